"""Trainer checkpoints: ``checkpoints/step-N`` written atomically, and an exact restore from them.

A checkpoint holds the trainable weights (safetensors; with FSDP2, a sharded ``dcp/`` folder that any
number of processes reads back), the optimizer, scheduler and RNG states and the data position; ``trainer_state.json`` is written last, so a folder without it is incomplete and ignored.
``checkpoints/last`` names the newest one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from o1pruner import distributed, parallel
from o1pruner.io import DataError, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from o1pruner.train import Trainer

STEP_DIR = re.compile(r"^step-(\d+)$")
SHARDED = "dcp"  # the torch.distributed.checkpoint folder of an FSDP2 checkpoint


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete ``checkpoints/step-N`` (complete ones are renamed into place, never partial)."""
    if not checkpoint_dir.is_dir():
        return None
    steps = []
    for d in checkpoint_dir.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / "trainer_state.json").exists():
            steps.append((int(m.group(1)), d))
    return max(steps)[1] if steps else None


def save_checkpoint(trainer: Trainer) -> Path:
    """Write ``checkpoints/step-N`` atomically, then point ``checkpoints/last`` at it.

    Every process calls it. Rank 0 writes the trainable weights and optimizer state (the same on every
    DDP process); with FSDP2 every process writes its shards into ``dcp/`` (``torch.distributed.checkpoint``).
    """
    main = trainer.world.is_main
    name = f"step-{trainer.global_step}"
    final = trainer.checkpoint_dir / name
    tmp = trainer.checkpoint_dir / f".{name}.tmp"  # one name for all processes; a killed save's is replaced
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    try:
        if trainer.parallel == "fsdp":
            parallel.save_sharded(trainer.policy, trainer.optimizer, tmp / SHARDED)
            distributed.barrier()
        elif main:
            stream_safetensors(trainer.named_params, tmp / "trainable.safetensors")
            torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        if main:
            _save_loop_state(trainer, tmp)  # trainer_state.json last: marks the folder complete
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(trainer.checkpoint_dir / "last", name + "\n")
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    return final


# safetensors' dtype names (its format's header) for the dtypes a model's parameters take, in the order of
# its Rust ``Dtype`` enum: ``save_file`` lays tensors out by that order, descending, then by name.
SAFETENSORS_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
_DTYPE_RANK = {dtype: i for i, dtype in enumerate(SAFETENSORS_DTYPES)}


def stream_safetensors(named_tensors, path: Path) -> None:
    """Write ``(name, tensor)`` pairs as one safetensors file, copying one tensor at a time to the host.

    ``safetensors.torch.save_file`` takes a dict of host tensors, so a full fine-tune would first copy
    every trainable weight to host memory (28 GiB for 7B in float32). Here the header is computed from
    shapes and dtypes alone, then each tensor's bytes are written in turn, in ``save_file``'s layout
    (by dtype, largest first, then by name), so the file has the same bytes.
    """
    import json

    items = sorted(
        ((n, t.detach()) for n, t in named_tensors), key=lambda nt: (-_DTYPE_RANK.get(nt[1].dtype, -1), nt[0])
    )
    header, offset = {}, 0
    for name, t in items:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, t in items:
            host = t.contiguous().cpu().reshape(-1)
            if host.numel():
                f.write(memoryview(host.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def _save_loop_state(trainer: Trainer, folder: Path) -> None:
    """Scheduler, RNG states and ``trainer_state.json`` (the data position), the last one last."""
    torch.save(trainer.scheduler.state_dict(), folder / "scheduler.pt")
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(rng, folder / "rng.pt")
    epoch, pos = divmod(trainer.global_step, trainer.steps_per_epoch)
    state = {
        "global_step": trainer.global_step,
        "epoch": epoch,
        "step_in_epoch": pos,
        "order": trainer.epoch_order(epoch).tolist(),
        "elapsed": trainer.elapsed,
        "total_steps": trainer.total_steps,
        "num_rows": len(trainer.data),
        "world_size": trainer.world.size,
        "parallel": trainer.parallel,
        "config": asdict(trainer.config),
    }
    atomic_write_json(folder / "trainer_state.json", state)


def load_checkpoint(trainer: Trainer, path: str | os.PathLike) -> None:
    """Restore trainable weights, optimizer, scheduler, RNG states and the data position."""
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    if state["num_rows"] != len(trainer.data) or state["total_steps"] != trainer.total_steps:
        raise ValueError(
            f"{path}: checkpoint of a run with {state['num_rows']} rows / {state['total_steps']} steps, "
            f"but this run has {len(trainer.data)} rows / {trainer.total_steps} steps (different data or config)"
        )
    if state["order"] != trainer.epoch_order(state["epoch"]).tolist():
        raise ValueError(f"{path}: data order differs from this run's (different seed?)")
    if (path / SHARDED).is_dir():  # read into any layout: FSDP2 on any number of processes, DDP, one
        parallel.load_sharded(trainer.policy, trainer.optimizer, path / SHARDED)
    elif trainer.parallel == "fsdp":
        raise ValueError(
            f"{path}: a checkpoint written without --fsdp resumes without it (on any number of processes)"
        )
    else:
        weights = load_file(path / "trainable.safetensors")
        names = {n for n, _ in trainer.named_params}
        if set(weights) != names:
            raise ValueError(f"{path}: trainable parameters differ: {sorted(set(weights) ^ names)[:5]}")
        with torch.no_grad():
            for n, p in trainer.named_params:
                p.copy_(weights[n].to(p.device, p.dtype))
        trainer.optimizer.load_state_dict(load_state(path / "optimizer.pt", map_location=trainer.device))
    trainer.scheduler.load_state_dict(load_state(path / "scheduler.pt"))
    rng = load_state(path / "rng.pt")
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer.global_step = state["global_step"]
    trainer.elapsed = state["elapsed"]


def _numpy_rng_globals() -> list:
    """What ``np.random.get_state()`` pickles to: an MT19937 key array (numpy 1 and numpy 2 paths)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state(path: Path, map_location=None):
    """``torch.load`` of a checkpoint file with ``weights_only=True``: tensors, containers and numbers,
    plus numpy's RNG state, and nothing else. A file that would run other code (a pickle planted in a
    shared run directory) raises DataError naming it."""
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{path}: refused to load this checkpoint file (only tensors, numbers and containers are "
            f"accepted): {first}; delete the checkpoint folder to train from the previous one"
        ) from None
