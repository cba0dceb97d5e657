"""Fused output projection + PerCE cross-entropy: the loss of personalized training without the N x V logits.

PerContrast weighs each target token by how much the user profile raises its log-probability:
    pir_t = log p_pos(y_t) - log p_neg(y_t),   w_t = clip(pir_t, min_weight, max_weight)   (detached)
    PerCE = sum over valid t of w_t * (-log p_pos(y_t)) / n_valid
where p_pos comes from hidden states computed with the profile in context and p_neg without it.

Two backends behind one function:
- "torch" (CPU): a chunked autograd.Function. Each chunk of rows goes once over the whole vocabulary and leaves its
  gradients behind (the loss is a scalar, so backward only scales them by grad_output): extra memory
  O(N + chunk_rows * V), and no second pass over the vocabulary.
- "triton" (CUDA, localpers.kernels.perce_triton): Cut Cross-Entropy's recipe, per-token log-sum-exp over vocabulary
  tiles forward, tiles recomputed backward; extra memory O(N). Triton is imported only when this backend is used.
"""
from __future__ import annotations

import torch

CHUNK_ROWS = 256  # 256 x 49152 fp32 logits = 48 MiB per chunk buffer


def percontrast_weights(logp_pos: torch.Tensor, logp_neg: torch.Tensor, valid: torch.Tensor,
                        min_weight: float, max_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token weights, PIR) of PerContrast; both are 0 at ignored positions."""
    pir = torch.where(valid, logp_pos - logp_neg, 0.0)
    return torch.where(valid, pir.clamp(min_weight, max_weight), 0.0), pir


def perce_linear_cross_entropy(h_pos, h_neg, weight, targets, min_weight=0.8, max_weight=5.0, ignore_index=-100,
                               token_weights=None, *, return_pir=False, backend=None):
    """PerCE loss of the logits h_pos @ weight.T, never materialized. Returns (loss, token_weights).

    h_pos [N, d] (may require grad), weight [V, d] (may require grad), targets [N] (ignore_index marks positions
    that do not count). Exactly one of:
    - h_neg [N, d]: PerContrast weights from the same positions without the profile (no gradient flows to it);
    - token_weights [N]: plain weighted cross-entropy (all ones: the usual mean cross-entropy).
    The returned token weights are detached, fp32, 0 at ignored positions. With return_pir=True the result is
    (loss, token_weights, pir), pir being None in the plain weighted mode.
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
    loss, used_weights, pir = function.apply(h_pos, h_neg, weight, targets, token_weights,
                                             float(min_weight), float(max_weight), int(ignore_index))
    return (loss, used_weights, pir) if return_pir else (loss, used_weights)


def _exp_and_logsumexp_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite logits [n, V] with exp(logits - row max); return the rows' log-sum-exp and sums of exp."""
    row_max = logits.amax(1)
    exp_sums = logits.sub_(row_max[:, None]).exp_().sum(1)
    return row_max + exp_sums.log(), exp_sums


class PerCEChunked(torch.autograd.Function):
    """CPU path: rows in chunks of CHUNK_ROWS, gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx, h_pos, h_neg, weight, targets, token_weights, min_weight, max_weight, ignore_index):
        need_dh, _, need_dw = ctx.needs_input_grad[:3]
        W = weight.float()  # no copy for fp32; bf16 weights are upcast once so every product accumulates in fp32
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        n_valid = valid.sum().clamp(min=1)
        n = h_pos.shape[0]

        nll = torch.empty(n, dtype=torch.float32, device=h_pos.device)
        if token_weights is None:
            weights, pir = torch.empty_like(nll), torch.empty_like(nll)
        else:
            weights, pir = torch.where(valid, token_weights.float(), 0.0), None
        dh = torch.zeros(h_pos.shape, dtype=torch.float32, device=h_pos.device) if need_dh else None
        dW = torch.zeros_like(W) if need_dw else None

        logits_buffer = torch.empty(min(n, CHUNK_ROWS), W.shape[0], dtype=torch.float32, device=h_pos.device)
        for start in range(0, n, CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            t = safe_targets[rows, None]
            logits = logits_buffer[:len(t)]
            if h_neg is not None:
                torch.mm(h_neg[rows].float(), W.T, out=logits)
                target_logit = logits.gather(1, t).squeeze(1)
                logp_neg = target_logit - _exp_and_logsumexp_(logits)[0]
            h = h_pos[rows].float()
            torch.mm(h, W.T, out=logits)
            target_logit = logits.gather(1, t).squeeze(1)
            lse, exp_sums = _exp_and_logsumexp_(logits)
            logp_pos = target_logit - lse
            nll[rows] = -logp_pos
            if h_neg is not None:
                weights[rows], pir[rows] = percontrast_weights(logp_pos, logp_neg, valid[rows], min_weight, max_weight)
            if dh is None and dW is None:
                continue
            # d loss / d logits = c_t * (softmax - onehot(y_t)) with c_t = w_t / n_valid, built in the logits buffer
            coef = weights[rows] / n_valid
            grad_logits = logits.mul_((coef / exp_sums)[:, None])
            grad_logits.scatter_add_(1, t, -coef[:, None])
            if dh is not None:
                torch.mm(grad_logits, W, out=dh[rows])
            if dW is not None:
                dW.addmm_(grad_logits.T, h)

        loss = (weights * nll).sum() / n_valid
        ctx.save_for_backward(dh, dW)
        ctx.dtypes = h_pos.dtype, weight.dtype
        ctx.mark_non_differentiable(weights, *([pir] if pir is not None else []))
        return loss, weights, pir

    @staticmethod
    def backward(ctx, grad_loss, *_):
        dh, dW = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_h = (dh * grad_loss).to(h_dtype) if dh is not None else None
        grad_w = (dW * grad_loss).to(w_dtype) if dW is not None else None
        return grad_h, None, grad_w, None, None, None, None, None
