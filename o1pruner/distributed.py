"""Several processes (``torchrun`` / ``accelerate launch``): the process group, rank shards, merged logs.

One process is the default and needs nothing from here: every helper is a no-op when ``WORLD_SIZE`` is
unset or 1. Under a launcher each process reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the
environment (both launchers set them); :func:`init` starts the default process group, NCCL on GPUs
(each process on ``cuda:LOCAL_RANK``) and gloo on the CPU.

Generation stages split the problems by position (``problems[r::W]``, :func:`shard`). Each rank appends
to its own crash-safe log ``NAME.rankR.jsonl`` beside the stage's file; rank 0 folds the rank logs into
``NAME.jsonl`` (deduplicated by ``(problem_id, sample_index)``, in problem order) before and after the
stage (:func:`merge_rank_logs`), so a resumed run skips what any rank finished, whatever the number of
processes, and the run directory ends up with the same files as a one-process run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RANK_LOG = re.compile(r"^(?P<stem>.+)\.rank(?P<rank>\d+)\.jsonl$")


@dataclass(frozen=True)
class World:
    """This process's place among the processes: ``rank`` of ``size``, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self) -> torch.device:
        """The device this process computes on: ``cuda:LOCAL_RANK`` with GPUs, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def world() -> World:
    """The launcher's ranks (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); ``World()`` for one process."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    return World(_env_int("RANK", 0), size, _env_int("LOCAL_RANK", 0))


def init() -> World:
    """Start the default process group when launched with several processes (idempotent)."""
    w = world()
    if not w.distributed or torch.distributed.is_initialized():
        return w
    if not w.is_main:
        os.environ.setdefault("TQDM_DISABLE", "1")  # one set of progress bars: rank 0's
    if torch.cuda.is_available():
        torch.cuda.set_device(w.local_rank)
        torch.distributed.init_process_group("nccl", device_id=w.device())
    else:
        torch.distributed.init_process_group("gloo")
    return w


def shutdown() -> None:
    """Tear the process group down (after a last barrier), so the launcher sees a clean exit."""
    if torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()


@contextmanager
def keep_default_group() -> Iterator[None]:
    """Inside the block, ``torch.distributed.destroy_process_group()`` of the default group is a no-op.

    A vLLM engine under a launcher (``external_launcher``) runs on the launcher's default process group
    and destroys it when it shuts down; the stages after it need that group, and starting it again
    in the same processes hangs in the rendezvous. vLLM's own subgroups are still destroyed.
    """
    real = torch.distributed.destroy_process_group

    def destroy(group=None):
        if group is None or group is torch.distributed.GroupMember.WORLD:
            return
        real(group)

    torch.distributed.destroy_process_group = destroy
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = real


@contextmanager
def main_first() -> Iterator[bool]:
    """Every rank meets, rank 0 runs the block alone (yields whether this is rank 0), every rank meets
    again: the block sees what every rank wrote before, and every rank sees what it wrote."""
    barrier()
    try:
        yield world().is_main
    finally:
        barrier()


def _reduce(values: Sequence[float], op) -> list[float]:
    if not torch.distributed.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=world().device())
    torch.distributed.all_reduce(t, op=op)
    return t.tolist()


def all_sum(values: Sequence[float]) -> list[float]:
    """Elementwise sum of ``values`` over the ranks (float64; the values themselves with one process)."""
    return _reduce(values, torch.distributed.ReduceOp.SUM)


def all_max(value: int) -> int:
    """The largest ``value`` over the ranks."""
    return int(_reduce([value], torch.distributed.ReduceOp.MAX)[0])


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks."""
    if not torch.distributed.is_initialized():
        return [obj]
    w = world()
    out = [None] * w.size if w.is_main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def lockstep(backend: str) -> bool:
    """Whether generation must advance in step on every rank: vLLM engines of one launch form a
    data-parallel group (``external_launcher``), so every rank starts its engine and makes the same number
    of ``generate`` calls (empty ones when its share is done)."""
    return backend == "vllm" and world().distributed


def shard(items: Sequence[Any], rank: int, size: int) -> list[Any]:
    """The items of shard ``rank`` of ``size`` (by position: deterministic for a given order)."""
    return list(items[rank::size])


# -------------------------------------------------------------------------------------- per-rank logs
def rank_log(path: str | os.PathLike, rank: int) -> Path:
    """``NAME.rankR.jsonl`` beside ``NAME.jsonl``: the log rank ``rank`` appends to."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}.jsonl")


def rank_logs(path: str | os.PathLike) -> list[Path]:
    """The rank logs of ``path`` that exist (from any number of processes), in rank order."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = []
    for f in path.parent.iterdir():
        m = RANK_LOG.match(f.name)
        if m and m.group("stem") == path.stem:
            found.append((int(m.group("rank")), f))
    return [f for _, f in sorted(found)]


def merge_rank_logs(
    path: str | os.PathLike, problem_ids: Sequence[str], read: Callable[[Path], list[dict]]
) -> int:
    """Fold the rank logs of ``path`` into it: one record per ``(problem_id, sample_index)`` (the merged
    file's first, then the rank logs' in rank order), sorted by problem (``problem_ids`` order) and sample
    index, written atomically; then the rank logs are deleted. Call on one process. Returns the count.

    A kill at any point loses nothing: the rank logs go only after the merged file is in place, and a
    repeated merge drops the records it already holds.
    """
    import json

    from o1pruner.io import atomic_write_text
    from o1pruner.records import record_key

    path = Path(path)
    logs = rank_logs(path)
    if not logs:
        return 0
    records: dict[tuple[str, int], dict] = {}
    for f in ([path] if path.exists() else []) + logs:
        for rec in read(f):
            records.setdefault(record_key(rec), rec)
    position = {pid: i for i, pid in enumerate(problem_ids)}
    ordered = sorted(records.items(), key=lambda kv: (position.get(kv[0][0], len(position)), kv[0][1]))
    atomic_write_text(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for _, rec in ordered))
    for f in logs:
        f.unlink()
    return len(ordered)


def sharded_stage(
    path: str | os.PathLike,
    problems: Sequence[Any],
    read: Callable[[Path], list[dict]],
    work: Callable[[list[Any], Path, list[Path]], None],
    *,
    dp: tuple[int, int] | None = None,
) -> None:
    """Run a generation stage whose records go to ``path`` on every rank.

    ``work(shard, out_path, done_paths)`` generates the missing records of ``shard`` into ``out_path``,
    counting those in ``done_paths`` as done. With one process: ``work(problems, path, [])``, after folding
    in the rank logs a killed multi-process run left. With several: rank 0 merges leftover rank logs, every
    rank works on its shard into its own rank log (``dp``: ``(data-parallel rank, size)`` when ranks of one
    tensor-parallel group share a shard), and rank 0 merges again; every rank returns once ``path`` is
    complete.
    """
    w = world()
    ids = [str(p.id if hasattr(p, "id") else p["id"]) for p in problems]
    if not w.distributed:
        merge_rank_logs(path, ids, read)  # what a killed run on several processes left
        work(list(problems), Path(path), [])
        return
    with main_first() as main:
        if main:
            merge_rank_logs(path, ids, read)
    rank, size = dp or (w.rank, w.size)
    work(shard(problems, rank, size), rank_log(path, w.rank), [Path(path)])
    with main_first() as main:
        if main:
            merge_rank_logs(path, ids, read)
