"""Stage 1, pre-sampling: K graded solutions per training problem from the reference model.

Writes ``samples.jsonl`` (resumable) and, once complete, ``samples.done.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from o1pruner.io import atomic_write_json
from o1pruner.modeling import free_memory

if TYPE_CHECKING:
    from o1pruner.pipeline import Pipeline


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
    if samples_path.exists():
        p.log("sample: resuming from samples.jsonl")
    p.log(f"sample: {p.cfg.k} solutions for each of {len(problems)} problems")
    sample_problems(problems, model, tokenizer, samples_path, p.cfg.sampling_config())
    samples = read_samples(samples_path)
    expected = len(problems) * p.cfg.k
    if len(samples) < expected:
        raise RuntimeError(f"sampling stopped early: {len(samples)} of {expected} samples in {samples_path}")
    atomic_write_json(done, {"num_problems": len(problems), "k": p.cfg.k, "num_samples": len(samples)})
    if p.cfg.sampling_backend == "vllm":
        free_memory()
