"""Training on several processes: the policy loss as one module, wrapped by DDP or sharded by FSDP2.

The trainer's forward (decoder body, then the fused loss on the last hidden states, see
``modeling.packed_forward``) is one ``nn.Module``, :class:`PolicyLoss`, so the engines that scale it see a
normal forward: ``DistributedDataParallel`` (the default under a launcher: every process holds the
model, gradients are averaged at the step's last micro-batch) or FSDP2 (``fully_shard`` on every decoder
layer and on the root: weights, gradients and optimizer states sharded across the processes). One
process uses the module as is.

FSDP2 checkpoints are sharded ``torch.distributed.checkpoint`` folders (``dcp/``): each process writes
its shards and any number of processes reads them back (DCP reshards on load).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from o1pruner import distributed
from o1pruner.modeling import _decoder_layers, packed_forward


class PolicyLoss(torch.nn.Module):
    """``forward(batch)``: the PPO-clip loss of one packed micro-batch (``packing.PackedBatch``) under the
    policy ``model``; returns the kernels' ``PPOLossOutput``."""

    def __init__(self, model: torch.nn.Module, config: Any, autocast_dtype: torch.dtype | None):
        super().__init__()
        self.model = model
        self.config = config
        self.autocast_dtype = autocast_dtype

    def forward(self, batch):
        from o1pruner.kernels import linear_ppo_loss

        hidden, weight = packed_forward(self.model, batch, self.autocast_dtype)
        c = self.config
        return linear_ppo_loss(
            hidden,
            weight,
            batch.labels[0],
            batch.old_logps[0],
            batch.advantages[0],
            seq_ids=batch.seq_ids[0],
            importance_level=c.importance_level,
            clip_low=c.clip_low,
            clip_high=c.clip_high,
            reduction=c.reduction,
            backend=c.backend,
            return_entropy=True,
        )


def parallel_mode(fsdp: bool) -> str | None:
    """None for one process, else "fsdp" (``--fsdp``, or an accelerate FSDP config) or "ddp"."""
    if not distributed.world().distributed:
        return None
    if fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp"
    return "ddp"


def check_fsdp(mode: str, optimizer: str) -> None:
    """ConfigError for what FSDP2 cannot shard: a 4-bit base, bitsandbytes' 8-bit optimizer states."""
    from o1pruner.options import ConfigError

    if mode == "qlora":
        raise ConfigError(
            "fsdp: FSDP2 shards full, freeze and lora models, not a 4-bit (qlora) base; use data parallel "
            "(no --fsdp) or --mode lora",
            key="fsdp",
        )
    if optimizer == "paged_adamw_8bit":
        raise ConfigError(
            "optimizer paged_adamw_8bit: bitsandbytes' 8-bit states do not shard with --fsdp; use "
            "--optimizer adamw (FSDP2 shards its states across the processes)",
            key="optimizer",
        )


def wrap(policy: PolicyLoss, mode: str | None) -> torch.nn.Module:
    """The module the trainer calls: ``policy`` itself, its DDP wrapper, or ``policy`` sharded in place."""
    if mode is None:
        return policy
    w = distributed.world()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        on_gpu = torch.cuda.is_available()
        return DistributedDataParallel(policy, device_ids=[w.local_rank] if on_gpu else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    check_fsdp(
        "qlora" if any(type(p).__name__ == "Params4bit" for p in policy.parameters()) else "full",
        policy.config.optimizer,
    )
    mesh = init_device_mesh(w.device().type, (w.size,))
    for layer in _decoder_layers(policy.model):
        _fp32_masters(layer)  # one layer in float32 at a time, then only its shard stays
        fully_shard(layer, mesh=mesh)
    _fp32_masters(policy)
    fully_shard(policy, mesh=mesh)
    return policy


def _fp32_masters(module: torch.nn.Module) -> None:
    """Trainable weights of full/freeze in float32 (loaded in 16 bits under FSDP2); LoRA's already are."""
    for p in module.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


@contextlib.contextmanager
def gradient_sync(engine: torch.nn.Module, mode: str | None, sync: bool) -> Iterator[None]:
    """Reduce gradients across processes in this backward only when ``sync`` (the step's last one)."""
    if mode == "ddp" and not sync:
        with engine.no_sync():
            yield
        return
    if mode == "fsdp":
        engine.set_requires_gradient_sync(sync)
    yield


def full_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a float (FSDP2's is a DTensor: its full value)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ------------------------------------------------------------------------------ sharded checkpoints
def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)


def save_sharded(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its shards of the trainable weights and optimizer states to ``folder``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(policy, optimizer, options=_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


def load_sharded(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read a sharded checkpoint written by any number of processes into this process's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(policy, optimizer, options=_options())
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        policy,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_options(strict=False),
    )


def full_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict (``model.`` keys of ``policy`` without the prefix), gathered on the
    CPU of rank 0 (None elsewhere): collective, every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not distributed.world().is_main:
        return None
    return {k.removeprefix("model."): v for k, v in sd.items()}
