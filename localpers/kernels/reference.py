"""Plain-torch references for the kernels: obviously correct, memory-hungry, used by tests and benchmarks."""
from __future__ import annotations

import torch


def perce_linear_cross_entropy_reference(h_pos, h_neg, weight, targets, min_weight=0.8, max_weight=5.0,
                                         ignore_index=-100, token_weights=None):
    """PerCE with the N x V logits materialized in fp32; returns (loss, token_weights, pir)."""
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)[:, None]
    logp_pos = torch.log_softmax(h_pos.float() @ weight.float().T, dim=-1).gather(1, safe_targets).squeeze(1)
    if token_weights is None:
        with torch.no_grad():
            logp_neg = torch.log_softmax(h_neg.float() @ weight.float().T, dim=-1).gather(1, safe_targets).squeeze(1)
            pir = torch.where(valid, logp_pos - logp_neg, 0.0)
            token_weights = pir.clamp(min_weight, max_weight)
    else:
        pir = None
    token_weights = torch.where(valid, token_weights.detach().float(), 0.0)
    loss = -(token_weights * logp_pos).sum() / valid.sum().clamp(min=1)
    return loss, token_weights, pir


def apply_lowrank_reference(W, U, V, scale=1.0):
    """W + scale * U @ V.T, computed in fp32 and returned in W's dtype (W is left alone)."""
    return (W.float() + scale * (U.float() @ V.float().T)).to(W.dtype)
