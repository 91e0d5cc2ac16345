"""The run directory: where each stage's outputs live, and the check that refuses another run's results.

Layout (docs/architecture.md): ``config.yaml``, ``problems/{train,eval}.jsonl``, ``samples.jsonl`` +
``samples.done.json``, ``scored.parquet``, ``checkpoints/``, ``metrics.jsonl``, ``model/`` (+
``model/DONE``), ``eval/{base,tuned}.json`` + ``eval/*_responses.jsonl``, ``eval.json``, ``metrics.json``,
``report.md``, ``summary.md``, ``plots/``; with ``--rounds R``, ``rounds/r2/`` ... ``rounds/rR/``, each
a run directory of the same layout (:mod:`o1pruner.stages.rounds`).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from o1pruner.config import STAGES, ConfigError, PipelineConfig, diff_configs, first_stage

# Files and folders that hold each stage's outputs (complete or partial).
STAGE_OUTPUTS = {
    "sample": ("problems/train.jsonl", "samples.jsonl", "samples.done.json", "rounds"),
    "score": ("scored.parquet",),
    "train": ("checkpoints", "model", "metrics.jsonl"),
    "eval": ("eval", "problems/eval.jsonl"),
}
# The base model's evaluation does not depend on the score and train settings; these outputs do.
TUNED_OUTPUTS = ("eval/tuned.json", "eval/tuned_responses.jsonl", "eval.json", "metrics.json")
REPORT_FILES = ("eval.json", "metrics.json", "summary.md", "report.md", "plots")


def existing_outputs(run_dir: Path) -> dict[str, list[str]]:
    """For each stage, its outputs (relative paths) present in ``run_dir``."""
    return {stage: [p for p in paths if (run_dir / p).exists()] for stage, paths in STAGE_OUTPUTS.items()}


def _outputs_depending_on(
    run_dir: Path, outputs: dict[str, list[str]], stage: str, changed: str
) -> list[str]:
    """Outputs of ``stage`` that depend on a value whose first affected stage is ``changed``."""
    if stage == "eval" and changed in ("score", "train"):
        return [p for p in TUNED_OUTPUTS if (run_dir / p).exists()]
    return outputs[stage]


def check_run_dir(run_dir: Path, cfg: PipelineConfig) -> list[str]:
    """Refuse a run directory holding another run's results; returns notes on harmless changes.

    A key whose value differs from the existing ``config.yaml`` is a conflict when its first affected
    stage, or a later one, already has outputs there (those results were computed with the old value).
    """
    check_writable(run_dir)
    outputs = existing_outputs(run_dir)
    present = [s for s in STAGES if outputs[s]]
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        if present:
            files = ", ".join(p for s in present for p in outputs[s])
            raise ConfigError(
                f"output dir {run_dir} holds pipeline outputs ({files}) but no config.yaml; "
                "use another --output-dir"
            )
        return []
    try:
        old = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{cfg_path}: not valid YAML ({e}); use another --output-dir") from None
    if not isinstance(old, dict):
        raise ConfigError(f"{cfg_path}: not a mapping; use another --output-dir")
    new = cfg.to_dict()
    conflicts, notes = [], []
    for key in diff_configs(old, cfg):
        if key not in new:
            continue
        stage = first_stage(key)
        change = f"{key}: {old[key]!r} -> {new[key]!r}"
        if stage is None:
            notes.append(f"{change} (changes no stage's result)")
            continue
        affected = [
            s for s in STAGES[STAGES.index(stage) :] if _outputs_depending_on(run_dir, outputs, s, stage)
        ]
        if affected:
            conflicts.append(f"{change} (changes stage '{stage}'; outputs of {', '.join(affected)} exist)")
        else:
            notes.append(f"{change} (affects only stage '{stage}' onwards, which has no outputs yet)")
    if conflicts:
        raise ConfigError(
            f"output dir {run_dir} holds another run's results that this config would change: "
            + "; ".join(conflicts)
            + ". Use another --output-dir, or delete those outputs to recompute them."
        )
    return notes


def check_writable(run_dir: Path) -> None:
    """Refuse an output directory that is a file, or that cannot be created or written to."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {str(run_dir)!r} exists and is not a directory", key="output_dir")
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"output_dir {str(run_dir)!r}: {existing} is not writable", key="output_dir")
