"""Padding-free packing of (prompt, response) rows into micro-batches, with per-sequence attention isolation.

A micro-batch is one row of concatenated sequences, shape (1, N), N <= the token budget (a single sequence
longer than the budget gets a micro-batch of its own; it is never cut: the scoring stage already truncated
responses to ``max_length``). ``position_ids`` restart at 0 for each sequence and ``seq_ids`` say which
sequence each token belongs to.

Why an explicit mask: in transformers 5, ``create_causal_mask`` only infers packed sequences from
``position_ids`` when no 2D mask and *no cache* are given (``masking_utils._preprocess_mask_arguments``),
and the decoder builds a ``DynamicCache`` whenever ``use_cache`` is left at the config default (True). So
restarting ``position_ids`` alone can silently let sequences attend to each other. We therefore pass, per
attention implementation:

- ``sdpa``: a 4D boolean block-diagonal causal mask (1, 1, N, N), True = may attend (returned as-is by
  ``create_causal_mask`` for any 4D mask);
- ``eager``: the same mask as an additive float mask (0 / dtype min), since eager attention adds it to
  the scores;
- ``flash_attention_2``/``flash_attention_3``: the varlen path, ``cu_seq_lens_q/k`` and ``max_length_q/k``
  plus the restarting ``position_ids`` (unverified here: flash-attn is not installable on this machine);
- ``flex_attention``: ``position_ids`` with ``use_cache=False``, from which transformers builds the
  packed block mask itself.

Labels follow the causal-LM shift inside each sequence: the label at position t is token t+1; prompt
positions whose next token is still prompt, and the last position of each sequence, get ``ignore_index``.
So a sequence with R response tokens has exactly R valid labels, aligned with its R ``ref_logps``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
# Implementations that isolate packed sequences from the varlen keyword arguments (cu_seq_lens_*).
_FLASH_IMPLS = (
    "flash_attention_2",
    "flash_attention_3",
    "kernels-community/flash-attn",
    "paged_attention",
    "o1pruner_varlen_sdpa",
)


@dataclass
class Example:
    """One training sequence, flattened: prompt + response tokens and per-token targets (length L)."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not a response token
    old_logps: list[float]  # log pi_ref of the label; 0.0 where ignored
    advantage: float
    row: int = -1  # index of the source row in the training table

    def __len__(self) -> int:
        return len(self.input_ids)


def build_example(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    ref_logps: Sequence[float],
    advantage: float,
    *,
    row: int = -1,
    ignore_index: int = IGNORE_INDEX,
) -> Example:
    """Shift-aligned labels and reference log-probs for one (prompt, response) pair.

    Position t predicts token t+1, so positions P-1 .. P+R-2 carry the R response tokens as labels.
    """
    prompt_ids, response_ids = list(prompt_ids), list(response_ids)
    if len(ref_logps) != len(response_ids):
        raise ValueError(
            f"row {row}: ref_logps has {len(ref_logps)} values but response_ids has {len(response_ids)} tokens"
        )
    if not prompt_ids:
        raise ValueError(f"row {row}: empty prompt_ids (the first response token needs a context)")
    ids = prompt_ids + response_ids
    n, p = len(ids), len(prompt_ids)
    labels = [ignore_index] * n
    old = [0.0] * n
    for j, (tok, lp) in enumerate(zip(response_ids, ref_logps)):
        labels[p - 1 + j] = int(tok)
        old[p - 1 + j] = float(lp)
    return Example(input_ids=ids, labels=labels, old_logps=old, advantage=float(advantage), row=row)


def plan_micro_batches(lengths: Sequence[int], budget: int, strategy: str = "ffd") -> list[list[int]]:
    """Group sequence indices into micro-batches of at most ``budget`` tokens.

    ``strategy="ffd"``: first-fit decreasing (fewest micro-batches, deterministic: ties keep input order);
    ``"sequential"``: keep the input order, start a new micro-batch when the next one does not fit.
    A sequence longer than ``budget`` is alone in its micro-batch. Returns lists of indices into
    ``lengths``; within a micro-batch the indices are in ascending order.
    """
    if budget <= 0:
        raise ValueError(f"micro-batch token budget must be positive, got {budget}")
    if strategy == "sequential":
        bins: list[list[int]] = []
        used = 0
        for i, n in enumerate(lengths):
            if bins and used + n <= budget:
                bins[-1].append(i)
                used += n
            else:
                bins.append([i])
                used = n
        return bins
    if strategy != "ffd":
        raise ValueError(f"unknown packing strategy {strategy!r} (expected 'ffd' or 'sequential')")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, loads = [], []
    for i in order:
        n = lengths[i]
        for b, load in enumerate(loads):
            if load + n <= budget:
                bins[b].append(i)
                loads[b] += n
                break
        else:
            bins.append([i])
            loads.append(n)
    return [sorted(b) for b in bins]


@dataclass
class PackedBatch:
    """One packed micro-batch. All tensors are (1, N); ``N`` = total tokens of its sequences."""

    input_ids: torch.Tensor  # int64
    position_ids: torch.Tensor  # int64, restarting at 0 per sequence
    seq_ids: torch.Tensor  # int64, 0..S-1
    labels: torch.Tensor  # int64, IGNORE_INDEX where not trained on
    old_logps: torch.Tensor  # float32
    advantages: torch.Tensor  # float32, each sequence's advantage on all of its positions
    seq_lens: list[int]
    rows: list[int]

    @property
    def num_sequences(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def num_valid_tokens(self, ignore_index: int = IGNORE_INDEX) -> int:
        return int((self.labels != ignore_index).sum())

    def to(self, device: torch.device | str) -> PackedBatch:
        move = lambda t: t.to(device, non_blocking=True)
        return PackedBatch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.seq_ids),
            move(self.labels),
            move(self.old_logps),
            move(self.advantages),
            self.seq_lens,
            self.rows,
        )


def collate_packed(examples: Sequence[Example]) -> PackedBatch:
    """Concatenate examples into one (1, N) row."""
    if not examples:
        raise ValueError("cannot pack an empty list of examples")
    ids, pos, sid, lab, old, adv = [], [], [], [], [], []
    for s, ex in enumerate(examples):
        n = len(ex)
        ids += ex.input_ids
        pos += range(n)
        sid += [s] * n
        lab += ex.labels
        old += ex.old_logps
        adv += [ex.advantage] * n
    as_row = lambda xs, dt: torch.tensor(xs, dtype=dt).unsqueeze(0)
    return PackedBatch(
        input_ids=as_row(ids, torch.long),
        position_ids=as_row(pos, torch.long),
        seq_ids=as_row(sid, torch.long),
        labels=as_row(lab, torch.long),
        old_logps=as_row(old, torch.float32),
        advantages=as_row(adv, torch.float32),
        seq_lens=[len(e) for e in examples],
        rows=[e.row for e in examples],
    )


@dataclass
class PaddedBatch:
    """Right-padded (B, T) batch; ``attention_mask`` is 1 on real tokens. Used as a packing cross-check."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    old_logps: torch.Tensor
    advantages: torch.Tensor
    seq_lens: list[int]


def collate_padded(examples: Sequence[Example], pad_id: int = 0) -> PaddedBatch:
    """Right-pad examples to the longest one (padding positions get IGNORE_INDEX labels)."""
    t = max(len(e) for e in examples)
    b = len(examples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    att = torch.zeros((b, t), dtype=torch.long)
    lab = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    old = torch.zeros((b, t), dtype=torch.float32)
    adv = torch.zeros((b, t), dtype=torch.float32)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        att[i, :n] = 1
        lab[i, :n] = torch.tensor(e.labels)
        old[i, :n] = torch.tensor(e.old_logps)
        adv[i, :] = e.advantage
    return PaddedBatch(ids, att, lab, old, adv, [len(e) for e in examples])


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """(1, N) sequence ids -> (1, 1, N, N) bool mask: query q may attend key k iff same sequence and k <= q."""
    s = seq_ids.reshape(1, -1)
    n = s.shape[1]
    same = s[:, :, None] == s[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
    return (same & causal).unsqueeze(1)


def packed_attention_kwargs(attn_implementation: str, batch: PackedBatch, dtype: torch.dtype) -> dict:
    """Keyword arguments for the decoder forward that isolate the sequences of ``batch``.

    Always contains ``position_ids``; plus ``attention_mask`` (sdpa, eager) or the flash varlen kwargs.
    ``dtype`` is the compute dtype of the attention scores (for eager's additive mask).
    """
    kw: dict = {"position_ids": batch.position_ids}
    if attn_implementation == "sdpa":
        kw["attention_mask"] = block_causal_mask(batch.seq_ids)
    elif attn_implementation == "eager":
        allowed = block_causal_mask(batch.seq_ids)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        kw["attention_mask"] = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    elif attn_implementation in _FLASH_IMPLS:
        lens = torch.tensor(batch.seq_lens, dtype=torch.int32, device=batch.input_ids.device)
        cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        kw.update(
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max(batch.seq_lens),
            max_length_k=max(batch.seq_lens),
        )
    elif attn_implementation == "flex_attention":
        pass  # transformers derives the packed block mask from position_ids when use_cache=False
    else:
        raise ValueError(
            f"packed sequences: attention implementation {attn_implementation!r} has no isolation path "
            "(supported: sdpa, eager, flash_attention_2/3, flex_attention)"
        )
    return kw
