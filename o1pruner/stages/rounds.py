"""Iterative rounds (``--rounds R``): round r >= 2 re-samples from round r-1's tuned model and trains again.

Round 1 is the run directory itself (the paper's single pass). Round r >= 2 is a complete run of the same
pipeline in ``rounds/rR/`` whose model is round r-1's tuned model: it is the sampler, the reference
(baselines Lbar, Abar and the importance ratio) and the model trained, on the same training and
evaluation problems (``problems/*.jsonl`` of the run). Each round is its own resumable run directory,
with its own ``config.yaml``, so a killed round resumes where it stopped and a finished one is skipped.

A LoRA/QLoRA round's tuned model is base + adapter; round r+1 starts from it merged into full weights
(``rounds/rR/base/``, peft ``merge_and_unload`` on the unquantised base) and trains a fresh adapter on
it; with qlora that merged model is quantised to NF4 again on load, so round r+1's reference is the
NF4 rounding of round r's tuned model (its importance ratio still starts at exactly 1). Full and freeze
rounds start directly from the previous ``model/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from o1pruner.pipeline import Pipeline


def round_dir(p: Pipeline, r: int) -> Path:
    """The run directory of round ``r`` (round 1 is the run directory itself)."""
    return p.run_dir if r == 1 else p.path(f"rounds/r{r}")


def round_base(p: Pipeline, r: int) -> Path:
    """The model round ``r >= 2`` starts from: round r-1's tuned model, as full weights (merged if LoRA)."""
    prev = round_dir(p, r - 1) / "model"
    if not (prev / "adapter_config.json").exists():
        return prev
    merged = round_dir(p, r) / "base"
    from o1pruner import distributed

    with distributed.main_first() as main:
        if main and not (merged / "DONE").exists():
            from o1pruner.modeling import merge_adapter_dir

            p.log(f"round {r}: merging round {r - 1}'s adapter into full weights -> {merged}")
            merge_adapter_dir(prev, merged)  # atomic: a killed merge leaves no base/DONE
    return merged


def round_config(p: Pipeline, r: int, model: Path):
    """Round ``r``'s config: the run's settings, its problem files, ``model`` as the base, one round."""
    from o1pruner.config import PipelineConfig

    values: dict[str, Any] = p.cfg.to_dict()
    values.update(
        output_dir=str(round_dir(p, r)),
        model=str(model),
        dataset=str(p.path("problems/train.jsonl")),
        shuffle=False,  # the run's problems, in the run's order
        rounds=1,
    )
    eval_file = p.path("problems/eval.jsonl")
    values["eval_dataset"] = str(eval_file) if eval_file.exists() else None
    return PipelineConfig.from_dict(values, source=f"round {r}")


def run_rounds(p: Pipeline) -> None:
    """Rounds 2..R after round 1 finished in ``p.run_dir`` (each writes its own report)."""
    from o1pruner.pipeline import Pipeline as RoundPipeline

    for r in range(2, p.cfg.rounds + 1):
        p.require("model/DONE" if r == 2 else f"rounds/r{r - 1}/model/DONE", "train")
        p.log(f"round {r} of {p.cfg.rounds}: sampling from round {r - 1}'s tuned model, in {round_dir(p, r)}")
        cfg = round_config(p, r, round_base(p, r))
        sub = RoundPipeline(cfg, log=lambda msg, r=r: p.log(f"[round {r}] {msg}"))
        sub.run()


def round_results(p: Pipeline) -> list[tuple[int, dict]]:
    """``(round, tuned evaluation)`` of every round 1..R whose evaluation exists; [] for a one-round run."""
    import json

    if p.cfg.rounds == 1:
        return []
    out = []
    for r in range(1, p.cfg.rounds + 1):
        path = round_dir(p, r) / "eval" / "tuned.json"
        if path.exists():
            out.append((r, json.loads(path.read_text(encoding="utf-8"))))
    return out


def round_training_metrics(p: Pipeline) -> list[tuple[int, Path]]:
    """``(round, metrics.jsonl)`` of every round's training log that exists."""
    paths = [(r, round_dir(p, r) / "metrics.jsonl") for r in range(1, p.cfg.rounds + 1)]
    return [(r, path) for r, path in paths if path.exists()]
