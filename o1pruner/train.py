"""The O1-Pruner trainer: off-policy PPO-clip on pre-sampled, scored responses, on one device.

Read top to bottom, ``Trainer.train`` is the whole loop:

1. the scored rows (``scored.parquet``) are shuffled with a seeded permutation per epoch;
2. an optimizer step takes the next ``effective_batch_size`` rows, packs them (no padding) into
   micro-batches of at most ``micro_batch_tokens`` tokens, and accumulates gradients over them;
3. a micro-batch runs the decoder body only (``last_hidden_states``: the logits are never built) and the
   fused ``linear_ppo_loss`` against the stored reference log-probs (no second model copy); its loss is
   weighted by its share of the step's sequences, so the accumulated loss is exactly the loss over all
   the step's sequences (share of valid tokens for ``importance_level="token"`` + ``"token_mean"``);
4. clip the gradient norm, AdamW step, LR schedule step, log a ``metrics.jsonl`` row;
5. every ``save_every`` steps and at the end, an atomic checkpoint from which ``train(resume=True)``
   continues bit-for-bit (trainable weights, optimizer, scheduler, RNG states, data position).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, distributed, parallel
from .io import DataError, append_jsonl, atomic_write_text, read_jsonl
from .modeling import autocast_dtype_for
from .options import bad_value, check_options, option, shared
from .packing import (
    Example,
    PackedBatch,
    build_example,
    collate_packed,
    plan_micro_batches,
)
from .trackers import log_scalars, open_trackers

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("prompt_ids", "response_ids", "ref_logps", "advantage")
IMPORTANCE_LEVELS = ("token", "sequence", "sequence_geomean")
REDUCTIONS = ("sequence_mean", "token_mean")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
KERNEL_BACKENDS = ("auto", "triton", "torch")
REPORT_TARGETS = ("tensorboard", "wandb")


@dataclass
class TrainConfig:
    """Training hyper-parameters; defaults follow the paper and its released code."""

    learning_rate: float = option(
        2e-6, "Peak learning rate (paper: 2e-7 full Marco-o1, 2e-6 QwQ).", stage="train", range="(0,)"
    )
    num_epochs: int = option(1, "Training epochs.", stage="train", range="[1,)")
    max_steps: int | None = option(
        None,
        "Stop after this many optimizer steps (the schedule still spans the full run); for smoke tests.",
        stage="train",
        range="[1,)",
    )
    warmup_ratio: float = option(0.1, "Warmup fraction of the optimizer steps.", stage="train", range="[0,1]")
    lr_scheduler: str = option("cosine", "Learning-rate schedule (cosine, linear, constant).", stage="train")
    weight_decay: float = option(0.0, "AdamW weight decay.", stage="train", range="[0,)")
    effective_batch_size: int = option(
        32, "Sequences per optimizer step (gradient accumulation fills it).", stage="train", range="[1,)"
    )
    micro_batch_tokens: int = option(
        8192, "Packed tokens per micro-batch (memory knob).", stage="train", range="[1,)"
    )
    importance_level: str = option(
        "sequence_geomean",
        "Importance ratio: token, sequence (the paper's formula) or sequence_geomean (released code).",
        stage="train",
        choices=IMPORTANCE_LEVELS,
    )
    clip_low: float = option(0.2, "PPO clip epsilon below 1.", stage="train", range="[0,)")
    clip_high: float = option(0.2, "PPO clip epsilon above 1.", stage="train", range="[0,)")
    reduction: str = option(
        "sequence_mean", "Loss reduction for --importance-level token.", stage="train", choices=REDUCTIONS
    )
    max_grad_norm: float = option(
        1.0, "Gradient clipping norm (<= 0: no clipping; the norm is still logged).", stage="train"
    )
    optimizer: str = option(
        "adamw", "Optimizer: adamw or paged_adamw_8bit.", stage="train", choices=OPTIMIZERS
    )
    bf16: bool = option(True, "bf16 autocast/weights where the hardware supports it.", stage="train")
    save_every: int = option(
        0,
        "Save a resumable checkpoint every N optimizer steps (0: only at the end).",
        stage=None,
        range="[0,)",
    )
    logging_every: int = option(1, "Log training metrics every N optimizer steps.", stage=None, range="[1,)")
    report_to: list[str] = option(
        help="Experiment trackers (e.g. wandb, tensorboard); default none.",
        stage=None,
        default_factory=list,
    )
    backend: str = option(
        "auto",
        "Loss kernel: auto (Triton on CUDA), triton or torch.",
        stage="train",
        key="kernel_backend",
        choices=KERNEL_BACKENDS,
    )
    fsdp: bool = option(
        False,
        "Under torchrun / accelerate launch: shard weights, gradients and optimizer states across the "
        "processes (FSDP2) instead of data parallel (DDP). full, freeze and lora modes.",
        stage=None,
    )
    seed: int = shared("seed", 0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    packing: str = "ffd"  # "ffd" (first-fit decreasing) | "sequential"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first option with a bad value."""
        check_options(self)
        for name in self.report_to:
            if name not in REPORT_TARGETS:
                raise bad_value("report_to", f"a list of {', '.join(REPORT_TARGETS)}", self.report_to)


class TrainingRows:
    """The scored training rows as flat numpy arrays (no per-token Python objects for big data sets)."""

    def __init__(self, table, source: str = "<table>"):
        import pyarrow as pa

        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"{source}: missing column(s) {missing}; has {table.column_names}")
        self.source = source

        def flat(name, dtype):
            col = table.column(name).combine_chunks()
            if isinstance(col, pa.ChunkedArray):  # pragma: no cover - combine_chunks returns an Array
                col = col.chunk(0)
            if col.null_count:
                raise DataError(f"{source}: column {name!r} has {col.null_count} null row(s)")
            offsets = col.offsets.to_numpy().astype(np.int64)
            values = col.flatten().to_numpy(zero_copy_only=False).astype(dtype)
            return offsets, values

        self.prompt_off, self.prompt = flat("prompt_ids", np.int64)
        self.resp_off, self.resp = flat("response_ids", np.int64)
        lp_off, self.ref_logps = flat("ref_logps", np.float32)
        self.advantage = np.asarray(
            table.column("advantage").to_numpy(zero_copy_only=False), dtype=np.float64
        )
        if not np.array_equal(lp_off, self.resp_off):
            bad = int(np.nonzero(np.diff(lp_off) != np.diff(self.resp_off))[0][0])
            raise DataError(
                f"{source}, row {bad}: ref_logps has {lp_off[bad + 1] - lp_off[bad]} values but response_ids "
                f"has {self.resp_off[bad + 1] - self.resp_off[bad]} tokens"
            )
        if not np.isfinite(self.advantage).all():
            bad = int(np.nonzero(~np.isfinite(self.advantage))[0][0])
            raise DataError(f"{source}, row {bad}: advantage is {self.advantage[bad]}")
        n_prompt = np.diff(self.prompt_off)
        if (n_prompt == 0).any():
            raise DataError(f"{source}, row {int(np.argmax(n_prompt == 0))}: empty prompt_ids")
        # Rows with an empty response carry no token to train on; they are left out of the run.
        self.rows = np.nonzero(np.diff(self.resp_off) > 0)[0]
        if len(self.rows) < len(n_prompt):
            log.warning(
                "%s: %d row(s) with an empty response skipped", source, len(n_prompt) - len(self.rows)
            )
        if len(self.rows) == 0:
            raise DataError(f"{source}: no row with a non-empty response to train on")

    def __len__(self) -> int:
        return len(self.rows)

    def length(self, i: int) -> int:
        """Total tokens (prompt + response) of training row ``i`` (an index into ``self.rows``)."""
        r = self.rows[i]
        return int(self.prompt_off[r + 1] - self.prompt_off[r] + self.resp_off[r + 1] - self.resp_off[r])

    def example(self, i: int) -> Example:
        r = int(self.rows[i])
        p0, p1 = self.prompt_off[r], self.prompt_off[r + 1]
        s0, s1 = self.resp_off[r], self.resp_off[r + 1]
        return build_example(
            self.prompt[p0:p1].tolist(),
            self.resp[s0:s1].tolist(),
            self.ref_logps[s0:s1].tolist(),
            float(self.advantage[r]),
            row=r,
        )


def make_optimizer(params: list[torch.nn.Parameter], c: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (torch) or bitsandbytes' paged 8-bit AdamW over ``params``, with the config's settings."""
    kw = {
        "lr": c.learning_rate,
        "betas": tuple(c.adam_betas),
        "eps": c.adam_eps,
        "weight_decay": c.weight_decay,
    }
    if c.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def _read_table(train_set):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(train_set, pa.Table):
        return train_set, "<table>"
    path = Path(train_set)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return pq.read_table(path), str(path)


class Trainer:
    """The O1-Pruner trainer. ``output_dir`` gets ``metrics.jsonl`` and ``checkpoints/``.

    One process trains on its device. Under ``torchrun`` / ``accelerate launch`` every process packs its
    share of each step's rows, and DDP (or FSDP2 with ``config.fsdp``, see :mod:`o1pruner.parallel`)
    averages the gradients, weighted so that the update is the one-process update of the same step.
    """

    def __init__(self, model, train_set, config: TrainConfig, output_dir: str | os.PathLike):
        from transformers import get_scheduler

        self.model = model
        self.config = config
        self.output_dir = Path(output_dir)
        table, source = _read_table(train_set)
        self.data = TrainingRows(table, source)
        config.validate()  # a config mutated after construction is still checked

        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameter (was it loaded with mode='none'?)")
        self.world = distributed.init()  # under torchrun also when used as a library
        self.device = next(p for p in model.parameters() if p.requires_grad).device
        self.parallel = parallel.parallel_mode(config.fsdp)
        self.policy = parallel.PolicyLoss(model, config, autocast_dtype_for(config.bf16, self.device))
        self.engine = parallel.wrap(self.policy, self.parallel)  # FSDP2 shards the parameters in place
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

        self.steps_per_epoch = math.ceil(len(self.data) / config.effective_batch_size)
        self.total_steps = self.steps_per_epoch * config.num_epochs
        self.optimizer = make_optimizer([p for _, p in self.named_params], config)
        self.scheduler = get_scheduler(
            config.lr_scheduler,
            self.optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.global_step = 0
        self.elapsed = 0.0
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self._writers: list = []

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 on a GPU with ``bf16``; None (the weights' own dtype) otherwise."""
        return self.policy.autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, dtype: torch.dtype | None) -> None:
        self.policy.autocast_dtype = dtype

    # ------------------------------------------------------------------------------------------ data
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The seeded permutation of training rows for ``epoch`` (indices into ``self.data``)."""
        return np.random.default_rng([self.config.seed, epoch]).permutation(len(self.data))

    def step_rows(self, step: int) -> list[int]:
        """Training-row indices of global optimizer step ``step`` (0-based); the last one may be short."""
        epoch, i = divmod(step, self.steps_per_epoch)
        b = self.config.effective_batch_size
        return self.epoch_order(epoch)[i * b : (i + 1) * b].tolist()

    def micro_batches(self, rows: list[int]) -> list[PackedBatch]:
        """Pack the rows of one step into token-budgeted micro-batches."""
        lengths = [self.data.length(i) for i in rows]
        plan = plan_micro_batches(lengths, self.config.micro_batch_tokens, self.config.packing)
        return [collate_packed([self.data.example(rows[j]) for j in group]) for group in plan]

    # ------------------------------------------------------------------------------------------ compute
    def micro_batch_loss(self, batch: PackedBatch):
        """Forward one packed micro-batch: decoder body, then the fused PPO loss. Returns PPOLossOutput."""
        return self.engine(batch.to(self.device))

    def forward_backward(self, rows: list[int]) -> dict:
        """Accumulate the gradient of the loss over all ``rows``; returns step metrics (no optimizer step).

        Each process takes its share ``rows[rank::world]``. A micro-batch's loss is weighted by its share
        of the step's sequences (of its valid tokens for token-level ``token_mean``) over all processes,
        times the number of processes (DDP and FSDP average gradients), so the summed gradient is the
        one-process gradient. Processes run the same number of micro-batches (zero-weight repeats fill
        up a short share): every forward and backward of DDP/FSDP is collective.
        """
        w = self.world
        batches = self.micro_batches(rows[w.rank :: w.size])
        by_token = self.config.importance_level == "token"
        token_weighted_loss = by_token and self.config.reduction == "token_mean"
        n_seq, n_valid = distributed.all_sum(
            [sum(b.num_sequences for b in batches), sum(b.num_valid_tokens() for b in batches)]
        )
        n_real = len(batches)
        if w.distributed:
            filler = batches[:1] or self.micro_batches(rows[:1])
            batches += filler * (distributed.all_max(n_real) - n_real)
        loss = clip = ratio = entropy = 0.0
        for j, b in enumerate(batches):
            real = j < n_real
            seq_share = b.num_sequences / n_seq if real else 0.0
            tok_share = b.num_valid_tokens() / n_valid if real else 0.0
            with parallel.gradient_sync(self.engine, self.parallel, sync=j == len(batches) - 1):
                out = self.micro_batch_loss(b)
                w_loss = tok_share if token_weighted_loss else seq_share
                (out.loss * (w_loss * w.size)).backward()
            if not real:
                continue
            loss += float(out.loss.detach()) * w_loss
            clip += float(out.clip_fraction) * (tok_share if by_token else seq_share)
            ratio += float(out.mean_ratio) * seq_share
            # Mean policy entropy over valid tokens (0.0 at ignored ones), watched for collapse.
            entropy += float(out.entropy.sum()) / n_valid
        real = batches[:n_real]
        loss, clip, ratio, entropy, n_tokens, n_micro = distributed.all_sum(
            [loss, clip, ratio, entropy, sum(b.num_tokens for b in real), n_real]
        )
        return {
            "loss": loss,
            "clip_fraction": clip,
            "mean_ratio": ratio,
            "entropy": entropy,
            "num_sequences": int(n_seq),
            "num_tokens": int(n_tokens),
            "num_micro_batches": int(n_micro),
        }

    # ------------------------------------------------------------------------------------------ loop
    def train(self, resume: bool = True) -> list[dict]:
        """Run (or continue) training to the end (or ``max_steps``). Returns the metrics rows of all steps."""
        from tqdm.auto import tqdm

        c = self.config
        self._start(resume)
        last = self.total_steps if c.max_steps is None else min(self.total_steps, c.max_steps)
        self.model.train()
        bar = tqdm(
            total=last,
            initial=self.global_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not self.world.is_main,
        )
        try:
            while self.global_step < last:
                t0 = time.perf_counter()
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                lr = self.scheduler.get_last_lr()[0]
                m = self.forward_backward(self.step_rows(self.global_step))
                params = [p for _, p in self.named_params]
                max_norm = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
                grad_norm = parallel.full_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                dt = time.perf_counter() - t0
                self.elapsed += dt
                row = {
                    "step": self.global_step,
                    "epoch": (self.global_step - 1) // self.steps_per_epoch,
                    "loss": m["loss"],
                    "clip_fraction": m["clip_fraction"],
                    "mean_ratio": m["mean_ratio"],
                    "entropy": m["entropy"],
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": m["num_tokens"] / max(dt, 1e-9),
                    "peak_memory_gb": _peak_memory_gb(self.device),
                    "elapsed": self.elapsed,
                    "num_sequences": m["num_sequences"],
                    "num_tokens": m["num_tokens"],
                    "num_micro_batches": m["num_micro_batches"],
                }
                log_now = self.global_step % max(1, c.logging_every) == 0 or self.global_step == last
                if log_now and self.world.is_main:
                    append_jsonl(self.metrics_path, [row])
                    log_scalars(self._writers, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", clip=f"{row['clip_fraction']:.3f}")
                bar.update(1)
                if (c.save_every and self.global_step % c.save_every == 0) or self.global_step == last:
                    self.save_checkpoint()
        finally:
            bar.close()
            for w in self._writers:
                w.close()
            self._writers = []
        return read_jsonl(self.metrics_path, tolerate_partial_tail=True) if self.metrics_path.exists() else []

    def _start(self, resume: bool) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self.latest_checkpoint() if resume else None
        if ckpt is not None:
            self.load_checkpoint(ckpt)
            log.info("resumed from %s (step %d)", ckpt, self.global_step)
        else:
            if not resume and self.checkpoint_dir.exists() and self.world.is_main:
                log.warning("resume=False: removing the old checkpoints in %s", self.checkpoint_dir)
                shutil.rmtree(self.checkpoint_dir)
            # Dropout and any other draw start from the seed, not from whatever ran before in this process.
            seed_everything(self.config.seed)
        # Drop metric rows past the restored step: they will be recomputed, identically.
        if self.metrics_path.exists() and self.world.is_main:
            rows = [
                r
                for r in read_jsonl(self.metrics_path, tolerate_partial_tail=True)
                if r.get("step", 0) <= self.global_step
            ]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        distributed.barrier()
        if self.world.is_main:
            self._writers = open_trackers(self.config.report_to, self.output_dir, asdict(self.config))

    # ------------------------------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        """The newest complete ``checkpoints/step-N`` (see :mod:`o1pruner.checkpoint`)."""
        return checkpoint.latest_checkpoint(self.checkpoint_dir)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically, then point ``checkpoints/last`` at it."""
        return checkpoint.save_checkpoint(self)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore trainable weights, optimizer, scheduler, RNG states and the data position."""
        checkpoint.load_checkpoint(self, path)


def _peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated during the step on CUDA; on a CPU, the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def release_paged_optimizer_states() -> int:
    """Move bitsandbytes' paged optimizer states (CUDA managed memory, which bitsandbytes never frees)
    to host memory and forget them, so a vLLM engine started later in this process finds the GPU free.

    Call after the optimizer is gone. Returns the bytes moved (0 when no paged state exists: no
    bitsandbytes paged optimizer ran, or on a CPU, where bitsandbytes does not page).
    """
    import sys

    if "bitsandbytes" not in sys.modules:
        return 0
    from bitsandbytes.functional import GlobalPageManager

    manager = GlobalPageManager.get_instance()
    moved = sum(t.nbytes for t in manager.paged_tensors)
    if manager.paged_tensors:
        manager.prefetch_all(to_cpu=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        manager.paged_tensors.clear()
    return moved


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (CUDA's too, when present)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
