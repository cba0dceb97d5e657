"""Triton kernels of the fused PerCE loss (CUDA; Triton's interpreter runs them on CPU tensors for tests).

Cut Cross-Entropy's recipe: the forward pass keeps per-token log-sum-exp over vocabulary tiles (online softmax) and
never writes a logit; the backward pass recomputes each [BLOCK_N, BLOCK_V] logits tile, turns it into
c_t * (softmax - onehot(y_t)) with c_t = grad * w_t / n_valid (each row scaled by its weight *before* the products),
and accumulates its dh and dW products with fp32 atomics. Extra memory: O(N) besides the fp32 gradient buffers.

Tiles are loaded in their dtype and multiplied in fp32: "ieee" products for fp32 inputs, tf32 tensor cores for
bf16/fp16 ones (tf32 holds bf16 and fp16 values exactly, and Triton's interpreter has no bf16 tl.dot).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from localpers.kernels.perce_weights import percontrast_weights

BLOCK_N, BLOCK_V, BLOCK_D = 64, 128, 64
VOCAB_PER_PROGRAM = 4 * BLOCK_V  # forward: each program covers this many vocabulary entries of BLOCK_N rows


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of h @ w.T (0 outside the matrix)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_ptr + rows[:, None] * stride_h + dims[None, :],
                    mask=(rows[:, None] < N) & (dims[None, :] < D), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + dims[None, :],
                    mask=(cols[:, None] < V) & (dims[None, :] < D), other=0.0)
        acc = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _partial_logsumexp_kernel(h_ptr, w_ptr, out_ptr, N, V, D, stride_h, stride_w, n_splits,
                              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                              VOCAB_PER_PROGRAM: tl.constexpr, PRECISION: tl.constexpr):
    """out[n, split] = log-sum-exp of row n's logits over the split's vocabulary range (online softmax)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    v_start = split * VOCAB_PER_PROGRAM
    running_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, tl.minimum(v_start + VOCAB_PER_PROGRAM, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        logits = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w,
                              BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        logits = tl.where(cols[None, :] < V, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
    tl.store(out_ptr + rows * n_splits + split, running_max + tl.log(running_sum), mask=rows < N)


@triton.jit
def _backward_kernel(h_ptr, w_ptr, targets_ptr, lse_ptr, coef_ptr, dh_ptr, dw_ptr, N, V, D, stride_h, stride_w,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                     COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr):
    """dh += G @ w and dW += G.T @ h for one tile of G = coef * (softmax - onehot(target))."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < N, cols < V
    logits = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)  # 0 for ignored and padding rows
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    onehot = (cols[None, :] == target[:, None]).to(tl.float32)
    grad = coef[:, None] * (tl.exp(logits - lse[:, None]) - onehot)
    grad = tl.where(col_ok[None, :], grad, 0.0)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        if COMPUTE_DH:
            w = tl.load(w_ptr + cols[:, None] * stride_w + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                        other=0.0)
            tl.atomic_add(dh_ptr + rows[:, None] * D + dims[None, :],
                          tl.dot(grad, w.to(tl.float32), input_precision=PRECISION),
                          mask=row_ok[:, None] & dim_ok[None, :])
        if COMPUTE_DW:
            h = tl.load(h_ptr + rows[:, None] * stride_h + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                        other=0.0)
            tl.atomic_add(dw_ptr + cols[:, None] * D + dims[None, :],
                          tl.dot(tl.trans(grad), h.to(tl.float32), input_precision=PRECISION),
                          mask=col_ok[:, None] & dim_ok[None, :])


def _precision(*tensors) -> str:
    return "ieee" if all(t.dtype == torch.float32 for t in tensors) else "tf32"


def logsumexp_rows(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-row log-sum-exp of h @ weight.T [N] in fp32, without materializing the product."""
    (n, d), v = h.shape, weight.shape[0]
    n_splits = triton.cdiv(v, VOCAB_PER_PROGRAM)
    partial = torch.empty(n, n_splits, dtype=torch.float32, device=h.device)
    _partial_logsumexp_kernel[(triton.cdiv(n, BLOCK_N), n_splits)](
        h, weight, partial, n, v, d, h.stride(0), weight.stride(0), n_splits,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, VOCAB_PER_PROGRAM=VOCAB_PER_PROGRAM,
        PRECISION=_precision(h, weight))
    return partial.logsumexp(1)


def _target_logits(h, weight, safe_targets):
    """<h_t, weight[y_t]> in fp32: the target logit by an indexed dot."""
    return (h.float() * weight[safe_targets].float()).sum(1)


class PerCETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_pos, h_neg, weight, targets, token_weights, min_weight, max_weight, ignore_index):
        h_pos, weight = h_pos.contiguous(), weight.contiguous()
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        n_valid = valid.sum().clamp(min=1)
        lse_pos = logsumexp_rows(h_pos, weight)
        logp_pos = _target_logits(h_pos, weight, safe_targets) - lse_pos
        if h_neg is not None:
            h_neg = h_neg.contiguous()
            logp_neg = _target_logits(h_neg, weight, safe_targets) - logsumexp_rows(h_neg, weight)
            weights, pir = percontrast_weights(logp_pos, logp_neg, valid, min_weight, max_weight)
        else:
            weights, pir = torch.where(valid, token_weights.float(), 0.0), None
        loss = -(weights * logp_pos).sum() / n_valid
        nll = torch.where(valid, -logp_pos, 0.0)
        ctx.save_for_backward(h_pos, weight, safe_targets, lse_pos, weights / n_valid)
        ctx.mark_non_differentiable(weights, nll, *([pir] if pir is not None else []))
        return loss, weights, pir, nll

    @staticmethod
    def backward(ctx, grad_loss, *_):
        h, weight, safe_targets, lse, coef = ctx.saved_tensors
        need_dh, _, need_dw = ctx.needs_input_grad[:3]
        (n, d), v = h.shape, weight.shape[0]
        dh = torch.zeros(n, d if need_dh else 0, dtype=torch.float32, device=h.device)
        dw = torch.zeros(v, d if need_dw else 0, dtype=torch.float32, device=h.device)
        if need_dh or need_dw:
            _backward_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(v, BLOCK_V))](
                h, weight, safe_targets, lse, coef * grad_loss, dh, dw, n, v, d, h.stride(0), weight.stride(0),
                BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, PRECISION=_precision(h, weight),
                COMPUTE_DH=need_dh, COMPUTE_DW=need_dw)
        return (dh.to(h.dtype) if need_dh else None, None, dw.to(weight.dtype) if need_dw else None,
                None, None, None, None, None)
