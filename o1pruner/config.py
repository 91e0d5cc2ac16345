"""The pipeline's configuration: the stage configs composed, every option a flat YAML key and a ``--flag``.

Each option is declared once, as a field of the config that uses it (:mod:`o1pruner.options`):
:class:`RunConfig`, :class:`ModelConfig` and :class:`DataConfig` here, ``SamplingConfig``,
``ScoringConfig``, ``TrainConfig`` and ``EvalConfig`` in their stage modules. :class:`PipelineConfig`
holds one of each and reads and writes the options by their flat keys (``cfg.k``, ``cfg.max_steps``), so
a user's YAML and flags stay flat while each stage receives its own config object whole.

Values come, lowest priority first, from the field defaults, a packaged recipe (``--recipe NAME``, read
from ``o1pruner/recipes/NAME.yaml``), a YAML file (``--config FILE``) and the command-line flags. Bad
input (an unknown key, a value of the wrong type, ``lam < 0``, ``k < 1``, a local model path that does not
exist) raises :class:`ConfigError` naming the layer the value came from; the CLI turns it into one message
on stderr and exit code 2.

Each option's metadata carries its help text and the first pipeline stage whose result it changes
(``stage``); ``None`` means it changes no result (logging, batch sizes of pure inference, ...). The run
directory uses this to decide whether an existing output folder is compatible with a new config.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from o1pruner.evaluate import EvalConfig
from o1pruner.options import (
    STAGES,
    ConfigError,
    bad_value,
    check_options,
    flat_key,
    option,
    option_fields,
    shared,
    strip_optional,
    suggest,
)
from o1pruner.prompts import DEFAULT_SYSTEM_PROMPT
from o1pruner.sampling import SamplingConfig
from o1pruner.scoring import ScoringConfig
from o1pruner.train import TrainConfig

__all__ = ["STAGES", "ConfigError", "PipelineConfig", "resolve_config"]

# Help groups, in the order shown by --help.
GROUPS = {
    "run": "run directory",
    "model": "model and fine-tuning mode",
    "data": "problems",
    "sample": "stage 1: pre-sampling K solutions per training problem from the reference model",
    "score": "stage 2: scoring (length-harmonizing reward, reference log-probs)",
    "train": "stage 3: off-policy PPO-clip training",
    "eval": "stage 4: evaluation of the base and the tuned model",
}
MODES = ("qlora", "lora", "full", "freeze")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def looks_local(path: str) -> bool:
    """True for strings that can only mean a local path (not a Hub id like ``org/name``)."""
    return (
        path.startswith(("/", "./", "../", "~", "."))
        or path.count("/") > 1
        or "\\" in path
        or Path(path).suffix.lower() in LOCAL_SUFFIXES
    )


def local_path(key: str, value: str | None) -> str | None:
    """``value`` made absolute when it names a local path (which must exist); Hub names pass unchanged.

    Absolute paths keep config.yaml (and a saved adapter's base path) valid from any working directory,
    and "./m" vs "m" is not taken for a different model by the run-directory check.
    """
    if value is None:
        return None
    if looks_local(value) and not Path(os.path.expanduser(value)).exists():
        raise ConfigError(f"{key} = {value!r}: no such file or directory", key=key)
    if looks_local(value) or os.path.exists(value):
        return os.path.abspath(os.path.expanduser(value))
    return value


@dataclass
class RunConfig:
    """Where a run keeps its outputs, and the seed every stage derives its randomness from."""

    output_dir: str = option("runs/o1pruner", "Run directory: every stage's outputs, resumable.", stage=None)
    seed: int = option(0, "Random seed (sampling, sample selection, training order).", stage="sample")
    card: str | None = option(
        None,
        "GPU card the run is planned for: a name in o1pruner/recipes/cards.yaml (24gb, 48gb, 80gb); "
        "o1pruner plan uses its usable memory when no GPU is visible and --gpu-memory-gb is not given.",
        stage=None,
    )
    num_gpus: int = option(
        1,
        "GPUs the run is planned for (under a launcher: its process count); with --fsdp the plan shards "
        "training's weights, gradients and optimizer states over them, and reports per-GPU peaks.",
        stage=None,
        range="[1,)",
    )
    rounds: int = option(
        1,
        "Rounds of sample -> score -> train (1: the paper). Round r >= 2 re-samples from round r-1's tuned "
        "model, which is also its reference (baselines and importance ratio), in rounds/rR/; AES is always "
        "against the original model.",
        stage=None,  # round 1's outputs do not depend on it; later rounds live in their own folders
        range="[1,)",
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.card is not None:
            from o1pruner.memory_plan import card_memory_gb

            card_memory_gb(self.card)  # an unknown card name fails here, naming the known ones


@dataclass
class ModelConfig:
    """The base (reference) model and how it is loaded for fine-tuning (``modeling.load_model``)."""

    model: str | None = option(
        None, "Base (reference) model: Hugging Face id or local folder.", stage="sample"
    )
    mode: str = option(
        "qlora",
        "Fine-tuning mode: qlora (4-bit base + LoRA), lora, full, freeze (train only the last N layers). "
        "The model is loaded once in this mode and also serves sampling and scoring (pi_ref).",
        stage="sample",
        choices=MODES,
    )
    lora_r: int = option(16, "LoRA rank.", stage="train", range="[1,)")
    lora_alpha: int = option(32, "LoRA alpha.", stage="train")
    lora_dropout: float = option(0.0, "LoRA dropout.", stage="train", range="[0,1)")
    lora_target: str = option(
        "all-linear", "LoRA target modules ('all-linear' or comma-separated names).", stage="train"
    )
    freeze_last_n_layers: int = option(
        0,
        "With --mode freeze: number of last decoder layers to train (paper, QwQ: 48).",
        stage="train",
        range="[0,)",
    )
    attn_implementation: str | None = option(
        None, "Attention implementation (sdpa, flash_attention_2, eager); default: auto.", stage="sample"
    )
    torch_dtype: str | None = option(
        None, "Weights dtype (bfloat16, float16, float32); default: auto.", stage="sample"
    )
    gradient_checkpointing: bool = option(True, "Gradient checkpointing during training.", stage=None)
    merge: bool = option(
        False, "Save the tuned model with the LoRA adapter merged into full weights.", stage="train"
    )
    seed: int = shared("seed", 0)  # seeds the weights load creates (a new LoRA adapter)

    def __post_init__(self) -> None:
        check_options(self)
        if self.mode == "freeze" and self.freeze_last_n_layers < 1:
            raise bad_value("freeze_last_n_layers", ">= 1 with --mode freeze", self.freeze_last_n_layers)
        self.model = local_path("model", self.model)

    def load_kwargs(self, mode: str | None = None) -> dict[str, Any]:
        """Keyword arguments of ``o1pruner.modeling.load_model`` (``mode`` overrides ``self.mode``)."""
        return {
            "mode": mode or self.mode,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "lora_target": self.lora_target,
            "freeze_last_n_layers": self.freeze_last_n_layers,
            "attn_implementation": self.attn_implementation,
            "torch_dtype": self.torch_dtype,
            "gradient_checkpointing": self.gradient_checkpointing,
            "seed": self.seed,
        }


@dataclass
class DataConfig:
    """The training and evaluation problems (``data.load_problems``) and the system prompt of every stage."""

    dataset: str | None = option(
        None,
        "Training problems: a short name (gsm8k, math, math500, aime24, gaokao) or a local "
        ".jsonl/.json/.parquet/.csv file.",
        stage="sample",
    )
    dataset_split: str | None = option("train", "Split of --dataset (named datasets only).", stage="sample")
    question_field: str | None = option(None, "Question field name (default: auto-detected).", stage="sample")
    answer_field: str | None = option(
        None, "Gold answer field name (default: auto-detected).", stage="sample"
    )
    max_train_problems: int | None = option(
        5000, "Use at most this many training problems (paper: 5000).", stage="sample", range="[1,)"
    )
    shuffle: bool = option(
        True,
        "Shuffle the training problems (with --seed) before taking --max-train-problems.",
        stage="sample",
    )
    eval_dataset: str | None = option(
        None,
        "Held-out evaluation problems: a short name or a local file (optional: without it the run trains "
        "and saves the tuned model, and evaluates nothing).",
        stage="eval",
    )
    eval_split: str | None = option(None, "Split of --eval-dataset (default: its test split).", stage="eval")
    max_eval_problems: int | None = option(
        None, "Evaluate on at most this many problems (default: all).", stage="eval", range="[1,)"
    )
    system_prompt: str | None = option(
        DEFAULT_SYSTEM_PROMPT,
        "System prompt used for sampling, training and evaluation ('none' for no system message).",
        stage="sample",
    )

    def __post_init__(self) -> None:
        check_options(self)
        self.dataset = local_path("dataset", self.dataset)
        self.eval_dataset = local_path("eval_dataset", self.eval_dataset)


# Section attribute of PipelineConfig -> (its config class, its --help group).
SECTIONS: dict[str, tuple[type, str]] = {
    "run": (RunConfig, "run"),
    "model_config": (ModelConfig, "model"),
    "data": (DataConfig, "data"),
    "sampling": (SamplingConfig, "sample"),
    "scoring": (ScoringConfig, "score"),
    "training": (TrainConfig, "train"),
    "evaluation": (EvalConfig, "eval"),
}


class Option(NamedTuple):
    """One flat option: its key, the section and field that declare it, its help group and type hint."""

    key: str
    section: str
    field: dataclasses.Field
    group: str
    type: Any


@cache
def options() -> dict[str, Option]:
    """Every option by flat key, in --help order (the field that declares it, not the shared copies)."""
    out: dict[str, Option] = {}
    for section, (cls, group) in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in option_fields(cls):
            if f.metadata.get("shared"):
                continue
            key = flat_key(f)
            if key in out:
                raise TypeError(f"option {key!r} declared twice ({out[key].section} and {section})")
            out[key] = Option(key, section, f, group, hints[f.name])
    return out


@cache
def holders(key: str) -> tuple[tuple[str, str], ...]:
    """``(section, field name)`` of every field filled from option ``key`` (declared and shared)."""
    return tuple(
        (section, f.name)
        for section, (cls, _) in SECTIONS.items()
        for f in option_fields(cls)
        if flat_key(f) == key
    )


@dataclass
class PipelineConfig:
    """Every setting of ``o1pruner run``, as one config per stage; defaults follow the paper on one GPU.

    Options read and write by flat key (``cfg.lam`` is ``cfg.scoring.lam``; setting ``cfg.seed`` sets the
    seed of every stage). Build it with :func:`resolve_config` (layers, with sources in errors) or
    :meth:`from_dict`.
    """

    run: RunConfig = field(default_factory=RunConfig)
    model_config: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.validate()

    def __getattr__(self, name: str) -> Any:
        # Called only when normal lookup fails: flat option keys resolve to the declaring section.
        opts = options()
        if name in opts and "evaluation" in self.__dict__:
            return getattr(self.__dict__[opts[name].section], opts[name].field.name)
        raise AttributeError(f"{type(self).__name__} has no attribute or option {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SECTIONS or name not in options():
            object.__setattr__(self, name, value)
            return
        for section, field_name in holders(name):
            setattr(getattr(self, section), field_name, value)

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        """Every flat option key, in --help order."""
        return list(options())

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> PipelineConfig:
        """Build from checked, typed values by flat key (each shared key fills every holder)."""
        kwargs: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for key, value in values.items():
            for section, field_name in holders(key):
                kwargs[section][field_name] = list(value) if isinstance(value, list) else value
        sections = {section: SECTIONS[section][0](**kw) for section, kw in kwargs.items()}
        return cls(**sections)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> PipelineConfig:
        """Build from raw (YAML or CLI) values; ``source`` names the file in error messages."""
        return resolve_layers([(values, source)])

    def to_dict(self) -> dict[str, Any]:
        """Flat key -> value, in --help order (what config.yaml holds)."""
        return {key: _plain(getattr(self, key)) for key in options()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def validate(self) -> None:
        """Checks across sections (each section checks its own options when built)."""
        if self.sampling.temperature <= 0:
            raise bad_value("temperature", "> 0 for pre-sampling", self.sampling.temperature)

    # ------------------------------------------------------------------ stage configs
    def sampling_config(self) -> SamplingConfig:
        return self.sampling

    def scoring_config(self) -> ScoringConfig:
        return self.scoring

    def train_config(self) -> TrainConfig:
        return self.training

    def eval_config(self) -> EvalConfig:
        return self.evaluation

    def model_kwargs(self, mode: str | None = None) -> dict[str, Any]:
        """Keyword arguments of ``o1pruner.modeling.load_model`` (``mode`` overrides ``self.mode``)."""
        return self.model_config.load_kwargs(mode)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------- values
_NONE_STRINGS = {"none", "null", "~", ""}
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
# String options whose YAML value may read as a number (a split named 2024).
_NUMERIC_STRINGS = ("dataset_split", "eval_split")


def field_types() -> dict[str, Any]:
    """Flat key -> type hint of every option."""
    return {key: opt.type for key, opt in options().items()}


def option_name(key: str, source: str) -> str:
    """How an error names option ``key`` coming from ``source``: its flag or its YAML key."""
    return f"--{key.replace('_', '-')}" if source == "command line" else f"key '{key}'"


def coerce_value(key: str, value: Any, source: str = "config") -> Any:
    """Check/convert one raw value to the option's type; ConfigError names key, value and source."""
    opt = options()[key]
    optional, base = strip_optional(opt.type)

    def err(expected: str) -> ConfigError:
        return ConfigError(
            f"{source}: {option_name(key, source)}: expected {expected}, got {value!r}", key=key
        )

    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE_STRINGS):
        if optional:
            return None
        raise err(_type_name(base))
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise err("a list of strings")
        return list(value)
    if isinstance(value, bool) and base in (int, float):
        raise err(_type_name(base))
    if base is bool:
        word = value.strip().lower() if isinstance(value, str) else None
        if isinstance(value, bool) or word in _TRUE + _FALSE:
            return value if isinstance(value, bool) else word in _TRUE
        raise err("true or false")
    if base is int:
        return _to_number(value, int, err)
    if base is float:  # YAML 1.1 reads 2e-7 (no dot) as a string
        return _to_number(value, float, err)
    if base is str:
        if isinstance(value, (int, float)) and key in _NUMERIC_STRINGS:
            return str(value)
        if not isinstance(value, str):
            raise err("a string")
        choices = opt.field.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(
                f"{source}: {option_name(key, source)}: {value!r} is not one of {', '.join(choices)}"
                f"{suggest(value, choices)}",
                key=key,
            )
        return value
    raise err(_type_name(base))  # pragma: no cover - every option type is handled above


def _to_number(value: Any, kind: type, err) -> Any:
    if isinstance(value, float) and kind is int:
        if value.is_integer():
            return int(value)
        raise err(_type_name(kind))
    if isinstance(value, (int, float)):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    raise err(_type_name(kind))


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _normalise_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    known = options()
    out = {}
    for raw_key, value in values.items():
        key = str(raw_key).strip().replace("-", "_")
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{raw_key}'{suggest(key, known)}", key=key)
        out[key] = value
    return out


# ---------------------------------------------------------------------- files
# Data files of the recipes folder that are not recipes (read by o1pruner.memory_plan).
RECIPE_DATA_FILES = ("architectures.yaml", "cards.yaml")


def recipe_names() -> list[str]:
    folder = resources.files("o1pruner") / "recipes"
    return sorted(
        p.name[: -len(".yaml")]
        for p in folder.iterdir()
        if p.name.endswith(".yaml") and p.name not in RECIPE_DATA_FILES
    )


def load_recipe(name: str) -> dict[str, Any]:
    """Raw values of the packaged recipe ``o1pruner/recipes/NAME.yaml``."""
    resource = resources.files("o1pruner") / "recipes" / f"{name}.yaml"
    if not resource.is_file() or f"{name}.yaml" in RECIPE_DATA_FILES:
        names = recipe_names()
        raise ConfigError(f"unknown recipe '{name}'{suggest(name, names)}; available: {', '.join(names)}")
    return _parse_yaml(resource.read_text(encoding="utf-8"), f"recipe '{name}'")


def load_yaml_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    return _parse_yaml(path.read_text(encoding="utf-8"), str(path))


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def resolve_config(
    *,
    recipe: str | None = None,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    base_source: str = "toy demo",
) -> PipelineConfig:
    """Defaults < base (e.g. the toy demo's settings) < recipe < config file < overrides (flags).

    Every error names the layer its value came from (the file, the recipe, "command line").
    """
    layers: list[tuple[dict[str, Any], str]] = []
    if base:
        layers.append((base, base_source))
    if recipe:
        layers.append((load_recipe(recipe), f"recipe '{recipe}'"))
    if config_file:
        layers.append((load_yaml_file(config_file), str(config_file)))
    if overrides:
        layers.append((overrides, "command line"))
    return resolve_layers(layers)


def resolve_layers(layers: list[tuple[dict[str, Any], str]]) -> PipelineConfig:
    """Merge raw layers (later wins) into a checked PipelineConfig; errors name the value's layer."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for raw, source in layers:
        for key, value in _normalise_keys(raw, source).items():
            values[key] = coerce_value(key, value, source)
            sources[key] = source
    try:
        return PipelineConfig.from_values(values)
    except ConfigError as e:
        if e.key is None:
            raise
        msg = str(e)
        msg = msg[len(e.key) :] if msg.startswith(e.key) else f": {msg}"
        if e.key not in sources:  # a default that another layer's value makes invalid
            raise ConfigError(f"{option_name(e.key, 'command line')} (default){msg}", key=e.key) from None
        source = sources[e.key]
        raise ConfigError(f"{source}: {option_name(e.key, source)}{msg}", key=e.key) from None


# ---------------------------------------------------------------------- run-dir compatibility
def first_stage(key: str) -> str | None:
    """The first stage whose result option ``key`` changes (None: it changes no result)."""
    return options()[key].field.metadata.get("stage")


def diff_configs(old: dict[str, Any], new: PipelineConfig) -> list[str]:
    """Keys whose values differ between an existing run's config.yaml and ``new``."""
    new_d = new.to_dict()
    return [k for k in new_d if k in old and old[k] != new_d[k]] + [k for k in old if k not in new_d]
