"""At step 0 the policy is the reference: the importance ratio must be exactly 1 and nothing clipped.

The reference log-probs come from scoring (no gradient, eval mode) and the training ones from the trainer
(gradients, train mode); both run ``modeling.packed_forward`` and the same kernel arithmetic, so any
mismatch (an eval-mode layout switch, a dtype or attention difference) shows here as a ratio off 1 or
clipped tokens.
"""

from __future__ import annotations

import json

import pytest
from cli_runs import run_cli
from helpers import make_tiny_model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ratio")
    model = make_tiny_model(root / "model", stop_prob=0.2)
    train = root / "train.jsonl"
    rows = [{"question": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(4)]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, train


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_geomean"])
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_ratio_is_one_at_step_0(inputs, mode, level):
    root, model, train = inputs
    out = root / f"run-{mode}-{level}"
    proc = run_cli(
        "--model", str(model), "--dataset", str(train), "--output-dir", str(out), "--mode", mode,
        "--k", "3", "--max-new-tokens", "24", "--effective-batch-size", "4", "--micro-batch-tokens", "512",
        "--kernel-backend", "torch", "--no-bf16", "--lora-r", "4", "--max-steps", "1",
        "--importance-level", level,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert abs(first["mean_ratio"] - 1.0) <= 1e-6, first
    assert first["clip_fraction"] == 0.0, first
