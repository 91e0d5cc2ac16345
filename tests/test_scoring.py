"""Scoring: R_LH and its post-processing by hand, m selection, reference log-probs against float64 logits,
truncation, EOS handling, bad input, and the parquet round trip."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import make_tiny_model

from o1pruner.data import Problem
from o1pruner.io import DataError
from o1pruner.modeling import load_model
from o1pruner.prompts import encode_prompt
from o1pruner.scoring import (
    COLUMNS,
    ScoringConfig,
    build_training_set,
    load_training_set,
    select_samples,
)

# (num_tokens, correct, finish_reason) per sample; problem "b" has an empty response (EOS first)
SPEC = {
    "a": [(5, True, "stop"), (9, False, "length"), (3, True, "stop"), (7, False, "stop")],
    "b": [(4, False, "stop"), (0, False, "stop"), (11, True, "length"), (2, True, "stop"), (6, True, "stop")],
    "c": [(8, True, "stop"), (8, True, "stop"), (1, False, "stop")],
}
QUESTIONS = {"a": "1+1?", "b": "What is two times three?", "c": "x"}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=2)
    return load_model(str(path), mode="none", device="cpu", torch_dtype="float32")


def _problems(order=("a", "b", "c")) -> list[Problem]:
    return [Problem(id=pid, question=QUESTIONS[pid], answer="2") for pid in order]


def _samples(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for pid, spec in SPEC.items():
        for i, (n, ok, reason) in enumerate(spec):
            ids = rng.integers(10, 90, size=n).tolist()  # plain characters, never EOS/pad
            out.append(
                {
                    "problem_id": pid,
                    "sample_index": i,
                    "text": "t" * n,
                    "token_ids": ids,
                    "num_tokens": n,
                    "finish_reason": reason,
                    "correct": ok,
                }
            )
    return out


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def test_config_validation():
    with pytest.raises(ValueError, match=r"samples_per_problem .*got -1"):
        ScoringConfig(samples_per_problem=-1)
    with pytest.raises(ValueError, match="lam"):
        ScoringConfig(lam=-0.5)
    with pytest.raises(ValueError, match="clip"):
        ScoringConfig(reward_clip_low=4.0, reward_clip_high=-2.0)
    cfg = ScoringConfig()
    assert (cfg.lam, cfg.samples_per_problem, cfg.clip, cfg.zscore) == (2.0, 2, (-2.0, 4.0), True)


def test_rewards_and_advantages_by_hand(loaded, tmp_path):
    model, tok = loaded
    lam = 3.0
    cfg = ScoringConfig(
        lam=lam,
        samples_per_problem=0,
        reward_clip_low=-0.5,
        reward_clip_high=1.0,
        zscore=True,
        max_length=None,
    )
    out = tmp_path / "scored.parquet"
    table = build_training_set(_problems(), _samples(), model, tok, out, cfg)
    assert table.column_names == list(COLUMNS)
    rows = _rows(table)
    expected_keys, raw = [], []
    for pid, spec in SPEC.items():
        lbar = sum(n for n, _, _ in spec) / len(spec)  # the empty response counts in the baselines
        abar = sum(ok for _, ok, _ in spec) / len(spec)
        for i, (n, ok, _) in enumerate(spec):
            if n == 0:
                continue  # never kept
            expected_keys.append((pid, i, n, ok, lbar, abar))
            raw.append(lbar / n - 1 + lam * (float(ok) - abar))
    got_keys = [
        (
            r["problem_id"],
            r["sample_index"],
            r["length"],
            r["correct"],
            r["ref_mean_length"],
            r["ref_accuracy"],
        )
        for r in rows
    ]
    assert got_keys == [
        (k[0], k[1], k[2], k[3], pytest.approx(k[4]), pytest.approx(k[5])) for k in expected_keys
    ]
    raw = np.array(raw)
    np.testing.assert_allclose([r["reward"] for r in rows], raw, rtol=1e-12)
    clipped = np.minimum(np.maximum(raw, -0.5), 1.0)
    assert (clipped != raw).any()  # the clip matters in this data
    z = (clipped - clipped.mean()) / np.sqrt(((clipped - clipped.mean()) ** 2).mean())
    np.testing.assert_allclose([r["advantage"] for r in rows], z, rtol=1e-10, atol=1e-12)
    # switches: no clip, no z-score -> advantage == raw reward
    plain = build_training_set(
        _problems(),
        _samples(),
        model,
        tok,
        None,
        ScoringConfig(
            lam=lam,
            samples_per_problem=0,
            reward_clip_low=None,
            reward_clip_high=None,
            zscore=False,
            max_length=None,
        ),
    )
    np.testing.assert_allclose(plain.column("advantage").to_numpy(), raw, rtol=1e-12)
    # written atomically, and reads back identical with the declared types
    back = load_training_set(out)
    assert back.equals(table)
    assert back.schema.field("sample_index").type == pa.int32()
    assert back.schema.field("ref_logps").type == pa.list_(pa.float32())
    assert back.schema.field("prompt_ids").type == pa.list_(pa.int32())
    assert [p.name for p in tmp_path.iterdir()] == ["scored.parquet"]  # no temp file left behind


def test_response_ids_eos_and_ref_logps_match_naive_logits(loaded):
    model, tok = loaded
    samples = _samples(seed=5)
    # batch_tokens far below the total: several right-padded batches of different widths
    cfg = ScoringConfig(samples_per_problem=0, max_length=None, batch_tokens=70)
    table = build_training_set(_problems(), samples, model, tok, None, cfg)
    recs = {(s["problem_id"], s["sample_index"]): s for s in samples}
    for row in _rows(table):
        rec = recs[(row["problem_id"], row["sample_index"])]
        expected = list(rec["token_ids"]) + ([tok.eos_token_id] if rec["finish_reason"] == "stop" else [])
        assert row["response_ids"] == expected
        assert row["length"] == rec["num_tokens"]
        prompt = encode_prompt(tok, QUESTIONS[row["problem_id"]])
        assert row["prompt_ids"] == prompt
        ids = torch.tensor([prompt + expected])
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        p = len(prompt)
        naive = logp[p - 1 : p + len(expected) - 1].gather(1, ids[0, p:, None]).squeeze(1).numpy()
        assert len(row["ref_logps"]) == len(expected)
        np.testing.assert_allclose(row["ref_logps"], naive, atol=1e-4, rtol=0)


def test_truncation_keeps_prompt_and_full_length(loaded):
    model, tok = loaded
    full = build_training_set(
        _problems(), _samples(), model, tok, None, ScoringConfig(samples_per_problem=0, max_length=None)
    )
    plen = {pid: len(encode_prompt(tok, q)) for pid, q in QUESTIONS.items()}
    cut = 3
    max_length = max(plen.values()) + cut  # the longest prompt keeps `cut` response tokens
    short = build_training_set(
        _problems(), _samples(), model, tok, None, ScoringConfig(samples_per_problem=0, max_length=max_length)
    )
    assert short.num_rows == full.num_rows
    for a, b in zip(_rows(full), _rows(short)):
        room = max_length - plen[a["problem_id"]]
        assert b["prompt_ids"] == a["prompt_ids"]
        assert b["response_ids"] == a["response_ids"][:room]
        assert len(b["prompt_ids"]) + len(b["response_ids"]) <= max_length
        np.testing.assert_allclose(b["ref_logps"], a["ref_logps"][:room], atol=1e-5)
        assert b["length"] == a["length"]
        assert b["reward"] == a["reward"]
    assert any(len(b["response_ids"]) < len(a["response_ids"]) for a, b in zip(_rows(full), _rows(short)))


def test_prompt_longer_than_cutoff_drops_the_problem(loaded):
    model, tok = loaded
    plen = {pid: len(encode_prompt(tok, q)) for pid, q in QUESTIONS.items()}
    assert plen["b"] > max(plen["a"], plen["c"])
    table = build_training_set(
        _problems(), _samples(), model, tok, None, ScoringConfig(samples_per_problem=0, max_length=plen["b"])
    )
    assert set(table.column("problem_id").to_pylist()) == {"a", "c"}
    with pytest.raises(DataError, match="no trainable sample"):
        build_training_set(
            _problems(),
            _samples(),
            model,
            tok,
            None,
            ScoringConfig(samples_per_problem=0, max_length=min(plen.values())),
        )


def test_m_selection_is_seeded_and_order_free(loaded):
    model, tok = loaded
    cfg = ScoringConfig(samples_per_problem=2, seed=7, max_length=None)
    t1 = build_training_set(_problems(), _samples(), model, tok, None, cfg)
    t2 = build_training_set(_problems(("c", "a", "b")), list(reversed(_samples())), model, tok, None, cfg)
    pick = lambda t: sorted(zip(t.column("problem_id").to_pylist(), t.column("sample_index").to_pylist()))
    assert pick(t1) == pick(t2)
    counts = {pid: sum(1 for p, _ in pick(t1) if p == pid) for pid in SPEC}
    assert counts == {"a": 2, "b": 2, "c": 2}
    assert ("b", 1) not in pick(t1)  # the empty response is never picked
    # z-score over the kept set only
    adv = t1.column("advantage").to_numpy()
    assert abs(adv.mean()) < 1e-12 and abs(adv.std() - 1) < 1e-12
    # the selection helper: m of n, sorted, deterministic, and the seed matters
    picks = {tuple(select_samples("q", range(16), 2, s)) for s in range(20)}
    assert all(len(p) == 2 and p[0] < p[1] for p in picks) and len(picks) > 5
    assert select_samples("q", range(16), 2, 3) == select_samples("q", list(reversed(range(16))), 2, 3)
    assert select_samples("q", [4, 2], 0, 0) == [2, 4] == select_samples("q", [4, 2], 5, 0)


def test_bad_samples(loaded):
    model, tok = loaded
    cfg = ScoringConfig(samples_per_problem=0, max_length=None)
    samples = [*_samples(), dict(_samples()[0], problem_id="zzz", sample_index=3)]
    with pytest.raises(DataError, match=r"problem_id 'zzz' is not among the 3 problems"):
        build_training_set(_problems(), samples, model, tok, None, cfg)
    dup = [*_samples(), _samples()[1]]
    with pytest.raises(DataError, match=r"duplicate \(problem_id, sample_index\) = \('a', 1\)"):
        build_training_set(_problems(), dup, model, tok, None, cfg)
    broken = _samples()
    broken[2] = dict(broken[2], num_tokens=99)
    with pytest.raises(DataError, match="sample 2: bad value for key 'num_tokens'"):
        build_training_set(_problems(), broken, model, tok, None, cfg)


def test_samples_path_and_problems_without_samples(loaded, tmp_path):
    from o1pruner.io import append_jsonl

    model, tok = loaded
    path = tmp_path / "samples.jsonl"
    append_jsonl(path, [s for s in _samples() if s["problem_id"] != "c"])
    table = build_training_set(_problems(), path, model, tok, None, ScoringConfig(samples_per_problem=1))
    assert table.column("problem_id").to_pylist() == ["a", "b"]


def test_load_training_set_errors(tmp_path):
    good = pa.table({c: pa.array([], type=t) for c, t in zip(COLUMNS, [f.type for f in _schema()])})
    pq.write_table(good.drop_columns(["advantage", "ref_logps"]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: missing column\(s\) \['ref_logps', 'advantage'\]"):
        load_training_set(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="file not found"):
        load_training_set(tmp_path / "nope.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable parquet"):
        load_training_set(tmp_path / "junk.parquet")
    row = {
        "problem_id": ["a"],
        "sample_index": [0],
        "prompt_ids": [[1, 2]],
        "response_ids": [[3, 4, 5]],
        "ref_logps": [[-1.0, -2.0]],
        "length": [3],
        "correct": [True],
        "ref_mean_length": [3.0],
        "ref_accuracy": [1.0],
        "reward": [0.0],
        "advantage": [0.0],
    }
    pq.write_table(pa.Table.from_pydict(row, schema=pa.schema(_schema())), tmp_path / "len.parquet")
    with pytest.raises(DataError, match="row 0: ref_logps has 2 values but response_ids has 3"):
        load_training_set(tmp_path / "len.parquet")


def _schema():
    from o1pruner.scoring import SCHEMA

    return list(SCHEMA)
