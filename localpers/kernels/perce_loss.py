"""Fused output projection + PerCE cross-entropy: the loss of personalized training without the N x V logits.

PerContrast weighs each target token by how much the user profile raises its log-probability:
    pir_t = log p_pos(y_t) - log p_neg(y_t),   w_t = clip(pir_t, min_weight, max_weight)   (detached)
    PerCE = sum over valid t of w_t * (-log p_pos(y_t)) / n_valid
where p_pos comes from hidden states computed with the profile in context and p_neg without it.

Two backends behind one function:
- "torch" (CPU): an autograd.Function over chunks of rows and vocabulary tiles with an online softmax (flash
  attention's, the output weights being the values); each chunk leaves its gradients behind (the loss is a scalar,
  so backward only scales them by grad_output): extra memory O(N d + chunk_rows * tile), three GEMMs' worth of work
  (logits with and without the profile, the input gradient), in fp32 or, for bf16 inputs or under bf16 autocast,
  in bf16 (Liger-Kernel's recipe).
- "triton" (CUDA, localpers.kernels.perce_triton): Cut Cross-Entropy's recipe, per-token log-sum-exp over vocabulary
  tiles forward, tiles recomputed backward; extra memory O(N). Triton is imported only when this backend is used.
"""
from __future__ import annotations

import torch

from localpers.kernels.perce_weights import percontrast_weights

CHUNK_ROWS = 512  # rows per chunk: the output weights are read once per chunk and pass
VOCAB_TILE = 2048  # columns per logits tile: 512 x 2048 fp32 = 4 MiB, in cache from its GEMM to its softmax

# torch's CPU flash attention: out = softmax(q k^T * scale) v and its log-sum-exp, one fused kernel (fp32 here:
# its bf16 path upcasts on CPUs without AMX). A private op: the tiled loop below stands in where a torch lacks it.
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def compute_dtype(h_pos: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMM dtype of the CPU path: bf16 when h_pos or weight is bf16 or bf16 autocast is on for their device
    (as torch.nn.functional.linear would), fp32 otherwise (fp16 inputs are upcast: CPUs have no fast fp16 GEMM)."""
    autocast = (torch.is_autocast_enabled(h_pos.device.type)
                and torch.get_autocast_dtype(h_pos.device.type) == torch.bfloat16)
    return torch.bfloat16 if autocast or torch.bfloat16 in (h_pos.dtype, weight.dtype) else torch.float32


def perce_linear_cross_entropy(h_pos, h_neg, weight, targets, min_weight=0.8, max_weight=5.0, ignore_index=-100,
                               token_weights=None, *, return_pir=False, return_nll=False, backend=None):
    """PerCE loss of the logits h_pos @ weight.T, never materialized. Returns (loss, token_weights).

    h_pos [N, d] (may require grad), weight [V, d] (may require grad), targets [N] (ignore_index marks positions
    that do not count). Exactly one of:
    - h_neg [N, d]: PerContrast weights from the same positions without the profile (no gradient flows to it);
    - token_weights [N]: plain weighted cross-entropy (all ones: the usual mean cross-entropy).
    The returned token weights are detached, fp32, 0 at ignored positions. With return_pir=True the result is
    (loss, token_weights, pir), pir being None in the plain weighted mode; with return_nll=True the per-token
    -log p(y_t) [N] (detached, fp32, 0 at ignored positions) is appended, so that a trainer logging the plain
    cross-entropy beside the weighted loss needs no second pass over the vocabulary.
    Dtypes: fp32 (or fp16) h_pos and weight go the exact fp32 way; bf16 ones, or bf16 autocast on their device,
    take bf16 GEMMs on the CPU path (PerCEChunked) and tf32 tiles on the Triton one.
    backend: "triton" or "torch"; by default Triton for CUDA tensors and torch otherwise. "triton" on CPU tensors
    needs TRITON_INTERPRET=1 set before Triton is first imported (Triton's interpreter; for tests).
    """
    if (h_neg is None) == (token_weights is None):
        raise ValueError("pass exactly one of h_neg (PerContrast weights) and token_weights (plain weighted mode)")
    n, d = h_pos.shape
    if weight.ndim != 2 or weight.shape[1] != d or targets.shape != (n,):
        raise ValueError(f"shapes do not fit: h_pos {tuple(h_pos.shape)}, weight {tuple(weight.shape)} "
                         f"(want [V, {d}]), targets {tuple(targets.shape)} (want [{n}])")
    for name, other in (("h_neg", h_neg), ("token_weights", token_weights)):
        if other is not None and other.shape[0] != n:
            raise ValueError(f"{name} has {other.shape[0]} rows, h_pos has {n}")
    if not torch.is_grad_enabled():  # no gradients to leave behind: spare the CPU path their computation
        h_pos, weight = h_pos.detach(), weight.detach()

    backend = backend or ("triton" if h_pos.is_cuda else "torch")
    if backend == "triton":
        from localpers.kernels.perce_triton import PerCETriton as function
    elif backend == "torch":
        function = PerCEChunked
    else:
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    args = h_pos, h_neg, weight, targets, token_weights, float(min_weight), float(max_weight), int(ignore_index)
    if backend == "torch":
        dtype = compute_dtype(h_pos, weight)
        with torch.autocast(h_pos.device.type, enabled=False):  # the path chooses each product's dtype itself
            loss, used_weights, pir, nll = function.apply(*args, dtype)
    else:
        loss, used_weights, pir, nll = function.apply(*args)
    return (loss, used_weights) + ((pir,) if return_pir else ()) + ((nll,) if return_nll else ())


def _softmax_tile(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out := softmax of the rows of the fp32 logits tile z [r, T] (torch's fused kernel, with its vectorized exp);
    returns the rows' log-sum-exp [r] = max - log(max softmax), the max softmax being 1 / sum exp(z - max)."""
    torch.softmax(z, 1, out=out)
    return z.amax(1) - out.amax(1).log_()


class PerCEChunked(torch.autograd.Function):
    """CPU path: rows in chunks of CHUNK_ROWS, each chunk's logits in vocabulary tiles of VOCAB_TILE columns that
    stay in cache, the gradients computed during the forward pass (the loss is a scalar, so backward only scales
    them by grad_output).

    The gradient to h is c_t * (softmax(h W^T) W - W[y_t]), c_t = w_t / n_valid: flash attention with the output
    weights as keys and values. fp32: torch's fused CPU kernel (FLASH_CPU) gives softmax(h W^T) W and the
    log-sum-exp in one pass. Otherwise (bf16, or no FLASH_CPU) the same online softmax here: each tile's GEMM, its
    softmax and log-sum-exp while it is in cache, then softmax(tile) @ W[tile] into a [rows, d] accumulator that is
    rescaled as the running log-sum-exp grows; the target's own column is left out of the products and
    (p_t - 1) W[y_t] added in fp32 at the end, so a confident token (p_t -> 1) keeps its small gradient. The logits
    without the profile only need their log-sum-exp (one GEMM). The target logits are dot products [rows].
    No [rows, V] buffer. The gradient of the weight, when asked for, recomputes the chunk's logits tiles with the
    final log-sum-exp (one more logits GEMM, as Cut Cross-Entropy's backward); LoRA training leaves the output
    weights frozen and never pays it.

    bf16 (dtype=torch.bfloat16): Liger-Kernel's recipe on CPU. The GEMMs take bf16 operands (oneDNN: AVX512-BF16 or
    AMX where the CPU has them, fp32 accumulation inside); torch has no bf16 x bf16 -> fp32 GEMM on CPU, so each
    logit and each tile's product is rounded to bf16 once (the target logit too, as the GEMM rounds it, so that
    log p_t <= 0 holds). Softmax, log-sum-exp, PIR, weights, loss and the accumulators are fp32; the softmax tile is
    rounded to bf16 for its GEMM.
    """

    @staticmethod
    def forward(ctx, h_pos, h_neg, weight, targets, token_weights, min_weight, max_weight, ignore_index, dtype):
        need_dh, _, need_dw = ctx.needs_input_grad[:3]
        device, low = h_pos.device, dtype != torch.float32
        W = weight.to(dtype).contiguous()  # no copy when the weight has this dtype and layout already
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        n_valid = valid.sum().clamp(min=1)
        (n, d), v = h_pos.shape, W.shape[0]

        nll = torch.empty(n, dtype=torch.float32, device=device)
        if token_weights is None:
            weights, pir = torch.empty_like(nll), torch.empty_like(nll)
        else:
            weights, pir = torch.where(valid, token_weights.float(), 0.0), None
        dh = torch.empty(h_pos.shape, dtype=torch.float32, device=device) if need_dh else None
        dW = torch.zeros(W.shape, dtype=torch.float32, device=device) if need_dw else None

        rows, width = min(n, CHUNK_ROWS), min(v, VOCAB_TILE)
        z_buffer = torch.empty(rows, width, dtype=torch.float32, device=device)
        p_buffer = torch.empty_like(z_buffer)
        low_buffer = torch.empty(rows, width, dtype=dtype, device=device) if low else None
        product = torch.empty(rows, d, dtype=torch.float32, device=device)  # softmax(tile) @ W[tile]

        def tiles(h):
            """Yield (first column, fp32 logits tile h @ W[columns].T [r, width])."""
            for j in range(0, v, width):
                z = z_buffer[:len(h), :min(width, v - j)]
                if low:
                    z.copy_(torch.mm(h, W[j:j + width].T, out=low_buffer[:len(h), :z.shape[1]]))
                else:
                    torch.mm(h, W[j:j + width].T, out=z)
                yield j, z

        def rows_by_tile(t):
            """For each vocabulary tile, the rows [k] whose target falls in it and those targets' columns there."""
            tile_of = torch.div(t, width, rounding_mode="floor")
            order = torch.argsort(tile_of, stable=True)
            ends = torch.bincount(tile_of, minlength=-(-v // width)).cumsum(0).tolist()
            return [(order[a:b], t[order[a:b]] - i * width) for i, (a, b) in enumerate(zip([0] + ends[:-1], ends))]

        def log_softmax_at(h, t, with_gradient):
            """(log softmax of h @ W.T at t [r], its log-sum-exp [r], and with_gradient softmax(h @ W.T) @ W - W[t]
            [r, d], the gradient of -log softmax at t with respect to h)."""
            r = len(h)
            # the target logits as the GEMM gives them (rounded to its dtype), so that log p <= 0 holds
            target_logit = (h.float() * W[t].float()).sum(1).to(dtype).float()
            if with_gradient and not low and FLASH_CPU is not None and device.type == "cpu":
                # torch's fused kernel: out = softmax(h W^T) W (cancelling W[t] in fp32 is harmless)
                out, lse = FLASH_CPU(h[None, None], W[None, None], W[None, None], scale=1.0)
                return target_logit - lse[0, 0], lse[0, 0], out[0, 0].sub_(W[t])
            run_lse = torch.full((r,), float("-inf"), dtype=torch.float32, device=device)
            acc = torch.zeros(r, d, dtype=torch.float32, device=device) if with_gradient else None
            targets_in = rows_by_tile(t) if with_gradient else None
            for i, (j, z) in enumerate(tiles(h)):
                p = p_buffer[:r, :z.shape[1]]
                tile_lse = _softmax_tile(z, p)
                new_lse = torch.logaddexp(run_lse, tile_lse)
                if with_gradient:
                    # the target's own term joins exactly at the end: sum over v != t of p_v W_v is well conditioned
                    # when p_t -> 1, where rounding (~W[t] + gradient) to bf16 before subtracting W[t] would not be
                    k, local = targets_in[i]
                    if len(k):
                        p[k, local] = 0.0
                    if low:
                        product[:r].copy_(torch.mm(low_buffer[:r, :z.shape[1]].copy_(p), W[j:j + width]))
                    else:
                        torch.mm(p, W[j:j + width], out=product[:r])
                    rescale, tile_share = (run_lse - new_lse).exp_(), (tile_lse - new_lse).exp_()
                    acc.mul_(rescale[:, None]).addcmul_(product[:r], tile_share[:, None])
                run_lse = new_lse
            logp = target_logit - run_lse
            if not with_gradient:
                return logp, run_lse, None
            return logp, run_lse, acc.addcmul_(weight[t].float(), logp.expm1()[:, None])

        for start in range(0, n, CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            t = safe_targets[rows]
            if h_neg is not None:
                logp_neg = log_softmax_at(h_neg[rows].to(dtype).contiguous(), t, False)[0]
            h = h_pos[rows].to(dtype).contiguous()
            logp_pos, lse, grad_direction = log_softmax_at(h, t, need_dh)
            nll[rows] = -logp_pos
            if h_neg is not None:
                weights[rows], pir[rows] = percontrast_weights(logp_pos, logp_neg, valid[rows], min_weight, max_weight)
            coef = weights[rows] / n_valid  # d loss / d logits = c_t * (softmax - onehot(y_t))
            if dh is not None:
                dh[rows] = grad_direction.mul_(coef[:, None])
            if dW is not None:  # the logits again, now that their log-sum-exp is known
                for (j, z), (k, local) in zip(tiles(h), rows_by_tile(t)):
                    z.sub_(lse[:, None]).exp_()  # the softmax
                    if len(k):
                        z[k, local] = logp_pos[k].expm1()  # p_t - 1, exact in fp32
                    z.mul_(coef[:, None])
                    if low:
                        dW[j:j + width] += torch.mm(low_buffer[:len(t), :z.shape[1]].copy_(z).T, h)
                    else:
                        dW[j:j + width].addmm_(z.T, h)

        nll = torch.where(valid, nll, 0.0)
        loss = (weights * nll).sum() / n_valid
        ctx.save_for_backward(dh, dW)
        ctx.dtypes = h_pos.dtype, weight.dtype
        ctx.mark_non_differentiable(weights, nll, *([pir] if pir is not None else []))
        return loss, weights, pir, nll

    @staticmethod
    def backward(ctx, grad_loss, *_):
        dh, dW = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_h = (dh * grad_loss).to(h_dtype) if dh is not None else None
        grad_w = (dW * grad_loss).to(w_dtype) if dW is not None else None
        return grad_h, None, grad_w, None, None, None, None, None, None
