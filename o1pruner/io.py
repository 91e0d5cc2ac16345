"""Crash-safe file helpers shared by every pipeline stage.

Whole files (scores, metrics, checkpoints' metadata) are written to a temporary file in the same folder,
flushed, fsynced and renamed over the target, so a reader sees the old file or the new one, never half.
Append-only logs (``samples.jsonl``, ``metrics.jsonl``) get one fsync per appended batch; a line cut by a
kill is detected and dropped when the log is read back, so a resumed run neither loses nor duplicates
complete records.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data; the message names the file, line, key or value at fault."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Append records as JSON lines, then flush and fsync once. Returns the number written.

    A previous writer killed mid-line leaves a last line without a newline; it is cut off first, so the
    new records never get glued to a fragment.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    if not lines:
        return 0
    with open(path, "a+b") as f:
        _truncate_partial_last_line(f)
        f.write("".join(lines).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    return len(lines)


def _truncate_partial_last_line(f) -> None:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    # Walk back to the last newline and drop the fragment after it.
    pos = size - 1
    block = 4096
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        idx = chunk.rfind(b"\n")
        if idx >= 0:
            f.truncate(start + idx + 1)
            return
        pos = start
    f.truncate(0)


def read_jsonl(path: str | os.PathLike, *, tolerate_partial_tail: bool = False) -> list[dict]:
    """Read a JSON-lines file. A malformed line raises DataError naming the file and line number.

    With ``tolerate_partial_tail`` (our own append-only logs), a final line without a newline, the trace
    of a killed writer, is skipped instead.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if tolerate_partial_tail and not line.endswith("\n"):
                break
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(obj)
    return records
