"""The pipeline's one flat configuration: every field is a YAML key and a ``--flag``.

Values come, lowest priority first, from the field defaults, a packaged recipe (``--recipe NAME``, read
from ``o1pruner/recipes/NAME.yaml``), a YAML file (``--config FILE``) and the command-line flags. Bad
input (an unknown key, a value of the wrong type, ``lam < 0``, ``k < 1``, a local model path that does not
exist) raises :class:`ConfigError`, which the CLI turns into one message on stderr and exit code 2.

Each field's metadata carries its help text and the first pipeline stage whose result it changes
(``stage``); ``None`` means it changes no result (logging, batch sizes of pure inference, ...). The run
directory uses this to decide whether an existing output folder is compatible with a new config.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

STAGES = ("sample", "score", "train", "eval")
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
BACKENDS = ("hf", "vllm")
IMPORTANCE_LEVELS = ("token", "sequence", "sequence_geomean")
REDUCTIONS = ("sequence_mean", "token_mean")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
KERNEL_BACKENDS = ("auto", "triton", "torch")


class ConfigError(ValueError):
    """A bad configuration value or file; the message names the key, value and file."""


def _f(default: Any, help: str, group: str, stage: str | None, *, choices: tuple | None = None, **kw) -> Any:
    meta = {"help": help, "group": group, "stage": stage, "choices": choices}
    return field(default=default, metadata=meta, **kw)


@dataclass
class PipelineConfig:
    """Every setting of ``o1pruner-train``; defaults follow the paper (arXiv 2501.12570) on one GPU."""

    # run
    output_dir: str = _f("runs/o1pruner", "Run directory: every stage's outputs, resumable.", "run", None)
    seed: int = _f(0, "Random seed (sampling, sample selection, training order).", "run", "sample")
    # model
    model: str | None = _f(
        None, "Base (reference) model: Hugging Face id or local folder.", "model", "sample"
    )
    mode: str = _f(
        "qlora",
        "Fine-tuning mode: qlora (4-bit base + LoRA), lora, full, freeze (train only the last N layers). "
        "The model is loaded once in this mode and also serves sampling and scoring (pi_ref).",
        "model",
        "sample",
        choices=MODES,
    )
    lora_r: int = _f(16, "LoRA rank.", "model", "train")
    lora_alpha: int = _f(32, "LoRA alpha.", "model", "train")
    lora_dropout: float = _f(0.0, "LoRA dropout.", "model", "train")
    lora_target: str = _f(
        "all-linear", "LoRA target modules ('all-linear' or comma-separated names).", "model", "train"
    )
    freeze_last_n_layers: int = _f(
        0, "With --mode freeze: number of last decoder layers to train (paper, QwQ: 48).", "model", "train"
    )
    attn_implementation: str | None = _f(
        None, "Attention implementation (sdpa, flash_attention_2, eager); default: auto.", "model", "sample"
    )
    torch_dtype: str | None = _f(
        None, "Weights dtype (bfloat16, float16, float32); default: auto.", "model", "sample"
    )
    gradient_checkpointing: bool = _f(True, "Gradient checkpointing during training.", "model", None)
    merge: bool = _f(
        False, "Save the tuned model with the LoRA adapter merged into full weights.", "model", "train"
    )
    # data
    dataset: str | None = _f(
        None,
        "Training problems: a short name (gsm8k, math, math500, aime24, gaokao) or a local "
        ".jsonl/.json/.parquet/.csv file.",
        "data",
        "sample",
    )
    dataset_split: str | None = _f("train", "Split of --dataset (named datasets only).", "data", "sample")
    question_field: str | None = _f(None, "Question field name (default: auto-detected).", "data", "sample")
    answer_field: str | None = _f(None, "Gold answer field name (default: auto-detected).", "data", "sample")
    max_train_problems: int | None = _f(
        5000, "Use at most this many training problems (paper: 5000).", "data", "sample"
    )
    shuffle: bool = _f(
        True,
        "Shuffle the training problems (with --seed) before taking --max-train-problems.",
        "data",
        "sample",
    )
    eval_dataset: str | None = _f(
        None,
        "Held-out evaluation problems: a short name or a local file (required for evaluation).",
        "data",
        "eval",
    )
    eval_split: str | None = _f(None, "Split of --eval-dataset (default: its test split).", "data", "eval")
    max_eval_problems: int | None = _f(
        None, "Evaluate on at most this many problems (default: all).", "data", "eval"
    )
    system_prompt: str | None = _f(
        "You are a helpful assistant. You should think step-by-step and put your final answer within \\boxed{}.",
        "System prompt used for sampling, training and evaluation ('none' for no system message).",
        "data",
        "sample",
    )
    # sample
    k: int = _f(
        16, "Solutions sampled per training problem (paper: 16 Marco-o1, 12 QwQ).", "sample", "sample"
    )
    temperature: float = _f(0.5, "Sampling temperature of the pre-sampling.", "sample", "sample")
    top_p: float = _f(0.8, "Top-p of the pre-sampling.", "sample", "sample")
    max_new_tokens: int = _f(8192, "Maximum new tokens per pre-sample.", "sample", "sample")
    sampling_backend: str = _f(
        "hf", "Generation backend for pre-sampling: hf or vllm.", "sample", "sample", choices=BACKENDS
    )
    sampling_batch_size: int = _f(
        64, "Sequences per generate call (hf) / prompts per call (vllm).", "sample", "sample"
    )
    gpu_memory_utilization: float = _f(0.85, "vLLM: fraction of GPU memory to use.", "sample", None)
    quantization: str | None = _f(
        None, "vLLM: weight quantization (e.g. bitsandbytes, fp8).", "sample", "sample"
    )
    # score
    lam: float = _f(
        2.0, "lambda, the accuracy weight of the reward (paper: 2 Marco-o1, 5 QwQ).", "score", "score"
    )
    samples_per_problem: int = _f(
        2, "Samples kept per problem for training (released code: 2; 0 keeps all K).", "score", "score"
    )
    reward_clip_low: float | None = _f(
        -2.0, "Lower clip of the raw reward ('none': no clipping).", "score", "score"
    )
    reward_clip_high: float | None = _f(
        4.0, "Upper clip of the raw reward ('none': no clipping).", "score", "score"
    )
    zscore: bool = _f(True, "z-score the (clipped) rewards over the whole training set.", "score", "score")
    cutoff: int | None = _f(
        4096,
        "Prompt + response cutoff in tokens for training (paper: 3072 Marco-o1, 4096 QwQ).",
        "score",
        "score",
    )
    score_batch_tokens: int = _f(
        16384, "Token budget per reference forward pass while scoring.", "score", None
    )
    # train
    learning_rate: float = _f(
        2e-6, "Peak learning rate (paper: 2e-7 full Marco-o1, 2e-6 QwQ).", "train", "train"
    )
    num_epochs: int = _f(1, "Training epochs.", "train", "train")
    max_steps: int | None = _f(
        None,
        "Stop after this many optimizer steps (the schedule still spans the full run); for smoke tests.",
        "train",
        "train",
    )
    warmup_ratio: float = _f(0.1, "Warmup fraction of the optimizer steps.", "train", "train")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule (cosine, linear, constant).", "train", "train")
    weight_decay: float = _f(0.0, "AdamW weight decay.", "train", "train")
    effective_batch_size: int = _f(
        32, "Sequences per optimizer step (gradient accumulation fills it).", "train", "train"
    )
    micro_batch_tokens: int = _f(8192, "Packed tokens per micro-batch (memory knob).", "train", "train")
    importance_level: str = _f(
        "sequence_geomean",
        "Importance ratio: token, sequence (the paper's formula) or sequence_geomean (released code).",
        "train",
        "train",
        choices=IMPORTANCE_LEVELS,
    )
    clip_low: float = _f(0.2, "PPO clip epsilon below 1.", "train", "train")
    clip_high: float = _f(0.2, "PPO clip epsilon above 1.", "train", "train")
    reduction: str = _f(
        "sequence_mean", "Loss reduction for --importance-level token.", "train", "train", choices=REDUCTIONS
    )
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.", "train", "train")
    optimizer: str = _f(
        "adamw", "Optimizer: adamw or paged_adamw_8bit.", "train", "train", choices=OPTIMIZERS
    )
    bf16: bool = _f(True, "bf16 autocast/weights where the hardware supports it.", "train", "train")
    save_every: int = _f(
        0, "Save a resumable checkpoint every N optimizer steps (0: only at the end).", "train", None
    )
    logging_every: int = _f(1, "Log training metrics every N optimizer steps.", "train", None)
    report_to: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Experiment trackers (e.g. wandb, tensorboard); default none.",
            "group": "train",
            "stage": None,
            "choices": None,
        },
    )
    kernel_backend: str = _f(
        "auto",
        "Loss kernel: auto (Triton on CUDA), triton or torch.",
        "train",
        "train",
        choices=KERNEL_BACKENDS,
    )
    # eval
    eval_max_new_tokens: int = _f(
        8192, "Maximum new tokens per evaluation response (paper: 8192).", "eval", "eval"
    )
    eval_greedy: bool = _f(
        True, "Greedy decoding for evaluation (paper); --no-eval-greedy samples.", "eval", "eval"
    )
    eval_temperature: float = _f(0.5, "Evaluation temperature with --no-eval-greedy.", "eval", "eval")
    eval_top_p: float = _f(0.8, "Evaluation top-p with --no-eval-greedy.", "eval", "eval")
    eval_num_samples: int = _f(1, "Responses per evaluation problem (accuracy is averaged).", "eval", "eval")
    eval_backend: str = _f(
        "hf", "Generation backend for evaluation: hf or vllm.", "eval", "eval", choices=BACKENDS
    )
    eval_batch_size: int = _f(64, "Prompts per evaluation generate call.", "eval", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> PipelineConfig:
        """Build from raw (YAML or CLI) values; ``source`` names the file in error messages."""
        checked = {
            key: coerce_value(key, value, source) for key, value in _normalise_keys(values, source).items()
        }
        cfg = cls(**checked)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def validate(self) -> None:
        """Range and consistency checks; raises ConfigError naming the key and value."""

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{key} = {getattr(self, key)!r}: {why}")

        if self.k < 1:
            raise bad("k", "must be >= 1 (solutions sampled per problem)")
        if self.lam < 0:
            raise bad("lam", "must be >= 0 (the accuracy weight of the reward)")
        for key in (
            "max_new_tokens",
            "eval_max_new_tokens",
            "sampling_batch_size",
            "eval_batch_size",
            "effective_batch_size",
            "micro_batch_tokens",
            "score_batch_tokens",
            "num_epochs",
            "eval_num_samples",
            "lora_r",
            "logging_every",
        ):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        for key in ("samples_per_problem", "freeze_last_n_layers", "save_every"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        for key in ("max_train_problems", "max_eval_problems", "cutoff", "max_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise bad(key, "must be >= 1 (or none)")
        if self.temperature <= 0:
            raise bad("temperature", "must be > 0 for pre-sampling")
        for key in ("top_p", "eval_top_p"):
            if not 0 < getattr(self, key) <= 1:
                raise bad(key, "must be in (0, 1]")
        if self.learning_rate <= 0:
            raise bad("learning_rate", "must be > 0")
        if not 0 <= self.warmup_ratio <= 1:
            raise bad("warmup_ratio", "must be in [0, 1]")
        for key in ("clip_low", "clip_high", "lora_dropout", "weight_decay", "eval_temperature"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if (
            self.reward_clip_low is not None
            and self.reward_clip_high is not None
            and self.reward_clip_low >= self.reward_clip_high
        ):
            raise ConfigError(
                f"reward_clip_low = {self.reward_clip_low} must be below reward_clip_high = {self.reward_clip_high}"
            )
        if self.mode == "freeze" and self.freeze_last_n_layers < 1:
            raise bad("freeze_last_n_layers", "--mode freeze needs --freeze-last-n-layers >= 1")
        if self.eval_backend == "vllm" and self.mode in ("qlora", "lora") and not self.merge:
            raise bad("eval_backend", "vllm evaluation of a LoRA adapter needs --merge")
        for key in ("model", "dataset", "eval_dataset"):
            check_local_path(key, getattr(self, key))

    # ------------------------------------------------------------------ stage configs
    def sampling_config(self):
        from o1pruner.sampling import SamplingConfig

        return _build(
            SamplingConfig,
            {
                "k": self.k,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens,
                "seed": self.seed,
                "backend": self.sampling_backend,
                "batch_size": self.sampling_batch_size,
                "system_prompt": self.system_prompt,
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "quantization": self.quantization,
            },
        )

    def scoring_config(self):
        from o1pruner.scoring import ScoringConfig

        clip = None
        if self.reward_clip_low is not None and self.reward_clip_high is not None:
            clip = (float(self.reward_clip_low), float(self.reward_clip_high))
        return _build(
            ScoringConfig,
            {
                "lam": self.lam,
                "samples_per_problem": self.samples_per_problem,
                "clip": clip,
                "zscore": self.zscore,
                "seed": self.seed,
                "max_length": self.cutoff,
                "batch_tokens": self.score_batch_tokens,
                "system_prompt": self.system_prompt,
            },
        )

    def train_config(self):
        from o1pruner.train import TrainConfig

        return _build(
            TrainConfig,
            {
                "learning_rate": self.learning_rate,
                "num_epochs": self.num_epochs,
                "warmup_ratio": self.warmup_ratio,
                "lr_scheduler": self.lr_scheduler,
                "weight_decay": self.weight_decay,
                "effective_batch_size": self.effective_batch_size,
                "micro_batch_tokens": self.micro_batch_tokens,
                "importance_level": self.importance_level,
                "clip_low": self.clip_low,
                "clip_high": self.clip_high,
                "reduction": self.reduction,
                "max_grad_norm": self.max_grad_norm,
                "optimizer": self.optimizer,
                "bf16": self.bf16,
                "seed": self.seed,
                "save_every": self.save_every,
                "logging_every": self.logging_every,
                "report_to": list(self.report_to),
                "backend": self.kernel_backend,
            },
        )

    def eval_config(self):
        from o1pruner.evaluate import EvalConfig

        return _build(
            EvalConfig,
            {
                "max_new_tokens": self.eval_max_new_tokens,
                "greedy": self.eval_greedy,
                "temperature": self.eval_temperature,
                "top_p": self.eval_top_p,
                "backend": self.eval_backend,
                "batch_size": self.eval_batch_size,
                "num_samples": self.eval_num_samples,
                "system_prompt": self.system_prompt,
                "seed": self.seed,
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "quantization": self.quantization,
            },
        )

    def model_kwargs(self, mode: str | None = None) -> dict[str, Any]:
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
        }


def _build(cls, kwargs: dict[str, Any]):
    """Instantiate a stage config with the keys it declares (another module's dataclass may lag ours)."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in known})


# ---------------------------------------------------------------------- values
_NONE_STRINGS = {"none", "null", "~", ""}


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(PipelineConfig)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0]
    return False, tp


def coerce_value(key: str, value: Any, source: str = "config") -> Any:
    """Check/convert one raw value to the field's type; ConfigError names key, value and source."""
    tp = field_types()[key]
    optional, base = _is_optional(tp)
    meta = PipelineConfig.__dataclass_fields__[key].metadata

    name = f"--{key.replace('_', '-')}" if source == "command line" else f"key '{key}'"

    def err(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {name}: expected {expected}, got {value!r}")

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
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in (
            "true",
            "yes",
            "1",
            "on",
            "false",
            "no",
            "0",
            "off",
        ):
            return value.strip().lower() in ("true", "yes", "1", "on")
        raise err("true or false")
    if base is int:
        if isinstance(value, bool):
            raise err("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise err("an integer")
    if base is float:
        if isinstance(value, bool):
            raise err("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-7 (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise err("a number")
    if base is str:
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and key in ("dataset_split", "eval_split")
        ):
            return str(value)
        if not isinstance(value, str):
            raise err("a string")
        choices = meta.get("choices")
        if choices and value not in choices:
            hint = _suggest(value, choices)
            raise ConfigError(f"{source}: {name}: {value!r} is not one of {', '.join(choices)}{hint}")
        return value
    raise err(_type_name(base))  # pragma: no cover - every field type is handled above


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _normalise_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    known = set(PipelineConfig.field_names())
    out = {}
    for raw_key, value in values.items():
        key = str(raw_key).strip().replace("-", "_")
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{raw_key}'{_suggest(key, known)}")
        out[key] = value
    return out


def looks_local(path: str) -> bool:
    """True for strings that can only mean a local path (not a Hub id like ``org/name``)."""
    return (
        path.startswith(("/", "./", "../", "~", "."))
        or path.count("/") > 1
        or "\\" in path
        or Path(path).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv")
    )


def check_local_path(key: str, value: str | None) -> None:
    if value is None or not looks_local(value):
        return
    if not Path(os.path.expanduser(value)).exists():
        raise ConfigError(f"{key} = {value!r}: no such file or directory")


# ---------------------------------------------------------------------- files
def recipe_names() -> list[str]:
    folder = resources.files("o1pruner") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """Raw values of the packaged recipe ``o1pruner/recipes/NAME.yaml``."""
    resource = resources.files("o1pruner") / "recipes" / f"{name}.yaml"
    if not resource.is_file():
        names = recipe_names()
        raise ConfigError(f"unknown recipe '{name}'{_suggest(name, names)}; available: {', '.join(names)}")
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

    Every layer is checked with its source name (the file, the recipe, "command line").
    """
    values: dict[str, Any] = {}
    if base:
        values.update(_check_layer(base, base_source))
    if recipe:
        values.update(_check_layer(load_recipe(recipe), f"recipe '{recipe}'"))
    if config_file:
        values.update(_check_layer(load_yaml_file(config_file), str(config_file)))
    if overrides:
        values.update(_check_layer(overrides, "command line"))
    cfg = PipelineConfig(**values)
    cfg.validate()
    # Local paths are stored absolute: config.yaml (and a saved adapter's base path) stay valid from any
    # working directory, and "./m" vs "m" is not taken for a different model by the run-dir check.
    for key in ("model", "dataset", "eval_dataset"):
        value = getattr(cfg, key)
        if value and (looks_local(value) or os.path.exists(value)):
            setattr(cfg, key, os.path.abspath(os.path.expanduser(value)))
    return cfg


def _check_layer(values: dict[str, Any], source: str) -> dict[str, Any]:
    return {key: coerce_value(key, value, source) for key, value in _normalise_keys(values, source).items()}


# ---------------------------------------------------------------------- run-dir compatibility
def first_stage(key: str) -> str | None:
    return PipelineConfig.__dataclass_fields__[key].metadata.get("stage")


def diff_configs(old: dict[str, Any], new: PipelineConfig) -> list[str]:
    """Keys whose values differ between an existing run's config.yaml and ``new``."""
    new_d = new.to_dict()
    return [k for k in new_d if k in old and old[k] != new_d[k]] + [k for k in old if k not in new_d]
