"""Token-level PPO-clip loss with a trainable lm_head in one chunked pass: 6*N*H*V FLOPs.

At the token level ``d loss / d logp_t = w_t * df/ds(d_t, A_t)`` depends only on token t (``w_t`` is the
reduction weight, known from the labels and sequence ids before any GEMM), so the forward can finish the
gradients chunk by chunk: with ``G_c = (onehot - softmax) / T`` from the row pass and ``k_c`` the per-token
coefficients,

    grad_h_c = k_c * (G_c @ W)          (2*C*H*V)
    grad_W  += G_c^T @ (k_c * h_c)      (2*C*H*V, accumulated in float32 in place)

after the logits GEMM (2*C*H*V). The backward only multiplies the stored gradients by the incoming scalar.
The sequence levels need every token's log-prob before any coefficient is known and keep 8*N*H*V.
"""

from __future__ import annotations

import torch

from .gemm import addmm_f32
from .linear_logprobs import _empty, scatter_valid, select_valid, tile_chunks
from .ppo_terms import clip_objective_torch, mean_ratio


def _scaled(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` times float32 ``k``, formed in float32, returned in ``x``'s dtype."""
    if x.dtype == torch.float32:
        return x * k.unsqueeze(1)
    return (x.float() * k.unsqueeze(1)).to(x.dtype)


class _FusedTokenPPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, h, w, labels, old, adv, wtok, inv_t, ignore_index, backend, chunk, clips, want_ent, round_logits
    ):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        m = h.shape[0]
        logp = _empty(m, dtype=torch.float32, device=h.device)
        ent = _empty(m, dtype=torch.float32, device=h.device) if want_ent else logp.new_zeros(0)
        loss_t = _empty(m, dtype=torch.float32, device=h.device)
        clipped = _empty(m, dtype=torch.bool, device=h.device)
        gh = _empty(*h.shape, dtype=h.dtype, device=h.device) if need_h else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        chunks = tile_chunks(
            h, w, labels, inv_t, ignore_index, backend, chunk, need_grad=True, want_entropy=want_ent,
            round_logits=round_logits,
        )  # fmt: skip
        for s, e, logp_c, ent_c, g in chunks:
            logp[s:e] = logp_c
            if want_ent:
                ent[s:e] = ent_c
            lt, dl, cl = clip_objective_torch(logp_c - old[s:e], adv[s:e], *clips)
            loss_t[s:e] = wtok[s:e] * lt
            clipped[s:e] = cl
            k = wtok[s:e] * dl
            if need_h:
                gh[s:e] = _scaled(torch.matmul(g, w), k)
            if need_w:
                addmm_f32(gw, g, _scaled(h[s:e], k))
        ctx.save_for_backward(gh, gw)
        ctx.w_dtype = w.dtype
        ctx.mark_non_differentiable(logp, ent, clipped)
        return loss_t.sum(), logp, ent, clipped

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _g_logp, _g_ent, _g_clip):
        gh, gw = ctx.saved_tensors
        g = grad_loss.float()
        grad_h = None if gh is None else (gh * g).to(gh.dtype)
        grad_w = None if gw is None else (gw * g).to(ctx.w_dtype)
        return grad_h, grad_w, *([None] * 11)


def fused_token_ppo_loss(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    sid: torch.Tensor,
    num_seqs: int,
    *,
    reduction: str,
    clip_low: float,
    clip_high: float,
    inv_t: float,
    ignore_index: int,
    backend: str,
    chunk: int,
    want_entropy: bool,
    round_logits: bool = False,
):
    """Token-level loss on checked flat inputs (h (N, H), w (V, H), labels/old/adv/sid (N,)).

    Returns (loss, logp (N,), entropy (N,) or None, clip_fraction, mean_ratio); only the loss is
    differentiable (with respect to h and w).
    """
    n = h.shape[0]
    hv, yv, idx = select_valid(h, labels, w.shape[0], ignore_index)
    keep = slice(None) if idx is None else idx
    sid_v, old_v, adv_v = sid[keep].contiguous(), old[keep].contiguous(), adv[keep].contiguous()
    counts = torch.zeros(num_seqs, dtype=torch.float32, device=h.device)
    counts.index_add_(0, sid_v, torch.ones_like(old_v))
    num_valid = float(hv.shape[0])
    if reduction == "sequence_mean":
        wtok = 1.0 / ((counts > 0).sum().float() * counts[sid_v])
    else:
        wtok = torch.full_like(old_v, 1.0 / max(num_valid, 1.0))
    loss, logp_v, ent_v, clipped = _FusedTokenPPOFunction.apply(
        hv, w, yv, old_v, adv_v, wtok, inv_t, ignore_index, backend, chunk,
        (float(clip_low), float(clip_high)), want_entropy, round_logits,
    )  # fmt: skip
    ssum = torch.zeros_like(counts).index_add_(0, sid_v, logp_v - old_v)
    clip_fraction = clipped.float().sum() / max(num_valid, 1.0)
    ent = scatter_valid(ent_v, n, idx) if want_entropy else None
    return loss, scatter_valid(logp_v, n, idx), ent, clip_fraction, mean_ratio(ssum, counts)
