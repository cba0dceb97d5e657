"""Applying a rank-r edit W += scale * U @ V.T: to float weights in place, or fused into quantized GGUF data.

The Triton kernels (CUDA) live in localpers.kernels.lowrank_triton, imported only when used; on CPU tensors
apply_lowrank_ is torch's addmm_ and the quantized edit is localpers.model.quant.edit_to_q8_0 (C++). Triton on CPU tensors
runs in Triton's interpreter, which needs TRITON_INTERPRET=1 before Triton is first imported (tests do that).
"""
from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from localpers.errors import UserError

EDIT_SOURCE_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def _check_factors(n_out, n_in, U, V):
    if U.ndim != 2 or V.ndim != 2 or U.shape[0] != n_out or V.shape[0] != n_in or U.shape[1] != V.shape[1]:
        raise ValueError(f"U {tuple(U.shape)} and V {tuple(V.shape)} do not fit W [{n_out}, {n_in}]: "
                         "need U [n_out, r] and V [n_in, r]")


def apply_lowrank_(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, scale: float = 1.0,
                   *, backend: str | None = None) -> torch.Tensor:
    """In place W += scale * U @ V.T (W [n_out, n_in], U [n_out, r], V [n_in, r]); returns W.

    backend: "triton" (default for CUDA; fp32/bf16/fp16 W, products accumulated in fp32) or "torch" (default on CPU).
    """
    _check_factors(*W.shape, U, V)
    backend = backend or ("triton" if W.is_cuda else "torch")
    if backend == "triton":
        from localpers.kernels.lowrank_triton import apply_lowrank_triton_

        return apply_lowrank_triton_(W, U, V, scale)
    if backend != "torch":
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    return W.addmm_(U.to(W.dtype), V.to(W.dtype).T, alpha=scale)


def edit_to_q8_0_triton(data: torch.Tensor, qtype, shape, U: torch.Tensor, V: torch.Tensor,
                        scale: float = 1.0) -> torch.Tensor:
    """Triton counterpart of localpers.model.quant.edit_to_q8_0, on torch tensors: Q8_0 bytes [n_out, n_in / 32 * 34]
    (uint8) of dequant(W) + scale * U @ V.T, W [n_out, n_in] given as raw GGUF data of type `qtype` (uint8).
    Byte-identical to localpers.model.quant.edit_to_q8_0_numpy (the kernel repeats its float32 operations in order)."""
    qtype = Q(qtype)
    n_out, n_in = (int(s) for s in shape)
    if qtype not in EDIT_SOURCE_TYPES:
        raise UserError(f"the Triton Q8_0 edit reads {', '.join(t.name for t in EDIT_SOURCE_TYPES)}, not {qtype.name}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n_in % block_size:
        raise UserError(f"{qtype.name} tensor of shape {(n_out, n_in)}: n_in must be a multiple of {block_size}")
    row_bytes = n_in // block_size * type_size
    if data.dtype != torch.uint8 or data.numel() != n_out * row_bytes:
        raise UserError(f"{qtype.name} tensor of shape {(n_out, n_in)} needs {n_out * row_bytes} uint8 bytes, "
                        f"got {data.numel()} of {data.dtype}")
    _check_factors(n_out, n_in, U, V)
    from localpers.kernels.lowrank_triton import edit_to_q8_0_triton_kernel

    return edit_to_q8_0_triton_kernel(data.contiguous(), qtype, n_out, n_in, row_bytes,
                                      U.float().contiguous(), V.float().contiguous(), scale)
