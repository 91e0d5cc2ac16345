"""Naive float64 references of the core API contract (materialised logits; for tests and benchmarks).

Everything is computed in float64 from the given tensors (upcast), with autograd: pass float64 leaf
tensors that require grad to get reference gradients.
"""

from __future__ import annotations

import torch


def _log_softmax64(
    hidden: torch.Tensor, weight: torch.Tensor, temperature: float, round_to: torch.dtype | None = None
) -> torch.Tensor:
    """float64 (..., V) ``log_softmax(hidden @ weight.T / T)`` on materialised logits.

    ``round_to``: the logits are rounded to this dtype first (the contract of ``logits_dtype="input"``),
    with the rounding's derivative taken as 1 (straight through), as the kernels' backward does.
    """
    z = hidden.double() @ weight.double().t()
    if round_to is not None:
        z = z + (z.detach().to(round_to).double() - z.detach())
    return torch.log_softmax(z / temperature, dim=-1)


def reference_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    round_to: torch.dtype | None = None,
) -> torch.Tensor:
    """float64 (...) ``log_softmax(hidden @ weight.T / T)[label]``, 0.0 where ``label == ignore_index``.

    ``round_to``: round the logits to this dtype first (see ``_log_softmax64``)."""
    valid = labels != ignore_index
    lp = (
        _log_softmax64(hidden, weight, temperature, round_to)
        .gather(-1, torch.where(valid, labels, 0).unsqueeze(-1))
        .squeeze(-1)
    )
    return torch.where(valid, lp, torch.zeros_like(lp))


def reference_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    round_to: torch.dtype | None = None,
) -> torch.Tensor:
    """float64 (...) ``-sum_v p_v log p_v`` of ``softmax(hidden @ weight.T / T)``, 0.0 at ignored tokens."""
    logp = _log_softmax64(hidden, weight, temperature, round_to)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(labels != ignore_index, ent, torch.zeros_like(ent))


def _clip_objective(
    ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float
) -> torch.Tensor:
    """f(r, A) = -min(r*A, clip(r, 1-clip_low, 1+clip_high)*A), written literally."""
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv)


def reference_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    seq_ids: torch.Tensor | None = None,
    importance_level: str = "token",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    reduction: str = "sequence_mean",
    temperature: float = 1.0,
    ignore_index: int = -100,
    round_to: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Float64 loss, logps, clip_fraction, mean_ratio of ``linear_ppo_loss`` by a per-sequence Python loop.

    Sequences: ``seq_ids`` when given, else the rows of a (B, T, H) ``hidden``, else one sequence.
    Raises ValueError when the advantage varies within a sequence at the sequence levels.
    """
    logps = reference_logprobs(
        hidden, weight, labels, temperature=temperature, ignore_index=ignore_index, round_to=round_to
    )
    flat_lp = logps.reshape(-1)
    y = labels.reshape(-1)
    old = old_logps.reshape(-1).double()
    adv = advantages.reshape(-1).double()
    if seq_ids is not None:
        sid = seq_ids.reshape(-1)
    elif hidden.dim() >= 3:
        sid = torch.arange(y.numel() // labels.shape[-1]).repeat_interleave(labels.shape[-1])
    else:
        sid = torch.zeros_like(y)
    per_seq, clipped, ratios, counts = [], [], [], []
    for s in torch.unique(sid).tolist():
        idx = ((sid == s) & (y != ignore_index)).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        d = flat_lp[idx] - old[idx]
        a = adv[idx]
        ratios.append(torch.exp(d.mean().detach()))
        if importance_level == "token":
            r = torch.exp(d)
            l_t = _clip_objective(r, a, clip_low, clip_high)
            c_t = ((a > 0) & (r > 1 + clip_high)) | ((a < 0) & (r < 1 - clip_low))
            per_seq.append(l_t)
            clipped.append(c_t)
            counts.append(idx.numel())
        else:
            if not bool((a == a[0]).all()):
                raise ValueError(f"advantage varies inside sequence {s}")
            log_r = d.sum() if importance_level == "sequence" else d.mean()
            r = torch.exp(log_r)
            per_seq.append(_clip_objective(r, a[0], clip_low, clip_high).reshape(1))
            clipped.append(
                (((a[0] > 0) & (r > 1 + clip_high)) | ((a[0] < 0) & (r < 1 - clip_low))).reshape(1)
            )
            counts.append(1)
    zero = flat_lp.sum() * 0.0
    if not per_seq:
        loss, clip_fraction, mean_ratio = zero, zero.detach(), zero.detach()
    else:
        if importance_level == "token" and reduction == "token_mean":
            loss = torch.cat(per_seq).mean()
        else:
            loss = torch.stack([x.mean() for x in per_seq]).mean()
        all_c = torch.cat(clipped).double()
        clip_fraction = all_c.mean()
        mean_ratio = torch.stack(ratios).mean()
    return {"loss": loss, "logps": logps, "clip_fraction": clip_fraction, "mean_ratio": mean_ratio}
