"""o1pruner: Length-Harmonizing Fine-Tuning (O1-Pruner) for long-thought reasoning models on one GPU.

The public API is re-exported here; heavy submodules are imported on first use, so
``import o1pruner`` stays fast and the kernels can be used without the pipeline's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # kernels
    "linear_logprobs": "o1pruner.kernels",
    "linear_ppo_loss": "o1pruner.kernels",
    "PPOLossOutput": "o1pruner.kernels",
    # reward and grading
    "length_harmonizing_reward": "o1pruner.reward",
    "aes": "o1pruner.reward",
    "postprocess_rewards": "o1pruner.reward",
    "is_correct": "o1pruner.grading",
    "extract_answer": "o1pruner.grading",
    # data and prompts
    "Problem": "o1pruner.data",
    "load_problems": "o1pruner.data",
    "build_prompt": "o1pruner.prompts",
    "encode_prompt": "o1pruner.prompts",
    # stages
    "SamplingConfig": "o1pruner.sampling",
    "sample_problems": "o1pruner.sampling",
    "ScoringConfig": "o1pruner.scoring",
    "build_training_set": "o1pruner.scoring",
    "load_model": "o1pruner.modeling",
    "last_hidden_states": "o1pruner.modeling",
    "TrainConfig": "o1pruner.train",
    "Trainer": "o1pruner.train",
    "EvalConfig": "o1pruner.evaluate",
    "evaluate_model": "o1pruner.evaluate",
    "PipelineConfig": "o1pruner.config",
    "run_pipeline": "o1pruner.pipeline",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'o1pruner' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
