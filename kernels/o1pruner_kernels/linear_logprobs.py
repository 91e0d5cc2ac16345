"""Fused lm_head projection + log-softmax + label gather, chunked over tokens.

For a chunk of C tokens the logits ``z = h_c @ W^T`` (C, V) are formed with one GEMM in the input dtype,
then ONE row pass over the tile (a Triton kernel, or the same math in torch ops) computes, in float32,
``lse = logsumexp(z / T)`` and ``logp = z[y] / T - lse``. When the hidden states need a gradient the same
pass overwrites the tile with ``grad_z = (onehot(y) - softmax(z / T)) / T`` and a second GEMM stores
``D_c = grad_z @ W`` = d logp_t / d h_t. The backward for ``hidden`` is then ``grad_h = g_t * D_t`` with no
GEMM, so a frozen head costs 4*N*H*V FLOPs forward+backward (2*N*H*V without gradients). A trainable head
recomputes z per chunk in the backward and accumulates ``grad_W += grad_z^T @ h_c`` in float32 (8*N*H*V).
Memory: O(N*H) for D plus one C x V tile. See docs/design.md.
"""

from __future__ import annotations

import os

import torch

from ._common import HAS_TRITON, check_temperature, chunk_tokens, resolve_backend
from .fused_logprobs import fused_logprobs

BLOCK_V_ENV = "O1PRUNER_KERNEL_BLOCK_V"


def _empty(*shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer (a seam: tests poison it with NaN to prove every element is written)."""
    return torch.empty(*shape, dtype=dtype, device=device)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _logprob_rows_kernel(
        z_ptr,  # (C, V) logits tile, input dtype; overwritten with the gradient when WRITE_GRAD
        stride_z,
        labels_ptr,  # (C,) int64
        scale_ptr,  # (C,) float32 per-row gradient scale (only read when HAS_SCALE)
        logp_ptr,  # (C,) float32 out
        V,
        inv_T,
        ignore_index,
        WRITE_GRAD: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        y = tl.load(labels_ptr + row)
        valid = y != ignore_index
        # Online max / sum-exp over V blocks, float32.
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_T
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        y_safe = tl.where(valid, y, 0)
        zy = tl.load(z_row + y_safe).to(tl.float32) * inv_T
        tl.store(logp_ptr + row, tl.where(valid, zy - lse, 0.0))
        if WRITE_GRAD:
            scale = inv_T
            if HAS_SCALE:
                scale = scale * tl.load(scale_ptr + row)
            scale = tl.where(valid, scale, 0.0)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                x = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_T
                p = tl.exp(x - lse)
                g = (tl.where(offs == y_safe, 1.0, 0.0) - p) * scale
                tl.store(z_row + offs, g.to(z_ptr.dtype.element_ty), mask=mask)


def _block_v(vocab: int) -> int:
    env = os.environ.get(BLOCK_V_ENV)
    if env:
        b = int(env)
        if b < 16 or b & (b - 1):
            raise ValueError(f"{BLOCK_V_ENV} must be a power of two >= 16, got {env!r}")
        return b
    return min(4096, triton.next_power_of_2(vocab))


def _rows_triton(
    z: torch.Tensor, labels: torch.Tensor, inv_t: float, ignore_index: int, write_grad: bool, scale
) -> torch.Tensor:
    c, v = z.shape
    logp = _empty(c, dtype=torch.float32, device=z.device)
    block = _block_v(v)
    _logprob_rows_kernel[(c,)](
        z,
        z.stride(0),
        labels,
        scale if scale is not None else logp,
        logp,
        v,
        inv_t,
        ignore_index,
        WRITE_GRAD=write_grad,
        HAS_SCALE=scale is not None,
        BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return logp


def _rows_torch(
    z: torch.Tensor, labels: torch.Tensor, inv_t: float, ignore_index: int, write_grad: bool, scale
) -> torch.Tensor:
    """Same contract as the Triton row kernel, with torch ops (float32 math)."""
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0).unsqueeze(1)
    zf = z.float() * inv_t  # always a fresh float32 tile
    lse = torch.logsumexp(zf, dim=1)
    logp = torch.where(valid, zf.gather(1, y).squeeze(1) - lse, 0.0)
    if write_grad:
        row_scale = torch.full_like(lse, inv_t) if scale is None else scale * inv_t
        row_scale = torch.where(valid, row_scale, 0.0)
        p = zf.sub_(lse.unsqueeze(1)).exp_()
        p.neg_().scatter_add_(1, y, torch.ones_like(y, dtype=p.dtype))
        p.mul_(row_scale.unsqueeze(1))
        z.copy_(p)
    return logp


def _rows(backend: str, *args) -> torch.Tensor:
    return _rows_triton(*args) if backend == "triton" else _rows_torch(*args)


def _logit_chunks(h: torch.Tensor, w: torch.Tensor, chunk: int):
    """Yield (start, end, z) with z = h[start:end] @ w.T written into one reused (chunk, V) buffer."""
    n = h.shape[0]
    if n == 0:
        return
    c = min(chunk, n)
    zbuf = _empty(c, w.shape[0], dtype=h.dtype, device=h.device)
    wt = w.t()
    for s in range(0, n, c):
        e = min(s + c, n)
        z = zbuf[: e - s]
        torch.matmul(h[s:e], wt, out=z)
        yield s, e, z


def _forward_chunks(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    inv_t: float,
    ignore_index: int,
    backend: str,
    chunk: int,
    need_d: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logp (N,) float32 and, when ``need_d``, D = d logp / d h (N, H) in h's dtype."""
    logp = _empty(h.shape[0], dtype=torch.float32, device=h.device)
    d = _empty(*h.shape, dtype=h.dtype, device=h.device) if need_d else None
    for s, e, z in _logit_chunks(h, w, chunk):
        logp[s:e] = _rows(backend, z, labels[s:e], inv_t, ignore_index, need_d, None)
        if need_d:
            torch.matmul(z, w, out=d[s:e])
    return logp, d


def _weight_grad(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    g: torch.Tensor,
    inv_t: float,
    ignore_index: int,
    backend: str,
    chunk: int,
) -> torch.Tensor:
    """sum_t g_t * d logp_t / d W, recomputing the logits per chunk; float32 accumulation."""
    gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for s, e, z in _logit_chunks(h, w, chunk):
        _rows(backend, z, labels[s:e], inv_t, ignore_index, True, g[s:e].contiguous())
        _accumulate_fp32(gw, z.t(), h[s:e])
    return gw.to(w.dtype)


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b; a low-precision product is formed per chunk, then added in float32."""
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, out=acc)
    else:
        acc.add_(torch.matmul(a, b))


class _LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, labels, inv_t, ignore_index, backend, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        logp, d = _forward_chunks(h, w, labels, inv_t, ignore_index, backend, chunk, need_h)
        ctx.meta = (inv_t, ignore_index, backend, chunk)
        ctx.save_for_backward(d, h if need_w else None, w if need_w else None, labels if need_w else None)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        inv_t, ignore_index, backend, chunk = ctx.meta
        d, h, w, labels = ctx.saved_tensors
        g = grad_logp.float()
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            if d.dtype == torch.float32:
                grad_h = d * g.unsqueeze(1)
            else:
                grad_h = (d.float() * g.unsqueeze(1)).to(d.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(h, w, labels, g, inv_t, ignore_index, backend, chunk)
        return grad_h, grad_w, None, None, None, None, None


def prepare_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float):
    """Check shapes/dtypes; return (hidden (N, H), weight (V, H), labels (N,) int64, 1/T)."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise ValueError("hidden must be a floating-point tensor of shape (..., H)")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a floating-point (V, H) tensor, got {got}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight (V, H) = {tuple(weight.shape)} does not match hidden (..., H) = {tuple(hidden.shape)}"
        )
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise ValueError("labels must be an integer tensor (int64) of shape hidden.shape[:-1]")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    if weight.device != hidden.device or labels.device != hidden.device:
        raise ValueError(
            f"hidden, weight and labels must be on one device, got {hidden.device}, {weight.device}, "
            f"{labels.device}"
        )
    inv_t = 1.0 / check_temperature(temperature)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    h = hidden.to(dtype).reshape(-1, hidden.shape[-1])
    w = weight.to(dtype)
    return h, w, labels.reshape(-1).long(), inv_t


def flat_logprobs(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    inv_t: float,
    ignore_index: int,
    backend: str,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """logp (N,) float32 for checked flat inputs; differentiable; ignored tokens are skipped entirely."""
    n = h.shape[0]
    v = w.shape[0]
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(f"labels must be in [0, {v}) or ignore_index={ignore_index}, got label {first}")
    idx = None
    if not bool(valid.all()):
        idx = valid.nonzero().squeeze(1)
        h = h.index_select(0, idx)
        labels = labels.index_select(0, idx)
    h = h.contiguous()
    w = w.contiguous()
    chunk = chunk_tokens(h.shape[0], v, h.device, chunk_size)
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        logp = _LinearLogprobsFunction.apply(h, w, labels, inv_t, ignore_index, backend, chunk)
    else:
        with torch.no_grad():
            if backend == "triton" and h.device.type == "cuda":  # scoring: one fused GEMM, no logits tile
                logp = fused_logprobs(h, w, labels, inv_t, ignore_index)
            else:
                logp, _ = _forward_chunks(h, w, labels, inv_t, ignore_index, backend, chunk, False)
    if idx is not None:
        logp = torch.zeros(n, dtype=torch.float32, device=h.device).index_copy(0, idx, logp)
    return logp


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token ``log_softmax(hidden @ weight.T / temperature)[label]`` without materialising the logits.

    Args:
        hidden: (..., H) float tensor (bf16/fp16/fp32), e.g. the decoder's last hidden states.
        weight: (V, H) lm_head weight (same device; dtypes are promoted to a common one).
        labels: (...) int64, ``hidden.shape[:-1]``; ``ignore_index`` marks tokens to skip.
        temperature: > 0, divides the logits.
        backend: "auto" (Triton on CUDA, torch elsewhere), "torch", or "triton".
        chunk_size: tokens per chunk (default from a ~256 MiB GPU / 16 MiB CPU tile budget, or the
            environment variable O1PRUNER_KERNEL_CHUNK_TOKENS).

    Returns:
        float32 (...) log-probs, exactly 0.0 where ``labels == ignore_index``; differentiable with respect
        to ``hidden`` and ``weight`` when they require grad.
    """
    h, w, y, inv_t = prepare_inputs(hidden, weight, labels, temperature)
    be = resolve_backend(backend, h.device)
    logp = flat_logprobs(h, w, y, inv_t, int(ignore_index), be, chunk_size)
    return logp.reshape(labels.shape)
