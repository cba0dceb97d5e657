"""The personalization layer: history -> signals -> artifacts.

Owns: preference detection (detect), the method registry (methods), dataset readers (datasets) and the synthetic
world (world), answer matching (matching), Personalization Editing (editing), PerCE training (training) and LoGo
(logo). Code here makes artifacts (LoRA adapters, control vectors, prompt context); it never imports the server
(localpers.serve), the sync processes (localpers.sync), the evaluation (localpers.eval) or the command line.
May import: localpers.names, localpers.errors, localpers.kernels, localpers.model, localpers.engine, localpers.store.
"""
