"""The O1-Pruner pipeline: sample -> score -> train -> eval, resumable in a run directory.

One process by default; under ``torchrun`` / ``accelerate launch`` every stage runs on all processes
(generation and scoring split the problems, training is DDP or FSDP2; see :mod:`o1pruner.distributed`
and docs/multi-gpu.md), and rank 0 writes the run directory's shared files.

The run directory's layout is in :mod:`o1pruner.rundir` (and docs/architecture.md). Before the first model
load, :meth:`Pipeline.preflight` checks every input (the model path or name, the output directory, every
data file read in full), so a bad input fails within seconds and writes nothing.

A stage whose complete output exists is skipped; a partial one resumes (sampling from samples.jsonl,
training from its checkpoints, evaluation from its response records). The model is loaded once, in the
fine-tuning mode, and serves as pi_ref for sampling (hf backend), scoring and the base evaluation before it
is trained (a fresh LoRA adapter is the identity, so the adapter-wrapped model *is* the reference; with
qlora the reference is the 4-bit model that is trained, so the importance ratio starts at exactly 1).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from o1pruner import distributed
from o1pruner.config import STAGES, ConfigError, PipelineConfig
from o1pruner.io import DataError, atomic_write_text
from o1pruner.modeling import free_memory
from o1pruner.rundir import check_run_dir
from o1pruner.stages import evaluate, report, rounds, sample, score, train

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def log_progress(msg: str) -> None:
    print(f"[o1pruner] {msg}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_model_source(model: str | None) -> str:
    """The model to load: a local model folder (config.json or a LoRA adapter) or a Hub name; else ConfigError."""
    if not model:
        raise ConfigError(
            "model is not set: pass --model (a Hugging Face id or a local folder) or a --recipe", key="model"
        )
    if os.path.isdir(model):
        if not any(os.path.isfile(os.path.join(model, f)) for f in ("config.json", "adapter_config.json")):
            raise ConfigError(
                f"model {model!r}: a folder without config.json (not a model folder)", key="model"
            )
    elif os.path.exists(model):
        raise ConfigError(f"model {model!r}: a file, not a model folder or a Hub name", key="model")
    elif not HUB_NAME.match(model):
        raise ConfigError(f"model {model!r}: no such folder, and not a Hub name (owner/name)", key="model")
    return model


class LoadedModel:
    """The one model in memory: the reference (untrained, pi_ref) or the tuned one, and its tokenizer."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, log: Callable[[str], None]):
        self.cfg = cfg
        self.run_dir = run_dir
        self.log = log
        self.model = None
        self._tokenizer = None
        self.state: str | None = None  # "reference" (untrained) | "tuned"

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(check_model_source(self.cfg.model))
            except OSError as e:
                raise ConfigError(
                    f"model {self.cfg.model!r}: cannot load its tokenizer: {_first_line(e)}", key="model"
                ) from None
        return self._tokenizer

    def reference(self):
        """The model in the fine-tuning mode, untrained (== pi_ref); loaded once."""
        if self.model is not None and self.state == "reference":
            return self.model
        self.release()
        from o1pruner.modeling import load_model

        self.log(f"loading {check_model_source(self.cfg.model)} (mode {self.cfg.mode})")
        from o1pruner.parallel import parallel_mode

        kwargs = self.cfg.model_kwargs()
        if parallel_mode(self.cfg.fsdp) == "fsdp":  # FSDP2 casts the trainable layers as it shards them
            kwargs["fp32_masters"] = False
        try:
            self.model, self._tokenizer = load_model(self.cfg.model, **kwargs)
        except OSError as e:  # transformers: not a local folder and not a Hub id (or offline)
            raise ConfigError(
                f"model {self.cfg.model!r}: cannot be loaded: {_first_line(e)}", key="model"
            ) from None
        self.model.eval()  # sampling and scoring; the trainer switches to train mode
        self.state = "reference"
        return self.model

    def tuned(self):
        """The tuned model: in memory after training, else loaded from ``model/``."""
        if self.model is not None and self.state == "tuned":
            return self.model
        model_dir = self.run_dir / "model"
        if not (model_dir / "DONE").exists():
            raise DataError(f"{model_dir}: no complete tuned model (model/DONE); run the train stage first")
        self.release()
        from o1pruner.modeling import load_model

        if (model_dir / "adapter_config.json").exists():
            # The same base (and 4-bit quantization with qlora) as the base evaluation, plus the adapter.
            mode = self.cfg.mode if self.cfg.mode in ("qlora", "lora") else "none"
            self.model, self._tokenizer = load_model(str(model_dir), **self.cfg.model_kwargs(mode=mode))
        else:
            kwargs = self.cfg.model_kwargs(mode="none")
            kwargs = {k: kwargs[k] for k in ("mode", "attn_implementation", "torch_dtype")}
            self.model, self._tokenizer = load_model(str(model_dir), **kwargs)
        self.model.eval()
        self.state = "tuned"
        return self.model

    def release(self) -> None:
        if self.model is not None:
            self.model = None
            self.state = None
            free_memory()


class Pipeline:
    """Runs the stages of one config in its run directory (``cfg.output_dir``)."""

    def __init__(self, cfg: PipelineConfig, *, log: Callable[[str], None] = log_progress):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.world = distributed.world()
        self.log = log if self.world.is_main else (lambda msg: None)  # rank 0 speaks for all
        self.models = LoadedModel(cfg, self.run_dir, self.log)
        self._train_problems = None
        self._eval_problems = None

    # ------------------------------------------------------------------ inputs
    def path(self, rel: str) -> Path:
        return self.run_dir / rel

    def is_complete(self, stage: str, marker: str, needs: tuple[str, str] | None = None) -> bool:
        """Whether ``stage``'s complete output ``marker`` exists (then the stage is skipped, and says so).

        ``needs``: ``(marker, producer)`` of the input the stage reads; when the stage is to run, it must
        exist (DataError otherwise, see :meth:`require`).
        """
        if self.path(marker).exists():
            self.log(f"{stage}: complete ({marker}), skipped")
            return True
        if needs is not None:
            self.require(*needs)
        return False

    def require(self, marker: str, producer: str) -> None:
        """DataError unless the complete output ``marker`` of stage ``producer`` exists."""
        if not self.path(marker).exists():
            raise DataError(f"{self.run_dir}: no {marker} (complete output); run the {producer} stage first")

    def has_eval_set(self) -> bool:
        return bool(self.cfg.eval_dataset) or self.path("problems/eval.jsonl").exists()

    def preflight(self, stages: Sequence[str]) -> list[str]:
        """Check every input before any work, writing nothing; returns notes on allowed config changes.

        The config is checked when built; here: the model path or Hub name, the output directory against
        an earlier run's config, and every data file the stages need, read in full (file and line named).
        """
        check_model_source(self.cfg.model)
        notes = check_run_dir(self.run_dir, self.cfg)
        if "eval" in stages and not self.has_eval_set() and list(stages) == ["eval"]:
            raise ConfigError(
                "eval_dataset is not set: pass --eval-dataset (a short name or a local file)",
                key="eval_dataset",
            )
        if any(s in stages for s in ("sample", "score")):
            self.train_problems()
        if "eval" in stages and self.has_eval_set():
            self.eval_problems()
        from o1pruner.parallel import check_fsdp, parallel_mode

        if parallel_mode(self.cfg.fsdp) == "fsdp":
            check_fsdp(self.cfg.mode, self.cfg.optimizer)
        tp = self.cfg.vllm_tensor_parallel_size
        if self.world.size % tp:
            raise ConfigError(
                f"vllm_tensor_parallel_size={tp} does not divide the {self.world.size} processes of this "
                "launch (each vLLM engine spans that many processes)",
                key="vllm_tensor_parallel_size",
            )
        return notes

    def prepare(self, notes: Sequence[str] = ()) -> None:
        """Write the resolved config.yaml and the problem files the preflight read."""
        for note in notes:
            self.log(f"config change allowed: {note}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = self.cfg.to_yaml()
        path = self.path("config.yaml")
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
        from o1pruner.data import save_problems

        for name, problems in (("train", self._train_problems), ("eval", self._eval_problems)):
            target = self.path(f"problems/{name}.jsonl")
            if problems is not None and not target.exists():
                save_problems(target, problems)
                self.log(f"{len(problems)} {name} problems in {target}")

    def train_problems(self):
        """The training problems: ``problems/train.jsonl`` of this run, else read from ``--dataset``."""
        from o1pruner.data import load_problems, read_problems

        if self._train_problems is None:
            path = self.path("problems/train.jsonl")
            if path.exists():
                self._train_problems = read_problems(path)
            elif not self.cfg.dataset:
                raise ConfigError(
                    "dataset is not set: pass --dataset (a short name or a local file)", key="dataset"
                )
            else:
                self._train_problems = load_problems(
                    self.cfg.dataset,
                    split=self.cfg.dataset_split,
                    question_field=self.cfg.question_field,
                    answer_field=self.cfg.answer_field,
                    limit=self.cfg.max_train_problems,
                    shuffle=self.cfg.shuffle,
                    seed=self.cfg.seed,
                )
        return self._train_problems

    def eval_problems(self):
        """The evaluation problems: ``problems/eval.jsonl`` of this run, else read from ``--eval-dataset``."""
        from o1pruner.data import load_problems, read_problems

        if self._eval_problems is None:
            path = self.path("problems/eval.jsonl")
            if path.exists():
                self._eval_problems = read_problems(path)
            elif not self.cfg.eval_dataset:
                raise ConfigError(
                    "eval_dataset is not set: pass --eval-dataset (a short name or a local file)",
                    key="eval_dataset",
                )
            else:
                problems = load_problems(
                    self.cfg.eval_dataset, split=self.cfg.eval_split, limit=self.cfg.max_eval_problems
                )
                train_ids = {p.id for p in self._train_problems or ()}
                overlap = sum(p.id in train_ids for p in problems)
                if overlap:
                    self.log(f"warning: {overlap} evaluation problems also appear in the training problems")
                self._eval_problems = problems
        return self._eval_problems

    # ------------------------------------------------------------------ driver
    def check_memory_plan(self, stages: Sequence[str]) -> None:
        """On a GPU, refuse (ConfigError, exit 2) a run whose planned peak of a stage exceeds the card."""
        from o1pruner.memory_plan import plan_run, visible_gpu_memory_gb

        budget = visible_gpu_memory_gb()
        if budget is None:
            return
        options = self.cfg.to_dict()
        if self.world.distributed:  # plan the launch as it is
            options["num_gpus"] = self.world.size
        try:
            plan = plan_run(options, budget)
        except ConfigError as e:  # no config.json to read (e.g. offline): loading will say more
            self.log(f"memory plan skipped: {e}")
            return
        plan.stages = [s for s in plan.stages if s.name in stages]
        if not plan.fits():
            raise ConfigError(
                f"the run does not fit this GPU ({plan.budget / 2**30:.1f} GiB):\n{plan.error_message()}"
            )
        self.log("memory plan: every stage fits (o1pruner plan prints the details)")

    def run(self, stages: Sequence[str] = STAGES) -> dict[str, Any] | None:
        """Run ``stages`` (in pipeline order); returns the eval.json content when "eval" ran.

        Without an evaluation set a full run trains and saves the tuned model and says that no evaluation
        was done; the "eval" stage alone needs one.
        """
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
        distributed.init()
        with distributed.main_first() as main:  # rank 0 writes config.yaml and the problem files
            if main:
                self.prepare(self.preflight(stages))
        if not self.world.is_main:
            self.preflight(stages)  # reads what rank 0 wrote
        self.check_memory_plan(stages)
        self.log(
            f"backends: sampling {self.cfg.sampling_backend}, evaluation {self.cfg.eval_backend} "
            "(vllm when it is installed, else hf, unless set)"
        )
        do_eval = "eval" in stages and self.has_eval_set()
        more_rounds = self.cfg.rounds > 1 and list(stages) == list(STAGES)
        if self.cfg.rounds > 1 and not more_rounds:
            self.log(
                f"rounds = {self.cfg.rounds}: rounds 2.. run with every stage (o1pruner run); this is round 1"
            )
        result = None
        try:
            if "sample" in stages:
                sample.run(self)
            if "score" in stages:
                score.run(self)
            if "train" in stages:
                if do_eval and not self.path("model/DONE").exists() and self.cfg.eval_backend == "hf":
                    # Evaluate the reference while it is loaded, before training changes it.
                    evaluate.base(self)
                train.run(self)
            if do_eval:
                self.require("model/DONE", "train")
                base_eval, tuned_eval = evaluate.base(self), evaluate.tuned(self)
            if more_rounds:
                self.models.release()
                rounds.run_rounds(self)
            if do_eval:
                with distributed.main_first() as main:
                    if main:
                        result = report.run(self, base_eval, tuned_eval)
            elif "eval" in stages:
                self.log(
                    f"no evaluation done: no --eval-dataset given; the tuned model is in {self.path('model')}"
                )
        finally:
            self.models.release()
        return result


def run_pipeline(cfg: PipelineConfig, stages: Sequence[str] = STAGES) -> dict[str, Any] | None:
    return Pipeline(cfg).run(stages)
