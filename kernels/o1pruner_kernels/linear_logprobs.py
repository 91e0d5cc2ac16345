"""Fused lm_head projection + log-softmax + label gather (+ entropy), chunked over tokens.

For a chunk of C tokens the logits ``z = h_c @ W^T`` (C, V) are formed in float32 (``gemm.mm_f32``: fp32
output from bf16/fp16 operands, never rounded to the input dtype), then ONE row pass over the tile
(``logit_rows``: a Triton kernel or the same math in torch ops) computes ``lse = logsumexp(z / T)``,
``logp = z[y] / T - lse`` and optionally the entropy. When the hidden states need a gradient the same pass
writes ``grad_z = (onehot(y) - softmax(z / T)) / T`` in the input dtype (the torch backend rounds it into
the float32 tile's own storage, ``narrow_in_place``), and a second GEMM stores ``D_c = grad_z @ W`` =
d logp_t / d h_t. The backward for ``hidden`` is then ``grad_h = g_t * D_t`` with no GEMM, so a frozen
head costs 4*N*H*V FLOPs forward+backward (2*N*H*V without gradients). A trainable head recomputes z per
chunk in the backward and accumulates ``grad_W += grad_z^T @ h_c`` in float32 (8*N*H*V; the token-level
PPO loss does 6*N*H*V, see ``ppo_token_fused``). Scoring (no gradient) and training run the same
arithmetic, so the importance ratio is exactly 1 at step 0. Memory: O(N*H) for D plus one float32 C x V
tile (a second one for the entropy on the torch backend, or for a bf16 gradient tile on the Triton one).
See docs/design.md.
"""

from __future__ import annotations

import operator

import torch

from ._common import (
    IGNORE_INDEX,
    ROW_BLOCK,
    check_logits_dtype,
    check_temperature,
    chunk_tokens,
    resolve_backend,
)
from .fused_logprobs import fused_logprobs
from .gemm import addmm_f32, mm_f32
from .logit_rows import logit_rows


def _empty(*shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer (a seam: tests poison it with NaN to prove every element is written)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def tile_chunks(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    inv_t: float,
    ignore_index: int,
    backend: str,
    chunk: int,
    *,
    need_grad: bool,
    want_entropy: bool = False,
    scale: torch.Tensor | None = None,
    round_logits: bool = False,
):
    """Yield ``(start, end, logp_c, entropy_c, grad_c)`` per chunk of ``chunk`` tokens.

    h (N, H) contiguous; w (V, H) any strides; labels (N,) int64 contiguous; scale (N,) float32 or None.
    logp_c, entropy_c: (C,) float32 (entropy_c None unless ``want_entropy``); grad_c: (C, V) in h's dtype,
    ``scale * (onehot - softmax) / T``, when ``need_grad`` (else None). The buffers are reused: consume
    grad_c before the next chunk. ``round_logits`` (``logits_dtype="input"``): the logits are formed in
    h's dtype (bf16/fp16 GEMM) and upcast ROW_BLOCK rows at a time (see :func:`_rounded_tile_chunks`).
    """
    n, v = h.shape[0], w.shape[0]
    if n == 0:
        return
    if round_logits and h.dtype != torch.float32:
        yield from _rounded_tile_chunks(
            h, w, labels, inv_t, ignore_index, backend, chunk, need_grad, want_entropy, scale
        )
        return
    c = min(chunk, n)
    # a 2-byte gradient tile fits in the float32 tile's storage (torch backend: written after the row pass)
    narrow = h.dtype.itemsize == 2 and backend != "triton"
    col = vocab_major(backend, h.device, h.dtype)
    x_buf = _empty(c * v, dtype=torch.float32, device=h.device)
    g_buf = scratch = None
    if need_grad and h.dtype != torch.float32 and not narrow:
        g_buf = _empty(c * v, dtype=h.dtype, device=h.device)  # the Triton kernel reads z while writing g
    if want_entropy and backend != "triton":
        scratch = _empty(c * v, dtype=torch.float32, device=h.device)
    for s, e in _spans(n, c):
        x = mm_f32(h[s:e], w, _tile(x_buf, e - s, v, col))
        g = None
        if need_grad:
            g = _tile(g_buf, e - s, v, col) if g_buf is not None else x
        logp_c, ent_c = logit_rows(
            backend, x, labels[s:e], inv_t, ignore_index, g,
            scale[s:e] if scale is not None else None, want_entropy,
            _tile(scratch, e - s, v, col) if scratch is not None else None,
        )  # fmt: skip
        if narrow and g is not None:
            g = narrow_in_place(x, h.dtype)
        yield s, e, logp_c, ent_c, g


def vocab_major(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the C x V tiles are stored vocabulary-major (``tile.t()`` contiguous): for float32 on a CPU
    with the torch backend, where the logits GEMM then runs as ``W @ h_c^T``, measured 12-15% faster than
    ``h_c @ W^T`` on a 2-core AVX-512 CPU at V=152k (the row pass, ~25% slower on that layout, is a tenth
    of the GEMM time). Row-major elsewhere: the Triton row kernel reads rows, and a bf16 gradient GEMM
    from a vocabulary-major tile measured 1.3-1.4x slower there."""
    return backend == "torch" and device.type == "cpu" and dtype == torch.float32


def _tile(buf: torch.Tensor, rows: int, v: int, col: bool) -> torch.Tensor:
    """(rows, V) view of the first rows * V elements of the flat buffer ``buf``: row-major, or
    vocabulary-major when ``col``."""
    flat = buf[: rows * v]
    return flat.view(v, rows).t() if col else flat.view(rows, v)


def narrow_in_place(x: torch.Tensor, dtype: torch.dtype, block: int = 16) -> torch.Tensor:
    """``x`` (R, L) float32 rounded to the 2-byte ``dtype`` into the first half of its own storage; returns
    that view in x's layout (row-major, or column-major: ``x.t()`` contiguous), so the gradient tile needs
    no buffer of its own.

    Storage row block k >= 1 (rows [k*b, (k+1)*b)) lands on float32 rows [k*b/2, (k+1)*b/2), which earlier
    blocks have already read, so source and destination never overlap; block 0 goes through a b x L
    staging copy.
    """
    if not x.is_contiguous():
        if x.t().is_contiguous():
            return narrow_in_place(x.t(), dtype, block).t()
        raise ValueError(f"narrow_in_place needs a dense tile, got strides {x.stride()}")
    r, ln = x.shape
    out = x.view(-1).view(dtype)[: r * ln].view(r, ln)
    b = max(1, min(block, r))
    first = x[:b].to(dtype)
    for s in range(b, r, b):
        e = min(s + b, r)
        out[s:e].copy_(x[s:e])
    out[:b].copy_(first)
    return out


def _spans(n: int, step: int):
    """``(start, end)`` of consecutive spans of ``step`` over ``range(n)``."""
    for s in range(0, n, step):
        yield s, min(s + step, n)


def _rounded_tile_chunks(h, w, labels, inv_t, ignore_index, backend, chunk, need_grad, want_entropy, scale):
    """``tile_chunks`` with the C x V logits tile in h's dtype (a plain bf16/fp16 GEMM, the rounding of
    an ``lm_head`` forward). The row pass runs on float32 copies of ROW_BLOCK rows; the gradient rows are
    written back into the tile they were read from (already copied), which then serves as grad_c."""
    n, v = h.shape[0], w.shape[0]
    c = min(chunk, n)
    z_buf = _empty(c, v, dtype=h.dtype, device=h.device)
    rb = min(ROW_BLOCK, c)
    x_buf = _empty(rb, v, dtype=torch.float32, device=h.device)
    scratch = None
    if want_entropy and backend != "triton":
        scratch = _empty(rb, v, dtype=torch.float32, device=h.device)
    for s, e in _spans(n, c):
        z = torch.mm(h[s:e], w.t(), out=z_buf[: e - s])
        logp_c = _empty(e - s, dtype=torch.float32, device=h.device)
        ent_c = _empty(e - s, dtype=torch.float32, device=h.device) if want_entropy else None
        for r0, r1 in _spans(e - s, rb):
            x = x_buf[: r1 - r0].copy_(z[r0:r1])
            lp, en = logit_rows(
                backend, x, labels[s + r0 : s + r1], inv_t, ignore_index,
                z[r0:r1] if need_grad else None,
                scale[s + r0 : s + r1] if scale is not None else None, want_entropy,
                scratch[: r1 - r0] if scratch is not None else None,
            )  # fmt: skip
            logp_c[r0:r1] = lp
            if want_entropy:
                ent_c[r0:r1] = en
        yield s, e, logp_c, ent_c, z if need_grad else None


def _forward_chunks(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    inv_t: float,
    ignore_index: int,
    backend: str,
    chunk: int,
    need_d: bool,
    want_entropy: bool = False,
    round_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """logp (N,) float32, entropy (N,) float32 or None, and (when ``need_d``) D = d logp / d h (N, H)."""
    logp = _empty(h.shape[0], dtype=torch.float32, device=h.device)
    ent = _empty(h.shape[0], dtype=torch.float32, device=h.device) if want_entropy else None
    d = _empty(*h.shape, dtype=h.dtype, device=h.device) if need_d else None
    chunks = tile_chunks(
        h, w, labels, inv_t, ignore_index, backend, chunk, need_grad=need_d, want_entropy=want_entropy,
        round_logits=round_logits,
    )  # fmt: skip
    for s, e, logp_c, ent_c, g in chunks:
        logp[s:e] = logp_c
        if want_entropy:
            ent[s:e] = ent_c
        if need_d:
            torch.matmul(g, w, out=d[s:e])
    return logp, ent, d


def _weight_grad(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    g: torch.Tensor,
    inv_t: float,
    ignore_index: int,
    backend: str,
    chunk: int,
    round_logits: bool = False,
) -> torch.Tensor:
    """sum_t g_t * d logp_t / d W, recomputing the logits per chunk; float32 accumulation."""
    gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    scale = g.contiguous()
    chunks = tile_chunks(
        h, w, labels, inv_t, ignore_index, backend, chunk, need_grad=True, scale=scale,
        round_logits=round_logits,
    )  # fmt: skip
    for s, e, _, _, gz in chunks:
        addmm_f32(gw, gz, h[s:e])
    return gw.to(w.dtype)


class _LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, labels, inv_t, ignore_index, backend, chunk, want_entropy, round_logits):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        logp, ent, d = _forward_chunks(
            h, w, labels, inv_t, ignore_index, backend, chunk, need_h, want_entropy, round_logits
        )
        ctx.meta = (inv_t, ignore_index, backend, chunk, round_logits)
        ctx.save_for_backward(d, h if need_w else None, w if need_w else None, labels if need_w else None)
        ent = ent if ent is not None else logp.new_zeros(0)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_ent):
        inv_t, ignore_index, backend, chunk, round_logits = ctx.meta
        d, h, w, labels = ctx.saved_tensors
        g = grad_logp.float()
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            if d.dtype == torch.float32:
                grad_h = d * g.unsqueeze(1)
            else:
                grad_h = (d.float() * g.unsqueeze(1)).to(d.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(h, w, labels, g, inv_t, ignore_index, backend, chunk, round_logits)
        return grad_h, grad_w, None, None, None, None, None, None, None


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def prepare_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float):
    """Check shapes/dtypes/devices; return (hidden (N, H), weight (V, H), labels (N,) int64 contiguous, 1/T).

    Any layout is accepted (transposed, sliced, expanded): hidden is flattened (copied only when it must
    be), labels are copied to a contiguous int64 vector, the weight keeps its strides (the GEMMs read any).
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        got = hidden.dtype if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a floating-point tensor of shape (..., H), got {got}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise ValueError(f"weight must be a floating-point (V, H) tensor, got {_shape(weight)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight (V, H) = {tuple(weight.shape)} does not match hidden (..., H) = {tuple(hidden.shape)}"
        )
    if (
        not isinstance(labels, torch.Tensor)
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor (int64) of shape hidden.shape[:-1], got {got}")
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
    return h, w, labels.reshape(-1).to(torch.long).contiguous(), inv_t


def check_ignore_index(ignore_index) -> int:
    """``ignore_index`` as a Python int (ValueError for a float, a bool or a non-number)."""
    if isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got ignore_index={ignore_index!r}")
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise ValueError(f"ignore_index must be an int, got ignore_index={ignore_index!r}") from None


def select_valid(h: torch.Tensor, labels: torch.Tensor, vocab: int, ignore_index: int):
    """(h, labels) of the valid tokens only, and their indices (None when all are valid).

    Raises ValueError for a label outside [0, vocab) that is not ``ignore_index``.
    """
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, got label "
            f"{int(labels[pos])} at flat position {pos}"
        )
    if bool(valid.all()):
        return h.contiguous(), labels, None
    idx = valid.nonzero().squeeze(1)
    return h.index_select(0, idx), labels.index_select(0, idx), idx


def scatter_valid(x: torch.Tensor, n: int, idx: torch.Tensor | None) -> torch.Tensor:
    """(n,) tensor with ``x`` at ``idx`` and 0.0 elsewhere (``x`` itself when ``idx`` is None)."""
    if idx is None:
        return x
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_copy(0, idx, x)


def flat_logprobs(
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    inv_t: float,
    ignore_index: int,
    backend: str,
    chunk_size: int | None = None,
    want_entropy: bool = False,
    round_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp (N,) float32 differentiable, entropy (N,) float32 detached or None) for checked flat inputs.

    Ignored tokens are skipped entirely (no FLOPs); their log-prob and entropy are exactly 0.0.
    ``round_logits``: the logits are rounded to h's dtype (``logits_dtype="input"``).
    """
    n = h.shape[0]
    h, labels, idx = select_valid(h, labels, w.shape[0], ignore_index)
    chunk = chunk_tokens(h.shape[0], w.shape[0], h.device, chunk_size)
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        logp, ent = _LinearLogprobsFunction.apply(
            h, w, labels, inv_t, ignore_index, backend, chunk, want_entropy, round_logits
        )
    else:
        with torch.no_grad():
            fused = backend == "triton" and h.device.type == "cuda"
            if fused and not want_entropy and not (round_logits and h.dtype != torch.float32):
                # Scoring: one fused GEMM with an online-logsumexp epilogue, no logits tile.
                logp, ent = fused_logprobs(h, w, labels, inv_t, ignore_index), None
            else:
                logp, ent, _ = _forward_chunks(
                    h, w, labels, inv_t, ignore_index, backend, chunk, False, want_entropy, round_logits
                )
    ent = scatter_valid(ent, n, idx) if want_entropy else None
    return scatter_valid(logp, n, idx), ent


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    chunk_size: int | None = None,
    return_entropy: bool = False,
    logits_dtype: str = "float32",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log_softmax(hidden @ weight.T / temperature)[label]`` without materialising the logits.

    Args:
        hidden: (..., H) float tensor (bf16/fp16/fp32), e.g. the decoder's last hidden states; any
            strides (transposed, sliced, expanded).
        weight: (V, H) lm_head weight (same device; dtypes are promoted to a common one); any strides.
        labels: (...) integer, ``hidden.shape[:-1]``; ``ignore_index`` marks tokens to skip. Labels must
            already be aligned with ``hidden`` (see :func:`o1pruner_kernels.shift_labels`).
        temperature: > 0, divides the logits.
        backend: "auto" (Triton on CUDA, torch elsewhere), "torch", or "triton".
        chunk_size: tokens per chunk (default: a ~256 MiB float32 tile on a GPU, 256 tokens on a CPU;
            or the environment variable O1PRUNER_KERNEL_CHUNK_TOKENS).
        return_entropy: also return the per-token entropy of the softmax.
        logits_dtype: "float32" (default): the logits are float32 whatever the input dtype (fp32-output
            GEMMs; exact to ~1e-6). "input": the logits are rounded to the input dtype, as a plain bf16
            ``lm_head`` forward rounds them (log-prob error ~1e-2 nats in bf16), for bf16 GEMMs where
            the device has no fp32-output form (CPUs); the log-softmax is still computed in float32.
            Scoring and training must use the same value for the importance ratio to start at 1.

    Returns:
        float32 (...) log-probs, exactly 0.0 where ``labels == ignore_index``; differentiable with respect
        to ``hidden`` and ``weight`` when they require grad. With ``return_entropy=True`` a pair
        ``(logps, entropy)``; entropy is float32 (...), ``-sum_v p_v log p_v`` of
        ``softmax(hidden @ weight.T / temperature)``, 0.0 at ignored tokens, detached; it comes from the
        same row pass (no extra GEMM).
    """
    h, w, y, inv_t = prepare_inputs(hidden, weight, labels, temperature)
    be = resolve_backend(backend, h.device)
    ii = check_ignore_index(ignore_index)
    rl = check_logits_dtype(logits_dtype)
    logp, ent = flat_logprobs(
        h, w, y, inv_t, ii, be, chunk_size, want_entropy=bool(return_entropy), round_logits=rl
    )
    if return_entropy:
        return logp.reshape(labels.shape), ent.reshape(labels.shape)
    return logp.reshape(labels.shape)
