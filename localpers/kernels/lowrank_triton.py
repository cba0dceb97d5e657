"""Triton kernels of rank-r edits (CUDA; Triton's interpreter runs them on CPU tensors for tests).

- _apply_lowrank_kernel: W += scale * U @ V.T in place, one [BLOCK_M, BLOCK_N] tile of W per program, products
  summed in fp32 ("ieee" for fp32 U and V; tf32 tensor cores for bf16/fp16 ones, which tf32 holds exactly).
- _edit_to_q8_0_kernel: reads GGUF blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), dequantizes, adds the rank-r update and
  writes Q8_0 blocks, with the float operations of localpers.model.quant.edit_to_q8_0_numpy in the same order: gguf's
  dequantizers, the update summed one rank at a time, gguf's Q8_0 quantizer. Launched with enable_fp_fusion=False
  (no FMA contraction) and div_rn (IEEE division), so every operation rounds as numpy's float32 does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as Q

BLOCK_M, BLOCK_N, BLOCK_R = 64, 64, 16
Q8_0_BLOCKS_PER_PROGRAM = 8  # 256 columns: one Q4_K / Q6_K super-block

QTYPE_Q8_0: tl.constexpr = tl.constexpr(int(Q.Q8_0))
QTYPE_Q4_0: tl.constexpr = tl.constexpr(int(Q.Q4_0))
QTYPE_Q4_1: tl.constexpr = tl.constexpr(int(Q.Q4_1))
QTYPE_Q4_K: tl.constexpr = tl.constexpr(int(Q.Q4_K))
QTYPE_Q5_K: tl.constexpr = tl.constexpr(int(Q.Q5_K))
QTYPE_Q6_K: tl.constexpr = tl.constexpr(int(Q.Q6_K))


@triton.jit
def _apply_lowrank_kernel(w_ptr, u_ptr, v_ptr, M, N, R, stride_wm, stride_wn, stride_u, stride_v, scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                          PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    update = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        u = tl.load(u_ptr + rows[:, None] * stride_u + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R),
                    other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_v + ranks[None, :], mask=(cols[:, None] < N) & (ranks[None, :] < R),
                    other=0.0)
        update = tl.dot(u.to(tl.float32), tl.trans(v.to(tl.float32)), update, input_precision=PRECISION)
    ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wm + cols[None, :] * stride_wn
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    w = tl.load(ptrs, mask=inside)
    tl.store(ptrs, (w.to(tl.float32) + scale * update).to(w.dtype), mask=inside)


def apply_lowrank_triton_(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, scale: float) -> torch.Tensor:
    U, V = U.contiguous(), V.contiguous()
    (m, n), r = W.shape, U.shape[1]
    precision = "ieee" if U.dtype == V.dtype == torch.float32 else "tf32"
    _apply_lowrank_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))](
        W, U, V, m, n, r, W.stride(0), W.stride(1), U.stride(0), V.stride(0), float(scale),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, PRECISION=precision)
    return W


@triton.jit
def _fp16_at(byte_ptrs, mask):
    """fp32 value of the little-endian fp16 at each (2-byte aligned) address."""
    return tl.load(byte_ptrs.to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _byte_at(byte_ptrs, mask):
    return tl.load(byte_ptrs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _dequantize(row_ptr, cols, mask, QTYPE: tl.constexpr):
    """float32 weights at `cols` of one row of GGUF blocks, as gguf.quants' dequantize_blocks computes them."""
    if QTYPE == QTYPE_Q8_0:  # 34-byte blocks of 32: d (fp16), 32 x int8
        block = row_ptr + (cols // 32) * 34
        q = _byte_at(block + 2 + cols % 32, mask).to(tl.int8).to(tl.float32)
        return q * _fp16_at(block, mask)
    elif QTYPE == QTYPE_Q4_0:  # 18-byte blocks of 32: d, 16 bytes of nibbles (low nibbles first); w = d * (q - 8)
        block = row_ptr + (cols // 32) * 18
        within = cols % 32
        q = (_byte_at(block + 2 + within % 16, mask) >> (within // 16 * 4)) & 0xF
        return _fp16_at(block, mask) * (q - 8).to(tl.float32)
    elif QTYPE == QTYPE_Q4_1:  # 20-byte blocks of 32: d, m, 16 bytes of nibbles; w = d * q + m
        block = row_ptr + (cols // 32) * 20
        within = cols % 32
        q = (_byte_at(block + 4 + within % 16, mask) >> (within // 16 * 4)) & 0xF
        return _fp16_at(block, mask) * q.to(tl.float32) + _fp16_at(block + 2, mask)
    elif QTYPE == QTYPE_Q4_K or QTYPE == QTYPE_Q5_K:
        # super-blocks of 256: d, dmin, 12 bytes of 6-bit scales and mins of 8 sub-blocks of 32, then Q4_K:
        # 128 bytes of nibbles (144 bytes); Q5_K: 32 bytes of 5th bits (bit j for sub-block j), the nibbles (176)
        block_bytes: tl.constexpr = 144 if QTYPE == QTYPE_Q4_K else 176
        nibbles_at: tl.constexpr = 16 if QTYPE == QTYPE_Q4_K else 48
        block = row_ptr + (cols // 256) * block_bytes
        within = cols % 256
        sub = within // 32
        a = _byte_at(block + 4 + sub % 4, mask)
        b = _byte_at(block + 8 + sub % 4, mask)
        c = _byte_at(block + 12 + sub % 4, mask)
        sc = tl.where(sub < 4, a & 63, (c & 0xF) | ((a >> 6) << 4))
        mn = tl.where(sub < 4, b & 63, (c >> 4) | ((b >> 6) << 4))
        q = (_byte_at(block + nibbles_at + sub // 2 * 32 + within % 32, mask) >> (sub % 2 * 4)) & 0xF
        if QTYPE == QTYPE_Q5_K:
            q = q | (((_byte_at(block + 16 + within % 32, mask) >> sub) & 1) << 4)
        d = _fp16_at(block, mask) * sc.to(tl.float32)
        dm = _fp16_at(block + 2, mask) * mn.to(tl.float32)
        return d * q.to(tl.float32) - dm
    else:  # Q6_K, 210-byte super-blocks of 256: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d
        tl.static_assert(QTYPE == QTYPE_Q6_K)
        block = row_ptr + (cols // 256) * 210
        within = cols % 256
        half, in_half = within // 128, within % 128
        low = (_byte_at(block + half * 64 + in_half % 64, mask) >> (in_half // 64 * 4)) & 0xF
        high = (_byte_at(block + 128 + half * 32 + in_half % 32, mask) >> (in_half // 32 * 2)) & 3
        sc = _byte_at(block + 192 + within // 16, mask).to(tl.int8).to(tl.float32)
        d = _fp16_at(block + 208, mask) * sc
        return d * ((low | (high << 4)) - 32).to(tl.float32)


@triton.jit
def _edit_to_q8_0_kernel(src_ptr, u_ptr, v_ptr, out_ptr, n_in, rank, src_row_bytes, scale,
                         QTYPE: tl.constexpr, BLOCKS: tl.constexpr):
    """One row, BLOCKS Q8_0 blocks of 32 columns: dequantize, add scale * sum_k U[row, k] V[col, k], quantize."""
    row = tl.program_id(0).to(tl.int64)
    blocks = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    cols = blocks[:, None] * 32 + tl.arange(0, 32)[None, :]
    block_ok = blocks * 32 < n_in
    mask = cols < n_in
    w = _dequantize(src_ptr + row * src_row_bytes, cols, mask, QTYPE)

    delta = tl.zeros([BLOCKS, 32], dtype=tl.float32)
    for k in range(rank):  # one rank at a time, product then add, like the numpy reference
        delta += tl.load(u_ptr + row * rank + k) * tl.load(v_ptr + cols * rank + k, mask=mask, other=0.0)
    w = w + scale * delta

    # gguf's Q8_0: d = amax / 127, q = round-half-away(w / d) (as w * (1 / d)), d stored as fp16
    d = tl.math.div_rn(tl.max(tl.abs(w), axis=1), 127.0)
    inv_d = tl.where(d == 0, 0.0, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), d))
    scaled = w * inv_d[:, None]
    magnitude = tl.abs(scaled)
    rounded = tl.floor(magnitude) + tl.floor(2 * (magnitude - tl.floor(magnitude)))
    q = tl.where(scaled < 0, -rounded, rounded).to(tl.int8)

    out_row = out_ptr + row * (n_in // 32 * 34)
    tl.store((out_row + blocks * 34).to(tl.pointer_type(tl.float16)), d.to(tl.float16), mask=block_ok)
    tl.store(out_row + blocks[:, None] * 34 + 2 + tl.arange(0, 32)[None, :], q.to(tl.uint8, bitcast=True), mask=mask)


def edit_to_q8_0_triton_kernel(data: torch.Tensor, qtype: Q, n_out: int, n_in: int, row_bytes: int,
                               U: torch.Tensor, V: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty(n_out, n_in // 32 * 34, dtype=torch.uint8, device=data.device)
    grid = (n_out, triton.cdiv(n_in // 32, Q8_0_BLOCKS_PER_PROGRAM))
    _edit_to_q8_0_kernel[grid](data, U, V, out, n_in, U.shape[1], row_bytes, float(scale),
                               QTYPE=int(qtype), BLOCKS=Q8_0_BLOCKS_PER_PROGRAM, enable_fp_fusion=False)
    return out
