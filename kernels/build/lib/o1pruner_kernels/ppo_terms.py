"""Per-token / per-sequence terms of the PPO-clip objective on float32 tensors (torch ops).

``f(exp(s), A) = -min(r*A, clip(r, 1-clip_low, 1+clip_high)*A)`` with its derivative in ``s = log r``.
Where A >= 0 the exponent is clamped at ``EXP_CLAMP`` before exp (for A > 0 the clipped branch is then
active and for A = 0 the term is 0, so the result is unchanged) and gradients use
``where(active, -A*r, 0)``, never ``0 * inf``.
"""

from __future__ import annotations

import torch

EXP_CLAMP = 60.0


def clip_objective_torch(s: torch.Tensor, A: torch.Tensor, clip_low: float, clip_high: float):
    """(loss f, d f / d s, clipped-branch mask), elementwise over float32 ``s`` (log-ratio) and ``A``."""
    e = torch.where(A >= 0, s.clamp(max=EXP_CLAMP), s)
    r = torch.exp(e)
    pos, neg = A > 0, A < 0
    zero = torch.zeros_like(r)
    loss = torch.where(
        pos, -A * r.clamp(max=1.0 + clip_high), torch.where(neg, -A * r.clamp(min=1.0 - clip_low), zero)
    )
    active = (pos & (r < 1.0 + clip_high)) | (neg & (r > 1.0 - clip_low))
    dlds = torch.where(active, -A * r, zero)
    clipped = (pos & (r > 1.0 + clip_high)) | (neg & (r < 1.0 - clip_low))
    return loss, dlds, clipped


def mean_ratio(ssum: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Mean over sequences with n > 0 of exp(ssum / n) (0.0 when there is none); float32 scalar."""
    has = n > 0
    inv_seq = 1.0 / has.sum().float().clamp(min=1.0)
    return torch.where(has, torch.exp(ssum / n.clamp(min=1.0)), 0.0).sum() * inv_seq
