"""``nn.Module`` front ends and the label-shift helper, in the style of Liger-Kernel's fused losses.

The modules hold the options; the lm_head weight is passed at call time (``model.lm_head.weight``), so
one module serves any head, frozen or trainable, tied or not.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import BACKENDS, IGNORE_INDEX, check_logits_dtype, check_temperature
from .linear_logprobs import check_ignore_index, linear_logprobs
from .ppo_loss import PPOLossOutput, _check_options, linear_ppo_loss


def shift_labels(
    labels: torch.Tensor, seq_ids: torch.Tensor | None = None, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Labels aligned with the hidden states that predict them: ``out[..., t] = labels[..., t + 1]``.

    Args:
        labels: (..., T) integer, e.g. the input ids with prompt/padding set to ``ignore_index``.
        seq_ids: optional (..., T) integer sequence ids of packed rows; a position whose next token
            belongs to another sequence gets ``ignore_index`` (no prediction across sequences).

    Returns:
        (..., T) int64, a new tensor; the last position of each row is ``ignore_index``.
    """
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dim() < 1:
        raise ValueError("labels must be an integer tensor of shape (..., T)")
    out = torch.full(labels.shape, check_ignore_index(ignore_index), dtype=torch.long, device=labels.device)
    out[..., :-1] = labels[..., 1:]
    if seq_ids is not None:
        if not isinstance(seq_ids, torch.Tensor) or tuple(seq_ids.shape) != tuple(labels.shape):
            got = tuple(seq_ids.shape) if isinstance(seq_ids, torch.Tensor) else type(seq_ids).__name__
            raise ValueError(f"seq_ids must be a tensor of labels' shape {tuple(labels.shape)}, got {got}")
        cross = seq_ids[..., 1:] != seq_ids[..., :-1]
        out[..., :-1] = torch.where(cross, out.new_tensor(ignore_index), out[..., :-1])
    return out


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    return backend


_PASS_OPTIONS = ("temperature", "ignore_index", "backend", "chunk_size", "return_entropy", "logits_dtype")


def _set_pass_options(
    module, temperature, ignore_index, backend, chunk_size, return_entropy, logits_dtype
) -> None:
    """Check and store the options of the log-prob pass that both modules take."""
    module.temperature = check_temperature(temperature)
    module.ignore_index = check_ignore_index(ignore_index)
    module.backend = _check_backend(backend)
    module.chunk_size = chunk_size
    module.return_entropy = bool(return_entropy)
    check_logits_dtype(logits_dtype)
    module.logits_dtype = logits_dtype


def _pass_options(module) -> dict:
    return {k: getattr(module, k) for k in _PASS_OPTIONS}


class LinearLogprobs(nn.Module):
    """``forward(hidden (..., H), weight (V, H), labels (...))`` -> float32 (...) log-probs (or
    ``(logps, entropy)`` with ``return_entropy=True``); see :func:`linear_logprobs`."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        chunk_size: int | None = None,
        return_entropy: bool = False,
        logits_dtype: str = "float32",
    ) -> None:
        super().__init__()
        _set_pass_options(self, temperature, ignore_index, backend, chunk_size, return_entropy, logits_dtype)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
        return linear_logprobs(hidden, weight, labels, **_pass_options(self))


class LinearPPOLoss(nn.Module):
    """The length-harmonizing PPO-clip loss as a module; see :func:`linear_ppo_loss` for the meaning of
    every option and of ``forward(hidden, weight, labels, old_logps, advantages, seq_ids=None)``, which
    returns a :class:`PPOLossOutput`. Options are checked here, at construction."""

    def __init__(
        self,
        *,
        importance_level: str = "token",
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        reduction: str = "sequence_mean",
        temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        chunk_size: int | None = None,
        return_entropy: bool = False,
        logits_dtype: str = "float32",
    ) -> None:
        super().__init__()
        _check_options(importance_level, reduction, clip_low, clip_high)
        self.importance_level = importance_level
        self.clip_low, self.clip_high = float(clip_low), float(clip_high)
        self.reduction = reduction
        _set_pass_options(self, temperature, ignore_index, backend, chunk_size, return_entropy, logits_dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        seq_ids: torch.Tensor | None = None,
    ) -> PPOLossOutput:
        return linear_ppo_loss(
            hidden, weight, labels, old_logps, advantages, seq_ids=seq_ids,
            importance_level=self.importance_level, clip_low=self.clip_low, clip_high=self.clip_high,
            reduction=self.reduction, **_pass_options(self),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"importance_level={self.importance_level!r}, clip_low={self.clip_low}, "
            f"clip_high={self.clip_high}, reduction={self.reduction!r}, backend={self.backend!r}"
        )
