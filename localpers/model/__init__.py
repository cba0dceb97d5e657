"""The model layer: GGUF files and what they hold, with no llama.cpp runtime.

Owns: reading GGUF metadata (gguf_info), writing GGUF models, LoRA adapters and control vectors (gguf_write),
dequantization and the fused Q8_0 edit (quant, with the C++ extension localpers._cpu), the torch transformer that
computes what llama.cpp computes (model), and chat templates (chat).
May import: localpers.names, localpers.errors, localpers.kernels.
"""
