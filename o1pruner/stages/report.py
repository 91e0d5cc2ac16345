"""The report after the evaluations: eval.json, metrics.json, summary.md, report.md, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from o1pruner.rundir import REPORT_FILES
from o1pruner.stages import rounds as rounds_stage

if TYPE_CHECKING:
    from o1pruner.pipeline import Pipeline


def _inputs(p: Pipeline) -> list[Path]:
    paths = [p.path("eval/base.json"), p.path("eval/tuned.json"), p.path("metrics.jsonl")]
    for r in range(2, p.cfg.rounds + 1):
        d = rounds_stage.round_dir(p, r)
        paths += [d / "eval" / "tuned.json", d / "metrics.jsonl"]
    return paths


def is_current(p: Pipeline) -> bool:
    """All report files exist, are newer than every round's evaluation and training log, and list the
    rounds that exist."""
    paths = [p.path(rel) for rel in REPORT_FILES]
    if not all(f.exists() for f in paths):
        return False
    oldest = min(f.stat().st_mtime for f in paths)
    if not all(not f.exists() or f.stat().st_mtime <= oldest for f in _inputs(p)):
        return False
    listed = json.loads(p.path("metrics.json").read_text(encoding="utf-8")).get("rounds")
    found = rounds_stage.round_results(p)
    return [r["round"] for r in listed or []] == [r for r, _ in found]


def run(p: Pipeline, base: dict, tuned: dict) -> dict:
    """Write the report files (unless current), print the summary table; returns eval.json's content.

    With several rounds, ``tuned`` is replaced by the last evaluated round's model (the final one) and
    every round's figures go into metrics.json's ``rounds`` and report.md.
    """
    from o1pruner.report import print_summary, write_report

    rounds = rounds_stage.round_results(p)
    if rounds:
        tuned = rounds[-1][1]
    if is_current(p):
        p.log("report: up to date, skipped")
        doc = json.loads(p.path("eval.json").read_text(encoding="utf-8"))
    else:
        curves = None
        if rounds:
            curves = {f"round {r}": path for r, path in rounds_stage.round_training_metrics(p)}
        doc = write_report(
            p.run_dir, base, tuned, config=p.cfg.to_dict(), rounds=rounds or None, training_metrics=curves
        )
    if rounds:
        for r, t in rounds:
            p.log(
                f"round {r}: accuracy {100 * t['accuracy']:.1f}%, mean length {t['mean_length']:.1f} tokens"
            )
    print_summary(base, tuned)
    p.log(f"report: {p.path('report.md')}, summary: {p.path('summary.md')}, tuned model: {p.path('model')}")
    return doc
