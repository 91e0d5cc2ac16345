"""Stage 2, scoring: rewards and reference log-probs of the samples, into ``scored.parquet``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from o1pruner import distributed
from o1pruner.records import read_samples

if TYPE_CHECKING:
    from o1pruner.pipeline import Pipeline


def run(p: Pipeline) -> None:
    """Write ``scored.parquet`` from the complete samples (skipped when it exists)."""
    out = p.path("scored.parquet")
    if p.is_complete("score", "scored.parquet", needs=("samples.done.json", "sample")):
        return
    from o1pruner.scoring import build_training_set

    problems = p.train_problems()
    samples = read_samples(p.path("samples.jsonl"))
    model = p.models.reference()
    p.log(f"score: rewards (lam={p.cfg.lam}) and reference log-probs of {len(samples)} samples")
    build_training_set(  # atomic; under a launcher every rank scores a share, rank 0 writes
        problems, samples, model, p.models.tokenizer(), out, p.cfg.scoring_config()
    )
    distributed.barrier()
