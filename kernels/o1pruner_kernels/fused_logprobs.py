"""Fused lm_head GEMM + online log-softmax + label gather for scoring (no gradient), one Triton pass.

``linear_logprobs`` without a gradient needs only ``logp_t = z_t[y_t] / T - logsumexp(z_t / T)`` with
``z = h @ W^T``. Here one Triton GEMM forms BLOCK_N x BLOCK_V logits tiles with ``tl.dot`` in float32
accumulators over H and reduces each tile in registers (online max / sum-exp, the label logit when the
label falls in the tile): the logits are never written to memory. The vocabulary is split over a second
program axis (SPLITS contiguous ranges of V blocks) so that short inputs still fill the GPU; a small
merge kernel combines the SPLITS partial (max, sum-exp, label logit) triples of each token.

Cost: 2*N*H*V FLOPs (the GEMM), memory O(N * SPLITS) float32 beside the inputs, instead of a C x V tile.
Float32 inputs multiply in IEEE float32 (no TF32); bf16/fp16 inputs use the tensor cores with float32
accumulation, so the log-probs are those of float32 logits of the given inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import HAS_TRITON


@dataclass(frozen=True)
class FusedLogprobConfig:
    """Launch configuration of the partial kernel (tile sizes, warps, pipeline stages)."""

    block_n: int = 128
    block_v: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3


# Tile configurations by input element size: fp32 halves BLOCK_K to keep the staged tiles in shared memory.
CONFIGS: dict[int, FusedLogprobConfig] = {
    2: FusedLogprobConfig(),
    4: FusedLogprobConfig(block_n=64, block_k=32),
}
# Programs per SM aimed at when choosing how many vocabulary splits a short input gets.
PROGRAMS_PER_SM = 2


def _empty(*shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer (a seam: tests poison it with NaN to prove every element is written)."""
    return torch.empty(*shape, dtype=dtype, device=device)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_utils import kernels_are_interpreted

    @triton.jit
    def _fused_logprob_partial_kernel(
        h_ptr, stride_hn, stride_hk,  # (N, H) hidden, any strides
        w_ptr, stride_wv, stride_wk,  # (V, H) weight, any strides
        labels_ptr,  # (N,) int64
        m_ptr, s_ptr, zy_ptr,  # (SPLITS, N) float32 out: running max, sum-exp (of z/T), label logit z_y/T
        N, V, H, inv_T, ignore_index, blocks_per_split,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        y = tl.load(labels_ptr + offs_n, mask=row_ok, other=ignore_index)
        offs_k = tl.arange(0, BLOCK_K)
        h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        zy = tl.zeros((BLOCK_N,), tl.float32)
        v_first = split * blocks_per_split * BLOCK_V
        v_last = tl.minimum(v_first + blocks_per_split * BLOCK_V, V)
        for v0 in range(v_first, v_last, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            col_ok = offs_v < v_last
            w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
            acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < H
                a = tl.load(h_rows + kk[None, :] * stride_hk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if UPCAST:  # the interpreter's tl.dot multiplies bf16 bit patterns as integers
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if IEEE:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
            x = tl.where(col_ok[None, :], acc * inv_T, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            m = m_new
            zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], x, 0.0), axis=1)
        out = split * N + offs_n
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(zy_ptr + out, zy, mask=row_ok)

    @triton.jit
    def _fused_logprob_merge_kernel(
        m_ptr, s_ptr, zy_ptr, labels_ptr, logp_ptr, N, ignore_index, splits, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        for j in range(splits):
            m = tl.maximum(m, tl.load(m_ptr + j * N + offs, mask=ok, other=float("-inf")))
        s = tl.zeros((BLOCK,), tl.float32)
        zy = tl.zeros((BLOCK,), tl.float32)
        for j in range(splits):
            mj = tl.load(m_ptr + j * N + offs, mask=ok, other=float("-inf"))
            s += tl.load(s_ptr + j * N + offs, mask=ok, other=0.0) * tl.exp(mj - m)
            zy += tl.load(zy_ptr + j * N + offs, mask=ok, other=0.0)
        y = tl.load(labels_ptr + offs, mask=ok, other=ignore_index)
        logp = zy - (m + tl.log(s))
        tl.store(logp_ptr + offs, tl.where(y != ignore_index, logp, 0.0), mask=ok)


MERGE_BLOCK = 256


def config_for(dtype: torch.dtype) -> FusedLogprobConfig:
    """The tile configuration used for inputs of ``dtype``."""
    return CONFIGS[torch.finfo(dtype).bits // 8]


def num_splits(num_tokens: int, vocab: int, device: torch.device, cfg: FusedLogprobConfig) -> int:
    """Vocabulary splits so that about PROGRAMS_PER_SM programs per SM run (1 off CUDA)."""
    v_blocks = triton.cdiv(vocab, cfg.block_v)
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n_blocks = triton.cdiv(max(1, num_tokens), cfg.block_n)
    return max(1, min(v_blocks, triton.cdiv(PROGRAMS_PER_SM * sms, n_blocks)))


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    inv_t: float,
    ignore_index: int,
    *,
    splits: int | None = None,
    config: FusedLogprobConfig | None = None,
) -> torch.Tensor:
    """Per-token log-probs of the labels, without gradient and without materialised logits.

    Args:
        hidden: (N, H) float32/bf16/fp16, any strides (CUDA, or CPU under TRITON_INTERPRET=1).
        weight: (V, H), same dtype and device, any strides.
        labels: (N,) int64 in [0, V) or ``ignore_index`` (not checked here: ``linear_logprobs`` checks).
        inv_t: 1 / temperature.
        splits: vocabulary splits (default from the SM count); config: tile sizes (default by dtype).

    Returns:
        float32 (N,) ``log_softmax(hidden @ weight.T * inv_t)[label]``, 0.0 where ``label == ignore_index``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (N, H) and weight (V, H) expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = config or config_for(hidden.dtype)
    logp = _empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return logp
    v_blocks = triton.cdiv(v, cfg.block_v)
    k = max(1, min(v_blocks, splits or num_splits(n, v, hidden.device, cfg)))
    per_split = triton.cdiv(v_blocks, k)
    k = triton.cdiv(v_blocks, per_split)  # no empty split
    part = _empty(3, k, n, dtype=torch.float32, device=hidden.device)
    labels = labels.contiguous()
    _fused_logprob_partial_kernel[(triton.cdiv(n, cfg.block_n), k)](
        hidden, hidden.stride(0), hidden.stride(1), weight, weight.stride(0), weight.stride(1), labels,
        part[0], part[1], part[2], n, v, h, float(inv_t), int(ignore_index), per_split,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, IEEE=hidden.dtype == torch.float32,
        UPCAST=hidden.dtype == torch.bfloat16 and kernels_are_interpreted(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    _fused_logprob_merge_kernel[(triton.cdiv(n, MERGE_BLOCK),)](
        part[0], part[1], part[2], labels, logp, n, int(ignore_index), k, BLOCK=MERGE_BLOCK
    )
    return logp
