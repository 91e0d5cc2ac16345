"""``o1pruner run`` end to end on a tiny random model (CPU), reruns, bad inputs and --help.

The console scripts may not be installed: the commands run as ``python -m o1pruner COMMAND`` with the repo
on PYTHONPATH, in a subprocess, so stderr can be checked for tracebacks exactly as a user would see it.
Arguments that do not start with a command run as ``o1pruner run`` (what ``o1pruner-train`` does).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli_runs import COMMANDS, REPO, run_cli
from helpers import make_tiny_model

from o1pruner.config import ConfigError, resolve_config
from o1pruner.pipeline import check_run_dir

TRAIN = [("What is 1+1?", "2", "1"), ("What is 2+2?", "4", "2"), ("What is 3+4?", "7", "1")]
EVAL = [("What is 5+5?", "10", "1"), ("What is 6+1?", "7", "2")]


def _jsonl(path: Path, rows) -> Path:
    path.write_text(
        "".join(json.dumps({"question": q, "answer": a, "level": lvl}) + "\n" for q, a, lvl in rows)
    )
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_model(
        root / "model", seed=0, stop_prob=0.02
    )  # lengths vary (T=0.5): rewards are not all 0
    return {
        "root": root,
        "model": model,
        "train": _jsonl(root / "train.jsonl", TRAIN),
        "eval": _jsonl(root / "eval.jsonl", EVAL),
    }


def _args(inputs, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(inputs["model"]),
        "--dataset",
        str(inputs["train"]),
        "--eval-dataset",
        str(inputs["eval"]),
        "--output-dir",
        str(out),
        "--mode",
        "lora",
        "--k",
        "2",
        "--max-new-tokens",
        "6",
        "--eval-max-new-tokens",
        "6",
        "--effective-batch-size",
        "2",
        "--micro-batch-tokens",
        "512",
        "--kernel-backend",
        "torch",
        "--cutoff",
        "128",
        "--no-bf16",
        "--lora-r",
        "4",
        "--learning-rate",
        "1e-3",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(inputs):
    out = inputs["root"] / "run"
    start = time.monotonic()
    proc = run_cli(*_args(inputs, out))
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"dir": out, "proc": proc, "elapsed": elapsed}


OUTPUTS = [
    "config.yaml",
    "problems/train.jsonl",
    "problems/eval.jsonl",
    "samples.jsonl",
    "samples.done.json",
    "scored.parquet",
    "model/DONE",
    "model/adapter_config.json",
    "eval/base.json",
    "eval/tuned.json",
    "eval/base_responses.jsonl",
    "eval/tuned_responses.jsonl",
    "eval.json",
    "metrics.json",
    "metrics.jsonl",
    "report.md",
    "summary.md",
    "plots/length_distribution.png",
    "plots/accuracy.png",
    "plots/training_curves.png",
    "plots/length_by_level.png",
]


def test_end_to_end_writes_every_output(finished_run):
    out, proc = finished_run["dir"], finished_run["proc"]
    for rel in OUTPUTS:
        assert (out / rel).exists(), rel
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr  # a clean run warns of nothing
    assert "accuracy (%)" in proc.stdout and "AES" in proc.stdout  # the final table
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"baseline", "pruned", "aes", "eval_problems"}
    assert metrics["eval_problems"] == len(EVAL)
    for key in ("baseline", "pruned"):
        assert set(metrics[key]) == {"accuracy", "mean_length"}
        assert 0.0 <= metrics[key]["accuracy"] <= 1.0 and 0 < metrics[key]["mean_length"] <= 6
    done = json.loads((out / "samples.done.json").read_text())
    assert done == {"num_problems": 3, "k": 2, "num_samples": 6}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        cfg["k"] == 2 and cfg["mode"] == "lora" and cfg["model"] == str(finished_run["dir"].parent / "model")
    )
    for png in ("plots/length_distribution.png", "plots/accuracy.png", "plots/training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "Base vs tuned" in report and "Per level" in report and "Training" in report


def test_saved_adapter_loads_with_peft(finished_run, inputs):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(inputs["model"])
    tuned = PeftModel.from_pretrained(base, finished_run["dir"] / "model")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        logits = tuned(ids).logits
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # training moved the adapter


def test_rerun_skips_completed_stages(finished_run, inputs):
    out = finished_run["dir"]
    files = [p for p in out.rglob("*") if p.is_file()]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    start = time.monotonic()
    proc = run_cli(*_args(inputs, out))
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("sample", "score", "train", "eval base", "eval tuned", "report"):
        assert f"{stage}: " in proc.stderr and "skipped" in proc.stderr, stage
    assert "loading" not in proc.stderr  # no model was loaded
    assert "accuracy (%)" in proc.stdout
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert elapsed < finished_run["elapsed"]


def test_single_stage_commands(finished_run, inputs, tmp_path):
    proc = run_cli("eval", *_args(inputs, finished_run["dir"]))
    assert proc.returncode == 0 and "eval tuned: complete" in proc.stderr, proc.stderr[-2000:]
    proc = run_cli("score", *_args(inputs, tmp_path / "fresh"))
    assert proc.returncode == 2 and "samples.done.json" in proc.stderr and "Traceback" not in proc.stderr


def _one_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_incompatible_output_dir(finished_run, inputs):
    proc = run_cli(*_args(inputs, finished_run["dir"], "--k", "3"))
    _one_error(proc, "k: 2 -> 3", str(finished_run["dir"]))
    proc = run_cli(*_args(inputs, finished_run["dir"], "--lam", "5", "--temperature", "0.7"))
    _one_error(proc, "lam", "temperature")


def test_bad_inputs_exit_2_with_one_message(inputs, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("k: 2\nlearnig_rate: 1e-5\n")
    _one_error(
        run_cli("--config", str(cfg), "--model", str(inputs["model"])),
        "learnig_rate",
        str(cfg),
        "learning_rate",
    )
    _one_error(
        run_cli("--model", str(tmp_path / "missing-model"), "--dataset", str(inputs["train"])),
        "missing-model",
    )
    _one_error(run_cli(*_args(inputs, tmp_path / "r1", "--lam", "-1")), "lam")
    _one_error(run_cli(*_args(inputs, tmp_path / "r2", "--k", "0")), "--k must be >= 1, got 0")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": \n')
    args = _args(inputs, tmp_path / "r3")
    args[args.index("--dataset") + 1] = str(bad)
    _one_error(run_cli(*args), str(bad), "line 2")
    _one_error(run_cli(*_args(inputs, tmp_path / "r4", "--k", "two")), "--k", "two")
    proc = run_cli("--modle", "x")
    assert proc.returncode == 2 and "--model" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_the_flags():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for flag in (
        "--model",
        "--dataset",
        "--eval-dataset",
        "--output-dir",
        "--mode",
        "--k",
        "--lam",
        "--learning-rate",
        "--config",
        "--recipe",
        "--merge",
        "--eval-max-new-tokens",
        "r1-distill-qwen-7b",
    ):
        assert flag in proc.stdout, flag
    for group in ("stage 1", "stage 2", "stage 3", "stage 4"):
        assert group in proc.stdout
    proc = run_cli("sample", "--help")
    assert proc.returncode == 0 and "--k" in proc.stdout
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0 and "--eval-dataset" in proc.stdout


def test_commands_and_the_run_alias():
    """``o1pruner`` lists its commands; ``o1pruner-train`` parses exactly the flags of ``o1pruner run``."""
    from o1pruner import cli

    top = cli.build_main_parser()
    assert set(COMMANDS) <= set(top._subparsers._group_actions[0].choices)
    run_flags = {
        o for a in top._subparsers._group_actions[0].choices["run"]._actions for o in a.option_strings
    }
    alias_flags = {o for a in cli.build_run_parser()._actions for o in a.option_strings}
    assert alias_flags - run_flags == {"--demo", "--toy-split"} and run_flags <= alias_flags
    proc = subprocess.run(
        [sys.executable, "-m", "o1pruner"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2 and "run" in proc.stderr and "demo" in proc.stderr


def test_check_run_dir_allows_changes_of_later_stages(tmp_path):
    base = {
        "model": "org/m",
        "dataset": "math",
        "eval_dataset": "math500",
        "k": "4",
        "output_dir": str(tmp_path),
    }
    cfg = resolve_config(overrides=base)
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    (tmp_path / "samples.jsonl").write_text("")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "base.json").write_text("{}")  # the base evaluation runs before training
    changed = resolve_config(overrides={**base, "lam": "5", "learning_rate": "1e-5", "eval_batch_size": "8"})
    notes = check_run_dir(tmp_path, changed)
    assert any("lam" in n and "score" in n for n in notes)
    assert any("learning_rate" in n for n in notes) and any("eval_batch_size" in n for n in notes)
    with pytest.raises(ConfigError, match="seed"):
        check_run_dir(tmp_path, resolve_config(overrides={**base, "seed": "1"}))
    with pytest.raises(ConfigError, match="max_eval_problems"):
        check_run_dir(tmp_path, resolve_config(overrides={**base, "max_eval_problems": "3"}))
    (tmp_path / "eval" / "tuned.json").write_text("{}")
    with pytest.raises(ConfigError, match="learning_rate"):
        check_run_dir(tmp_path, changed)
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"no config\.yaml"):
        check_run_dir(tmp_path, cfg)


def test_eval_reloads_models_from_disk(finished_run, inputs, tmp_path):
    """Base and tuned evaluations redone from disk (fresh reference, saved adapter) match the in-memory ones."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run["dir"], run)
    before = {n: json.loads((run / f"eval/{n}.json").read_text()) for n in ("base", "tuned")}
    for rel in ("eval", "eval.json", "metrics.json", "report.md"):
        path = run / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (run / "config.yaml").write_text(
        (run / "config.yaml").read_text().replace(str(finished_run["dir"]), str(run))
    )
    proc = run_cli("eval", *_args(inputs, run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("base", "tuned"):
        after = json.loads((run / f"eval/{name}.json").read_text())
        assert after == before[name], name
    assert json.loads((run / "metrics.json").read_text()) == json.loads(
        (finished_run["dir"] / "metrics.json").read_text()
    )


def test_merge_saves_full_weights(finished_run, inputs, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    run = tmp_path / "merged"
    shutil.copytree(finished_run["dir"], run)
    for rel in (
        "model",
        "checkpoints",
        "metrics.jsonl",
        "eval/tuned.json",
        "eval/tuned_responses.jsonl",
        "eval.json",
        "metrics.json",
    ):
        path = run / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (run / "config.yaml").write_text(
        (run / "config.yaml").read_text().replace(str(finished_run["dir"]), str(run))
    )
    proc = run_cli(*_args(inputs, run, "--merge"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merge: False -> True" in proc.stderr  # allowed: no train outputs were left
    assert not (run / "model" / "adapter_config.json").exists() and (run / "model" / "DONE").exists()
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert json.loads((run / "metrics.json").read_text())["eval_problems"] == len(EVAL)


def test_no_arguments_runs_the_toy_demo(monkeypatch, tmp_path, inputs, capsys):
    """``o1pruner-train`` alone calls o1pruner.toy.prepare_toy and runs the pipeline on what it returns
    (a fake toy here: the real one trains its model for minutes)."""
    from types import SimpleNamespace

    import o1pruner.toy as toy
    from o1pruner import cli

    calls = []
    tiny = {
        "model": str(inputs["model"]),
        "dataset": str(inputs["train"]),
        "eval_dataset": str(inputs["eval"]),
        "mode": "lora",
        "k": 2,
        "max_new_tokens": 4,
        "eval_max_new_tokens": 4,
        "effective_batch_size": 4,
        "kernel_backend": "torch",
        "cutoff": 128,
        "bf16": False,
        "lora_r": 2,
    }

    def fake_prepare_toy(run_dir, seed=0, **kwargs):
        calls.append((str(run_dir), seed))
        return SimpleNamespace(overrides=dict(tiny))

    monkeypatch.setattr(toy, "prepare_toy", fake_prepare_toy)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.train_main([]) == 0
    assert calls == [(cli.DEMO_OUTPUT_DIR, 0)]
    out = tmp_path / cli.DEMO_OUTPUT_DIR
    assert (out / "metrics.json").exists() and (out / "model" / "DONE").exists()
    assert "accuracy (%)" in capsys.readouterr().out
    # --demo with flags: the flags override the demo's settings; a bad one is reported, exit 2.
    assert cli.train_main(["--demo", "--output-dir", str(tmp_path / "d2"), "--k", "0"]) == 2
    assert "--k must be >= 1, got 0" in capsys.readouterr().err
    assert cli.train_main(["--demo", "--recipe", "marco-o1-7b"]) == 2


def test_max_steps_and_no_eval_dataset(inputs, tmp_path):
    """--max-steps 2 trains exactly 2 optimizer steps (of 3); without --eval-dataset the run trains, saves
    the tuned model and says that no evaluation was done."""
    out = tmp_path / "short"
    args = _args(inputs, out, "--max-steps", "2")
    i = args.index("--eval-dataset")
    del args[i : i + 2]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (out / "model" / "DONE").exists() and (out / "checkpoints" / "step-2").is_dir()
    assert not (out / "eval").exists() and not (out / "eval.json").exists()
    assert "no evaluation done" in proc.stderr and "Traceback" not in proc.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 2


def _bad_jsonl(path: Path) -> Path:
    path.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": \n')
    return path


@pytest.mark.parametrize(
    "case", ["missing model", "bad train line", "bad eval line", "unknown yaml key", "lam", "kernel backend"]
)
def test_bad_input_exits_2_before_any_work(inputs, tmp_path, case):
    """Each bad input is refused with exit 2 and one line naming the culprit, before any model is
    loaded or sampled from: the run directory is not even created."""
    out = tmp_path / "run"
    args = _args(inputs, out)

    def replace(flag: str, value: str) -> None:
        args[args.index(flag) + 1] = value

    if case == "missing model":
        replace("--model", str(tmp_path / "no-such-model"))
        needles = ["no-such-model"]
    elif case == "bad train line":
        replace("--dataset", str(_bad_jsonl(tmp_path / "train.jsonl")))
        needles = [str(tmp_path / "train.jsonl"), "line 2"]
    elif case == "bad eval line":
        replace("--eval-dataset", str(_bad_jsonl(tmp_path / "eval.jsonl")))
        needles = [str(tmp_path / "eval.jsonl"), "line 2"]
    elif case == "unknown yaml key":
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("k: 2\nlearnig_rate: 1e-5\n")
        args += ["--config", str(cfg)]
        needles = [str(cfg), "learnig_rate", "learning_rate"]
    elif case == "lam":
        args += ["--lam", "-1"]
        needles = ["--lam", "-1"]
    else:
        replace("--kernel-backend", "cuda-magic")
        needles = ["--kernel-backend", "cuda-magic"]
    _one_error(run_cli(*args), *needles)
    assert not out.exists()


def test_model_folder_without_config_is_refused(inputs, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    args = _args(inputs, tmp_path / "run")
    args[args.index("--model") + 1] = str(empty)
    _one_error(run_cli(*args), "empty-model", "config.json")
    assert not (tmp_path / "run").exists()
