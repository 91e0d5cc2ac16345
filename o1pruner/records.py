"""The records the stages write and read: one definition each.

- sample records (``samples.jsonl``, one line per pre-sampled solution): :func:`sample_record`,
  :func:`validate_sample`, :func:`read_samples`;
- evaluation records (``eval/*_responses.jsonl``, one line per graded response): :func:`eval_record`;
- the scored training set (``scored.parquet``): its schema is ``o1pruner.scoring.SCHEMA``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from o1pruner.grading import extract_answer, is_correct
from o1pruner.io import DataError, read_jsonl

FINISH_REASONS = ("stop", "length")
SAMPLE_KEYS = ("problem_id", "sample_index", "text", "token_ids", "num_tokens", "finish_reason", "correct")
EVAL_KEYS = (
    "problem_id",
    "sample_index",
    "level",
    "gold",
    "extracted",
    "correct",
    "num_tokens",
    "finish_reason",
    "text",
)


def record_key(rec: dict[str, Any]) -> tuple[str, int]:
    """The identity of a sample or response record in a resumable log: ``(str(problem_id),
    sample_index)``, with sample_index 0 where a record has none."""
    return str(rec.get("problem_id")), int(rec.get("sample_index", 0))


def read_samples(path: str | os.PathLike) -> list[dict]:
    """Read ``samples.jsonl``: a partial last line (killed writer) is skipped, duplicates of a
    (problem_id, sample_index) pair are dropped (first wins), and every record is checked (DataError naming
    the line and key)."""
    path = Path(path)
    records = read_jsonl(path, tolerate_partial_tail=True)
    seen: set[tuple[str, int]] = set()
    out = []
    for lineno, rec in enumerate(records, start=1):
        validate_sample(rec, f"{path}, record {lineno}")
        key = (rec["problem_id"], rec["sample_index"])
        if key in seen:
            continue
        seen.add(key)
        out.append(rec)
    return out


def validate_sample(rec: dict, where: str) -> None:
    """Check one sample record's keys and value types; DataError naming ``where`` and the key."""
    missing = [k for k in SAMPLE_KEYS if k not in rec]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}")
    checks = (
        ("problem_id", isinstance(rec["problem_id"], str)),
        ("sample_index", isinstance(rec["sample_index"], int) and rec["sample_index"] >= 0),
        ("text", isinstance(rec["text"], str)),
        (
            "token_ids",
            isinstance(rec["token_ids"], list) and all(isinstance(t, int) for t in rec["token_ids"]),
        ),
        ("num_tokens", isinstance(rec["num_tokens"], int) and rec["num_tokens"] == len(rec["token_ids"])),
        ("finish_reason", rec["finish_reason"] in FINISH_REASONS),
        ("correct", isinstance(rec["correct"], bool)),
    )
    for key, ok in checks:
        if not ok:
            value = rec[key] if key != "token_ids" else f"list of {len(rec[key])}"
            raise DataError(f"{where}: bad value for key {key!r}: {value!r}")


def sample_record(problem: Any, index: int, gen: Any) -> dict:
    """The sample record of ``gen`` (a ``sampling.Generation``), the ``index``-th solution of ``problem``, graded."""
    return {
        "problem_id": problem.id,
        "sample_index": index,
        "text": gen.text,
        "token_ids": gen.token_ids,
        "num_tokens": len(gen.token_ids),
        "finish_reason": gen.finish_reason,
        "correct": bool(is_correct(gen.text, problem.answer)),
    }


def eval_record(problem_id: str, index: int, level: Any, gold: str, gen: Any) -> dict:
    """The evaluation record of ``gen`` (a ``sampling.Generation``): graded, its answer extracted."""
    return {
        "problem_id": problem_id,
        "sample_index": index,
        "level": level,
        "gold": gold,
        "extracted": extract_answer(gen.text),
        "correct": bool(is_correct(gen.text, gold)),
        "num_tokens": len(gen.token_ids),
        "finish_reason": gen.finish_reason,
        "text": gen.text,
    }
