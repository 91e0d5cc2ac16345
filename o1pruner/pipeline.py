"""The O1-Pruner pipeline on one GPU: sample -> score -> train -> eval, resumable in a run directory.

Layout (docs/INTERFACES.md): ``config.yaml``, ``problems/{train,eval}.jsonl``, ``samples.jsonl`` +
``samples.done.json``, ``scored.parquet``, ``checkpoints/``, ``model/`` (+ ``model/DONE``),
``eval/{base,tuned}.json`` + ``eval/*_responses.jsonl``, ``eval.json``, ``report.md``, ``plots/``,
``metrics.json``, ``summary.md``.

A stage whose complete output exists is skipped; a partial one resumes (sampling from samples.jsonl,
training from its checkpoints, evaluation from its response records). The model is loaded once, in the
fine-tuning mode, and serves as pi_ref for sampling (hf backend), scoring and the base evaluation before it
is trained (a fresh LoRA adapter is the identity, so the adapter-wrapped model *is* the reference; with
qlora the reference is the 4-bit model that is trained, so the importance ratio starts at exactly 1).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from o1pruner.config import STAGES, ConfigError, PipelineConfig, diff_configs, first_stage
from o1pruner.io import DataError, atomic_write_json, atomic_write_text

# Files and folders that hold each stage's outputs (complete or partial).
STAGE_OUTPUTS = {
    "sample": ("problems/train.jsonl", "samples.jsonl", "samples.done.json"),
    "score": ("scored.parquet",),
    "train": ("checkpoints", "model", "metrics.jsonl"),
    "eval": ("eval", "problems/eval.jsonl"),
}
# The base model's evaluation does not depend on the score and train settings; these outputs do.
TUNED_OUTPUTS = ("eval/tuned.json", "eval/tuned_responses.jsonl", "eval.json", "metrics.json")
REPORT_FILES = ("eval.json", "metrics.json", "summary.md", "report.md", "plots")


def _log(msg: str) -> None:
    print(f"[o1pruner] {msg}", file=sys.stderr, flush=True)


def existing_outputs(run_dir: Path) -> dict[str, list[str]]:
    """For each stage, its outputs (relative paths) present in ``run_dir``."""
    return {stage: [p for p in paths if (run_dir / p).exists()] for stage, paths in STAGE_OUTPUTS.items()}


def _outputs_depending_on(
    run_dir: Path, outputs: dict[str, list[str]], stage: str, changed: str
) -> list[str]:
    """Outputs of ``stage`` that depend on a value whose first affected stage is ``changed``."""
    if stage == "eval" and changed in ("score", "train"):
        return [p for p in TUNED_OUTPUTS if (run_dir / p).exists()]
    return outputs[stage]


def check_run_dir(run_dir: Path, cfg: PipelineConfig) -> list[str]:
    """Refuse a run directory holding another run's results; returns notes on harmless changes.

    A key whose value differs from the existing ``config.yaml`` is a conflict when its first affected
    stage, or a later one, already has outputs there (those results were computed with the old value).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {str(run_dir)!r} exists and is not a directory")
    outputs = existing_outputs(run_dir)
    present = [s for s in STAGES if outputs[s]]
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        if present:
            files = ", ".join(p for s in present for p in outputs[s])
            raise ConfigError(
                f"output dir {run_dir} holds pipeline outputs ({files}) but no config.yaml; "
                "use another --output-dir"
            )
        return []
    try:
        old = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{cfg_path}: not valid YAML ({e}); use another --output-dir") from None
    if not isinstance(old, dict):
        raise ConfigError(f"{cfg_path}: not a mapping; use another --output-dir")
    new = cfg.to_dict()
    conflicts, notes = [], []
    for key in diff_configs(old, cfg):
        if key not in new:
            continue
        stage = first_stage(key)
        change = f"{key}: {old[key]!r} -> {new[key]!r}"
        if stage is None:
            notes.append(f"{change} (changes no stage's result)")
            continue
        affected = [
            s for s in STAGES[STAGES.index(stage) :] if _outputs_depending_on(run_dir, outputs, s, stage)
        ]
        if affected:
            conflicts.append(f"{change} (changes stage '{stage}'; outputs of {', '.join(affected)} exist)")
        else:
            notes.append(f"{change} (affects only stage '{stage}' onwards, which has no outputs yet)")
    if conflicts:
        raise ConfigError(
            f"output dir {run_dir} holds another run's results that this config would change: "
            + "; ".join(conflicts)
            + ". Use another --output-dir, or delete those outputs to recompute them."
        )
    return notes


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


class Pipeline:
    """Runs the stages of one config in its run directory (``cfg.output_dir``)."""

    def __init__(self, cfg: PipelineConfig, *, log: Callable[[str], None] = _log):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.log = log
        self._model = None
        self._tokenizer = None
        self._model_state: str | None = None  # "reference" (untrained) | "tuned"
        self._train_problems = None
        self._eval_problems = None

    # ------------------------------------------------------------------ helpers
    def path(self, rel: str) -> Path:
        return self.run_dir / rel

    def prepare(self) -> None:
        """Check the run directory against the config and write the resolved config.yaml."""
        for note in check_run_dir(self.run_dir, self.cfg):
            self.log(f"config change allowed: {note}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = self.cfg.to_yaml()
        path = self.path("config.yaml")
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)

    def _require_model(self) -> str:
        if not self.cfg.model:
            raise ConfigError(
                "model is not set: pass --model (a Hugging Face id or a local folder) or a --recipe"
            )
        return self.cfg.model

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self._require_model())
            except OSError as e:
                raise ConfigError(
                    f"model {self.cfg.model!r}: cannot load its tokenizer: {_first_line(e)}"
                ) from None
        return self._tokenizer

    def reference_model(self):
        """The model in the fine-tuning mode, untrained (== pi_ref); loaded once."""
        if self._model is not None and self._model_state == "reference":
            return self._model
        self.release_model()
        from o1pruner.modeling import load_model

        self.log(f"loading {self._require_model()} (mode {self.cfg.mode})")
        try:
            self._model, self._tokenizer = load_model(self.cfg.model, **self.cfg.model_kwargs())
        except OSError as e:  # transformers: not a local folder and not a Hub id (or offline)
            raise ConfigError(f"model {self.cfg.model!r}: cannot be loaded: {_first_line(e)}") from None
        self._model.eval()  # sampling and scoring; the trainer switches to train mode
        self._model_state = "reference"
        return self._model

    def tuned_model(self):
        """The tuned model: in memory after training, else loaded from ``model/``."""
        if self._model is not None and self._model_state == "tuned":
            return self._model
        model_dir = self.path("model")
        if not (model_dir / "DONE").exists():
            raise DataError(f"{model_dir}: no complete tuned model (model/DONE); run the train stage first")
        self.release_model()
        from o1pruner.modeling import load_model

        if (model_dir / "adapter_config.json").exists():
            # The same base (and 4-bit quantization with qlora) as the base evaluation, plus the adapter.
            mode = self.cfg.mode if self.cfg.mode in ("qlora", "lora") else "none"
            self._model, self._tokenizer = load_model(str(model_dir), **self.cfg.model_kwargs(mode=mode))
        else:
            kwargs = self.cfg.model_kwargs(mode="none")
            kwargs = {k: kwargs[k] for k in ("mode", "attn_implementation", "torch_dtype")}
            self._model, self._tokenizer = load_model(str(model_dir), **kwargs)
        self._model.eval()
        self._model_state = "tuned"
        return self._model

    def release_model(self) -> None:
        if self._model is not None:
            self._model = None
            self._model_state = None
            free_memory()

    def train_problems(self):
        from o1pruner.data import load_problems, read_problems, save_problems

        if self._train_problems is None:
            path = self.path("problems/train.jsonl")
            if path.exists():
                self._train_problems = read_problems(path)
            else:
                if not self.cfg.dataset:
                    raise ConfigError("dataset is not set: pass --dataset (a short name or a local file)")
                problems = load_problems(
                    self.cfg.dataset,
                    split=self.cfg.dataset_split,
                    question_field=self.cfg.question_field,
                    answer_field=self.cfg.answer_field,
                    limit=self.cfg.max_train_problems,
                    shuffle=self.cfg.shuffle,
                    seed=self.cfg.seed,
                )
                if not problems:
                    raise DataError(f"dataset {self.cfg.dataset!r}: no problems")
                save_problems(path, problems)
                self._train_problems = problems
                self.log(f"{len(problems)} training problems from {self.cfg.dataset}")
        return self._train_problems

    def eval_problems(self):
        from o1pruner.data import load_problems, read_problems, save_problems

        if self._eval_problems is None:
            path = self.path("problems/eval.jsonl")
            if path.exists():
                self._eval_problems = read_problems(path)
            else:
                if not self.cfg.eval_dataset:
                    raise ConfigError(
                        "eval_dataset is not set: pass --eval-dataset (a short name or a local file)"
                    )
                problems = load_problems(
                    self.cfg.eval_dataset, split=self.cfg.eval_split, limit=self.cfg.max_eval_problems
                )
                if not problems:
                    raise DataError(f"eval dataset {self.cfg.eval_dataset!r}: no problems")
                train_ids = (
                    {p.id for p in self.train_problems()}
                    if self.path("problems/train.jsonl").exists()
                    else set()
                )
                overlap = sum(p.id in train_ids for p in problems)
                if overlap:
                    self.log(f"warning: {overlap} evaluation problems also appear in the training problems")
                save_problems(path, problems)
                self._eval_problems = problems
                self.log(f"{len(problems)} evaluation problems from {self.cfg.eval_dataset}")
        return self._eval_problems

    # ------------------------------------------------------------------ stages
    def stage_sample(self) -> None:
        done = self.path("samples.done.json")
        if done.exists():
            self.log("sample: complete (samples.done.json), skipped")
            return
        from o1pruner.sampling import read_samples, sample_problems

        problems = self.train_problems()
        scfg = self.cfg.sampling_config()
        if self.cfg.sampling_backend == "vllm":
            self.release_model()
            model, tokenizer = self._require_model(), self.tokenizer()
        else:
            model, tokenizer = self.reference_model(), self._tokenizer
        samples_path = self.path("samples.jsonl")
        if samples_path.exists():
            self.log("sample: resuming from samples.jsonl")
        self.log(f"sample: {self.cfg.k} solutions for each of {len(problems)} problems")
        sample_problems(problems, model, tokenizer, samples_path, scfg)
        samples = read_samples(samples_path)
        expected = len(problems) * self.cfg.k
        if len(samples) < expected:
            raise RuntimeError(
                f"sampling stopped early: {len(samples)} of {expected} samples in {samples_path}"
            )
        atomic_write_json(done, {"num_problems": len(problems), "k": self.cfg.k, "num_samples": len(samples)})
        if self.cfg.sampling_backend == "vllm":
            free_memory()

    def stage_score(self) -> None:
        out = self.path("scored.parquet")
        if out.exists():
            self.log("score: complete (scored.parquet), skipped")
            return
        if not self.path("samples.done.json").exists():
            raise DataError(
                f"{self.run_dir}: no complete samples (samples.done.json); run the sample stage first"
            )
        from o1pruner.sampling import read_samples
        from o1pruner.scoring import build_training_set

        problems = self.train_problems()
        samples = read_samples(self.path("samples.jsonl"))
        model = self.reference_model()
        self.log(f"score: rewards (lam={self.cfg.lam}) and reference log-probs of {len(samples)} samples")
        build_training_set(
            problems, samples, model, self._tokenizer, out, self.cfg.scoring_config()
        )  # atomic

    def stage_train(self) -> None:
        model_dir = self.path("model")
        if (model_dir / "DONE").exists():
            self.log("train: complete (model/DONE), skipped")
            return
        if not self.path("scored.parquet").exists():
            raise DataError(f"{self.run_dir}: no scored.parquet; run the score stage first")
        from o1pruner.modeling import save_model
        from o1pruner.train import Trainer

        model = self.reference_model()
        if self.path("checkpoints").exists():
            self.log("train: resuming from checkpoints/")
        trainer = Trainer(model, self.path("scored.parquet"), self.cfg.train_config(), self.run_dir)
        trainer.train(resume=True)
        del trainer  # optimizer state and gradients go before evaluation
        free_memory()
        self._model_state = "tuned"
        model.eval()
        save_model(model, self._tokenizer, model_dir, merge=self.cfg.merge)  # atomic, writes model/DONE
        self.log(f"train: tuned model saved to {model_dir}{' (merged)' if self.cfg.merge else ''}")

    def _evaluate(self, name: str, get_model: Callable[[], Any], path_for_vllm: Callable[[], str]) -> dict:
        import json

        from o1pruner.evaluate import evaluate_model

        out = self.path(f"eval/{name}.json")
        if out.exists():
            self.log(f"eval {name}: complete (eval/{name}.json), skipped")
            return json.loads(out.read_text(encoding="utf-8"))
        problems = self.eval_problems()
        if self.cfg.eval_backend == "vllm":
            self.release_model()
            model, tokenizer = path_for_vllm(), self.tokenizer()
        else:
            model = get_model()
            tokenizer = self._tokenizer
        self.log(f"eval {name}: {len(problems)} problems")
        result = evaluate_model(
            model,
            tokenizer,
            problems,
            self.cfg.eval_config(),
            out_path=self.path(f"eval/{name}_responses.jsonl"),
            desc=f"eval {name}",
        )
        atomic_write_json(out, result)
        return result

    def eval_base(self) -> dict:
        return self._evaluate("base", self.reference_model, self._require_model)

    def eval_tuned(self) -> dict:
        return self._evaluate("tuned", self.tuned_model, lambda: str(self.path("model")))

    # ------------------------------------------------------------------ driver
    def run(self, stages: Sequence[str] = STAGES) -> dict[str, Any] | None:
        """Run ``stages`` (in pipeline order); returns the eval.json content when "eval" ran."""
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
        self._require_model()
        if "eval" in stages and not self.cfg.eval_dataset and not self.path("problems/eval.jsonl").exists():
            raise ConfigError("eval_dataset is not set: pass --eval-dataset (a short name or a local file)")
        self.prepare()
        result = None
        try:
            if "sample" in stages:
                self.stage_sample()
            if "score" in stages:
                self.stage_score()
            if "train" in stages:
                if (
                    "eval" in stages
                    and not self.path("model/DONE").exists()
                    and self.cfg.eval_backend == "hf"
                ):
                    # Evaluate the reference while it is loaded, before training changes it.
                    self.eval_base()
                self.stage_train()
            if "eval" in stages:
                if not self.path("model/DONE").exists():
                    raise DataError(
                        f"{self.run_dir}: no complete tuned model (model/DONE); run the train stage first"
                    )
                base = self.eval_base()
                tuned = self.eval_tuned()
                result = self.report(base, tuned)
        finally:
            self.release_model()
        return result

    def report_is_current(self) -> bool:
        """All report files exist and are newer than both evaluations and the training log."""
        paths = [self.path(p) for p in REPORT_FILES]
        if not all(p.exists() for p in paths):
            return False
        oldest = min(p.stat().st_mtime for p in paths)
        inputs = [self.path("eval/base.json"), self.path("eval/tuned.json"), self.path("metrics.jsonl")]
        return all(not p.exists() or p.stat().st_mtime <= oldest for p in inputs)

    def report(self, base: dict, tuned: dict) -> dict:
        import json

        from o1pruner.report import print_summary, write_report

        if self.report_is_current():
            self.log("report: up to date, skipped")
            doc = json.loads(self.path("eval.json").read_text(encoding="utf-8"))
        else:
            doc = write_report(self.run_dir, base, tuned, config=self.cfg.to_dict())
        print_summary(base, tuned)
        self.log(
            f"report: {self.path('report.md')}, summary: {self.path('summary.md')}, "
            f"tuned model: {self.path('model')}"
        )
        return doc


def run_pipeline(cfg: PipelineConfig, stages: Sequence[str] = STAGES) -> dict[str, Any] | None:
    return Pipeline(cfg).run(stages)
