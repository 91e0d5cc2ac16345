"""Several processes on the CPU (gloo): per-rank logs and their merge, the vLLM parallel layout, and
``torchrun --nproc-per-node 2`` runs: training equal to one process (DDP, FSDP2), sharded checkpoints
resumed on another process count, and the whole pipeline, killed and resumed."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import REPO, TORCHRUN, cli_env, make_inputs, run_python, small_run_args
from helpers import make_scored, make_tiny_model

from o1pruner import distributed
from o1pruner.io import read_jsonl
from o1pruner.vllm_engine import data_parallel_rank, parallel_kwargs

WORKER = Path(__file__).with_name("dist_worker.py")


def _rec(pid: str, i: int, tag: str = "") -> dict:
    return {"problem_id": pid, "sample_index": i, "tag": tag}


def _read(path: Path) -> list[dict]:
    return read_jsonl(path, tolerate_partial_tail=True)


# ------------------------------------------------------------------------------------------- rank logs
def test_merge_rank_logs_keeps_each_record_once_in_problem_order(tmp_path):
    main = tmp_path / "samples.jsonl"
    main.write_text(json.dumps(_rec("b", 0, "main")) + "\n")
    r0, r1 = distributed.rank_log(main, 0), distributed.rank_log(main, 1)
    r0.write_text("".join(json.dumps(_rec(p, i, "r0")) + "\n" for p, i in [("b", 1), ("b", 0)]))
    # rank 1 was killed in the middle of a line
    r1.write_text(json.dumps(_rec("a", 1, "r1")) + "\n" + json.dumps(_rec("a", 0, "r1")) + "\n" + '{"probl')
    (tmp_path / "samples.rank2.json").write_text("not a rank log")  # wrong suffix: left alone
    (tmp_path / "other.rank0.jsonl").write_text(json.dumps(_rec("z", 0)) + "\n")  # another file's log
    assert distributed.rank_logs(main) == [r0, r1]

    assert distributed.merge_rank_logs(main, ["a", "b"], _read) == 4
    got = [(r["problem_id"], r["sample_index"], r["tag"]) for r in _read(main)]
    assert got == [("a", 0, "r1"), ("a", 1, "r1"), ("b", 0, "main"), ("b", 1, "r0")]
    assert not r0.exists() and not r1.exists()
    assert (tmp_path / "samples.rank2.json").exists() and (tmp_path / "other.rank0.jsonl").exists()
    before = main.read_bytes()
    assert distributed.merge_rank_logs(main, ["a", "b"], _read) == 0 and main.read_bytes() == before


def test_one_process_stage_folds_in_what_a_killed_multi_process_run_left(tmp_path):
    main = tmp_path / "eval" / "base_responses.jsonl"
    main.parent.mkdir()
    distributed.rank_log(main, 1).write_text(json.dumps(_rec("q", 0, "r1")) + "\n")
    calls = []
    problems = [{"id": "q"}, {"id": "p"}]
    distributed.sharded_stage(main, problems, _read, lambda *a: calls.append(a))
    assert calls == [(problems, main, [])]
    assert [r["tag"] for r in _read(main)] == ["r1"] and distributed.rank_logs(main) == []


def test_shards_cover_every_item_once():
    items = list(range(11))
    shards = [distributed.shard(items, r, 3) for r in range(3)]
    assert sorted(x for s in shards for x in s) == items and [len(s) for s in shards] == [4, 4, 3]


def test_world_comes_from_the_launcher_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world() == distributed.World() and not distributed.world().distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.world() == distributed.World(3, 4, 1)
    monkeypatch.setenv("RANK", "three")
    with pytest.raises(ValueError, match="RANK='three'"):
        distributed.world()


def test_vllm_layout_tensor_and_data_parallel(monkeypatch):
    assert parallel_kwargs(1, 1) == {}
    assert parallel_kwargs(2, 1) == {"tensor_parallel_size": 2}
    assert parallel_kwargs(1, 4) == {
        "tensor_parallel_size": 1,
        "data_parallel_size": 4,
        "distributed_executor_backend": "external_launcher",
    }
    assert parallel_kwargs(2, 8)["data_parallel_size"] == 4
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size=3 does not divide the 4"):
        parallel_kwargs(3, 4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    ranks = []
    for r in range(4):
        monkeypatch.setenv("RANK", str(r))
        ranks.append(data_parallel_rank(2))
    assert ranks == [(0, 2), (0, 2), (1, 2), (1, 2)]  # one engine (and one shard) per pair of ranks


# ------------------------------------------------------------------------------------------- torchrun
def _torchrun(*args: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc ARGS`` (``nproc=0``: plain ``python ARGS``)."""
    proc = run_python(*((*TORCHRUN, str(nproc)) if nproc else ()), *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def test_rank_0_merges_after_the_slowest_rank(tmp_path):
    proc = _torchrun(str(WORKER), "stage", str(tmp_path))
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [f"p{i}" for i in range(5)]
    assert distributed.rank_logs(tmp_path / "responses.jsonl") == []


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    """A tiny Qwen2 and a 13-row scored set: 3 steps of 5, 2, 3 rows per rank-0/1 share, several
    micro-batches of 24 tokens per share (the ranks' counts differ)."""
    from o1pruner.modeling import load_model

    root = tmp_path_factory.mktemp("dist")
    path = make_tiny_model(root / "m", hidden=64, layers=2)
    model = load_model(str(path), mode="none", device="cpu", torch_dtype="float32")[0]
    return {"root": root, "model": path, "scored": make_scored(root / "scored.parquet", model, n=13)}


def _train(inputs, name: str, mode: str, par: str, nproc: int, steps: int = 3, **kw) -> dict:
    from safetensors.torch import load_file

    out = inputs["root"] / name
    extra = [str(kw.get("save_every", 0)), kw.get("level", "sequence_geomean")]
    _torchrun(
        str(WORKER),
        str(inputs["model"]),
        str(inputs["scored"]),
        str(out),
        mode,
        par,
        str(steps),
        *extra,
        nproc=nproc,
    )
    return load_file(out / "weights.safetensors")


def _initial(inputs, mode: str) -> dict:
    from o1pruner.modeling import load_model

    torch.manual_seed(0)
    mode, _, dtype = mode.partition("-")
    net = load_model(
        str(inputs["model"]),
        mode=mode,
        device="cpu",
        torch_dtype=dtype or "float32",
        lora_r=4,
        lora_alpha=8,
        freeze_last_n_layers=1 if mode == "freeze" else 0,
    )[0]
    return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def _assert_same_update(one: dict, many: dict, start: dict) -> None:
    """Per tensor, max |a - b| / max |a| <= 3e-4, and every tensor moved far more than that.

    The processes see different token counts per GEMM, so float32 sums run in another order; Adam turns
    that rounding on near-zero gradients (embedding rows of rare tokens) into up to ~1e-4 of the weights
    after three steps (1.15e-4 seen). A wrong sharding or weighting moves them by O(1)."""
    assert one.keys() == many.keys() == start.keys() and one
    for n in one:
        scale = float(one[n].abs().max())
        rel = float((one[n] - many[n]).abs().max()) / scale
        moved = float((one[n] - start[n]).abs().max()) / scale
        assert rel <= 3e-4, f"{n}: max relative difference {rel:.2e}"
        assert moved > 100 * max(rel, 1e-7), f"{n}: moved only {moved:.2e} in training"


@pytest.mark.parametrize(
    "mode, par, level",
    [
        ("full", "ddp", "sequence_geomean"),
        ("full", "fsdp", "sequence_geomean"),
        ("freeze", "fsdp", "sequence"),
        ("lora", "ddp", "token:token_mean"),
        ("lora", "fsdp", "sequence_geomean"),
        ("freeze-bfloat16", "fsdp", "sequence_geomean"),  # 16-bit load: FSDP2 casts layer by layer
    ],
)
def test_two_processes_train_to_the_one_process_weights(train_inputs, mode, par, level):
    one = _train(train_inputs, f"one-{mode}-{level}", mode, "none", nproc=0, level=level)
    two = _train(train_inputs, f"two-{mode}-{par}-{level}", mode, par, nproc=2, level=level)
    _assert_same_update(one, two, _initial(train_inputs, mode))


def test_sharded_checkpoint_of_two_processes_resumes_on_one(train_inputs):
    name = "fsdp-then-one"
    _train(train_inputs, name, "full", "fsdp", nproc=2, steps=2, save_every=1)
    ckpt = train_inputs["root"] / name / "checkpoints" / "step-2"
    assert (ckpt / "dcp").is_dir() and not (ckpt / "trainable.safetensors").exists()
    resumed = _train(train_inputs, name, "full", "none", nproc=0, steps=3)
    rows = read_jsonl(train_inputs["root"] / name / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    one = _train(train_inputs, "one-full-3", "full", "none", nproc=0)
    _assert_same_update(one, resumed, _initial(train_inputs, "full"))


# ------------------------------------------------------------------------------------------- pipeline
PIPELINE_ARGS = ("--mode", "lora", "--save-every", "1")


def _pipeline_args(inputs, out: Path) -> list[str]:
    """``torchrun`` (2 processes) ``-m o1pruner run`` on the small run, as ``python`` arguments."""
    return [*TORCHRUN, "2", "-m", "o1pruner", "run", *small_run_args(inputs, out, *PIPELINE_ARGS)]


def _files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def _kinds(run_dir: Path) -> set[str]:
    """The run's files, checkpoints named without their step."""
    return {
        f.split("/", 2)[0] + "/*/" + f.split("/", 2)[2] if f.startswith("checkpoints/step-") else f
        for f in _files(run_dir)
    }


def _assert_each_once(run_dir: Path, n_train: int, k: int, n_eval: int) -> None:
    samples = read_jsonl(run_dir / "samples.jsonl")
    keys = [(r["problem_id"], r["sample_index"]) for r in samples]
    assert len(keys) == len(set(keys)) == n_train * k
    for name in ("base", "tuned"):
        recs = read_jsonl(run_dir / "eval" / f"{name}_responses.jsonl")
        keys = [(r["problem_id"], r["sample_index"]) for r in recs]
        assert len(keys) == len(set(keys)) == n_eval
    assert not [f for f in _files(run_dir) if ".rank" in f], "rank logs left behind"


@pytest.fixture(scope="module")
def pipeline_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-pipeline")
    inputs = make_inputs(root)
    one = root / "one"
    proc = run_python("-m", "o1pruner", "run", *small_run_args(inputs, one, *PIPELINE_ARGS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**inputs, "one": one}


def test_torchrun_pipeline_writes_what_one_process_writes_each_sample_once(pipeline_inputs):
    out = pipeline_inputs["root"] / "two"
    proc = run_python(*_pipeline_args(pipeline_inputs, out))
    assert proc.returncode == 0, proc.stderr[-6000:]
    _assert_each_once(out, n_train=3, k=3, n_eval=3)
    assert _kinds(out) == _kinds(pipeline_inputs["one"])
    assert json.loads((out / "eval.json").read_text())["tuned"]["num_problems"] == 3


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to torchrun and every process under it (its workers run in their own sessions), as when
    the machine goes down."""
    import psutil

    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=30)


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def test_torchrun_pipeline_killed_with_sigkill_resumes(pipeline_inputs):
    out = pipeline_inputs["root"] / "killed"
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    log = pipeline_inputs["root"] / "killed.log"
    kills = []
    latest = 20.0
    while len(kills) < 3:
        delay = rng.uniform(3.0, latest)
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                [sys.executable, *_pipeline_args(pipeline_inputs, out)],
                stdout=f,
                stderr=f,
                env=cli_env(),
                cwd=REPO,
            )
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            kills.append(round(delay, 1))
        else:
            assert proc.returncode == 0, log.read_text()[-4000:]
            if kills:
                break
            latest = max(4.0, latest / 2)
            import shutil

            shutil.rmtree(out)
    final = run_python(*_pipeline_args(pipeline_inputs, out))
    assert final.returncode == 0, f"kill seed {seed}, kills at {kills} s\n" + final.stderr[-4000:]
    assert kills, f"no attempt was killed (seed {seed})"
    _assert_each_once(out, n_train=3, k=3, n_eval=3)
    assert _kinds(out) >= _kinds(pipeline_inputs["one"]) - {
        f for f in _kinds(pipeline_inputs["one"]) if f.startswith("checkpoints/")
    }


def test_accelerate_launch_with_an_fsdp_config_shards_training(pipeline_inputs):
    """``accelerate launch --use_fsdp`` (what an accelerate FSDP config sets) trains with FSDP2: the
    checkpoints are sharded, the tuned model is whole, every sample drawn once."""
    out = pipeline_inputs["root"] / "accelerate"
    args = small_run_args(pipeline_inputs, out, "--mode", "full")
    launch = ["-m", "accelerate.commands.launch", "--num_processes", "2", "--use_fsdp", "--fsdp_version", "2"]
    proc = run_python(*launch, "-m", "o1pruner", "run", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    _assert_each_once(out, n_train=3, k=3, n_eval=3)
    last = out / "checkpoints" / (out / "checkpoints" / "last").read_text().strip()
    state = json.loads((last / "trainer_state.json").read_text())
    assert (state["parallel"], state["world_size"]) == ("fsdp", 2)
    assert (last / "dcp").is_dir() and (out / "model" / "DONE").exists()
