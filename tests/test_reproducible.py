"""The same ``o1pruner-train`` command twice gives bit-identical samples, scored set, tuned weights and
metrics, for every fine-tuning mode; the default mode (qlora, no --mode flag) runs end to end in one
process, with the base evaluation before training and the tuned one after it."""

from __future__ import annotations

import json

import pytest
import yaml
from cli_runs import differing, make_inputs, result_bytes, run_cli, small_run_args

# Per mode, the flags that select it; qlora is the default and gets none.
MODE_FLAGS = {"qlora": [], "lora": ["--mode", "lora"], "full": ["--mode", "full"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("repro"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODE_FLAGS))
def test_same_command_twice_gives_identical_bytes(inputs, mode):
    runs = []
    for attempt in ("a", "b"):
        out = inputs["root"] / f"{mode}-{attempt}"
        proc = run_cli(*small_run_args(inputs, out, *MODE_FLAGS[mode]))
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr
        runs.append(result_bytes(out))
        # base evaluated before training, tuned after it, in this one process
        log = proc.stderr
        assert (
            log.index("] eval base: 3 problems")
            < log.index("train: tuned model saved")
            < log.index("] eval tuned: 3 problems")
        )
    assert differing(*runs) == []
    weights = "model/adapter_model.safetensors" if mode != "full" else "model/model.safetensors"
    assert weights in runs[0]
    run_dir = inputs["root"] / f"{mode}-a"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["mode"] == mode
    assert set(json.loads(runs[0]["eval.json"])) >= {"base", "tuned", "aes"}
    # training moved the weights: the tuned model is not the reference
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert len(metrics) >= 2 and any(m["grad_norm"] > 0 for m in metrics)
