"""Iterative rounds (``--rounds R``): round 2 samples from and is referenced against round 1's model,
a killed round resumes to the bytes of an uninterrupted run, and the report shows every round."""

from __future__ import annotations

import json
import signal
import time

import yaml
from cli_runs import differing, make_inputs, result_bytes, run_cli, small_run_args, start_cli

LORA_2 = ("--mode", "lora", "--save-every", "1", "--rounds", "2")


def test_toy_rounds_report_and_splits(tmp_path, monkeypatch):
    """Two rounds of the reduced toy: per-round figures in metrics.json, round 2 starts from round 1's
    model, the top-level figures are round 2's, and the report has every plot."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from o1pruner.config import STAGES, resolve_config
    from o1pruner.pipeline import Pipeline
    from o1pruner.report import PLOTS, compute_aes
    from o1pruner.toy import WarmupConfig, prepare_toy

    run = tmp_path / "run"
    small = WarmupConfig(steps=30, max_steps=30, anneal_steps=10, num_validation=10, batch_size=16)
    reduced = {"k": 3, "max_new_tokens": 48, "eval_max_new_tokens": 48, "effective_batch_size": 8}
    reduced |= {"learning_rate": 1e-3, "samples_per_problem": 0, "rounds": 2}
    assets = prepare_toy(
        run, seed=0, num_train=10, num_eval=10, warmup_config=small, cache_dir=tmp_path / "cache",
        overrides=reduced, log=None,
    )  # fmt: skip
    splits = {n: {json.loads(line)["question"] for line in (run / "toy" / f"{n}.jsonl").open()} for n in
              ("train", "validation", "test")}  # fmt: skip
    assert all(len(q) == 10 for q in splits.values())
    assert not (splits["train"] & splits["validation"] or splits["train"] & splits["test"])
    assert not splits["validation"] & splits["test"]
    assert assets.eval_path == run / "toy" / "test.jsonl"

    cfg = resolve_config(base=assets.overrides, overrides={"output_dir": str(run)})
    Pipeline(cfg, log=lambda msg: None).run(STAGES)

    r2 = run / "rounds" / "r2"
    r2_cfg = yaml.safe_load((r2 / "config.yaml").read_text())
    assert r2_cfg["model"] == str(run / "model") and r2_cfg["rounds"] == 1
    assert (r2 / "samples.done.json").exists() and (r2 / "model" / "DONE").exists()
    # round 2's reference (its base evaluation) is round 1's tuned model
    assert json.loads((r2 / "eval/base.json").read_text()) == json.loads(
        (run / "eval/tuned.json").read_text()
    )

    metrics = json.loads((run / "metrics.json").read_text())
    base = json.loads((run / "eval/base.json").read_text())
    tuned = [json.loads((d / "eval/tuned.json").read_text()) for d in (run, r2)]
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for row, t in zip(metrics["rounds"], tuned):
        assert row["accuracy"] == t["accuracy"] and row["mean_length"] == t["mean_length"]
        assert row["aes"] == compute_aes(base, t)  # against the original base
    assert metrics["pruned"] == {"accuracy": tuned[1]["accuracy"], "mean_length": tuned[1]["mean_length"]}
    assert metrics["aes"] == metrics["rounds"][-1]["aes"]
    report = (run / "report.md").read_text()
    assert "## Rounds" in report and PLOTS["rounds"] in report
    for key in ("rounds", "truncated", "training", "length_by_level", "accuracy", "lengths"):
        assert (run / PLOTS[key]).stat().st_size > 1000, key

    # a rerun skips every round and leaves the report alone
    before = (run / "metrics.json").stat().st_mtime_ns
    logs: list[str] = []
    Pipeline(cfg, log=logs.append).run(STAGES)
    assert (run / "metrics.json").stat().st_mtime_ns == before
    assert any("[round 2] train: complete" in m for m in logs), logs


def test_killed_round_2_resumes_to_the_uninterrupted_bytes(tmp_path):
    """A LoRA run of two rounds killed (-9) inside round 2, then rerun, ends with the bytes of an
    uninterrupted one; round 2 starts from round 1's adapter merged into full weights."""
    inputs = make_inputs(tmp_path)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = run_cli(*small_run_args(inputs, ref, *LORA_2))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (ref / "rounds/r2/base/DONE").exists() and (ref / "rounds/r2/base/config.json").exists()
    assert yaml.safe_load((ref / "rounds/r2/config.yaml").read_text())["model"] == str(ref / "rounds/r2/base")
    assert len(json.loads((ref / "metrics.json").read_text())["rounds"]) == 2

    log = tmp_path / "killed.log"
    proc = start_cli(*small_run_args(inputs, killed, *LORA_2), log=log)
    marker = killed / "rounds/r2/checkpoints"  # round 2 is training
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), log.read_text()[-4000:]
    assert not (killed / "rounds/r2/model/DONE").exists(), "round 2 finished before the kill"

    final = run_cli(*small_run_args(inputs, killed, *LORA_2))
    assert final.returncode == 0, final.stderr[-4000:]
    assert "[round 2] train: resuming from checkpoints/" in final.stderr
    assert "[round 2] sample: complete" in final.stderr
    assert differing(result_bytes(ref), result_bytes(killed)) == []
    # round 2's adapter names its base, rounds/r2/base of its own run directory
    moved = {
        k: v.replace(str(ref).encode(), str(killed).encode())
        for k, v in result_bytes(ref / "rounds/r2").items()
    }
    assert differing(moved, result_bytes(killed / "rounds/r2")) == []
    assert json.loads((ref / "metrics.json").read_text()) == json.loads((killed / "metrics.json").read_text())
