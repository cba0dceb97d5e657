"""PerContrast token weights (PerCE, eq. 3): w_t = clip(log p(y_t | profile, x) - log p(y_t | x), min, max).

Shared by the loss dispatcher (perce_loss) and its Triton backend (perce_triton), so that neither imports the other
at module level."""
from __future__ import annotations

import torch


def percontrast_weights(logp_pos: torch.Tensor, logp_neg: torch.Tensor, valid: torch.Tensor,
                        min_weight: float, max_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token weights, PIR) of PerContrast; both are 0 at ignored positions."""
    pir = torch.where(valid, logp_pos - logp_neg, 0.0)
    return torch.where(valid, pir.clamp(min_weight, max_weight), 0.0), pir
