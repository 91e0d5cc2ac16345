"""Stage 1, pre-sampling: K graded solutions per training problem from the reference model.

Writes ``samples.jsonl`` (resumable) and, once complete, ``samples.done.json``. Under a launcher the
problems are split across the processes (see :mod:`o1pruner.distributed`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from o1pruner import distributed
from o1pruner.io import atomic_write_json
from o1pruner.modeling import free_memory

if TYPE_CHECKING:
    from o1pruner.pipeline import Pipeline


def generation_shard(p: Pipeline, config):
    """``(config, dp)`` for this process's share of a generation stage: the seed derived from the
    data-parallel rank (ranks draw distinct streams) and ``dp`` = (rank, size) for
    :func:`o1pruner.distributed.sharded_stage`; ``(config, None)`` with one process."""
    if not distributed.world().distributed:
        return config, None
    from o1pruner.sampling import child_seed

    if config.backend == "vllm":
        from o1pruner.vllm_engine import data_parallel_rank

        dp = data_parallel_rank(config.tensor_parallel_size)
    else:
        w = distributed.world()
        dp = (w.rank, w.size)
    return dataclasses.replace(config, seed=child_seed(config.seed, dp[0])), dp


def run_generation(p: Pipeline, desc: str, config, fn, /, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)``: the generation work of one process. With vLLM and one process it runs in a
    child process (:mod:`o1pruner.child`), so the engine's memory is back for certain before training or
    the next stage; under a launcher it stays in this process, whose process group the engines join."""
    if config.backend == "vllm" and not distributed.world().distributed:
        from o1pruner.child import run_in_child

        p.log(f"{desc}: the vLLM engine runs in a child process")
        run_in_child(desc, fn, *args, **kwargs)
    else:
        fn(*args, **kwargs)


def run(p: Pipeline) -> None:
    """Draw the missing samples into ``samples.jsonl``; mark the stage done (skipped when done)."""
    done = p.path("samples.done.json")
    if p.is_complete("sample", "samples.done.json"):
        return
    from o1pruner.sampling import read_samples, sample_problems

    problems = p.train_problems()
    if p.cfg.sampling_backend == "vllm":
        p.models.release()
        model, tokenizer = p.cfg.model, p.models.tokenizer()
    else:
        model, tokenizer = p.models.reference(), p.models.tokenizer()
    samples_path = p.path("samples.jsonl")
    if samples_path.exists() or distributed.rank_logs(samples_path):
        p.log("sample: resuming from samples.jsonl")
    p.log(f"sample: {p.cfg.k} solutions for each of {len(problems)} problems")
    config, dp = generation_shard(p, p.cfg.sampling_config())

    def work(shard, out_path, done_paths) -> None:
        run_generation(
            p, "sample", config, sample_problems, shard, model, tokenizer, out_path, config,
            done_paths=done_paths,
        )  # fmt: skip

    distributed.sharded_stage(samples_path, problems, read_samples, work, dp=dp)
    with distributed.main_first() as main:
        if main:
            samples = read_samples(samples_path)
            expected = len(problems) * p.cfg.k
            if len(samples) < expected:
                raise RuntimeError(
                    f"sampling stopped early: {len(samples)} of {expected} samples in {samples_path}"
                )
            atomic_write_json(
                done, {"num_problems": len(problems), "k": p.cfg.k, "num_samples": len(samples)}
            )
    if p.cfg.sampling_backend == "vllm":
        free_memory()
