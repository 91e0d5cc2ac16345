"""The embedded demo: a toy long-thinking model and problem source for ``o1pruner-train`` with no arguments.

``prepare_toy(run_dir, seed)`` builds (or finds in its cache) a tiny Llama model that solves running sums
with o1-style redundant re-checks (more on easy problems than on hard ones), writes the training,
validation and test problems as ``.jsonl`` files, and returns the pipeline settings that point the
standard pipeline at them (evaluation on the test split unless ``split="validation"``). Settings are
chosen on the validation split; reported numbers come from the test split. Nothing else about the
pipeline changes: the toy is a model + problem source.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from o1pruner.data import Problem, problem_id, save_problems
from o1pruner.io import atomic_write_json
from o1pruner.toy.task import TaskConfig, ToyProblem, draw_problems
from o1pruner.toy.warmup import TOY_SYSTEM_PROMPT, WarmupConfig
from o1pruner.toy.warmup import warmup as run_warmup

__all__ = [
    "DEMO_OVERRIDES",
    "SPLITS",
    "TaskConfig",
    "ToyAssets",
    "WarmupConfig",
    "default_cache_dir",
    "demo_overrides",
    "prepare_toy",
]

#: Bump when the task, tokenizer or warm-up changes in a way that changes the cached model.
TOY_VERSION = 5

#: Pipeline settings (``PipelineConfig`` field -> value) of the demo, on top of the paper defaults.
DEMO_OVERRIDES: dict[str, Any] = {
    "mode": "full",
    "system_prompt": TOY_SYSTEM_PROMPT,
    "torch_dtype": "float32",
    "bf16": False,
    "gradient_checkpointing": False,
    "attn_implementation": "sdpa",
    "shuffle": False,
    # stage 1: pre-sampling; temperature 1 keeps the model's own spread of re-check counts and slips
    "k": 8,
    "temperature": 1.0,
    "top_p": 1.0,
    "max_new_tokens": 160,
    "sampling_batch_size": 256,
    # stage 2: scoring (released code: m=2, clip [-2, 4], z-score)
    "lam": 2.0,
    "samples_per_problem": 2,
    "cutoff": 512,
    "score_batch_tokens": 32768,
    # stage 3: training; a tiny model from scratch takes a much larger step than a 7B one
    "learning_rate": 2.5e-4,
    "num_epochs": 1,
    "effective_batch_size": 32,
    "micro_batch_tokens": 8192,
    "kernel_backend": "torch",
    # stage 4: greedy evaluation
    "eval_max_new_tokens": 160,
    "eval_batch_size": 256,
    # rounds of sample -> score -> train, chosen on the validation split (docs/demo.md): round 2
    # recovers round 1's accuracy loss there and cuts more; a third adds almost nothing
    "rounds": 2,
}
#: The toy's evaluation splits: ``validation`` for choosing settings, ``test`` for the reported numbers.
SPLITS = ("validation", "test")


def demo_overrides(**changes: Any) -> dict[str, Any]:
    """A copy of :data:`DEMO_OVERRIDES` with ``changes`` applied."""
    out = dict(DEMO_OVERRIDES)
    out.update(changes)
    return out


@dataclass
class ToyAssets:
    """What ``prepare_toy`` made.

    ``overrides``: ``PipelineConfig`` field -> value; apply on top of the defaults (``model``,
    ``dataset``, ``eval_dataset`` point at the files below; the rest is :data:`DEMO_OVERRIDES`).
    """

    model_dir: Path
    train_path: Path
    eval_path: Path  # the split evaluated: toy/validation.jsonl or toy/test.jsonl
    train_problems: list[Any]
    eval_problems: list[Any]
    overrides: dict[str, Any]
    warmup_seconds: float | None  # None: the model came from the cache
    info: dict[str, Any] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """``$O1PRUNER_CACHE/toy``, else ``$XDG_CACHE_HOME/o1pruner/toy``, else ``~/.cache/o1pruner/toy``."""
    if os.environ.get("O1PRUNER_CACHE"):
        return Path(os.environ["O1PRUNER_CACHE"]) / "toy"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "o1pruner" / "toy"


def _as_problem(p: ToyProblem) -> Problem:
    return Problem(id=problem_id(p.question), question=p.question, answer=p.answer, level=str(p.level))


def prepare_toy(
    run_dir: str | os.PathLike,
    seed: int = 0,
    *,
    num_train: int = 320,
    num_eval: int = 200,
    warmup_config: WarmupConfig | None = None,
    task_config: TaskConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    split: str = "test",
    log=print,
) -> ToyAssets:
    """Build the demo's reference model and problems; return where they are and the pipeline settings.

    ``run_dir/toy/{train,validation,test}.jsonl`` get the problems (fields id, question, answer, level),
    ``num_eval`` in each of the two held-out splits; the three sets are disjoint, and no warm-up trace
    is drawn from either held-out split. ``split`` names the one the pipeline evaluates (``validation``
    to choose settings, ``test`` for the numbers reported). The warm-up model is cached under
    ``cache_dir`` (default :func:`default_cache_dir`), keyed by a hash of seed, settings and held-out
    sets (the same model for both splits), so a rerun skips it. ``overrides`` are applied on top of
    :data:`DEMO_OVERRIDES`.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    warmup_config = warmup_config or WarmupConfig()
    task_config = task_config or TaskConfig()
    run_dir = Path(run_dir)
    test_set = draw_problems(num_eval, seed=10_000 + seed, config=task_config)
    val_set = draw_problems(
        num_eval, seed=20_000 + seed, config=task_config, exclude={p.question for p in test_set}
    )
    eval_questions = frozenset(p.question for p in (*test_set, *val_set))  # held out of everything
    train_set = draw_problems(num_train, seed=seed, config=task_config, exclude=eval_questions)
    train_path = run_dir / "toy" / "train.jsonl"
    save_problems(train_path, [_as_problem(p) for p in train_set])
    for name, problems in (("validation", val_set), ("test", test_set)):
        save_problems(run_dir / "toy" / f"{name}.jsonl", [_as_problem(p) for p in problems])
    eval_path = run_dir / "toy" / f"{split}.jsonl"
    eval_set = val_set if split == "validation" else test_set

    key_src = {
        "version": TOY_VERSION,
        "seed": seed,
        "warmup": warmup_config.to_dict(),
        "task": {
            k: (sorted(v.items()) if isinstance(v, dict) else v) for k, v in asdict(task_config).items()
        },
        "system_prompt": TOY_SYSTEM_PROMPT,
        "eval": hashlib.sha1("\n".join(sorted(eval_questions)).encode()).hexdigest(),
    }
    key = hashlib.sha1(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache / f"model-{key}"
    seconds: float | None = None
    info: dict[str, Any] = {"cache_key": key}
    if (model_dir / "DONE").is_file():
        if log:
            log(f"[toy] reference model found in cache: {model_dir}")
        info.update(json.loads((model_dir / "DONE").read_text()))
    else:
        if log:
            log(f"[toy] warm-up of the reference model (seed {seed}) -> {model_dir}")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".model-{key}.", dir=cache))
        try:
            t0 = time.time()
            result = run_warmup(
                tmp,
                seed=seed,
                exclude_questions=eval_questions,
                config=warmup_config,
                task=task_config,
                log=log,
            )
            seconds = time.time() - t0
            losses = result["losses"]
            tail = losses[-20:]
            info.update(
                num_parameters=result["num_parameters"],
                warmup_seconds=seconds,
                first_loss=losses[0],
                final_loss=sum(tail) / len(tail),
                steps=result["steps"],
                validations=result["validations"],
                validation_accuracy=result["final_validation_accuracy"],
                key_source=key_src,
            )
            atomic_write_json(tmp / "DONE", info)
            if model_dir.exists():  # a concurrent run finished first; keep theirs
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, model_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    settings = demo_overrides(**(overrides or {}))
    settings.update(
        model=str(model_dir),
        dataset=str(train_path),
        eval_dataset=str(eval_path),
        max_train_problems=num_train,
        max_eval_problems=num_eval,
        seed=seed,
    )
    return ToyAssets(
        model_dir=model_dir,
        train_path=train_path,
        eval_path=eval_path,
        train_problems=[_as_problem(p) for p in train_set],
        eval_problems=[_as_problem(p) for p in eval_set],
        overrides=settings,
        warmup_seconds=seconds,
        info={**info, "split": split},
    )
