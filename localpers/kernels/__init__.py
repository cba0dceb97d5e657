"""Custom kernels of localpers, each beside its plain-torch reference (reference.py):

- perce_linear_cross_entropy: fused output projection + PerCE loss, no N x V logits (CPU: chunked torch; CUDA: Triton).
- apply_lowrank_: in-place W += scale * U @ V.T (CUDA: Triton; CPU: torch).
- edit_to_q8_0_triton: fused dequantize -> rank-r update -> Q8_0 requantize on CUDA, the GPU counterpart of
  localpers.model.quant.edit_to_q8_0.
"""
from localpers.kernels.lowrank import apply_lowrank_, edit_to_q8_0_triton
from localpers.kernels.perce_loss import perce_linear_cross_entropy

__all__ = ["apply_lowrank_", "edit_to_q8_0_triton", "perce_linear_cross_entropy"]
