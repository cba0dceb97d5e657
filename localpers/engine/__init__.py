"""The engine layer: the one llama.cpp model and context that serves every request.

Owns: generation and scoring with per-request LoRA adapters and control vectors (engine), the per-user KV-state cache
(kvcache), and llama.cpp's tokenizer seen through chat templates (tokenizer).
May import: localpers.names, localpers.errors, localpers.model.
"""
