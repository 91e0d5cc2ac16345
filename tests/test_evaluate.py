"""evaluate_model on hand-made responses (generate mocked), resumption, and the report files."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from helpers import make_char_tokenizer

from o1pruner import sampling
from o1pruner.evaluate import EvalConfig, compute_metrics, evaluate_model
from o1pruner.io import read_jsonl
from o1pruner.report import PLOTS, format_table, write_report
from o1pruner.reward import aes


@dataclass
class P:
    id: str
    question: str
    answer: str
    level: str | None = None


PROBLEMS = [
    P("p1", "What is 1+1?", "2", "1"),
    P("p2", "What is 2+3?", "5", "1"),
    P("p3", "What is 7*6?", "42", "3"),
    P("p4", "What is 10-4?", "6", "3"),
    P("p5", "What is 9/3?", "3", "2"),
]
# (response text, generated length in tokens, finish reason)
RESPONSES = {
    "p1": ("so \\boxed{2}", 10, "stop"),
    "p2": ("the answer is 6.", 20, "stop"),  # wrong
    "p3": ("thinking 42 ... ", 300, "length"),  # cut off: wrong even though 42 appears
    "p4": ("</think> \\boxed{6}", 7, "stop"),
    "p5": ("\\boxed{3}", 4, "stop"),
}


class FakeGenerate:
    """Stands in for o1pruner.sampling.generate; answers by the question text, records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, tokenizer, prompts_ids, *, n, config, seed_offset=0):
        self.calls.append(
            {
                "num_prompts": len(prompts_ids),
                "n": n,
                "temperature": config.temperature,
                "max_new_tokens": config.max_new_tokens,
                "seed_offset": seed_offset,
            }
        )
        out = []
        for ids in prompts_ids:
            text = tokenizer.decode(ids)
            pid = next(p.id for p in PROBLEMS if p.question in text)
            resp, length, reason = RESPONSES[pid]
            out.append(
                [
                    sampling.Generation(token_ids=[5] * length, text=resp, finish_reason=reason)
                    for _ in range(n)
                ]
            )
        return out


@pytest.fixture
def fake_generate(monkeypatch):
    fake = FakeGenerate()
    monkeypatch.setattr(sampling, "generate", fake)
    return fake


@pytest.fixture(scope="module")
def tokenizer():
    return make_char_tokenizer()


def test_metrics_on_hand_made_responses(tmp_path, fake_generate, tokenizer):
    out = tmp_path / "eval" / "base_responses.jsonl"
    config = EvalConfig(max_new_tokens=300, batch_size=2)
    result = evaluate_model(object(), tokenizer, PROBLEMS, config, out_path=out)
    lengths = [10, 20, 300, 7, 4]
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["mean_length"] == pytest.approx(np.mean(lengths))
    assert result["median_length"] == pytest.approx(10.0)
    assert result["num_problems"] == 5 and result["num_responses"] == 5
    assert result["truncated_fraction"] == pytest.approx(1 / 5)
    assert result["lengths"] == lengths
    assert list(result["per_level"]) == ["1", "2", "3"]
    assert result["per_level"]["1"]["accuracy"] == pytest.approx(0.5)
    assert result["per_level"]["3"]["mean_length"] == pytest.approx(153.5)
    assert result["per_level"]["3"]["num_problems"] == 2
    assert result["per_level"]["2"]["accuracy"] == 1.0
    # greedy by default, in batches of 2 prompts with distinct seed offsets
    assert [c["num_prompts"] for c in fake_generate.calls] == [2, 2, 1]
    assert all(
        c["temperature"] == 0.0 and c["n"] == 1 and c["max_new_tokens"] == 300 for c in fake_generate.calls
    )
    assert len({c["seed_offset"] for c in fake_generate.calls}) == 3
    records = read_jsonl(out)
    assert [r["problem_id"] for r in records] == ["p1", "p2", "p3", "p4", "p5"]
    assert [r["correct"] for r in records] == [True, False, False, True, True]
    assert records[1]["extracted"] == "6" and records[2]["finish_reason"] == "length"
    json.dumps(result)  # JSON-serialisable


def test_resume_generates_only_missing_records(tmp_path, fake_generate, tokenizer):
    out = tmp_path / "responses.jsonl"
    config = EvalConfig(batch_size=3)
    first = evaluate_model(object(), tokenizer, PROBLEMS, config, out_path=out)
    # A killed writer: keep the first two records and half of the third.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:15])
    fake_generate.calls.clear()
    again = evaluate_model(object(), tokenizer, PROBLEMS, config, out_path=out)
    assert sum(c["num_prompts"] for c in fake_generate.calls) == 3
    assert {k: v for k, v in again.items()} == first
    assert len(read_jsonl(out)) == 5
    fake_generate.calls.clear()
    evaluate_model(object(), tokenizer, PROBLEMS, config, out_path=out)
    assert fake_generate.calls == []  # complete: nothing generated


def test_sampled_evaluation_averages_over_samples(tmp_path, fake_generate, tokenizer):
    config = EvalConfig(greedy=False, num_samples=3, temperature=0.7, top_p=0.9)
    result = evaluate_model(object(), tokenizer, PROBLEMS[:2], config)
    assert result["num_responses"] == 6 and result["num_problems"] == 2
    assert result["accuracy"] == pytest.approx(0.5)
    assert fake_generate.calls[0]["n"] == 3 and fake_generate.calls[0]["temperature"] == 0.7


def test_no_levels_no_breakdown_and_duplicates(fake_generate, tokenizer):
    probs = [P(p.id, p.question, p.answer) for p in PROBLEMS[:2]]
    assert evaluate_model(object(), tokenizer, probs)["per_level"] == {}
    with pytest.raises(ValueError, match="duplicate"):
        evaluate_model(object(), tokenizer, [probs[0], probs[0]])


def test_compute_metrics_empty():
    m = compute_metrics([], {})
    assert m["accuracy"] == 0.0 and m["num_responses"] == 0 and m["per_level"] == {}


def _result(acc, lengths, per_level=None):
    arr = np.asarray(lengths, dtype=np.float64)
    return {
        "accuracy": acc,
        "mean_length": float(arr.mean()),
        "median_length": float(np.median(arr)),
        "num_problems": len(lengths),
        "num_responses": len(lengths),
        "truncated_fraction": 0.0,
        "per_level": per_level or {},
        "lengths": list(lengths),
    }


def _is_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_report_files(tmp_path):
    lvl = {
        "1": {
            "accuracy": 0.8,
            "mean_length": 100.0,
            "median_length": 90.0,
            "num_problems": 2,
            "num_responses": 2,
            "truncated_fraction": 0.0,
        }
    }
    lvl_t = {
        "1": {
            "accuracy": 0.9,
            "mean_length": 60.0,
            "median_length": 50.0,
            "num_problems": 2,
            "num_responses": 2,
            "truncated_fraction": 0.0,
        }
    }
    base = _result(0.5, [100, 200, 300, 400], lvl)
    tuned = _result(0.75, [50, 100, 150, 300], lvl_t)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "clip_fraction": 0.1 * step}) + "\n")
    doc = write_report(tmp_path, base, tuned, config={"model": "m", "k": 4, "lam": 2.0})
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"baseline", "pruned", "aes", "eval_problems"}
    assert metrics["baseline"] == {"accuracy": 0.5, "mean_length": 250.0}
    assert metrics["pruned"] == {"accuracy": 0.75, "mean_length": 150.0}
    assert metrics["eval_problems"] == 4
    assert metrics["aes"] == pytest.approx(aes(0.75, 150.0, 0.5, 250.0)) == pytest.approx(0.4 + 3 * 0.5)
    assert doc["aes"] == metrics["aes"] and "1" in doc["per_level"] and "lengths" not in doc["base"]
    assert json.loads((tmp_path / "eval.json").read_text()) == doc
    report = (tmp_path / "report.md").read_text()
    assert "-40.0%" in report and "50.0" in report and "75.0" in report and "Per level" in report
    assert "Training" in report and "5 logged optimizer steps" in report
    for name, rel in PLOTS.items():
        if name == "rounds":  # a one-round run has no trade-off across rounds to plot
            assert f"]({rel})" not in report and not (tmp_path / rel).exists()
            continue
        assert f"]({rel})" in report
        _is_png(tmp_path / rel)
    assert "accuracy" in (tmp_path / "summary.md").read_text()
    table = format_table(base, tuned)
    assert "AES" in table and "-40.0%" in table and "+25.0 pts" in table


def test_report_accuracy_drop_and_no_training(tmp_path):
    base = _result(0.8, [100, 100])
    tuned = _result(0.4, [50, 50])
    write_report(tmp_path, base, tuned)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["aes"] == pytest.approx(0.5 - 5 * 0.5)  # docs/method.md: a fall costs gamma*|dA|
    assert not (tmp_path / PLOTS["training"]).exists()
    _is_png(tmp_path / PLOTS["lengths"])
    _is_png(tmp_path / PLOTS["accuracy"])
    zero = write_report(tmp_path / "z", _result(0.0, [10]), _result(0.0, [5]))
    assert zero["aes"] is None


def test_vllm_evaluation_keeps_the_engine_full():
    """hf generates eval_batch_size prompts per call (its KV-cache memory knob); a vLLM engine gets at
    least VLLM_EVAL_CHUNK per call, so it is not left waiting on the slowest answer of a small batch."""
    from o1pruner.evaluate import VLLM_EVAL_CHUNK

    assert EvalConfig(backend="hf", batch_size=16).chunk_size == 16
    assert EvalConfig(backend="vllm", batch_size=16).chunk_size == VLLM_EVAL_CHUNK >= 500  # MATH500: one call
    assert EvalConfig(backend="vllm", batch_size=4096).chunk_size == 4096
