"""vLLM engine settings and the LoRA-serving decisions (no vLLM needed: these only build arguments)."""

from __future__ import annotations

import json

import pytest
from helpers import make_tiny_model

from o1pruner.sampling import SamplingConfig
from o1pruner.vllm_engine import (
    VLLM_LORA_RANKS,
    engine_kwargs,
    lora_unsupported_reason,
    max_lora_rank,
    memory_utilization,
)


def _adapter(tmp_path, **cfg):
    folder = tmp_path / f"adapter-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    base = {"r": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": False, "modules_to_save": None}
    (folder / "adapter_config.json").write_text(json.dumps({**base, **cfg}))
    return folder


def test_max_lora_rank_is_the_smallest_supported_that_fits():
    for rank in range(1, VLLM_LORA_RANKS[-1] + 1):
        got = max_lora_rank(rank)
        assert got in VLLM_LORA_RANKS and got >= rank
        assert all(r < rank for r in VLLM_LORA_RANKS if r < got)


@pytest.mark.parametrize(
    ("cfg", "reason"),
    [
        ({}, None),
        ({"target_modules": "all-linear"}, None),
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["score"]}, "whole modules"),
        ({"target_modules": ["q_proj", "model.embed_tokens"]}, "embeddings"),
        ({"target_modules": ["lm_head"]}, "lm_head"),
        ({"r": VLLM_LORA_RANKS[-1] + 1}, "above vLLM's maximum"),
    ],
)
def test_lora_unsupported_reason(tmp_path, cfg, reason):
    got = lora_unsupported_reason(_adapter(tmp_path, **cfg))
    assert (got is None) if reason is None else (reason in got)


def test_bad_adapter_config_names_the_file(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        lora_unsupported_reason(folder)
    (folder / "adapter_config.json").write_text('{"r": "eight"}')
    with pytest.raises(ValueError, match="'r'"):
        lora_unsupported_reason(folder)


def test_engine_kwargs_enable_lora_only_with_an_adapter(tmp_path):
    cfg = SamplingConfig(k=1, backend="vllm", seed=5)
    plain = engine_kwargs("m", cfg)
    assert "enable_lora" not in plain and plain["seed"] == 5
    assert plain["gpu_memory_utilization"] == memory_utilization(None)
    cfg = SamplingConfig(
        k=1, backend="vllm", lora_path=str(_adapter(tmp_path, r=20)), gpu_memory_utilization=0.3
    )
    served = engine_kwargs("m", cfg)
    assert (served["enable_lora"], served["max_loras"], served["max_lora_rank"]) == (True, 1, 32)
    assert served["gpu_memory_utilization"] == 0.3


def test_engine_kwargs_max_model_len_is_longest_prompt_plus_new_tokens():
    cfg = SamplingConfig(k=1, backend="vllm", max_new_tokens=300)
    assert "max_model_len" not in engine_kwargs("m", cfg)  # no prompts known: the model's own limit
    assert engine_kwargs("m", cfg, longest_prompt=57)["max_model_len"] == 357  # "m": no config to read


def test_max_model_len_never_exceeds_the_models_limit(tmp_path):
    model = make_tiny_model(tmp_path / "m")
    limit = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    cfg = SamplingConfig(k=1, backend="vllm", max_new_tokens=limit)
    assert engine_kwargs(str(model), cfg, longest_prompt=10)["max_model_len"] == limit
    cfg = SamplingConfig(k=1, backend="vllm", max_new_tokens=5)
    assert engine_kwargs(str(model), cfg, longest_prompt=10)["max_model_len"] == 15
