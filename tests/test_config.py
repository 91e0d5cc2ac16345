"""PipelineConfig: YAML keys, flags, recipes, validation messages, stage configs, run-dir compatibility."""

from __future__ import annotations

from dataclasses import fields

import pytest

from o1pruner.config import (
    SECTIONS,
    ConfigError,
    ModelConfig,
    PipelineConfig,
    coerce_value,
    diff_configs,
    holders,
    load_recipe,
    options,
    recipe_names,
    resolve_config,
)
from o1pruner.options import strip_optional


def _write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_follow_the_paper():
    cfg = PipelineConfig()
    assert (cfg.k, cfg.temperature, cfg.top_p, cfg.lam, cfg.samples_per_problem) == (16, 0.5, 0.8, 2.0, 2)
    assert (cfg.reward_clip_low, cfg.reward_clip_high, cfg.zscore) == (-2.0, 4.0, True)
    assert cfg.eval_greedy and cfg.eval_max_new_tokens == 8192 and cfg.warmup_ratio == 0.1


def test_every_option_has_help_group_and_stage_metadata():
    opts = options()
    assert len(opts) == len(PipelineConfig().to_dict()) >= 60
    for key, opt in opts.items():
        assert opt.field.metadata.get("help"), key
        assert opt.group in ("run", "model", "data", "sample", "score", "train", "eval"), key
        assert opt.field.metadata.get("stage") in (None, "sample", "score", "train", "eval"), key


def test_shared_fields_have_one_declaration_and_the_same_default():
    """A shared field (seed, system_prompt, ...) repeats an option declared once elsewhere, same default."""
    opts = options()
    for section, (cls, _) in SECTIONS.items():
        for f in fields(cls):
            if f.metadata.get("shared"):
                key = f.metadata["key"]
                assert key in opts and opts[key].section != section, (section, f.name)
                assert f.default == opts[key].field.default, (section, f.name)


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
    "name",
    ["marco-o1-7b", "qwq-32b-preview", "qwq-32b-preview-qlora", "r1-distill-qwen-1.5b", "r1-distill-qwen-7b"],
)
def test_packaged_recipes_are_valid(name):
    assert name in recipe_names()
    cfg = resolve_config(recipe=name)
    raw = load_recipe(name)
    assert all(getattr(cfg, k) == coerce_value(k, v) for k, v in raw.items())


def test_recipe_data_files_are_not_recipes():
    assert "architectures" not in recipe_names() and "cards" not in recipe_names()
    with pytest.raises(ConfigError, match="unknown recipe 'cards'"):
        load_recipe("cards")
    with pytest.raises(ConfigError, match=r"card = '12gb': unknown card; known: 24gb, 48gb, 80gb"):
        resolve_config(overrides={"card": "12gb"})


def test_r1_recipes_follow_deepseeks_sampling_advice():
    for name in ("r1-distill-qwen-1.5b", "r1-distill-qwen-7b"):
        cfg = resolve_config(recipe=name)
        assert cfg.system_prompt is None and (cfg.temperature, cfg.top_p) == (0.6, 0.95)
        assert not cfg.eval_greedy and (cfg.eval_temperature, cfg.eval_top_p) == (0.6, 0.95)


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
    """A refused flag value is named as the flag; the same value from a YAML file, as its key."""
    with pytest.raises(ConfigError, match="--" + culprit.replace("_", "-")):
        resolve_config(overrides=overrides)
    if culprit in overrides:
        with pytest.raises(ConfigError, match=f"recipe 'toy': key '{culprit}'"):
            resolve_config(base=overrides, base_source="recipe 'toy'")


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
            "max_steps": "3",
        }
    )
    s = cfg.sampling_config()
    assert (s.k, s.seed, s.temperature) == (3, 7, 0.5)
    sc = cfg.scoring_config()
    assert (sc.lam, sc.max_length, sc.clip, sc.seed) == (5.0, 128, None, 7)
    e = cfg.eval_config()
    assert e.greedy is False and e.num_samples == 2 and e.responses_per_problem == 2 and e.seed == 7
    t = cfg.train_config()
    assert t.learning_rate == cfg.learning_rate and t.importance_level == "sequence_geomean" and t.seed == 7
    assert cfg.max_steps == 3 and t.max_steps == 3


def _other_value(key: str, opt):
    """A valid value of option ``key`` that differs from its default (raw, as a flag would give it)."""
    special = {
        "model": "org/other-model",
        "card": "48gb",
        "dataset": "gsm8k",
        "eval_dataset": "math500",
        "mode": "lora",
        "freeze_last_n_layers": "3",
        "report_to": "tensorboard",
        "reward_clip_low": "-1.5",
        "reward_clip_high": "3.5",
        "top_p": "0.7",
        "eval_top_p": "0.7",
        "gpu_memory_utilization": "0.5",
        "warmup_ratio": "0.25",
        "lora_dropout": "0.05",
        "eval_backend": "vllm",
        "sampling_backend": "vllm",
    }
    if key in special:
        return special[key]
    f = opt.field
    default = f.default
    if f.metadata.get("choices"):
        return next(c for c in f.metadata["choices"] if c != default)
    base = strip_optional(opt.type)[1]
    if base is bool:
        return str(not default).lower()
    if base is int:
        return str((default or 1) + 2)
    if base is float:
        return str((default or 1.0) * 1.5 + 0.25)
    return f"other-{key}"


def test_every_option_reaches_the_code_that_uses_it():
    """Each option, set alone to a non-default value, shows in what its consumers receive, and the
    consumer's code reads that field: a declared option cannot silently be a no-op (as max_steps was)."""
    import inspect

    from o1pruner import (
        evaluate,
        memory_plan,
        modeling,
        parallel,
        pipeline,
        sampling,
        scoring,
        stages,
        train,
        vllm_engine,
    )
    from o1pruner.stages import evaluate as eval_stage
    from o1pruner.stages import report, sample, score
    from o1pruner.stages import train as train_stage

    driver = inspect.getsource(pipeline) + "".join(
        inspect.getsource(m) for m in (stages, sample, score, train_stage, eval_stage, report)
    )
    consumers = {  # section -> source of the code that receives that section
        "run": driver + inspect.getsource(memory_plan),  # card, num_gpus: read by the memory plan
        "model_config": driver + inspect.getsource(ModelConfig.load_kwargs),
        "data": driver,
        "sampling": inspect.getsource(sampling) + inspect.getsource(vllm_engine),
        "scoring": inspect.getsource(scoring),
        "training": inspect.getsource(train) + inspect.getsource(parallel),
        "evaluation": inspect.getsource(evaluate) + inspect.getsource(sampling),
    }
    needs = {"freeze_last_n_layers": {"mode": "freeze"}, "eval_backend": {"merge": "true"}}
    default = PipelineConfig()
    for key, opt in options().items():
        raw = _other_value(key, opt)
        cfg = resolve_config(overrides={**needs.get(key, {}), key: raw})
        want = coerce_value(key, raw)
        assert getattr(cfg, key) == want != getattr(default, key), key
        received = {
            "run": cfg.run,
            "model_config": cfg.model_config,
            "data": cfg.data,
            "sampling": cfg.sampling_config(),
            "scoring": cfg.scoring_config(),
            "training": cfg.train_config(),
            "evaluation": cfg.eval_config(),
        }
        for section, name in holders(key):
            assert getattr(received[section], name) == want, (key, section)
            if section == opt.section and len(holders(key)) > 1:
                continue  # declared here for the --help, used through its shared copies
            reads = (f".{name}", f'"{name}"', f"{name}=")
            assert any(r in consumers[section] for r in reads), f"{key}: nothing reads {section}.{name}"
    # What the model loader receives are its own parameters, and carry the values.
    kwargs = resolve_config(overrides={"lora_r": "5", "torch_dtype": "float32"}).model_kwargs()
    assert set(kwargs) <= set(inspect.signature(modeling.load_model).parameters)
    assert (kwargs["lora_r"], kwargs["torch_dtype"]) == (5, "float32")
