"""Math problems from the Hugging Face Hub or local files, as ``Problem`` records with a gold answer.

Sources (``load_problems(source, ...)``):

* short names, loaded with ``datasets.load_dataset`` (see ``HUB_SOURCES``): ``gsm8k`` (openai/gsm8k
  "main", default split test), ``math`` (DigitalLearningGmbH/MATH-lighteval, the 7,500-problem MATH train
  set in one config, default split train), ``math500`` (HuggingFaceH4/MATH-500, test), ``aime24``
  (HuggingFaceH4/aime_2024, train: its only split), ``gaokao`` (MARIO-Math-Reasoning/Gaokao2023-Math-En,
  train: its only split; the GaoKao 2023 English set of the Qwen2.5-Math evaluation);
* any other ``owner/name`` Hub id (``split`` defaults to train);
* a local ``.jsonl``, ``.json`` (a list of objects, or an object holding one such list), ``.parquet`` or
  ``.csv`` file.

Fields: the question is the first of ``question|problem|prompt|input`` present (or ``question_field``).
The gold answer comes from ``answer_field`` or, auto-detected, ``answer|final_answer|gold|target``, else
``solution``; in any of them a GSM8K ``#### X`` marker gives X, and a text with ``\\boxed{}`` (a MATH
solution) gives the content of its last box. Whitespace in golds is collapsed; nothing else is changed
(grading normalises "1,000" == "1000" and the like).

Ids: the first 16 hex digits of the sha1 of the question with whitespace collapsed. A question that
occurs twice keeps its first occurrence; later duplicates are dropped (a warning gives the count).
``shuffle=True`` permutes with ``random.Random(seed)``, then ``limit`` keeps the first ``limit`` problems:
the same seed always gives the same subset.

A row without any answer field raises DataError (file, line/row, the keys tried); a row whose answer
field is present but empty (two rows of gaokao2023en) cannot be graded and is skipped with a warning.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from o1pruner.io import DataError, atomic_path

logger = logging.getLogger(__name__)

QUESTION_FIELDS = ("question", "problem", "prompt", "input")
ANSWER_FIELDS = ("answer", "final_answer", "gold", "target")
SOLUTION_FIELD = "solution"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_META_FIELDS = ("subject", "type", "unique_id", "id", "url", "source", "year")


@dataclass(frozen=True)
class HubSource:
    repo: str
    config: str | None
    default_split: str
    splits: tuple[str, ...]


HUB_SOURCES: dict[str, HubSource] = {
    "gsm8k": HubSource("openai/gsm8k", "main", "test", ("train", "test")),
    "math": HubSource("DigitalLearningGmbH/MATH-lighteval", "default", "train", ("train", "test")),
    "math500": HubSource("HuggingFaceH4/MATH-500", None, "test", ("test",)),
    "aime24": HubSource("HuggingFaceH4/aime_2024", None, "train", ("train",)),
    "gaokao": HubSource("MARIO-Math-Reasoning/Gaokao2023-Math-En", None, "train", ("train",)),
}


@dataclass
class Problem:
    id: str  # sha1 of the whitespace-normalised question, first 16 hex chars
    question: str
    answer: str  # gold final answer
    level: str | None = None  # MATH level ("3") or subject; for per-level breakdowns
    meta: dict = field(default_factory=dict)


def problem_id(question: str) -> str:
    """Stable id: the first 16 hex digits of sha1(whitespace-collapsed question, utf-8)."""
    return hashlib.sha1(" ".join(question.split()).encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Gold answers


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None."""
    from o1pruner.grading import last_box  # the same linear-time parser as the grader

    found, content = last_box(text)
    return content if found else None


def _gold_from_text(value: str) -> str | None:
    if "####" in value:
        gold = value.rsplit("####", 1)[1]
    elif "\\boxed" in value or "\\fbox" in value:
        gold = last_boxed(value)
        if gold is None:
            return None
    else:
        gold = value
    gold = " ".join(gold.split())
    return gold or None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _row_to_problem(
    row: dict, where: str, question_field: str | None, answer_field: str | None, source: str
) -> Problem | None:
    """The problem of one row; None when its answer field exists but is empty. DataError if malformed."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    if question_field is not None:
        if _is_missing(row.get(question_field)):
            raise DataError(f"{where}: missing question field {question_field!r}")
        qkey = question_field
    else:
        qkey = next((k for k in QUESTION_FIELDS if not _is_missing(row.get(k))), None)
        if qkey is None:
            raise DataError(
                f"{where}: no question field (tried {', '.join(QUESTION_FIELDS)}; keys: {sorted(row)})"
            )
    question = row[qkey]
    if not isinstance(question, str):
        raise DataError(f"{where}: question field {qkey!r} is {type(question).__name__}, expected text")

    if answer_field is not None:
        candidates = (answer_field,)
    else:
        candidates = (*ANSWER_FIELDS, SOLUTION_FIELD)
    akey = next((k for k in candidates if not _is_missing(row.get(k))), None)
    if akey is None:
        if any(k in row for k in candidates):
            return None  # the field is there but empty: an ungradable row, skipped with a warning
        raise DataError(f"{where}: missing answer field (tried {', '.join(candidates)}; keys: {sorted(row)})")
    raw = row[akey]
    if isinstance(raw, (list, tuple)) and len(raw) == 1:
        raw = raw[0]
    text = str(raw)
    if akey == SOLUTION_FIELD and "####" not in text and "\\boxed" not in text and "\\fbox" not in text:
        gold = None  # a worked solution without a box has no identifiable final answer
    else:
        gold = _gold_from_text(text)
    if gold is None:
        what = "no \\boxed{} answer" if "boxed" in str(raw) or akey == SOLUTION_FIELD else "an empty answer"
        raise DataError(f"{where}: field {akey!r} has {what}")

    level = None
    for key in ("level", "subject", "type"):
        if not _is_missing(row.get(key)):
            level = str(row[key]).strip()
            if key == "level" and level.lower().startswith("level "):
                level = level[len("level ") :].strip()
            break
    meta: dict[str, Any] = {"source": source}
    for key in _META_FIELDS:
        value = row.get(key)
        if isinstance(value, (str, int, float, bool)) and key != qkey and key != akey:
            meta["origin" if key == "source" else key] = value
    return Problem(id=problem_id(question), question=question, answer=gold, level=level, meta=meta)


# ----------------------------------------------------------------------------------------------------
# Readers: each yields (where, row) with a location for error messages


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            yield f"{path}, line {lineno}", obj


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            yield from _iter_jsonl(path)
            return
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of objects, or an object holding exactly one list")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(obj).__name__}")
    for i, row in enumerate(obj, start=1):
        yield f"{path}, item {i}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read as parquet ({e})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}, row {i}", row


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                yield f"{path}, line {reader.line_num}", row
        except csv.Error as e:
            raise DataError(f"{path}, line {reader.line_num}: {e}") from None


_READERS = {".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet, ".csv": _iter_csv}


def _iter_local(path: Path) -> Iterator[tuple[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(LOCAL_SUFFIXES)})")
    try:
        yield from reader(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def _iter_hub(source: str, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    spec = HUB_SOURCES.get(source)
    repo, config = (spec.repo, spec.config) if spec else (source, None)
    split = split or (spec.default_split if spec else "train")
    if spec is not None and split not in spec.splits:
        raise DataError(f"{source}: unknown split {split!r} (available: {', '.join(spec.splits)})")
    args = (repo,) if config is None else (repo, config)
    try:
        ds = datasets.load_dataset(*args, split=split)
    except Exception as e:
        raise DataError(
            f"could not load Hub data set {repo!r} (config {config}, split {split!r}): {e}"
        ) from e
    label = f"{repo}[{split}]"
    for i, row in enumerate(ds, start=1):
        yield f"{label}, row {i}", row


def _is_local(source: str) -> bool:
    # A folder that happens to be called "math" must not shadow the short name.
    return Path(source).suffix.lower() in LOCAL_SUFFIXES or Path(source).is_file()


# ----------------------------------------------------------------------------------------------------
# Public API


def load_problems(
    source: str,
    *,
    split: str | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> list[Problem]:
    """Problems from a short name, a Hub id or a local file (see the module doc), deduplicated by id.

    ``split`` applies to Hub sources only. ``shuffle`` (seeded) happens before ``limit``.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    source = str(source)
    if _is_local(source):
        rows: Iterable[tuple[str, Any]] = _iter_local(Path(source))
        label = str(Path(source))
    elif source in HUB_SOURCES or ("/" in source and not source.startswith((".", "/"))):
        rows = _iter_hub(source, split)
        label = source
    else:
        raise DataError(
            f"unknown data source {source!r}: not a file, not a short name ({', '.join(HUB_SOURCES)}) "
            "and not a Hub id owner/name"
        )

    problems: list[Problem] = []
    seen: set[str] = set()
    duplicates = 0
    empty: list[str] = []
    for where, row in rows:
        p = _row_to_problem(row, where, question_field, answer_field, label)
        if p is None:
            empty.append(where)
            continue
        if p.id in seen:
            duplicates += 1
            continue
        seen.add(p.id)
        problems.append(p)
    if duplicates:
        logger.warning(
            "%s: dropped %d duplicate question(s) (the first occurrence is kept)", label, duplicates
        )
    if empty:
        shown = "; ".join(empty[:3]) + ("; ..." if len(empty) > 3 else "")
        logger.warning("skipped %d row(s) whose answer field is empty: %s", len(empty), shown)
    if not problems:
        raise DataError(f"{label}: no problems found")
    if shuffle:
        random.Random(seed).shuffle(problems)
    if limit is not None:
        problems = problems[:limit]
    return problems


def save_problems(path: str | Path, problems: Iterable[Problem]) -> None:
    """Write problems as JSON lines (id, question, answer, level, meta), atomically."""
    lines = [json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in problems]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")


def read_problems(path: str | Path) -> list[Problem]:
    """Read a file written by ``save_problems``; a bad line raises DataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    problems = []
    for where, obj in _iter_jsonl(path):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("id", "question", "answer"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: missing or non-text field {key!r}")
        level = obj.get("level")
        meta = obj.get("meta") or {}
        if not isinstance(meta, dict):
            raise DataError(f"{where}: field 'meta' must be an object")
        problems.append(
            Problem(
                id=obj["id"],
                question=obj["question"],
                answer=obj["answer"],
                level=None if level is None else str(level),
                meta=meta,
            )
        )
    return problems
