"""Running ``o1pruner-train`` as a user does: a subprocess per command, and a run directory's result bytes.

The console scripts may not be installed: the commands run as ``python -m o1pruner COMMAND`` with the repo
on PYTHONPATH, in a subprocess, so stderr can be checked for tracebacks exactly as a user would see it.
Arguments that do not start with a command run as ``o1pruner run`` (what ``o1pruner-train`` does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The files of a finished run that must not depend on timing: samples, scored set, tuned weights, metrics.
RESULT_FILES = (
    "samples.jsonl",
    "scored.parquet",
    "eval/base.json",
    "eval/tuned.json",
    "eval/base_responses.jsonl",
    "eval/tuned_responses.jsonl",
    "eval.json",
)


def cli_env() -> dict[str, str]:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("O1PRUNER_DEBUG", None)
    return env


COMMANDS = ("run", "sample", "score", "train", "eval", "demo", "plan")


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "o1pruner", *(args if args and args[0] in COMMANDS else ("run", *args))]


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node")  # + the process count


def run_python(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` in the repo with the CLI's environment, output captured."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=cli_env(), timeout=timeout, cwd=REPO
    )


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_python(*cli_command(*args)[1:], timeout=timeout)


def start_cli(*args: str, log: Path) -> subprocess.Popen:
    """Start a command in the background (output to ``log``), to be killed or waited for."""
    with open(log, "ab") as out:
        return subprocess.Popen(cli_command(*args), stdout=out, stderr=out, env=cli_env(), cwd=REPO)


def result_bytes(run_dir: Path) -> dict[str, bytes]:
    """The bytes of ``RESULT_FILES`` and of every file of the tuned model in ``run_dir``."""
    files = {name: (run_dir / name).read_bytes() for name in RESULT_FILES}
    for path in sorted((run_dir / "model").rglob("*")):
        if path.is_file():
            files[str(path.relative_to(run_dir))] = path.read_bytes()
    return files


def differing(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    """Names whose bytes differ (or that only one side has)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


TRAIN = [("What is 1+1?", "2", "1"), ("What is 2+2?", "4", "2"), ("What is 3+4?", "7", "1")]
EVAL = [("What is 5+5?", "10", "1"), ("What is 6+1?", "7", "2"), ("What is 2+7?", "9", "3")]


def write_problems(path: Path, rows) -> Path:
    path.write_text(
        "".join(json.dumps({"question": q, "answer": a, "level": lvl}) + "\n" for q, a, lvl in rows)
    )
    return path


def make_inputs(root: Path) -> dict[str, Path]:
    """A tiny random model whose sampled lengths vary, and its training and evaluation problems."""
    from helpers import make_tiny_model

    return {
        "root": root,
        "model": make_tiny_model(root / "model", seed=3, stop_prob=0.1),
        "train": write_problems(root / "train.jsonl", TRAIN),
        "eval": write_problems(root / "eval.jsonl", EVAL),
    }


def small_run_args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """A tiny but complete run: every stage, a few optimizer steps, hf backends on the CPU."""
    return [
        *("--model", str(inputs["model"]), "--dataset", str(inputs["train"])),
        *("--eval-dataset", str(inputs["eval"]), "--output-dir", str(out)),
        *("--k", "3", "--max-new-tokens", "8", "--eval-max-new-tokens", "8"),
        *("--effective-batch-size", "2", "--micro-batch-tokens", "512", "--samples-per-problem", "0"),
        *("--kernel-backend", "torch", "--cutoff", "128", "--no-bf16", "--lora-r", "4"),
        *("--learning-rate", "1e-2", "--sampling-backend", "hf", "--eval-backend", "hf"),
        *extra,
    ]
