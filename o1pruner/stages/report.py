"""The report after the evaluations: eval.json, metrics.json, summary.md, report.md, plots."""

from __future__ import annotations

from typing import TYPE_CHECKING

from o1pruner.rundir import REPORT_FILES

if TYPE_CHECKING:
    from o1pruner.pipeline import Pipeline


def is_current(p: Pipeline) -> bool:
    """All report files exist and are newer than both evaluations and the training log."""
    paths = [p.path(rel) for rel in REPORT_FILES]
    if not all(f.exists() for f in paths):
        return False
    oldest = min(f.stat().st_mtime for f in paths)
    inputs = [p.path("eval/base.json"), p.path("eval/tuned.json"), p.path("metrics.jsonl")]
    return all(not f.exists() or f.stat().st_mtime <= oldest for f in inputs)


def run(p: Pipeline, base: dict, tuned: dict) -> dict:
    """Write the report files (unless current), print the summary table; returns eval.json's content."""
    import json

    from o1pruner.report import print_summary, write_report

    if is_current(p):
        p.log("report: up to date, skipped")
        doc = json.loads(p.path("eval.json").read_text(encoding="utf-8"))
    else:
        doc = write_report(p.run_dir, base, tuned, config=p.cfg.to_dict())
    print_summary(base, tuned)
    p.log(f"report: {p.path('report.md')}, summary: {p.path('summary.md')}, tuned model: {p.path('model')}")
    return doc
