"""The row pass over one float32 C x V logits tile: log-prob of the label, entropy, and the softmax gradient.

For each row x = z / T (float32): ``lse = logsumexp(x)``, ``logp = x[y] - lse``, optionally the entropy
``-sum_v p_v log p_v = lse - sum_v p_v x_v`` and the gradient tile ``g = scale * (onehot(y) - p) / T``
written in the input dtype into a buffer of its own (it may alias the float32 tile only when the input
dtype is float32). Rows whose label is ``ignore_index`` get logp = entropy = 0 and a zero gradient row.

Two implementations with one contract: a Triton kernel (one program per row, online max / sum-exp /
sum p*x over V blocks, a second sweep for the gradient) and torch ops that update the tile in place.
"""

from __future__ import annotations

import os

import torch

from ._common import BLOCK_V_ENV, HAS_TRITON, device_guard


def _empty(*shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer (a seam: tests poison it with NaN to prove every element is written)."""
    return torch.empty(*shape, dtype=dtype, device=device)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _logprob_rows_kernel(
        z_ptr,  # (C, V) float32 logits tile (read only)
        stride_z,
        g_ptr,  # (C, V) gradient tile in the input dtype (written when WRITE_GRAD; may alias z if fp32)
        stride_g,
        labels_ptr,  # (C,) int64, contiguous
        scale_ptr,  # (C,) float32 per-row gradient scale (read when HAS_SCALE), contiguous
        logp_ptr,  # (C,) float32 out
        ent_ptr,  # (C,) float32 out (written when WRITE_ENT)
        V,
        inv_T,
        ignore_index,
        WRITE_GRAD: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        WRITE_ENT: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        y = tl.load(labels_ptr + row)
        valid = y != ignore_index
        # Online max m, sum-exp s and sum exp(x - m) * x over V blocks, all float32.
        m = float("-inf")
        s = 0.0
        t = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(z_row + offs, mask=mask, other=float("-inf")) * inv_T
            m_new = tl.maximum(m, tl.max(x, axis=0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(x - m_new)
            s = s * alpha + tl.sum(e, axis=0)
            if WRITE_ENT:
                t = t * alpha + tl.sum(e * tl.where(mask, x, 0.0), axis=0)
            m = m_new
        lse = m + tl.log(s)
        y_safe = tl.where(valid, y, 0)
        zy = tl.load(z_row + y_safe) * inv_T
        tl.store(logp_ptr + row, tl.where(valid, zy - lse, 0.0))
        if WRITE_ENT:
            tl.store(ent_ptr + row, tl.where(valid, lse - t / s, 0.0))
        if WRITE_GRAD:
            g_row = g_ptr + row * stride_g
            scale = inv_T
            if HAS_SCALE:
                scale = scale * tl.load(scale_ptr + row)
            scale = tl.where(valid, scale, 0.0)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                x = tl.load(z_row + offs, mask=mask, other=0.0) * inv_T
                p = tl.exp(x - lse)
                g = (tl.where(offs == y_safe, 1.0, 0.0) - p) * scale
                tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


def block_v(vocab: int) -> int:
    """Triton block over the vocabulary: ``min(4096, next_pow2(V))`` or O1PRUNER_KERNEL_BLOCK_V."""
    env = os.environ.get(BLOCK_V_ENV)
    if env:
        try:
            b = int(env)
        except ValueError:
            b = 0
        if b < 16 or b & (b - 1):
            raise ValueError(f"{BLOCK_V_ENV} must be a power of two >= 16, got {env!r}")
        return b
    return min(4096, 1 << max(0, int(vocab) - 1).bit_length())


def _rows_triton(x, labels, inv_t, ignore_index, grad, scale, want_entropy, scratch):
    del scratch  # the kernel streams the tile; it needs no working copy
    c, v = x.shape
    logp = _empty(c, dtype=torch.float32, device=x.device)
    ent = _empty(c, dtype=torch.float32, device=x.device) if want_entropy else None
    block = block_v(v)
    with device_guard(x.device):
        _logprob_rows_kernel[(c,)](
            x, x.stride(0),
            grad if grad is not None else x, grad.stride(0) if grad is not None else x.stride(0),
            labels, scale if scale is not None else logp, logp, ent if ent is not None else logp,
            v, inv_t, ignore_index,
            WRITE_GRAD=grad is not None, HAS_SCALE=scale is not None, WRITE_ENT=want_entropy,
            BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
        )  # fmt: skip
    return logp, ent


def _rows_torch(x, labels, inv_t, ignore_index, grad, scale, want_entropy, scratch):
    """The same contract with torch ops; ``x`` is overwritten, ``scratch`` (C, V) float32 is needed for
    the entropy (it may be ``grad`` itself when that is a float32 buffer other than ``x``)."""
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0).unsqueeze(1)
    if inv_t != 1.0:
        x.mul_(inv_t)
    m = x.amax(dim=1, keepdim=True)
    zy = x.gather(1, y).squeeze(1)
    u = x.sub_(m)  # x - max: every later pass works on it in place
    e = torch.exp(u, out=scratch) if want_entropy else u.exp_()
    s = e.sum(dim=1)
    log_s = s.log()
    logp = torch.where(valid, zy - m.squeeze(1) - log_s, 0.0)
    ent = None
    if want_entropy:
        t = u.mul_(e).sum(dim=1)  # sum_v exp(u_v) * u_v
        ent = torch.where(valid, log_s - t / s, 0.0)
    if grad is not None:
        row = torch.full_like(s, inv_t) if scale is None else scale * inv_t
        row = torch.where(valid, row, 0.0)
        e.mul_((-row / s).unsqueeze(1)).scatter_add_(1, y, row.unsqueeze(1))
        if grad is not e:
            grad.copy_(e)
    return logp, ent


def logit_rows(
    backend: str,
    x: torch.Tensor,
    labels: torch.Tensor,
    inv_t: float,
    ignore_index: int,
    grad: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    want_entropy: bool = False,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row pass over a float32 tile ``x`` (C, V): the Triton backend needs a unit column stride (any row
    stride); the torch backend takes any dense layout, vocabulary-major included, and ``grad`` /
    ``scratch`` in the same layout as ``x``.

    Args: labels (C,) int64 contiguous; grad: (C, V) buffer for the gradient tile or None; scale: (C,)
    float32 contiguous per-row factor of the gradient or None; scratch: (C, V) float32 working buffer
    (torch backend with ``want_entropy`` only). The torch backend overwrites ``x``.
    Returns (logp (C,) float32, entropy (C,) float32 or None).
    """
    fn = _rows_triton if backend == "triton" else _rows_torch
    return fn(x, labels, inv_t, ignore_index, grad, scale, want_entropy, scratch)
