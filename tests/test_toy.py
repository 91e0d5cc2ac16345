"""The embedded toy demo: task generator, tokenizer, warm-up cache, and a reduced end-to-end pipeline run."""

from __future__ import annotations

import itertools
import json
import random
import statistics

import pytest

from o1pruner.toy import task
from o1pruner.toy.task import LEVELS, TaskConfig, draw_problem, draw_problems, greedy_trace, write_trace


# ------------------------------------------------------------------------------------ task generator
def test_problems_deterministic_per_seed_and_distinct():
    a = draw_problems(60, seed=3)
    b = draw_problems(60, seed=3)
    c = draw_problems(60, seed=4)
    assert a == b
    assert a != c
    assert len({p.question for p in a}) == 60
    assert sorted({p.level for p in a}) == list(LEVELS)  # balanced over the levels


def test_problems_exclude_held_out():
    held = draw_problems(150, seed=11)
    train = draw_problems(400, seed=0, exclude={p.question for p in held})
    assert not {p.question for p in held} & {p.question for p in train}


def _eval_expr(expr: str) -> int:
    """Left-to-right value of a "5+3-4"-style expression of integers."""
    import re

    tokens = re.findall(r"[+-]?\d+", expr)
    return sum(int(t) for t in tokens)


def test_answers_are_the_values_and_totals_stay_digits():
    for p in draw_problems(100, seed=5):
        expr = p.question.removeprefix("Compute ").removesuffix(".")
        assert int(p.answer) == _eval_expr(expr)
        assert len(p.ops) == p.level + 1 and len(set(p.ops)) == len(p.ops)
        total = p.start
        for d in p.ops:
            total += d
            assert 0 <= total <= 9


def test_traces_deterministic_and_graded_by_o1pruner_grading():
    from o1pruner.grading import is_correct

    problems = draw_problems(40, seed=7)
    t1 = [write_trace(p, random.Random(f"t{i}")) for i, p in enumerate(problems)]
    t2 = [write_trace(p, random.Random(f"t{i}")) for i, p in enumerate(problems)]
    assert t1 == t2
    no_slips = TaskConfig(slip_rate=0.0)
    for i, p in enumerate(problems):
        assert is_correct(write_trace(p, random.Random(i), no_slips), p.answer)
        assert is_correct(greedy_trace(p), p.answer)
        assert is_correct(task.pruned_trace(p), p.answer)
        assert not is_correct(task.pruned_trace(p), str(int(p.answer) + 1))


def test_slips_are_caught_only_by_checks():
    """Checks recompute a slipped step; a trace can only be wrong when some slip had no check after it."""
    cfg = TaskConfig(slip_rate=0.5)
    rng = random.Random(0)
    wrong = caught = 0
    for _ in range(400):
        p = draw_problem(rng, rng.choice(LEVELS), cfg)
        trace = write_trace(p, rng, cfg)
        lines = trace.splitlines()
        uncaught = False
        for i, line in enumerate(lines[:-1]):
            if line.startswith("check"):
                continue
            expr, shown = line.split("=")
            if _eval_expr(expr) != int(shown):
                if lines[i + 1].startswith("check"):
                    caught += 1
                    assert lines[i + 1] == f"check {expr}={_eval_expr(expr)}"
                else:
                    uncaught = True
        boxed = lines[-1].removeprefix("answer \\boxed{").removesuffix("}")
        assert boxed == lines[-2].split("=")[-1]  # the answer is the last running total
        if not uncaught:
            assert boxed == p.answer
        wrong += boxed != p.answer
    assert caught > 50 and wrong > 20


def test_easy_problems_get_more_verification():
    rng = random.Random(1)
    checks_per_step = {}
    for level in LEVELS:
        counts = []
        for _ in range(300):
            p = draw_problem(rng, level)
            counts.append(write_trace(p, rng).count("check") / len(p.ops))
        checks_per_step[level] = statistics.mean(counts)
    means = [checks_per_step[lv] for lv in LEVELS]
    assert all(x > y for x, y in itertools.pairwise(means)), checks_per_step
    for level in LEVELS:
        assert abs(checks_per_step[level] - task.expected_checks(level)) < 0.15
    # the greedy (mode) path still verifies on easy problems, not on the hardest
    p1 = draw_problem(rng, 1)
    assert greedy_trace(p1).count("check") == 2 * len(p1.ops)
    assert greedy_trace(draw_problem(rng, 5)).count("check") == 0


def test_bad_level_is_named():
    with pytest.raises(ValueError, match="level 9"):
        draw_problem(random.Random(0), 9)


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trip_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from o1pruner.prompts import encode_prompt
    from o1pruner.toy.tokenizer import make_tokenizer

    tok = make_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    rng = random.Random(0)
    texts = [write_trace(draw_problem(rng, lv), rng) for lv in LEVELS]
    texts += ["Compute 1+2-3.", 'You are a helpful assistant. \\boxed{}\n\t ~!@#$%^&*()_+{}|:"<>?']
    for t in (tok, loaded):
        for text in texts:
            ids = t(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text)  # one token per character
            assert t.decode(ids) == text
    ids = encode_prompt(loaded, "Compute 1+2.", None)
    assert loaded.decode(ids) == "<|user|>Compute 1+2.<|end|><|assistant|>"
    assert loaded.eos_token_id not in ids and loaded.eos_token == "<eos>"


# ------------------------------------------------------------------------------ reduced demo, end to end
def test_reduced_demo_end_to_end(tmp_path, monkeypatch):
    """prepare_toy + the standard pipeline on a few problems: every stage runs, files are written, the
    training loss falls, and a second prepare_toy finds the warm-up model in its cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from o1pruner.config import STAGES, resolve_config
    from o1pruner.pipeline import Pipeline
    from o1pruner.toy import WarmupConfig, prepare_toy

    run, cache = tmp_path / "run", tmp_path / "cache"
    small = WarmupConfig(steps=40, max_steps=40, anneal_steps=10, num_validation=10, batch_size=16)
    reduced = {
        "k": 4,
        "max_new_tokens": 64,
        "eval_max_new_tokens": 64,
        "num_epochs": 3,
        "effective_batch_size": 8,
        "learning_rate": 1e-3,
        "samples_per_problem": 0,
        "rounds": 1,  # the demo's second round is covered by tests/test_rounds.py
    }

    def prepare():
        return prepare_toy(
            run,
            seed=0,
            num_train=12,
            num_eval=10,
            warmup_config=small,
            cache_dir=cache,
            overrides=reduced,
            log=None,
        )

    assets = prepare()
    assert assets.warmup_seconds is not None and (assets.model_dir / "DONE").is_file()
    assert assets.info["final_loss"] < assets.info["first_loss"]
    assert len(assets.train_problems) == 12 and len(assets.eval_problems) == 10
    assert not {p.question for p in assets.train_problems} & {p.question for p in assets.eval_problems}
    assert assets.overrides["model"] == str(assets.model_dir) and assets.overrides["mode"] == "full"

    cfg = resolve_config(base=assets.overrides, overrides={"output_dir": str(run)})
    Pipeline(cfg, log=lambda msg: None).run(STAGES)

    metrics = json.loads((run / "metrics.json").read_text())
    assert {"baseline", "pruned", "aes", "eval_problems"} <= metrics.keys()
    assert metrics["eval_problems"] == 10
    for side in ("baseline", "pruned"):
        assert {"accuracy", "mean_length"} <= metrics[side].keys()
    assert (run / "report.md").read_text().strip()
    assert list((run / "plots").glob("*.png"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_epoch: dict[int, list[float]] = {}
    for row in rows:
        by_epoch.setdefault(row["epoch"], []).append(row["loss"])
    first, last = min(by_epoch), max(by_epoch)
    assert last > first
    # same rows every epoch: the PPO loss of the data falls as the policy moves toward the advantages
    assert statistics.mean(by_epoch[last]) < statistics.mean(by_epoch[first]), by_epoch

    again = prepare()
    assert again.warmup_seconds is None and again.model_dir == assets.model_dir


def test_saved_model_dir_reloads_the_same_tokenizer(tmp_path):
    """AutoTokenizer on the saved model folder (as the pipeline loads it) keeps every character."""
    from transformers import AutoTokenizer

    from o1pruner.toy.tokenizer import make_tokenizer
    from o1pruner.toy.warmup import WarmupConfig, build_model, check_reload

    tok = make_tokenizer()
    model = build_model(tok, WarmupConfig(hidden_size=32, intermediate_size=64, num_layers=1), seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    check_reload(tmp_path, tok)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = write_trace(draw_problem(random.Random(2), 3), random.Random(2))
    assert (
        loaded(text, add_special_tokens=False)["input_ids"]
        == tok(text, add_special_tokens=False)["input_ids"]
    )
