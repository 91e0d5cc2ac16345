"""Evaluation: accuracy and generated length of a model on held-out problems.

Responses come from :func:`o1pruner.sampling.generate` (the same backends and prompt builder as the
pre-sampling), greedy by default as in the paper; each is graded by :func:`o1pruner.grading.is_correct`
and its length is its number of generated tokens. Per-response records are appended to a JSON-lines file
batch by batch, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from o1pruner import distributed
from o1pruner.io import append_jsonl, read_jsonl
from o1pruner.options import check_options, option, shared
from o1pruner.prompts import DEFAULT_SYSTEM_PROMPT
from o1pruner.records import eval_record, record_key
from o1pruner.sampling import backend_option

# Prompts per vLLM evaluation call at least (MATH500 is one call): the engine batches them itself.
VLLM_EVAL_CHUNK = 1024


@dataclass
class EvalConfig:
    """Decoding settings of an evaluation (paper: greedy, up to 8192 new tokens)."""

    max_new_tokens: int = option(
        8192,
        "Maximum new tokens per evaluation response (paper: 8192).",
        stage="eval",
        key="eval_max_new_tokens",
        range="[1,)",
    )
    greedy: bool = option(
        True,
        "Greedy decoding for evaluation (paper); --no-eval-greedy samples.",
        stage="eval",
        key="eval_greedy",
    )
    temperature: float = option(
        0.5,
        "Evaluation temperature with --no-eval-greedy.",
        stage="eval",
        key="eval_temperature",
        range="[0,)",
    )
    top_p: float = option(
        0.8, "Evaluation top-p with --no-eval-greedy.", stage="eval", key="eval_top_p", range="(0,1]"
    )
    num_samples: int = option(
        1,
        "Responses per evaluation problem (accuracy is averaged).",
        stage="eval",
        key="eval_num_samples",
        range="[1,)",
    )
    backend: str = backend_option("evaluation", "eval", "eval_backend")
    batch_size: int = option(
        64,
        f"Prompts per evaluation generate call with hf (its KV-cache memory knob); vllm takes at least "
        f"{VLLM_EVAL_CHUNK} per call (the engine schedules its own memory; resumable per call).",
        stage=None,
        key="eval_batch_size",
        range="[1,)",
    )
    system_prompt: str | None = shared("system_prompt", DEFAULT_SYSTEM_PROMPT)
    seed: int = shared("seed", 0)
    gpu_memory_utilization: float | None = shared("gpu_memory_utilization", None)
    quantization: str | None = shared("quantization", None)
    tensor_parallel_size: int = shared("vllm_tensor_parallel_size", 1)
    bf16: bool = shared("bf16", True)
    # Not an option: a LoRA adapter folder that vLLM serves on top of the model (the tuned evaluation).
    lora_path: str | None = None

    def __post_init__(self) -> None:
        check_options(self)

    def sampling_config(self):
        """The :class:`o1pruner.sampling.SamplingConfig` that ``generate`` receives."""
        from dataclasses import fields

        from o1pruner.sampling import SamplingConfig

        values = {
            "k": self.responses_per_problem,
            "temperature": 0.0 if self.greedy else self.temperature,
            "top_p": 1.0 if self.greedy else self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "backend": self.backend,
            "batch_size": self.batch_size,
            "system_prompt": self.system_prompt,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "quantization": self.quantization,
            "tensor_parallel_size": self.tensor_parallel_size,
            "bf16": self.bf16,
            "lora_path": self.lora_path,
        }
        known = {f.name for f in fields(SamplingConfig)}
        return SamplingConfig(**{k: v for k, v in values.items() if k in known})

    @property
    def chunk_size(self) -> int:
        """Prompts per generate call: ``batch_size`` with hf; with vllm at least ``VLLM_EVAL_CHUNK``, so
        the engine is kept full instead of waiting for the slowest of a small batch."""
        return self.batch_size if self.backend == "hf" else max(self.batch_size, VLLM_EVAL_CHUNK)

    @property
    def responses_per_problem(self) -> int:
        return 1 if self.greedy else self.num_samples


def _attr(problem: Any, name: str, default: Any = None) -> Any:
    if isinstance(problem, dict):
        return problem.get(name, default)
    return getattr(problem, name, default)


def evaluate_model(
    model_or_path: Any,
    tokenizer: Any,
    problems: Sequence[Any],
    config: EvalConfig | None = None,
    out_path: str | os.PathLike | None = None,
    *,
    desc: str = "eval",
    done_paths: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Generate, grade and measure responses to ``problems``.

    Args:
        model_or_path: a loaded causal LM (hf backend) or a model path (vllm backend).
        problems: ``o1pruner.data.Problem`` objects (or dicts with ``id``, ``question``, ``answer``,
            optional ``level``).
        out_path: per-response JSON-lines file; records already there (same problem id and sample index)
            are reused, so a rerun only generates the missing ones.
        done_paths: more such files (other processes' logs) whose records count as done; they are read,
            never written.

    Returns:
        ``{"accuracy", "mean_length", "median_length", "num_problems", "num_responses",
        "truncated_fraction", "per_level", "lengths", "config"}``: accuracy is a fraction in [0, 1],
        lengths are generated tokens; ``per_level`` maps each level to the same metrics (empty when no
        problem has a level); ``lengths`` lists every response's length in problem order.
    """
    config = config or EvalConfig()
    n = config.responses_per_problem
    done = _read_done(problems, [p for p in (out_path, *done_paths) if p is not None])
    todo = [p for p in problems if any((str(_attr(p, "id")), j) not in done for j in range(n))]
    calls = math.ceil(len(todo) / config.chunk_size)
    if distributed.lockstep(config.backend):
        calls = distributed.all_max(calls)
    if calls:
        with _generator(model_or_path, tokenizer, config, todo) as (model, tokenizer):
            _generate_missing(model, tokenizer, todo, done, config, out_path, desc, calls)
    return _result(problems, done, config)


def summarize_responses(
    problems: Sequence[Any], config: EvalConfig, out_path: str | os.PathLike
) -> dict[str, Any]:
    """:func:`evaluate_model`'s result from the response records already in ``out_path`` (no generation;
    problems without their responses there are measured on what exists)."""
    return _result(problems, _read_done(problems, [out_path]), config)


def _read_done(problems: Sequence[Any], paths: Sequence[str | os.PathLike]) -> dict[tuple[str, int], dict]:
    ids = [str(_attr(p, "id")) for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"evaluation problems: duplicate problem id {dup!r}")
    done: dict[tuple[str, int], dict] = {}
    for path in [p for p in paths if os.path.exists(p)]:
        for rec in read_jsonl(path, tolerate_partial_tail=True):
            done.setdefault(record_key(rec), rec)
    return done


def _result(problems: Sequence[Any], done: dict[tuple[str, int], dict], config: EvalConfig) -> dict[str, Any]:
    n = config.responses_per_problem
    records = [
        done[(str(_attr(p, "id")), j)] for p in problems for j in range(n) if (str(_attr(p, "id")), j) in done
    ]
    levels = {str(_attr(p, "id")): _attr(p, "level") for p in problems}
    result = compute_metrics(records, levels)
    result["num_problems"] = len(problems)
    result["config"] = {
        "greedy": config.greedy,
        "max_new_tokens": config.max_new_tokens,
        "temperature": None if config.greedy else config.temperature,
        "top_p": None if config.greedy else config.top_p,
        "responses_per_problem": n,
        "backend": config.backend,
    }
    return result


@contextlib.contextmanager
def _generator(
    model_or_path: Any, tokenizer: Any, config: EvalConfig, todo: Sequence[Any] = ()
) -> Iterator[tuple[Any, Any]]:
    """Load a model given as a path once for the whole evaluation (an engine per batch would be slow).

    A vLLM engine gets ``max_model_len`` from the longest prompt of ``todo`` when ``tokenizer`` is given.
    """
    if not isinstance(model_or_path, (str, os.PathLike)):
        was_training = bool(getattr(model_or_path, "training", False))
        if was_training:  # dropout off; gradient checkpointing would also switch the KV cache off
            model_or_path.eval()
        try:
            yield model_or_path, tokenizer
        finally:
            if was_training:
                model_or_path.train()
        return
    if config.backend == "vllm":
        from o1pruner.sampling import make_vllm_engine, release_vllm_engine

        longest = None
        if tokenizer is not None and todo:
            from o1pruner.prompts import encode_prompt

            longest = max(
                len(encode_prompt(tokenizer, _attr(p, "question"), config.system_prompt)) for p in todo
            )
        llm = make_vllm_engine(model_or_path, config.sampling_config(), longest)
        try:
            if tokenizer is None:
                tokenizer = llm.get_tokenizer()
            yield llm, tokenizer
        finally:
            release_vllm_engine(llm)
        return
    from o1pruner.modeling import load_model

    model, tok = load_model(str(model_or_path), mode="none")
    try:
        yield model, tokenizer if tokenizer is not None else tok
    finally:
        del model


def _generate_missing(
    model: Any,
    tokenizer: Any,
    todo: Sequence[Any],
    done: dict[tuple[str, int], dict],
    config: EvalConfig,
    out_path: str | os.PathLike | None,
    desc: str,
    calls: int,
) -> None:
    """Generate and grade the missing responses of ``todo``, adding them to ``done`` (and ``out_path``);
    ``calls`` >= the batches of ``todo``: the rest are empty calls that keep data-parallel engines in step."""
    from tqdm.auto import tqdm

    from o1pruner.prompts import encode_prompt
    from o1pruner.sampling import generate

    n = config.responses_per_problem
    sampling_config = config.sampling_config()
    with tqdm(total=len(todo), desc=desc, unit="problem") as bar:
        for start in range(0, len(todo), config.chunk_size):
            batch = todo[start : start + config.chunk_size]
            prompts = [encode_prompt(tokenizer, _attr(p, "question"), config.system_prompt) for p in batch]
            # seed_offset: batches of a sampled evaluation draw with distinct seeds.
            outputs = generate(model, tokenizer, prompts, n=n, config=sampling_config, seed_offset=start * n)
            if len(outputs) != len(batch):
                raise RuntimeError(f"generate returned {len(outputs)} result lists for {len(batch)} prompts")
            new = []
            for problem, gens in zip(batch, outputs):
                pid = str(_attr(problem, "id"))
                gold = str(_attr(problem, "answer"))
                for j, gen in enumerate(gens[:n]):
                    if (pid, j) in done:
                        continue
                    rec = eval_record(pid, j, _attr(problem, "level"), gold, gen)
                    done[(pid, j)] = rec
                    new.append(rec)
            if out_path is not None:
                append_jsonl(out_path, new)
            bar.update(len(batch))
    idle = calls - math.ceil(len(todo) / config.chunk_size)
    if idle > 0:
        from o1pruner.sampling import _vllm_generate_requests

        for _ in range(idle):
            _vllm_generate_requests(model, tokenizer, [], sampling_config)


def _summary(lengths: Sequence[int], correct: Sequence[bool], truncated: Sequence[bool]) -> dict[str, Any]:
    if not lengths:
        return {
            "accuracy": 0.0,
            "mean_length": 0.0,
            "median_length": 0.0,
            "num_responses": 0,
            "truncated_fraction": 0.0,
        }
    lengths64 = np.asarray(lengths, dtype=np.float64)
    return {
        "accuracy": float(np.mean(np.asarray(correct, dtype=np.float64))),
        "mean_length": float(lengths64.mean()),
        "median_length": float(np.median(lengths64)),
        "num_responses": len(lengths),
        "truncated_fraction": float(np.mean(np.asarray(truncated, dtype=np.float64))),
    }


def compute_metrics(records: Sequence[dict], levels: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics of graded response records (``correct``, ``num_tokens``, ``finish_reason``, ``problem_id``).

    ``levels`` maps problem id to level (None: no level); the per-level breakdown is given only when at
    least one problem has a level (the rest are grouped under "none").
    """
    lengths = [int(r["num_tokens"]) for r in records]
    correct = [bool(r["correct"]) for r in records]
    truncated = [r.get("finish_reason") == "length" for r in records]
    out = _summary(lengths, correct, truncated)
    out["num_problems"] = len({r["problem_id"] for r in records})
    per_level: dict[str, dict] = {}
    levels = levels if levels is not None else {r["problem_id"]: r.get("level") for r in records}
    if any(v is not None for v in levels.values()):
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            lvl = levels.get(r["problem_id"], r.get("level"))
            groups.setdefault("none" if lvl is None else str(lvl), []).append(i)
        for lvl in sorted(groups, key=_level_sort_key):
            idx = groups[lvl]
            stats = _summary(
                [lengths[i] for i in idx], [correct[i] for i in idx], [truncated[i] for i in idx]
            )
            stats["num_problems"] = len({records[i]["problem_id"] for i in idx})
            per_level[lvl] = stats
    out["per_level"] = per_level
    out["lengths"] = lengths
    return out


def _level_sort_key(level: str) -> tuple:
    digits = "".join(c for c in level if c.isdigit())
    return (0, int(digits), level) if digits else (1, 0, level)
