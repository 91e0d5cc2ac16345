"""Fused lm_head + log-prob + PPO-clip kernels (Triton on CUDA, chunked PyTorch elsewhere).

Public API: :func:`linear_logprobs`, :func:`linear_ppo_loss`, :class:`PPOLossOutput`, the modules
:class:`LinearLogprobs` and :class:`LinearPPOLoss`, :func:`shift_labels` and :data:`IGNORE_INDEX`.
Float64 naive references of the same contract live in :mod:`o1pruner_kernels.reference`. Note: the
package attribute ``linear_logprobs`` is the function; the module of the same name is reachable with
``importlib.import_module("o1pruner_kernels.linear_logprobs")``. Usage: kernels/README.md; design, FLOP
and memory counts, measured errors: docs/design.md.
"""

from __future__ import annotations

from ._common import IGNORE_INDEX
from .linear_logprobs import linear_logprobs
from .modules import LinearLogprobs, LinearPPOLoss, shift_labels
from .ppo_loss import IMPORTANCE_LEVELS, REDUCTIONS, PPOLossOutput, linear_ppo_loss

__all__ = [
    "IGNORE_INDEX",
    "IMPORTANCE_LEVELS",
    "REDUCTIONS",
    "LinearLogprobs",
    "LinearPPOLoss",
    "PPOLossOutput",
    "linear_logprobs",
    "linear_ppo_loss",
    "shift_labels",
]
