"""Length-harmonizing PPO-clip loss on per-token log-probs, fused with the lm_head log-prob pass.

The loss depends on ``hidden`` only through the per-token log-probs ``logp_t``, so
``linear_ppo_loss`` = the ``linear_logprobs`` autograd op (cost 4*N*H*V for a frozen head) composed with a
cheap op on (N,) scalars, defined here. That op computes per sequence the number of valid tokens n_i and
S_i = sum_t d_t (d_t = logp_t - old_t), the clipped objective f(r, A) = -min(r*A, clip(r)*A) at the chosen
importance level, the loss, and d loss / d logp_t as per-token coefficients (the backward is one multiply).
With a trainable head at the token level the whole loss is one chunked pass instead (``ppo_token_fused``,
6*N*H*V FLOPs). Numerical safety of the objective: see ``ppo_terms``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import (
    HAS_TRITON,
    IGNORE_INDEX,
    check_logits_dtype,
    chunk_tokens,
    device_guard,
    resolve_backend,
)
from .linear_logprobs import check_ignore_index, flat_logprobs, prepare_inputs
from .ppo_terms import EXP_CLAMP, clip_objective_torch
from .ppo_terms import mean_ratio as mean_ratio_of
from .ppo_token_fused import fused_token_ppo_loss

IMPORTANCE_LEVELS = ("token", "sequence", "sequence_geomean")
REDUCTIONS = ("sequence_mean", "token_mean")
_BLOCK = 256


@dataclass
class PPOLossOutput:
    """Result of :func:`linear_ppo_loss`.

    loss: float32 scalar, differentiable. logps: float32 (labels.shape), detached, 0.0 at ignored tokens.
    clip_fraction: float32 scalar, detached: fraction of valid tokens (token level) or of sequences
    (sequence levels) whose clipped branch is active. mean_ratio: float32 scalar, detached: mean over
    sequences of exp(mean_t d_t). entropy: float32 (labels.shape), detached, 0.0 at ignored tokens, the
    per-token entropy of the softmax, when ``return_entropy=True`` (else None).
    """

    loss: torch.Tensor
    logps: torch.Tensor
    clip_fraction: torch.Tensor
    mean_ratio: torch.Tensor
    entropy: torch.Tensor | None = None


def _empty(*shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer (a seam: tests poison it with NaN to prove every element is written)."""
    return torch.empty(*shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------- triton
if HAS_TRITON:
    import triton
    import triton.language as tl

    EXP_CLAMP_TL = tl.constexpr(EXP_CLAMP)

    @triton.jit
    def _clip_objective(s, A, clip_low, clip_high):
        """f(exp(s), A) = -min(r*A, clip(r)*A), d f / d s, and whether the clipped branch is active."""
        e = tl.where(A >= 0, tl.minimum(s, EXP_CLAMP_TL), s)
        r = tl.exp(e)
        pos = A > 0
        neg = A < 0
        loss = tl.where(
            pos, -A * tl.minimum(r, 1.0 + clip_high), tl.where(neg, -A * tl.maximum(r, 1.0 - clip_low), 0.0)
        )
        active = (pos & (r < 1.0 + clip_high)) | (neg & (r > 1.0 - clip_low))
        dlds = tl.where(active, -A * r, 0.0)
        clipped = (pos & (r > 1.0 + clip_high)) | (neg & (r < 1.0 - clip_low))
        return loss, dlds, clipped

    @triton.jit
    def _segment_sums_kernel(logp_ptr, old_ptr, valid_ptr, sid_ptr, n_ptr, s_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        v = (tl.load(valid_ptr + offs, mask=m, other=0) != 0) & m
        d = tl.load(logp_ptr + offs, mask=v, other=0.0) - tl.load(old_ptr + offs, mask=v, other=0.0)
        sid = tl.load(sid_ptr + offs, mask=v, other=0)
        tl.atomic_add(s_ptr + sid, d, mask=v)
        tl.atomic_add(n_ptr + sid, tl.where(v, 1.0, 0.0), mask=v)

    @triton.jit
    def _ppo_token_kernel(
        logp_ptr, old_ptr, adv_ptr, valid_ptr, sid_ptr, n_ptr, scale_ptr,
        loss_ptr, coef_ptr, clip_ptr, N, clip_low, clip_high,
        SEQ_MEAN: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        v = (tl.load(valid_ptr + offs, mask=m, other=0) != 0) & m
        d = tl.load(logp_ptr + offs, mask=v, other=0.0) - tl.load(old_ptr + offs, mask=v, other=0.0)
        A = tl.load(adv_ptr + offs, mask=v, other=0.0)
        loss, dlds, clipped = _clip_objective(d, A, clip_low, clip_high)
        w = tl.load(scale_ptr)
        if SEQ_MEAN:
            sid = tl.load(sid_ptr + offs, mask=v, other=0)
            w = w / tl.load(n_ptr + sid, mask=v, other=1.0)
        tl.store(loss_ptr + offs, tl.where(v, w * loss, 0.0), mask=m)
        tl.store(coef_ptr + offs, tl.where(v, w * dlds, 0.0), mask=m)
        tl.store(clip_ptr + offs, tl.where(v & clipped, 1.0, 0.0), mask=m)

    @triton.jit
    def _ppo_seq_kernel(
        s_ptr, n_ptr, adv_ptr, scale_ptr, loss_ptr, coef_ptr, clip_ptr, ratio_ptr, S, clip_low, clip_high,
        GEOMEAN: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < S
        n = tl.load(n_ptr + offs, mask=m, other=0.0)
        has = (n > 0) & m
        n1 = tl.maximum(n, 1.0)
        ssum = tl.load(s_ptr + offs, mask=has, other=0.0)
        A = tl.load(adv_ptr + offs, mask=has, other=0.0)
        if GEOMEAN:
            s = ssum / n1
        else:
            s = ssum
        loss, dlds, clipped = _clip_objective(s, A, clip_low, clip_high)
        w = tl.load(scale_ptr)
        if GEOMEAN:
            dlds = dlds / n1
        tl.store(loss_ptr + offs, tl.where(has, w * loss, 0.0), mask=m)
        tl.store(coef_ptr + offs, tl.where(has, w * dlds, 0.0), mask=m)
        tl.store(clip_ptr + offs, tl.where(has & clipped, 1.0, 0.0), mask=m)
        tl.store(ratio_ptr + offs, tl.where(has, tl.exp(ssum / n1), 0.0), mask=m)

    @triton.jit
    def _gather_coef_kernel(coef_seq_ptr, valid_ptr, sid_ptr, coef_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        v = (tl.load(valid_ptr + offs, mask=m, other=0) != 0) & m
        sid = tl.load(sid_ptr + offs, mask=v, other=0)
        c = tl.load(coef_seq_ptr + sid, mask=v, other=0.0)
        tl.store(coef_ptr + offs, tl.where(v, c, 0.0), mask=m)


def _grid(n: int) -> tuple[int]:
    return (max(1, triton.cdiv(n, _BLOCK)),)


# ------------------------------------------------------------------------------------------------ torch
def _segment_sums(logp, old, valid, sid, num_seqs: int, backend: str):
    """(n (S,) float32 valid-token counts, S (S,) float32 sums of d_t over valid tokens)."""
    n = torch.zeros(num_seqs, dtype=torch.float32, device=logp.device)
    ssum = torch.zeros(num_seqs, dtype=torch.float32, device=logp.device)
    if backend == "triton":
        if logp.numel():
            with device_guard(logp.device):
                _segment_sums_kernel[_grid(logp.numel())](
                    logp, old, valid, sid, n, ssum, logp.numel(), BLOCK=_BLOCK
                )
    else:
        vb = valid.bool()
        n.index_add_(0, sid, vb.float())
        ssum.index_add_(0, sid, torch.where(vb, logp - old, 0.0))
    return n, ssum


def _ppo_forward(
    logp, old, adv, valid, sid, adv_seq, num_seqs, level, reduction, clip_low, clip_high, backend
):
    """(loss, coef (N,) = d loss / d logp, clip_fraction, mean_ratio); all float32."""
    device = logp.device
    N = logp.numel()
    vb = valid.bool()
    n, ssum = _segment_sums(logp, old, valid, sid, num_seqs, backend)
    has = n > 0
    num_seq = has.sum().float()
    inv_seq = 1.0 / num_seq.clamp(min=1.0)
    if level == "token":
        num_valid = n.sum()
        inv_valid = 1.0 / num_valid.clamp(min=1.0)
        scale = inv_seq if reduction == "sequence_mean" else inv_valid
        if backend == "triton":
            loss_t = _empty(N, dtype=torch.float32, device=device)
            coef = _empty(N, dtype=torch.float32, device=device)
            clip_t = _empty(N, dtype=torch.float32, device=device)
            if N:
                with device_guard(device):
                    _ppo_token_kernel[_grid(N)](
                        logp, old, adv, valid, sid, n, scale.reshape(1), loss_t, coef, clip_t, N,
                        float(clip_low), float(clip_high), SEQ_MEAN=reduction == "sequence_mean",
                        BLOCK=_BLOCK,
                    )  # fmt: skip
        else:
            d = torch.where(vb, logp - old, 0.0)
            a = torch.where(vb, adv, 0.0)
            lt, dl, cl = clip_objective_torch(d, a, clip_low, clip_high)
            w = scale / n.clamp(min=1.0)[sid] if reduction == "sequence_mean" else scale.expand(N)
            w = torch.where(vb, w, 0.0)
            loss_t, coef, clip_t = w * lt, w * dl, (cl & vb).float()
        loss = loss_t.sum()
        clip_fraction = clip_t.sum() * inv_valid
    else:
        geo = level == "sequence_geomean"
        if backend == "triton":
            loss_i = _empty(num_seqs, dtype=torch.float32, device=device)
            coef_i = _empty(num_seqs, dtype=torch.float32, device=device)
            clip_i = _empty(num_seqs, dtype=torch.float32, device=device)
            ratio_i = _empty(num_seqs, dtype=torch.float32, device=device)
            coef = _empty(N, dtype=torch.float32, device=device)
            with device_guard(device):
                if num_seqs:
                    _ppo_seq_kernel[_grid(num_seqs)](
                        ssum, n, adv_seq, inv_seq.reshape(1), loss_i, coef_i, clip_i, ratio_i, num_seqs,
                        float(clip_low), float(clip_high), GEOMEAN=geo, BLOCK=_BLOCK,
                    )  # fmt: skip
                if N:
                    _gather_coef_kernel[_grid(N)](coef_i, valid, sid, coef, N, BLOCK=_BLOCK)
            mean_ratio = ratio_i.sum() * inv_seq
        else:
            n1 = n.clamp(min=1.0)
            s = ssum / n1 if geo else ssum
            a = torch.where(has, adv_seq, 0.0)
            li, dl, cl = clip_objective_torch(s, a, clip_low, clip_high)
            if geo:
                dl = dl / n1
            zero = torch.zeros_like(li)
            loss_i = torch.where(has, inv_seq * li, zero)
            coef_i = torch.where(has, inv_seq * dl, zero)
            clip_i = (cl & has).float()
            coef = torch.where(vb, coef_i[sid], 0.0)
            mean_ratio = mean_ratio_of(ssum, n)
        loss = loss_i.sum()
        clip_fraction = clip_i.sum() * inv_seq
        return loss, coef, clip_fraction, mean_ratio
    return loss, coef, clip_fraction, mean_ratio_of(ssum, n)


class _PPOClipFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logp, old, adv, valid, sid, adv_seq, num_seqs, level, reduction, clip_low, clip_high, backend
    ):
        loss, coef, clip_fraction, mean_ratio = _ppo_forward(
            logp.detach(),
            old,
            adv,
            valid,
            sid,
            adv_seq,
            num_seqs,
            level,
            reduction,
            clip_low,
            clip_high,
            backend,
        )
        ctx.save_for_backward(coef)
        ctx.mark_non_differentiable(clip_fraction, mean_ratio)
        return loss, clip_fraction, mean_ratio

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_clip, _grad_ratio):
        (coef,) = ctx.saved_tensors
        return coef * grad_loss.float(), None, None, None, None, None, None, None, None, None, None, None


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    seq_index: torch.Tensor,
    num_seqs: int,
    *,
    importance_level: str = "token",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    reduction: str = "sequence_mean",
    backend: str = "torch",
):
    """The PPO-clip part on flat per-token scalars.

    Args: logp (N,) float32 (differentiable); old_logps, advantages (N,) float; valid (N,) bool;
    seq_index (N,) int64 dense in [0, num_seqs); backend "torch" | "triton" (already resolved).
    Returns (loss, clip_fraction, mean_ratio), float32 scalars; only the loss is differentiable.
    Raises ValueError when the advantage varies inside a sequence at the sequence levels.
    """
    device = logp.device
    old = old_logps.detach().to(torch.float32).contiguous()
    adv = advantages.detach().to(torch.float32).contiguous()
    sid = seq_index.contiguous()
    valid8 = valid.to(torch.int8).contiguous()
    vb = valid.bool()
    if importance_level == "token":
        adv_seq = torch.zeros(0, dtype=torch.float32, device=device)
    else:
        big = torch.finfo(torch.float32).max
        amax = torch.full((num_seqs,), -big, dtype=torch.float32, device=device)
        amin = torch.full((num_seqs,), big, dtype=torch.float32, device=device)
        amax.scatter_reduce_(0, sid[vb], adv[vb], reduce="amax")
        amin.scatter_reduce_(0, sid[vb], adv[vb], reduce="amin")
        seen = amax >= amin
        spread = torch.where(seen, amax - amin, 0.0)
        tol = 1e-6 * (1.0 + torch.where(seen, amax.abs(), 0.0))
        if bool((spread > tol).any()) or not bool(torch.isfinite(torch.where(seen, amax, 0.0)).all()):
            bad = int(((spread > tol) | ~torch.isfinite(torch.where(seen, amax, 0.0))).nonzero()[0])
            raise ValueError(
                f"advantages must be finite and constant over the valid tokens of each sequence at "
                f"importance_level={importance_level!r}; sequence #{bad} has values in "
                f"[{float(amin[bad])}, {float(amax[bad])}]"
            )
        adv_seq = torch.where(seen, amax, 0.0).contiguous()
    return _PPOClipFunction.apply(
        logp.contiguous(), old, adv, valid8, sid, adv_seq, int(num_seqs), importance_level, reduction,
        float(clip_low), float(clip_high), backend,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ public API
def _sequence_index(hidden: torch.Tensor, labels: torch.Tensor, seq_ids) -> tuple[torch.Tensor, int]:
    """Dense per-token sequence index (N,) int64 and the number of distinct sequences."""
    device = labels.device
    n = labels.numel()
    if seq_ids is None:
        if hidden.dim() >= 3:
            t = labels.shape[-1]
            rows = n // t if t else 0
            sid = torch.arange(rows, device=device).repeat_interleave(t)
            return sid, rows
        return torch.zeros(n, dtype=torch.long, device=device), 1 if n else 0
    if not isinstance(seq_ids, torch.Tensor):
        seq_ids = torch.as_tensor(seq_ids, device=device)
    if seq_ids.is_floating_point() or seq_ids.is_complex() or seq_ids.dtype == torch.bool:
        raise ValueError(f"seq_ids must be an integer tensor, got dtype {seq_ids.dtype}")
    if tuple(seq_ids.shape) != tuple(labels.shape):
        raise ValueError(
            f"seq_ids shape {tuple(seq_ids.shape)} must equal labels shape {tuple(labels.shape)}"
        )
    if seq_ids.device != device:
        raise ValueError(f"seq_ids must be on {device}, got {seq_ids.device}")
    flat = seq_ids.reshape(-1).long()
    if n and bool((flat < 0).any()):
        raise ValueError(f"seq_ids must be non-negative, got {int(flat.min())}")
    uniq, inverse = torch.unique(flat, return_inverse=True)
    return inverse.reshape(-1), int(uniq.numel())


def _per_token(x, name: str, labels: torch.Tensor) -> torch.Tensor:
    """``x`` as a detached float32 (N,) vector after shape/device/dtype checks."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float32, device=labels.device)
    if tuple(x.shape) != tuple(labels.shape):
        raise ValueError(f"{name} shape {tuple(x.shape)} must equal labels shape {tuple(labels.shape)}")
    if x.device != labels.device:
        raise ValueError(f"{name} must be on {labels.device}, got {x.device}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}")
    return x.detach().to(torch.float32).reshape(-1)


def _check_finite(x: torch.Tensor, name: str, valid: torch.Tensor) -> None:
    bad = valid & ~torch.isfinite(x)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0])
        raise ValueError(f"{name} must be finite at valid tokens, got {float(x[pos])} at flat position {pos}")


def _check_options(importance_level: str, reduction: str, clip_low: float, clip_high: float) -> None:
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_level must be one of {IMPORTANCE_LEVELS}, got {importance_level!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, val in (("clip_low", clip_low), ("clip_high", clip_high)):
        try:
            ok = float(val) >= 0.0 and float(val) < float("inf")
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a finite number >= 0, got {name}={val!r}")


def linear_ppo_loss(
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
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    chunk_size: int | None = None,
    return_entropy: bool = False,
    logits_dtype: str = "float32",
) -> PPOLossOutput:
    """PPO-clip loss of the lm_head log-probs, without materialising the logits (contract: docs/method.md).

    Args:
        hidden: (B, T, H) padded (each row one sequence when ``seq_ids`` is None) or (N, H) packed with
            ``seq_ids``; an (N, H) input without ``seq_ids`` is ONE sequence. bf16/fp16/fp32, any strides.
        weight: (V, H) lm_head weight. labels: integer, ``hidden.shape[:-1]``; ``ignore_index`` = padding.
        old_logps: float, labels' shape: log-probs under the sampling policy (no gradient; finite at
            valid tokens).
        advantages: float, labels' shape: per-token advantage (no gradient; finite at valid tokens); at
            the sequence levels it must be constant over each sequence's valid tokens (ValueError
            otherwise).
        seq_ids: optional integer, labels' shape: any non-negative ids, tokens of one sequence need not
            be contiguous.
        importance_level: "token" | "sequence" (ratio exp(sum_t d_t)) | "sequence_geomean"
            (exp(mean_t d_t)). reduction: "sequence_mean" | "token_mean" (token level only; the sequence
            levels always average over sequences with >= 1 valid token).
        clip_low, clip_high: the clip range [1 - clip_low, 1 + clip_high]. temperature: > 0.
        backend: "auto" | "torch" | "triton". chunk_size: tokens per chunk (see ``linear_logprobs``).
        return_entropy: fill ``PPOLossOutput.entropy`` with the per-token entropy (same row pass).
        logits_dtype: "float32" (exact logits, default) or "input" (rounded to the input dtype; see
            ``linear_logprobs``).

    Returns:
        :class:`PPOLossOutput`. With no valid token at all the loss is 0.0 (with zero gradient),
        clip_fraction 0.0 and mean_ratio 0.0.
    """
    _check_options(importance_level, reduction, clip_low, clip_high)
    h, w, y, inv_t = prepare_inputs(hidden, weight, labels, temperature)
    be = resolve_backend(backend, h.device)
    ii = check_ignore_index(ignore_index)
    rl = check_logits_dtype(logits_dtype)
    old = _per_token(old_logps, "old_logps", labels)
    adv = _per_token(advantages, "advantages", labels)
    valid = y != ii
    _check_finite(old, "old_logps", valid)
    _check_finite(adv, "advantages", valid)
    sid, num_seqs = _sequence_index(hidden, labels, seq_ids)
    want_ent = bool(return_entropy)
    if importance_level == "token" and torch.is_grad_enabled() and w.requires_grad:
        loss, logp, ent, clip_fraction, mean_ratio = fused_token_ppo_loss(
            h, w, y, old, adv, sid, num_seqs, reduction=reduction, clip_low=clip_low, clip_high=clip_high,
            inv_t=inv_t, ignore_index=ii, backend=be, want_entropy=want_ent,
            chunk=chunk_tokens(int(valid.sum()), w.shape[0], h.device, chunk_size), round_logits=rl,
        )  # fmt: skip
    else:
        logp, ent = flat_logprobs(h, w, y, inv_t, ii, be, chunk_size, want_entropy=want_ent, round_logits=rl)
        loss, clip_fraction, mean_ratio = ppo_clip_loss(
            logp, old, adv, valid, sid, num_seqs, importance_level=importance_level, clip_low=clip_low,
            clip_high=clip_high, reduction=reduction, backend=be,
        )  # fmt: skip
    return PPOLossOutput(
        loss=loss,
        logps=logp.detach().reshape(labels.shape),
        clip_fraction=clip_fraction,
        mean_ratio=mean_ratio,
        entropy=ent.reshape(labels.shape) if ent is not None else None,
    )
