"""PipelineConfig: YAML keys, flags, recipes, validation messages, stage configs, run-dir compatibility."""

from __future__ import annotations

from dataclasses import fields

import pytest

from o1pruner.config import (
    ConfigError,
    PipelineConfig,
    coerce_value,
    diff_configs,
    load_recipe,
    recipe_names,
    resolve_config,
)


def _write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_follow_the_paper():
    cfg = PipelineConfig()
    assert (cfg.k, cfg.temperature, cfg.top_p, cfg.lam, cfg.samples_per_problem) == (16, 0.5, 0.8, 2.0, 2)
    assert (cfg.reward_clip_low, cfg.reward_clip_high, cfg.zscore) == (-2.0, 4.0, True)
    assert cfg.eval_greedy and cfg.eval_max_new_tokens == 8192 and cfg.warmup_ratio == 0.1


def test_every_field_has_help_group_and_stage_metadata():
    for f in fields(PipelineConfig):
        assert f.metadata.get("help"), f.name
        assert f.metadata.get("group") in ("run", "model", "data", "sample", "score", "train", "eval"), f.name
        assert f.metadata.get("stage") in (None, "sample", "score", "train", "eval"), f.name


def test_yaml_then_flags_override(tmp_path):
    path = _write(tmp_path, "k: 4\nlam: 5\nlearning_rate: 1e-5\nreport-to: [wandb]\n")
    cfg = resolve_config(config_file=str(path), overrides={"k": "8", "eval_greedy": "false"})
    assert cfg.k == 8 and cfg.lam == 5.0 and cfg.learning_rate == 1e-5  # YAML 1.1 reads 1e-5 as a string
    assert cfg.report_to == ["wandb"] and cfg.eval_greedy is False


def test_recipe_then_config_then_flags(tmp_path):
    path = _write(tmp_path, "lam: 3\n")
    cfg = resolve_config(recipe="marco-o1-7b", config_file=str(path), overrides={"k": "3"})
    assert cfg.model == "AIDC-AI/Marco-o1" and cfg.mode == "full" and cfg.learning_rate == 2e-7
    assert cfg.lam == 3.0 and cfg.k == 3 and cfg.cutoff == 3072


@pytest.mark.parametrize(
    "name", ["marco-o1-7b", "qwq-32b-preview", "r1-distill-qwen-1.5b", "r1-distill-qwen-7b"]
)
def test_packaged_recipes_are_valid(name):
    assert name in recipe_names()
    cfg = resolve_config(recipe=name)
    raw = load_recipe(name)
    assert all(getattr(cfg, k) == coerce_value(k, v) for k, v in raw.items())


def test_recipe_values_match_the_paper():
    qwq = resolve_config(recipe="qwq-32b-preview")
    assert (qwq.mode, qwq.freeze_last_n_layers, qwq.learning_rate, qwq.lam, qwq.k, qwq.cutoff) == (
        "freeze",
        48,
        2e-6,
        5.0,
        12,
        4096,
    )
    r1 = resolve_config(recipe="r1-distill-qwen-1.5b")
    assert r1.mode == "qlora" and r1.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" and 8 <= r1.k <= 16


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = _write(tmp_path, "k: 4\nlearnig_rate: 1e-5\n")
    with pytest.raises(ConfigError) as e:
        resolve_config(config_file=str(path))
    msg = str(e.value)
    assert str(path) in msg and "learnig_rate" in msg and "learning_rate" in msg


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="r1-distill-qwen-7b"):
        resolve_config(recipe="r1-distill-qwen-7")


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        ("k: four\n", "'k'"),
        ("k: 2.5\n", "'k'"),
        ("lam: high\n", "'lam'"),
        ("eval_greedy: maybe\n", "'eval_greedy'"),
        ("mode: qlor\n", "qlora"),
        ("report_to: 3\n", "'report_to'"),
        ("model: [a, b]\n", "'model'"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, text, culprit):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        resolve_config(config_file=str(path))
    assert culprit in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [
        ({"lam": "-0.5"}, "lam"),
        ({"k": "0"}, "k"),
        ({"top_p": "1.5"}, "top_p"),
        ({"reward_clip_low": "5"}, "reward_clip_low"),
        ({"mode": "freeze"}, "freeze_last_n_layers"),
        ({"max_new_tokens": "0"}, "max_new_tokens"),
    ],
)
def test_bad_values(overrides, culprit):
    with pytest.raises(ConfigError, match=culprit):
        resolve_config(overrides=overrides)


def test_flag_type_error_names_the_flag():
    with pytest.raises(ConfigError, match="--learning-rate"):
        resolve_config(overrides={"learning_rate": "fast"})


def test_missing_local_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match="no-such-model"):
        resolve_config(overrides={"model": str(missing)})
    with pytest.raises(ConfigError, match="dataset"):
        resolve_config(overrides={"dataset": "./nope.jsonl"})
    # Hub ids are not checked locally.
    assert resolve_config(overrides={"model": "org/name"}).model == "org/name"


def test_none_strings_and_yaml_errors(tmp_path):
    cfg = resolve_config(overrides={"cutoff": "none", "reward_clip_low": "null", "system_prompt": "none"})
    assert cfg.cutoff is None and cfg.reward_clip_low is None and cfg.system_prompt is None
    path = _write(tmp_path, "k: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(config_file=str(path))
    with pytest.raises(ConfigError, match="mapping"):
        resolve_config(config_file=str(_write(tmp_path, "- 1\n- 2\n", "list.yaml")))
    with pytest.raises(ConfigError, match="no such file"):
        resolve_config(config_file=str(tmp_path / "absent.yaml"))


def test_yaml_round_trip():
    cfg = resolve_config(recipe="r1-distill-qwen-7b", overrides={"report_to": "wandb,tensorboard"})
    import yaml

    again = PipelineConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert diff_configs(yaml.safe_load(cfg.to_yaml()), cfg) == []


def test_stage_configs_carry_the_values():
    cfg = resolve_config(
        overrides={
            "k": "3",
            "lam": "5",
            "cutoff": "128",
            "seed": "7",
            "eval_greedy": "false",
            "eval_num_samples": "2",
            "reward_clip_low": "none",
        }
    )
    s = cfg.sampling_config()
    assert (s.k, s.seed, s.temperature) == (3, 7, 0.5)
    sc = cfg.scoring_config()
    assert (sc.lam, sc.max_length, sc.clip, sc.seed) == (5.0, 128, None, 7)
    e = cfg.eval_config()
    assert e.greedy is False and e.num_samples == 2 and e.responses_per_problem == 2
    pytest.importorskip("o1pruner.train")
    t = cfg.train_config()
    assert t.learning_rate == cfg.learning_rate and t.importance_level == "sequence_geomean" and t.seed == 7


def test_stage_config_mappings_use_existing_field_names():
    """Every value PipelineConfig hands to a stage config is a field there (nothing silently dropped)."""
    import inspect

    from o1pruner import config as config_mod
    from o1pruner.evaluate import EvalConfig
    from o1pruner.sampling import SamplingConfig
    from o1pruner.scoring import ScoringConfig

    targets = {"sampling_config": SamplingConfig, "scoring_config": ScoringConfig, "eval_config": EvalConfig}
    try:
        from o1pruner.train import TrainConfig

        targets["train_config"] = TrainConfig
    except ImportError:
        pass
    import re

    for method, cls in targets.items():
        src = inspect.getsource(getattr(config_mod.PipelineConfig, method))
        keys = re.findall(r'"(\w+)":', src)
        known = {f.name for f in fields(cls)}
        assert keys and set(keys) <= known, (method, set(keys) - known)
