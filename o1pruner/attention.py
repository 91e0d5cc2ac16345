"""Per-sequence attention for packed rows without an N x N mask: the default when flash-attn is absent.

Registered with transformers' ``AttentionInterface`` under :data:`VARLEN_SDPA`. With the varlen keyword
arguments a packed row carries (``cu_seq_lens_q``, the same ones flash-attn's varlen path takes) it runs one
causal ``scaled_dot_product_attention`` per sequence, so memory stays O(N) in the packed length and SDPA picks
its fused (flash / memory-efficient) kernel for each causal block. Without them (generation with a KV cache,
scoring of padded batches) it is ordinary SDPA with the padding mask. For the mask step transformers treats the
name like flash-attn: it passes the 2D padding mask (or None) through instead of building a 4D one.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

VARLEN_SDPA = "o1pruner_varlen_sdpa"


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, T, D) -> (B, kv_heads * groups, T, D), as grouped-query attention shares keys and values."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _padding_sdpa(query, key, value, padding: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """SDPA over a right- or left-padded batch; ``padding`` (B, kv_len) is 1 on real tokens, or None."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if padding is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1, scale=scale)
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    mask = causal[None, None] & padding[:, None, None, -kv_len:].bool()
    # A padding query that may attend to nothing would give NaN, which 0-weighted values still spread.
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (B, heads, T, D) query, (B, kv_heads, T, D) key and value.

    Returns ``(B, T, heads, D)`` in the query's dtype and no attention weights. ``dropout`` must be 0 (the
    trainer never uses attention dropout).
    """
    if dropout:
        raise ValueError(f"{VARLEN_SDPA} supports no attention dropout, got dropout={dropout}")
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if cu_seq_lens_q is None:
        out = _padding_sdpa(query, key, value, attention_mask, scaling)
    else:
        if query.shape[0] != 1:
            raise ValueError(f"packed attention takes one packed row, got batch {query.shape[0]}")
        bounds = cu_seq_lens_q.tolist()
        pieces = [
            F.scaled_dot_product_attention(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling
            )
            for s, e in itertools.pairwise(bounds)
            if e > s
        ]
        out = torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :data:`VARLEN_SDPA` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, flash_attention_mask)
    return VARLEN_SDPA
