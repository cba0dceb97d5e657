"""Dequantization of GGUF tensors and the fused rank-r edit into Q8_0 blocks.

The C++ extension `localpers._cpu` (csrc/) is the fast path; the `gguf` package's numpy code is the fallback
and the oracle the tests compare it with, bit for bit.
"""
from __future__ import annotations

from math import prod

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from localpers.errors import UserError

try:
    from localpers import _cpu
except ImportError:  # not built (e.g. a plain source checkout): numpy does the work
    _cpu = None

Q = GGMLQuantizationType
# Types both paths read; the edit reads them all too (it dequantizes each row with the same code).
DEQUANT_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def _raw_bytes(data: np.ndarray, qtype: GGMLQuantizationType, shape) -> tuple[np.ndarray, tuple[int, ...]]:
    """Check `data` against `shape`; return it as a flat contiguous uint8 array, and the shape as ints."""
    if qtype not in DEQUANT_TYPES:
        raise UserError(f"tensor type {getattr(qtype, 'name', qtype)} is not supported "
                        f"(supported: {', '.join(t.name for t in DEQUANT_TYPES)})")
    shape = tuple(int(s) for s in shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if not shape or shape[-1] % block_size:
        raise UserError(f"{qtype.name} tensor of shape {shape}: the row length must be a multiple of {block_size}")
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    expected = prod(shape) // block_size * type_size
    if raw.size != expected:
        raise UserError(f"{qtype.name} tensor of shape {shape} needs {expected} bytes, got {raw.size}")
    return raw, shape


def dequantize_numpy(data: np.ndarray, qtype: GGMLQuantizationType, shape) -> np.ndarray:
    """The gguf package's numpy dequantizer (fallback and oracle)."""
    raw, shape = _raw_bytes(data, qtype, shape)
    rows = raw.reshape(prod(shape[:-1]), -1)
    return np.asarray(gguf_quants.dequantize(rows, qtype), dtype=np.float32).reshape(shape)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType, shape) -> np.ndarray:
    """Dequantize raw GGUF tensor data (as GGUFReader gives it) of numpy shape `shape` to float32."""
    if _cpu is None:
        return dequantize_numpy(data, qtype, shape)
    raw, shape = _raw_bytes(data, qtype, shape)
    return _cpu.dequantize(raw, int(qtype), prod(shape)).reshape(shape)


def _check_edit(qtype, shape, U, V):
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f"the edited tensor must be 2-D [n_out, n_in], got shape {shape}")
    if shape[1] % 32:
        raise UserError(f"Q8_0 output needs n_in to be a multiple of 32, got shape {shape}")
    U = np.ascontiguousarray(U, dtype=np.float32)
    V = np.ascontiguousarray(V, dtype=np.float32)
    if U.ndim != 2 or V.ndim != 2 or U.shape[0] != shape[0] or V.shape[0] != shape[1] or U.shape[1] != V.shape[1]:
        raise ValueError(f"U {U.shape} and V {V.shape} do not fit W {shape}: need U [n_out, r] and V [n_in, r]")
    return shape, U, V


def edit_to_q8_0_numpy(data, qtype, shape, U, V, scale=1.0) -> np.ndarray:
    """Reference: quantize dequant(W) + scale * U @ V.T to Q8_0 with gguf's quantizer, in float32.

    What byte identity rests on:
    - U @ V.T is summed one rank at a time (k = 0, 1, ...), product then add, each rounded to float32. A BLAS
      matmul sums in its own order with FMA (OpenBLAS differs from this sum in about half the elements at
      r = 8), so the literal formula is only reproducible for r = 1, where both are one product.
    - gguf's Q8_0 quantizer (like ggml's quantize_row_q8_0_ref) takes d = amax / 127 in float32, multiplies
      by id = 1 / d (not a division by d), rounds half away from zero (np_roundf, not np.round's half to
      even), and quantizes with the float32 d before storing d rounded to fp16.
    - Values must be finite: with NaN or inf in a block the bytes are unspecified.
    """
    shape, U, V = _check_edit(qtype, shape, U, V)
    W = dequantize_numpy(data, qtype, shape)
    delta = np.zeros(shape, dtype=np.float32)
    for k in range(U.shape[1]):
        delta += np.outer(U[:, k], V[:, k])
    return gguf_quants.quantize(W + np.float32(scale) * delta, Q.Q8_0)


# Byte offsets of the fp16 scale fields inside one block of each block type.
FP16_SCALE_OFFSETS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def random_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType, shape, scale: float | None = 0.002):
    """Valid random raw data of a `qtype` tensor, for tests and benchmarks: random bytes whose fp16 scale
    fields are scale * |N(0, 1)|, or (scale=None) any finite fp16 bit pattern, subnormals included."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = prod(shape) // block_size
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in FP16_SCALE_OFFSETS.get(qtype, []):
        if scale is None:
            h = rng.integers(0, 2**16, size=n_blocks, dtype=np.uint16)
            h[(h & 0x7C00) == 0x7C00] &= 0xBFFF  # exponent all ones (inf, NaN) -> finite
        else:
            h = (scale * np.abs(rng.standard_normal(n_blocks))).astype(np.float16).view(np.uint16)
        raw[:, offset:offset + 2] = h.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def edit_to_q8_0(data, qtype, shape, U, V, scale=1.0) -> np.ndarray:
    """Q8_0 bytes [n_out, n_in / 32 * 34] of dequant(W) + scale * U @ V.T, W [n_out, n_in] given as raw
    GGUF data of type `qtype`, U [n_out, r], V [n_in, r]. Byte-identical to `edit_to_q8_0_numpy`."""
    if _cpu is None:
        return edit_to_q8_0_numpy(data, qtype, shape, U, V, scale)
    shape, U, V = _check_edit(qtype, shape, U, V)
    raw, _ = _raw_bytes(data, qtype, shape)
    return _cpu.edit_to_q8_0(raw, int(qtype), shape[0], shape[1], U, V, float(scale))
