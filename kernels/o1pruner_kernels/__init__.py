"""Fused lm_head + log-prob + PPO-clip kernels (Triton on CUDA, chunked PyTorch elsewhere).

Public API (contract in METHOD.md): :func:`linear_logprobs`, :func:`linear_ppo_loss`, :class:`PPOLossOutput`.
Float64 naive references of the same contract live in :mod:`o1pruner_kernels.reference`. Note: the
package attribute ``linear_logprobs`` is the function; the module of the same name is reachable with
``importlib.import_module("o1pruner_kernels.linear_logprobs")`` or ``from o1pruner_kernels.linear_logprobs
import ...``. Design, FLOP and memory counts: docs/design.md.
"""

from __future__ import annotations

from .linear_logprobs import linear_logprobs
from .ppo_loss import IMPORTANCE_LEVELS, REDUCTIONS, PPOLossOutput, linear_ppo_loss

__all__ = ["IMPORTANCE_LEVELS", "REDUCTIONS", "PPOLossOutput", "linear_logprobs", "linear_ppo_loss"]
