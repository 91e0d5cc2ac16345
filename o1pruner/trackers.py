"""Experiment trackers for the training metrics (``--report-to tensorboard,wandb``); both optional."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class WandbWriter:
    """A wandb run behind the ``add_scalar``/``close`` interface of tensorboard's SummaryWriter."""

    def __init__(self, run: Any):
        self.run = run

    def add_scalar(self, key: str, value: float, step: int) -> None:
        self.run.log({key: value}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: list[str], output_dir: Path, config: dict[str, Any]) -> list[Any]:
    """One writer per tracker name that is installed (a missing one is skipped with a warning)."""
    writers: list[Any] = []
    for name in names:
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                writers.append(SummaryWriter(str(output_dir / "tensorboard")))
            elif name == "wandb":
                import wandb

                run = wandb.init(project="o1pruner", dir=str(output_dir), config=config, resume="allow")
                writers.append(WandbWriter(run))
        except ImportError as e:
            log.warning("report_to=%s requested but not installed (%s); skipping it", name, e)
    return writers


def log_scalars(writers: list[Any], row: dict[str, Any]) -> None:
    """Every numeric value of a metrics row (but ``step``) as ``train/KEY`` at that step."""
    for w in writers:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                w.add_scalar(f"train/{k}", v, row["step"])
