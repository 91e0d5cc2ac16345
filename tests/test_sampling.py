"""Pre-sampling: hf backend on a tiny random model, crash-safe resume (a real SIGKILL), record checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import make_tiny_model

from o1pruner import records as record_module
from o1pruner.data import Problem
from o1pruner.io import DataError, read_jsonl
from o1pruner.modeling import load_model
from o1pruner.prompts import encode_prompt
from o1pruner.sampling import (
    SAMPLE_KEYS,
    SamplingConfig,
    cut_at_eos,
    generate,
    read_samples,
    sample_problems,
)
from o1pruner.vllm_engine import memory_utilization

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "sampling_worker.py"


def _problems(n: int) -> list[Problem]:
    # prompts of different lengths, so that batches need padding
    return [
        Problem(id=f"p{i:02d}", question="What is " + "1+" * i + "1?", answer=str(i + 1)) for i in range(n)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=1)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir), mode="none", device="cpu", torch_dtype="float32")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"k must be .*got 0"):
        SamplingConfig(k=0)
    with pytest.raises(ValueError, match=r"k must be .*got -3"):
        SamplingConfig(k=-3)
    with pytest.raises(ValueError, match="backend"):
        SamplingConfig(backend="tgi")
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    cfg = SamplingConfig()
    assert (cfg.k, cfg.temperature, cfg.top_p, cfg.max_new_tokens) == (16, 0.5, 0.8, 8192)
    cfg.k = 0  # mutated after construction: still caught when used
    with pytest.raises(ValueError, match="got 0"):
        sample_problems(_problems(1), "unused", None, "unused.jsonl", cfg)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 1, 0, 0], [1]) == ([5, 6], "stop")
    assert cut_at_eos([5, 2, 6, 1], [1, 2]) == ([5], "stop")
    assert cut_at_eos([1, 7], [1]) == ([], "stop")
    # no EOS: ran into the limit; a pad id (0) inside is a real generated token and is kept
    assert cut_at_eos([5, 0, 6], [1]) == ([5, 0, 6], "length")
    assert cut_at_eos([], [1]) == ([], "length")


def test_hf_sampling_writes_k_records(model_dir, tmp_path, monkeypatch):
    calls = []

    def fake_is_correct(text, gold):
        calls.append((text, gold))
        return gold in ("1", "3")

    monkeypatch.setattr(record_module, "is_correct", fake_is_correct)
    problems = _problems(5)
    cfg = SamplingConfig(k=3, max_new_tokens=7, batch_size=4, seed=11)
    out = tmp_path / "samples.jsonl"
    records = sample_problems(problems, str(model_dir), None, out, cfg)  # loaded by path
    on_disk = read_jsonl(out)
    assert len(records) == len(on_disk) == 15
    _, tok = load_model(str(model_dir), mode="none", device="cpu")
    by_pair = {(r["problem_id"], r["sample_index"]): r for r in on_disk}
    assert set(by_pair) == {(p.id, i) for p in problems for i in range(3)}
    # returned in problem order, then sample index
    assert [(r["problem_id"], r["sample_index"]) for r in records] == [
        (p.id, i) for p in problems for i in range(3)
    ]
    reasons = set()
    for rec in on_disk:
        assert set(rec) == set(SAMPLE_KEYS)
        assert rec["num_tokens"] == len(rec["token_ids"]) <= 7
        assert rec["finish_reason"] in ("stop", "length")
        if rec["finish_reason"] == "length":
            assert rec["num_tokens"] == 7
        else:
            assert rec["num_tokens"] < 7
        assert tok.eos_token_id not in rec["token_ids"]
        assert rec["text"] == tok.decode(rec["token_ids"], skip_special_tokens=True)
        gold = next(p.answer for p in problems if p.id == rec["problem_id"])
        assert rec["correct"] is (gold in ("1", "3"))
        reasons.add(rec["finish_reason"])
    assert "length" in reasons
    assert len(calls) == 15 and all(isinstance(t, str) for t, _ in calls)
    # a second call finds everything done: nothing generated, nothing appended
    again = sample_problems(problems, str(model_dir), None, out, cfg)
    assert again == records and len(read_jsonl(out)) == 15


def test_greedy_is_deterministic_and_batch_invariant(loaded):
    model, tok = loaded
    prompts = [encode_prompt(tok, p.question) for p in _problems(5)]
    assert len({len(p) for p in prompts}) == 5
    greedy = SamplingConfig(k=1, temperature=0.0, max_new_tokens=6, batch_size=3)
    one_by_one = SamplingConfig(k=1, temperature=0.0, max_new_tokens=6, batch_size=1)
    a = generate(model, tok, prompts, n=1, config=greedy)
    b = generate(model, tok, prompts, n=1, config=greedy)
    c = generate(model, tok, prompts, n=1, config=one_by_one)
    ids = lambda res: [[g.token_ids for g in gens] for gens in res]
    assert ids(a) == ids(b) == ids(c)  # left padding + mask: batching does not change the answer
    # and it is the argmax continuation, computed naively, one token at a time
    for prompt, gens in zip(prompts, a):
        seq, out = list(prompt), []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            seq.append(nxt)
        assert gens[0].token_ids == out


def test_hf_generation_runs_under_the_training_autocast(loaded, monkeypatch):
    """On a GPU with bf16, hf generation runs under bf16 autocast, as training and scoring do (float32
    master weights would give flash-attn float32 inputs); ``bf16=False`` runs the weights' own dtype.
    Simulated on the CPU by letting ``autocast_dtype_for`` choose bf16 there too."""
    import o1pruner.modeling as modeling

    model, tok = loaded
    real = modeling.autocast_dtype_for
    monkeypatch.setattr(modeling, "autocast_dtype_for", lambda bf16, device: torch.bfloat16 if bf16 else None)
    seen = []
    handle = model.register_forward_pre_hook(
        lambda *_: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    )
    prompts = [encode_prompt(tok, p.question) for p in _problems(2)]
    try:
        for bf16 in (True, False):
            seen.clear()
            generate(
                model,
                tok,
                prompts,
                n=1,
                config=SamplingConfig(k=1, temperature=0.0, max_new_tokens=3, bf16=bf16),
            )
            assert seen and all(s == ((True, torch.bfloat16) if bf16 else (False, s[1])) for s in seen)
    finally:
        handle.remove()
    assert real(True, torch.device("cpu")) is None  # the real rule: autocast on CUDA only


def test_hf_generate_halves_a_batch_that_runs_out_of_memory(loaded, monkeypatch):
    """A batch over the (simulated) memory limit is split until it fits; every prompt still gets its
    responses, greedy ones equal to an unsplit run, sampled ones reproducible and all drawn distinctly."""
    model, tok = loaded
    prompts = [encode_prompt(tok, p.question) for p in _problems(5)]
    real, sizes = model.generate, []

    def limited(*a, **kw):
        rows = kw["input_ids"].shape[0]
        sizes.append(rows)
        if rows > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(*a, **kw)

    greedy = SamplingConfig(k=1, temperature=0.0, max_new_tokens=6, batch_size=8)
    expected = generate(model, tok, prompts, n=2, config=greedy)
    monkeypatch.setattr(model, "generate", limited)
    got = generate(model, tok, prompts, n=2, config=greedy)
    ids = lambda res: [[g.token_ids for g in gens] for gens in res]
    assert ids(got) == ids(expected)
    assert sizes[:2] == [8, 4] and sum(s for s in sizes if s <= 2) == 10  # 8 -> 4 + 4 -> 2 + 2 ...; then 2
    sampled = SamplingConfig(k=4, temperature=1.0, max_new_tokens=8, batch_size=8)
    a = generate(model, tok, prompts[:1], n=4, config=sampled)
    b = generate(model, tok, prompts[:1], n=4, config=sampled)
    assert ids(a) == ids(b)
    assert len({tuple(g.token_ids) for g in a[0]}) > 1  # the halves do not share one random stream
    one_row = SamplingConfig(k=1, temperature=0.0, max_new_tokens=6, batch_size=1)
    monkeypatch.setattr(
        model, "generate", lambda *a, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("x"))
    )
    with pytest.raises(torch.OutOfMemoryError):
        generate(model, tok, prompts[:1], n=1, config=one_row)


def test_hf_generate_settings(loaded, monkeypatch):
    model, tok = loaded
    seen = []
    real = model.generate

    def spy(*args, **kwargs):
        seen.append((model.training, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    top_k = model.generation_config.top_k
    model.generation_config.top_k = 1  # a checkpoint default that must not leak into pre-sampling
    model.train()  # handed over in training mode: generation runs in eval mode, the mode is restored
    try:
        generate(model, tok, [[5, 6, 7]], n=2, config=SamplingConfig(k=2, max_new_tokens=3))
        assert model.training
    finally:
        model.eval()
        model.generation_config.top_k = top_k
    training, kw = seen[0]
    assert not training
    assert kw["do_sample"] is True and kw["use_cache"] is True
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["repetition_penalty"]) == (0.5, 0.8, 0, 1.0)
    assert kw["max_new_tokens"] == 3 and kw["eos_token_id"] == [tok.eos_token_id]
    assert kw["input_ids"].shape == (2, 3)


def test_n_samples_per_prompt_and_stop_reason(loaded):
    model, tok = loaded
    model = _with_biased_head(model, tok)  # every step: 'a' (p=3/4) or EOS (p=1/4)
    a_id = tok.convert_tokens_to_ids("a")
    prompts = [encode_prompt(tok, "hi"), encode_prompt(tok, "a longer question")]
    cfg = SamplingConfig(k=5, temperature=1.0, top_p=1.0, max_new_tokens=3, batch_size=4, seed=0)
    res = generate(model, tok, prompts, n=5, config=cfg)
    assert [len(g) for g in res] == [5, 5]
    flat = [g for gens in res for g in gens]
    assert {g.finish_reason for g in flat} == {"stop", "length"}
    for g in flat:
        assert set(g.token_ids) <= {a_id}
        assert g.text == "a" * len(g.token_ids)
        assert (g.finish_reason == "length") == (len(g.token_ids) == 3)


def _with_biased_head(model, tok):
    import copy

    model = copy.deepcopy(model)
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)
        head.bias[tok.eos_token_id] = 0.0
        head.bias[tok.convert_tokens_to_ids("a")] = float(np.log(3.0))
    model.lm_head = head
    return model


def test_vllm_backend_without_vllm_is_a_clear_error(monkeypatch, model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)
    cfg = SamplingConfig(k=1, backend="vllm", max_new_tokens=4)
    with pytest.raises(ImportError, match=r"o1pruner\[vllm\]"):
        generate(str(model_dir), None, [[5, 6, 7]], n=1, config=cfg)


def test_vllm_backend_needs_a_path(fake_vllm, loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="needs a model folder"):
        generate(model, tok, [[5, 6]], n=1, config=SamplingConfig(k=1, backend="vllm"))


def test_vllm_backend_generates(model_dir, tmp_path, loaded):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    _, tok = loaded
    cfg = SamplingConfig(k=2, backend="vllm", max_new_tokens=6, batch_size=2, gpu_memory_utilization=0.3)
    res = generate(str(model_dir), tok, [encode_prompt(tok, "hi")], n=2, config=cfg)
    assert len(res) == 1 and len(res[0]) == 2
    for g in res[0]:
        assert g.finish_reason in ("stop", "length") and len(g.token_ids) <= 6
        assert tok.eos_token_id not in g.token_ids
    # the engine was released: a second one (inside sample_problems) can start in this process
    records = sample_problems(_problems(3), str(model_dir), tok, tmp_path / "s.jsonl", cfg)
    assert len(records) == 6 and len(read_samples(tmp_path / "s.jsonl")) == 6


def test_read_samples_dedups_and_validates(tmp_path):
    rec = lambda pid, i, text="x": {
        "problem_id": pid,
        "sample_index": i,
        "text": text,
        "token_ids": [1, 2],
        "num_tokens": 2,
        "finish_reason": "stop",
        "correct": False,
    }
    path = tmp_path / "s.jsonl"
    lines = [json.dumps(r) for r in (rec("a", 0, "first"), rec("a", 1), rec("a", 0, "second"))]
    path.write_text("\n".join(lines) + "\n" + '{"problem_id": "a", "sampl')  # partial tail of a killed writer
    got = read_samples(path)
    assert [(r["problem_id"], r["sample_index"], r["text"]) for r in got] == [
        ("a", 0, "first"),
        ("a", 1, "x"),
    ]
    bad = rec("b", 0)
    bad["num_tokens"] = 3
    path.write_text(json.dumps(rec("a", 0)) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"record 2: bad value for key 'num_tokens'"):
        read_samples(path)
    missing = rec("b", 0)
    del missing["correct"]
    path.write_text(json.dumps(missing) + "\n")
    with pytest.raises(DataError, match=r"s\.jsonl, record 1: missing key\(s\) \['correct'\]"):
        read_samples(path)


def _write_problems(tmp_path: Path, problems: list[Problem]) -> Path:
    path = tmp_path / "problems.json"
    path.write_text(json.dumps([{"id": p.id, "question": p.question, "answer": p.answer} for p in problems]))
    return path


def _pairs(records):
    return [(r["problem_id"], r["sample_index"]) for r in records]


def test_resume_after_partial_last_line(model_dir, loaded, tmp_path):
    sys.path.insert(0, str(TESTS))
    from sampling_worker import worker_config

    model, tok = loaded
    problems = _problems(8)
    cfg = worker_config()
    full = sample_problems(problems, model, tok, tmp_path / "full.jsonl", cfg)
    assert len(full) == 32
    # a killed run: 7 complete records on disk (batches of 3 pairs: two whole batches + 1 of the third),
    # then half a line
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path / "resumed.jsonl"
    out.write_text("".join(lines[:7]) + lines[7][:25])
    resumed = sample_problems(problems, model, tok, out, cfg)
    on_disk = read_jsonl(out)  # strict: no fragment left anywhere in the file
    assert len(on_disk) == 32 and len(set(_pairs(on_disk))) == 32
    assert sorted(_pairs(resumed)) == sorted(_pairs(full))
    # per-batch seeds: the redrawn batches are the very same samples
    key = lambda r: (r["problem_id"], r["sample_index"])
    assert sorted(resumed, key=key) == sorted(full, key=key)


def test_kill_and_resume(model_dir, loaded, tmp_path):
    sys.path.insert(0, str(TESTS))
    from sampling_worker import worker_config

    problems = _problems(8)
    out = tmp_path / "samples.jsonl"
    env = dict(
        os.environ,
        O1P_TEST_SLEEP="0.1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
    )
    log = tmp_path / "worker.log"  # a file, not a pipe: a full pipe would stall the worker
    with open(log, "wb") as log_f:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(model_dir), str(_write_problems(tmp_path, problems)), str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_f,
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.stat().st_size > 0:
                break
            time.sleep(0.02)
        time.sleep(0.15)  # land somewhere inside a later batch
        assert proc.poll() is None, f"worker ended before it could be killed: {log.read_text()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = read_jsonl(out, tolerate_partial_tail=True)
    assert 0 < len(before) < 32

    model, tok = loaded
    resumed = sample_problems(problems, model, tok, out, worker_config())
    on_disk = read_jsonl(out)
    assert len(resumed) == len(on_disk) == 32
    assert len(set(_pairs(on_disk))) == 32
    assert set(_pairs(on_disk)) == {(p.id, i) for p in problems for i in range(4)}
    assert on_disk[: len(before)] == before  # what the killed run wrote is kept as is
    # the resumed run matches an uninterrupted one (same per-batch seeds)
    full = sample_problems(problems, model, tok, tmp_path / "full.jsonl", worker_config())
    key = lambda r: (r["problem_id"], r["sample_index"])
    assert sorted(on_disk, key=key) == sorted(full, key=key)


# ----------------------------------------------------------------------------- vLLM plumbing, on a fake vllm
# (the real engine needs a GPU; these check our side: one engine, per-pair seeds, token-id prompts, EOS and
# stop-id cutting, resume, release)


class _FakeParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _FakeLLM:
    EOS, STOP = 1, 77
    instances: typing.ClassVar[list] = []

    def __init__(self, **kwargs):
        self.kwargs, self.requests, self.shut = kwargs, [], False
        _FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        import random
        from types import SimpleNamespace as NS

        assert not self.shut and len(prompts) == len(params)
        outs = []
        for prompt, sp in zip(prompts, params):
            self.requests.append((tuple(prompt["prompt_token_ids"]), sp))
            children = []
            for index in range(sp.n):  # as vLLM v1: child i of a seeded request is seeded seed + i
                rng = random.Random(f"{prompt['prompt_token_ids']}-{sp.seed + index}")
                n = rng.randrange(0, sp.max_tokens + 1)
                ids = [rng.randrange(10, 90) for _ in range(n)]
                if n == sp.max_tokens:
                    done = NS(token_ids=ids, finish_reason="length", stop_reason=None, index=index)
                elif rng.random() < 0.5:
                    done = NS(token_ids=[*ids, self.EOS], finish_reason="stop", stop_reason=None, index=index)
                else:  # a stop id from the checkpoint's generation_config that the tokenizer does not know
                    done = NS(
                        token_ids=[*ids, self.STOP], finish_reason="stop", stop_reason=self.STOP, index=index
                    )
                children.append(done)
            outs.append(NS(outputs=children[::-1]))  # completion order is not index order
        return outs

    def shutdown(self):
        self.shut = True


@pytest.fixture
def fake_vllm(monkeypatch):
    import types

    _FakeLLM.instances = []
    cleanups = []
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = _FakeLLM, _FakeParams
    dist = types.ModuleType("vllm.distributed")
    ps = types.ModuleType("vllm.distributed.parallel_state")
    ps.cleanup_dist_env_and_memory = lambda: cleanups.append(1)
    for name, mod in (("vllm", vllm), ("vllm.distributed", dist), ("vllm.distributed.parallel_state", ps)):
        monkeypatch.setitem(sys.modules, name, mod)
    return cleanups


def test_vllm_plumbing_on_a_fake_engine(fake_vllm, model_dir, loaded, tmp_path):
    _, tok = loaded
    assert tok.eos_token_id == _FakeLLM.EOS
    problems = _problems(5)
    cfg = SamplingConfig(k=3, backend="vllm", max_new_tokens=5, batch_size=2, seed=4, quantization="awq")
    out = tmp_path / "s.jsonl"
    records = sample_problems(problems, str(model_dir), tok, out, cfg)
    assert len(_FakeLLM.instances) == 1 and fake_vllm == [1]  # one engine, released once
    llm = _FakeLLM.instances[0]
    assert llm.shut
    assert llm.kwargs == {
        "model": str(model_dir),
        "dtype": "bfloat16",
        "gpu_memory_utilization": memory_utilization(None),
        "seed": 4,
        "quantization": "awq",
        "enable_prefix_caching": True,
        "max_model_len": max(len(encode_prompt(tok, p.question)) for p in problems) + 5,
    }
    assert len(llm.requests) == 5  # one request per problem, n = k
    seeds = {sp.seed + i for _, sp in llm.requests for i in range(sp.n)}
    assert len(seeds) == 15  # every (problem, sample) pair has its own seed
    for _, sp in llm.requests:
        assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens) == (3, 0.5, 0.8, 5)
    prompts = {p.id: tuple(encode_prompt(tok, p.question)) for p in problems}
    assert {ids for ids, _ in llm.requests} == set(prompts.values())
    assert len(records) == 15 and len(set(_pairs(records))) == 15
    reasons = set()
    for rec in records:
        assert _FakeLLM.EOS not in rec["token_ids"] and _FakeLLM.STOP not in rec["token_ids"]
        assert rec["num_tokens"] == len(rec["token_ids"]) <= 5
        assert (rec["finish_reason"] == "length") == (rec["num_tokens"] == 5)
        reasons.add(rec["finish_reason"])
    assert reasons == {"stop", "length"}

    # resume after losing records: only the missing pairs are requested, with their original seeds
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]))
    resumed = sample_problems(problems, str(model_dir), tok, out, cfg)
    again = _FakeLLM.instances[1].requests
    assert len(_FakeLLM.instances) == 2 and sum(sp.n for _, sp in again) == 11
    assert {sp.seed + i for _, sp in again for i in range(sp.n)} < seeds  # their original seeds
    assert sorted(sp.n for _, sp in again) == [1, 1, 3, 3, 3]  # the half-done problem: one per sample
    key = lambda r: (r["problem_id"], r["sample_index"])
    assert sorted(resumed, key=key) == sorted(records, key=key)

    # an engine passed in is used as is and not released; greedy -> temperature 0, top_p 1
    mine = _FakeLLM(model="x")
    greedy = SamplingConfig(k=1, backend="vllm", temperature=0.0, max_new_tokens=3)
    res = generate(mine, tok, [[5, 6], [7]], n=2, config=greedy)
    assert [len(r) for r in res] == [2, 2] and not mine.shut
    assert [(ids, sp.n, sp.temperature, sp.top_p) for ids, sp in mine.requests] == [
        ((5, 6), 2, 0.0, 1.0),
        ((7,), 2, 0.0, 1.0),
    ]
