"""Scoring: turn graded pre-samples into the off-policy training set (``scored.parquet``).

Per problem x with samples y_1..y_K (all of them, before any selection):

- ``ref_mean_length`` = mean_i L(y_i) (``num_tokens``), ``ref_accuracy`` = mean_i A(x, y_i);
- ``reward`` = R_LH(x, y) = Lbar_ref / L(y) - 1 + lam * (A(x, y) - Abar_ref), raw;
- m samples are kept (seeded per problem; ``samples_per_problem=0`` keeps all), and ``advantage`` is the
  kept rewards clipped to [-2, 4] then z-scored over the whole kept set (each step switchable);
- ``ref_logps``: log pi_ref of every response token, computed once here with the frozen reference model
  (decoder hidden states -> ``linear_logprobs``, logits never materialised).

Choices this module makes (and why):

- An empty response (``num_tokens == 0``: EOS first) counts in the baselines with length 0, but is never
  kept for training: its R_LH = Lbar/0 is undefined and it has no reasoning to prune.
- ``response_ids`` are the generated tokens plus, for a response that ended with EOS
  (``finish_reason == "stop"``), the tokenizer's EOS id (``append_eos``): the policy can only learn to stop
  earlier if the EOS token carries the advantage too. ``length`` stays L(y), the EOS not counted.
- ``max_length`` cuts the response tail so that prompt + response fit (the prompt is kept whole); a problem
  whose prompt alone fills ``max_length`` is dropped with a warning. ``length`` keeps the full L(y).
- Reference forward passes use right-padded batches of similar lengths (sorted longest first) under an
  attention mask, at most ``batch_tokens`` padded tokens per pass.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from o1pruner import distributed
from o1pruner.io import DataError, atomic_path
from o1pruner.options import bad_value, check_options, option, shared
from o1pruner.prompts import DEFAULT_SYSTEM_PROMPT, encode_prompt
from o1pruner.records import read_samples, validate_sample
from o1pruner.reward import length_harmonizing_reward, postprocess_rewards

logger = logging.getLogger(__name__)


SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("sample_index", pa.int32()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("ref_logps", pa.list_(pa.float32())),
        ("length", pa.int32()),
        ("correct", pa.bool_()),
        ("ref_mean_length", pa.float64()),
        ("ref_accuracy", pa.float64()),
        ("reward", pa.float64()),
        ("advantage", pa.float64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


@dataclass
class ScoringConfig:
    """Scoring knobs; defaults follow the paper and its released code.

    ``samples_per_problem``: m samples kept per problem (0 keeps all). ``reward_clip_low`` and
    ``reward_clip_high``: the reward clip range (``clip``; None when either is None).
    ``max_length``: prompt + response cutoff in tokens (None: no cutoff). ``batch_tokens``: padded tokens
    per reference forward pass. ``system_prompt`` must be the one the samples were drawn with.
    ``append_eos``: end the response ids of EOS-terminated samples with the EOS id (see module doc).
    """

    lam: float = option(
        2.0,
        "lambda, the accuracy weight of the reward (paper: 2 Marco-o1, 5 QwQ).",
        stage="score",
        range="[0,)",
    )
    samples_per_problem: int = option(
        2,
        "Samples kept per problem for training (released code: 2; 0 keeps all K).",
        stage="score",
        range="[0,)",
    )
    reward_clip_low: float | None = option(
        -2.0, "Lower clip of the raw reward ('none': no clipping).", stage="score"
    )
    reward_clip_high: float | None = option(
        4.0, "Upper clip of the raw reward ('none': no clipping).", stage="score"
    )
    zscore: bool = option(True, "z-score the (clipped) rewards over the whole training set.", stage="score")
    max_length: int | None = option(
        4096,
        "Prompt + response cutoff in tokens for training (paper: 3072 Marco-o1, 4096 QwQ).",
        stage="score",
        key="cutoff",
        range="[2,)",
    )
    batch_tokens: int = option(
        16384,
        "Token budget per reference forward pass while scoring.",
        stage=None,
        key="score_batch_tokens",
        range="[1,)",
    )
    seed: int = shared("seed", 0)
    system_prompt: str | None = shared("system_prompt", DEFAULT_SYSTEM_PROMPT)
    # The training compute dtype: reference log-probs under the same bf16 autocast as the policy's.
    bf16: bool = shared("bf16", True)
    append_eos: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first option with a bad value."""
        check_options(self)
        low, high = self.reward_clip_low, self.reward_clip_high
        if low is not None and high is not None and not low < high:
            raise bad_value("reward_clip_low", f"below reward_clip_high = {high!r}", low)

    @property
    def clip(self) -> tuple[float, float] | None:
        """The reward clip range, or None (no clipping) when either end is None."""
        if self.reward_clip_low is None or self.reward_clip_high is None:
            return None
        return (float(self.reward_clip_low), float(self.reward_clip_high))


def _problem_rng(seed: int, problem_id: str) -> np.random.Generator:
    # Seeded by (seed, problem id): a problem's selection does not depend on the order or set of problems.
    digest = int.from_bytes(hashlib.sha1(problem_id.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, digest]))


def select_samples(problem_id: str, indices: Sequence[int], m: int, seed: int) -> list[int]:
    """The kept sample indices of one problem: ``m`` of ``indices`` at random (all if m == 0 or m >= n),
    returned in ascending order; deterministic in (seed, problem_id, set of indices)."""
    indices = sorted(indices)
    if m == 0 or m >= len(indices):
        return indices
    picked = _problem_rng(seed, problem_id).choice(len(indices), size=m, replace=False)
    return sorted(indices[i] for i in picked)


def _eos_id(model: Any, tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        return int(eos)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        return gen_eos
    if gen_eos:
        return int(next(iter(gen_eos)))
    return None


def _model_device(model: Any):
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def compute_ref_logps(
    model: Any,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    batch_tokens: int = 16384,
    progress: bool = True,
    autocast_dtype: Any = None,
    shard: tuple[int, int] = (0, 1),
) -> list[np.ndarray | None]:
    """log pi_ref(y_t | x, y_<t) of every response token, under ``model`` in eval mode, without grad.

    ``prompts[i]`` (P_i ids, P_i >= 1) and ``responses[i]`` (R_i ids). Returns one float32 array of shape
    (R_i,) per sequence, in input order. The forward is the trainer's own (``modeling.packed_forward``:
    sequences packed into rows of at most ``batch_tokens`` tokens, the same attention path, dtype and
    ``autocast_dtype``), so at step 0 the importance ratio is 1. ``shard=(r, W)`` computes only the
    packed batches ``r, r + W, ...`` (one process of W); the other sequences' entries are None.
    """
    import torch

    from o1pruner.kernels import linear_logprobs
    from o1pruner.modeling import packed_forward
    from o1pruner.packing import build_example, collate_packed, plan_micro_batches

    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    out: list[np.ndarray | None] = [None] * len(lengths)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            groups = plan_micro_batches(lengths, batch_tokens, "ffd")[shard[0] :: shard[1]]
            for group in tqdm(groups, desc="reference log-probs", unit="batch", disable=not progress):
                examples = [
                    build_example(prompts[i], responses[i], [0.0] * len(responses[i]), 0.0, row=i)
                    for i in group
                ]
                batch = collate_packed(examples).to(device)
                hidden, weight = packed_forward(model, batch, autocast_dtype)
                logps = linear_logprobs(hidden, weight, batch.labels[0]).float().cpu().numpy()
                start = 0
                for i in group:
                    p, r = len(prompts[i]), len(responses[i])
                    out[i] = logps[start + p - 1 : start + p + r - 1].astype(np.float32, copy=True)
                    start += p + r
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _list_array(seqs: Sequence[Sequence[Any] | np.ndarray], value_type: pa.DataType) -> pa.Array:
    """Build a pyarrow list array from per-row sequences without making one Python object per value."""
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if lens.sum() >= 2**31:
        raise DataError(f"{int(lens.sum())} values in one list column: too many for 32-bit offsets")
    offsets = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    np_type = value_type.to_pandas_dtype()
    values = np.concatenate([np.asarray(s, dtype=np_type) for s in seqs]) if seqs else np.zeros(0, np_type)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type=value_type))


def build_training_set(
    problems: Sequence[Any],
    samples: Sequence[dict] | str | os.PathLike,
    model: Any,
    tokenizer: Any,
    out_path: str | os.PathLike | None,
    config: ScoringConfig,
) -> pa.Table | None:
    """Score pre-samples and write ``scored.parquet`` atomically (columns: ``COLUMNS``, see docs/architecture.md).

    ``samples``: records as written by ``sample_problems`` (or the path of ``samples.jsonl``). ``model``:
    the frozen reference model (or a path, loaded with ``modeling.load_model(mode="none")``). Rows are in
    problem order, then sample index. Under a launcher every process scores its share of the reference
    log-probs and rank 0 writes and returns the table (None on the other ranks). Raises DataError for a sample of an unknown problem, a duplicated
    (problem_id, sample_index), a malformed record, or when nothing is left to train on.
    """
    config.validate()
    if isinstance(samples, (str, os.PathLike)):
        samples = read_samples(samples)
    if isinstance(model, (str, os.PathLike)):
        from o1pruner.modeling import load_model

        model, loaded_tok = load_model(str(model), mode="none")
        tokenizer = tokenizer if tokenizer is not None else loaded_tok

    by_id = {p.id: p for p in problems}
    grouped: dict[str, dict[int, dict]] = {pid: {} for pid in by_id}
    for n, rec in enumerate(samples):
        validate_sample(rec, f"sample {n}")
        pid, idx = rec["problem_id"], rec["sample_index"]
        if pid not in by_id:
            raise DataError(
                f"sample {n} (sample_index {idx}): problem_id {pid!r} is not among the {len(by_id)} problems given"
            )
        if idx in grouped[pid]:
            raise DataError(f"sample {n}: duplicate (problem_id, sample_index) = ({pid!r}, {idx})")
        grouped[pid][idx] = rec

    eos = _eos_id(model, tokenizer) if config.append_eos else None
    rows: list[dict] = []
    no_samples = too_long = empty = 0
    for problem in problems:
        recs = grouped[problem.id]
        if not recs:
            no_samples += 1
            continue
        prompt = encode_prompt(tokenizer, problem.question, config.system_prompt)
        if not prompt:
            raise DataError(f"problem {problem.id!r}: the prompt encodes to no tokens")
        if config.max_length is not None and len(prompt) >= config.max_length:
            too_long += 1
            continue
        ordered = [recs[i] for i in sorted(recs)]
        lengths = np.array([r["num_tokens"] for r in ordered], dtype=np.float64)
        correct = np.array([r["correct"] for r in ordered], dtype=np.float64)
        mean_len, acc = float(lengths.mean()), float(correct.mean())
        eligible = [r["sample_index"] for r in ordered if r["num_tokens"] > 0]
        empty += len(ordered) - len(eligible)
        for idx in select_samples(problem.id, eligible, config.samples_per_problem, config.seed):
            rec = recs[idx]
            response = list(rec["token_ids"])
            if eos is not None and rec["finish_reason"] == "stop":
                response.append(eos)
            if config.max_length is not None:
                response = response[: config.max_length - len(prompt)]
            reward = length_harmonizing_reward(
                [rec["num_tokens"]], [rec["correct"]], mean_len, acc, lam=config.lam
            )
            rows.append(
                {
                    "problem_id": problem.id,
                    "sample_index": idx,
                    "prompt_ids": prompt,
                    "response_ids": response,
                    "length": rec["num_tokens"],
                    "correct": bool(rec["correct"]),
                    "ref_mean_length": mean_len,
                    "ref_accuracy": acc,
                    "reward": float(np.asarray(reward, dtype=np.float64).reshape(-1)[0]),
                }
            )
    if no_samples:
        logger.warning("scoring: %d of %d problems have no samples; skipped", no_samples, len(problems))
    if too_long:
        logger.warning(
            "scoring: %d problems dropped: their prompt alone has >= max_length=%s tokens",
            too_long,
            config.max_length,
        )
    if empty:
        logger.info("scoring: %d empty responses (EOS first) counted in the baselines, never kept", empty)
    if not rows:
        raise DataError(
            f"scoring: no trainable sample among {len(samples)} samples of {len(problems)} problems "
            f"({no_samples} without samples, {too_long} with over-long prompts, {empty} empty responses)"
        )

    rewards = np.array([r["reward"] for r in rows], dtype=np.float64)
    advantages = np.asarray(postprocess_rewards(rewards, clip=config.clip, zscore=config.zscore), np.float64)
    from o1pruner.modeling import autocast_dtype_for

    w = distributed.world()
    ref_logps = compute_ref_logps(
        model,
        [r["prompt_ids"] for r in rows],
        [r["response_ids"] for r in rows],
        batch_tokens=config.batch_tokens,
        autocast_dtype=autocast_dtype_for(config.bf16, _model_device(model)),
        shard=(w.rank, w.size),
    )
    if w.distributed:  # every rank scored its share of the packed batches; rank 0 writes the table
        parts = distributed.gather_to_main({i: a for i, a in enumerate(ref_logps) if a is not None})
        if parts is None:
            return None
        for part in parts:
            for i, a in part.items():
                ref_logps[i] = a
    table = pa.Table.from_arrays(
        [
            pa.array([r["problem_id"] for r in rows], pa.string()),
            pa.array([r["sample_index"] for r in rows], pa.int32()),
            _list_array([r["prompt_ids"] for r in rows], pa.int32()),
            _list_array([r["response_ids"] for r in rows], pa.int32()),
            _list_array(ref_logps, pa.float32()),
            pa.array([r["length"] for r in rows], pa.int32()),
            pa.array([r["correct"] for r in rows], pa.bool_()),
            pa.array([r["ref_mean_length"] for r in rows], pa.float64()),
            pa.array([r["ref_accuracy"] for r in rows], pa.float64()),
            pa.array(rewards, pa.float64()),
            pa.array(advantages, pa.float64()),
        ],
        schema=SCHEMA,
    )
    if out_path is not None:
        with atomic_path(out_path) as tmp:
            pq.write_table(table, tmp)
    return table


def load_training_set(path: str | os.PathLike) -> pa.Table:
    """Read ``scored.parquet``; DataError naming the file and the missing columns, or the first row whose
    ``ref_logps`` and ``response_ids`` differ in length."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (expected {list(COLUMNS)})")
    for name in ("prompt_ids", "response_ids", "ref_logps"):
        if not pa.types.is_list(table.schema.field(name).type) and not pa.types.is_large_list(
            table.schema.field(name).type
        ):
            raise DataError(
                f"{path}: column {name!r} must be a list column, got {table.schema.field(name).type}"
            )
    import pyarrow.compute as pc

    n_resp = pc.list_value_length(table["response_ids"]).to_numpy(zero_copy_only=False)
    n_logp = pc.list_value_length(table["ref_logps"]).to_numpy(zero_copy_only=False)
    bad = np.nonzero(n_resp != n_logp)[0]
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{path}, row {i}: ref_logps has {n_logp[i]} values but response_ids has {n_resp[i]} tokens"
        )
    return table
