"""The fused loss kernels, re-exported from the stand-alone ``o1pruner_kernels`` distribution.

``o1pruner.kernels.linear_ppo_loss is o1pruner_kernels.linear_ppo_loss``: one implementation, two names.
"""

from __future__ import annotations

from o1pruner_kernels import *  # noqa: F403
from o1pruner_kernels import __all__  # noqa: F401
