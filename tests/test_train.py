"""The trainer: modes, loss against a naive logits-based reference, packing vs padding, exact resume."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import make_scored, make_tiny_model

from o1pruner.io import DataError, read_jsonl
from o1pruner.modeling import last_hidden_states, lm_head_weight, load_model
from o1pruner.packing import collate_padded
from o1pruner.train import TrainConfig, Trainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN = 64  # bitsandbytes' CPU 4-bit path needs in_features >= 64


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden=HIDDEN, layers=2)


def _load(path, mode="full", **kw):
    kw.setdefault("freeze_last_n_layers", 1 if mode == "freeze" else 0)
    torch.manual_seed(0)  # peft draws the LoRA init from the global RNG
    return load_model(
        str(path), mode=mode, device="cpu", torch_dtype="float32", lora_r=4, lora_alpha=8, **kw
    )[0]


@pytest.fixture(scope="module")
def scored(tiny_path, tmp_path_factory):
    model = _load(tiny_path, "none")
    return make_scored(tmp_path_factory.mktemp("data") / "scored.parquet", model)


def _cfg(**kw):
    base = dict(
        learning_rate=1e-2,
        effective_batch_size=4,
        micro_batch_tokens=24,
        warmup_ratio=0.0,
        backend="torch",
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def naive_step_loss(model, trainer, rows, level, reduction="sequence_mean", clip=(0.2, 0.2)) -> float:
    """float64 reference through the full model's logits, one sequence at a time."""
    per_seq, tok_terms = [], []
    with torch.no_grad():
        for i in rows:
            ex = trainer.data.example(i)
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0].double()
            lab = torch.tensor(ex.labels)
            valid = lab != -100
            logp = torch.log_softmax(logits, -1)[valid].gather(-1, lab[valid, None])[:, 0]
            d = logp - torch.tensor(ex.old_logps, dtype=torch.float64)[valid]
            a = ex.advantage

            def f(r, a=a):
                return -torch.minimum(r * a, torch.clamp(r, 1 - clip[0], 1 + clip[1]) * a)

            if level == "sequence_geomean":
                per_seq.append(float(f(torch.exp(d.mean()))))
            elif level == "sequence":
                per_seq.append(float(f(torch.exp(d.sum()))))
            else:
                lt = f(torch.exp(d))
                per_seq.append(float(lt.mean()))
                tok_terms.append(lt)
    if level == "token" and reduction == "token_mean":
        return float(torch.cat(tok_terms).mean())
    return float(np.mean(per_seq))


@pytest.mark.parametrize(
    "level,reduction",
    [
        ("sequence_geomean", "sequence_mean"),
        ("sequence", "sequence_mean"),
        ("token", "sequence_mean"),
        ("token", "token_mean"),
    ],
)
def test_step_loss_equals_naive_logits_reference(tiny_path, scored, tmp_path, level, reduction):
    model = _load(tiny_path, "full")
    trainer = Trainer(
        model, scored, _cfg(importance_level=level, reduction=reduction, micro_batch_tokens=17), tmp_path
    )
    rows = trainer.step_rows(0)
    assert len(trainer.micro_batches(rows)) > 1  # accumulation across several micro-batches is exercised
    got = trainer.forward_backward(rows)["loss"]
    want = naive_step_loss(model, trainer, rows, level, reduction)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_packed_and_padded_batches_give_same_loss_and_grads(tiny_path, scored, tmp_path):
    from o1pruner.kernels import linear_ppo_loss

    model = _load(tiny_path, "full")
    trainer = Trainer(model, scored, _cfg(micro_batch_tokens=20), tmp_path)
    rows = trainer.step_rows(1)
    packed_loss = trainer.forward_backward(rows)["loss"]
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    pb = collate_padded([trainer.data.example(i) for i in rows], pad_id=0)
    hidden = last_hidden_states(model, pb.input_ids, attention_mask=pb.attention_mask)
    out = linear_ppo_loss(
        hidden,
        lm_head_weight(model),
        pb.labels,
        pb.old_logps,
        pb.advantages,
        importance_level="sequence_geomean",
        backend="torch",
    )
    out.loss.backward()
    assert packed_loss == pytest.approx(float(out.loss.detach()), rel=1e-5, abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("mode", ["full", "lora", "qlora", "freeze"])
def test_every_mode_trains_only_its_parameters(tiny_path, scored, tmp_path, mode):
    try:
        model = _load(tiny_path, mode, gradient_checkpointing=(mode == "lora"))
    except Exception as e:  # pragma: no cover - bitsandbytes without a CPU 4-bit backend
        if mode == "qlora":
            pytest.skip(f"bitsandbytes 4-bit does not load on this machine: {e!r}")
        raise
    trainer = Trainer(model, scored, _cfg(), tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer.forward_backward(trainer.step_rows(0))
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n
    model.zero_grad(set_to_none=True)

    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n not in trainable and p.is_floating_point()
    }
    metrics = Trainer(model, scored, _cfg(max_steps=2), tmp_path / "run").train(resume=False)
    assert [m["step"] for m in metrics] == [1, 2]
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, before[n])]
    # lora_A gets no gradient while lora_B is still zero at step 1, but B moves, then A: all change by step 2
    assert len(changed) == len(trainable), sorted(set(trainable) - set(changed))[:5]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_lm_head_forward_is_never_called(tiny_path, scored, tmp_path):
    model = _load(tiny_path, "lora")

    def boom(*_):
        raise AssertionError("lm_head forward was called: logits were materialised")

    model.get_output_embeddings().register_forward_hook(boom)
    rows = Trainer(model, scored, _cfg(max_steps=1), tmp_path).train(resume=False)
    assert len(rows) == 1 and np.isfinite(rows[0]["loss"])


def test_metrics_rows_and_schedule(tiny_path, scored, tmp_path):
    model = _load(tiny_path, "full")
    cfg = _cfg(warmup_ratio=0.25, num_epochs=2, learning_rate=1e-3)
    trainer = Trainer(model, scored, cfg, tmp_path)
    rows = trainer.train()
    assert trainer.steps_per_epoch == 3 and trainer.total_steps == 6  # 11 rows, 4 per step, last short
    assert [r["step"] for r in rows] == list(range(1, 7))
    keys = {
        "step",
        "loss",
        "clip_fraction",
        "mean_ratio",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "peak_memory_gb",
        "elapsed",
    }
    assert keys <= set(rows[0])
    # warmup ceil(0.25 * 6) = 2 steps, then cosine over the remaining 4
    assert [r["lr"] for r in rows[:3]] == pytest.approx([0.0, 5e-4, 1e-3])
    assert rows[3]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 1 / 4)))
    assert [r["num_sequences"] for r in rows] == [4, 4, 3, 4, 4, 3]
    # each epoch visits every row exactly once, in a seeded order that differs between epochs
    for e in range(2):
        seen = [i for s in range(3 * e, 3 * e + 3) for i in trainer.step_rows(s)]
        assert sorted(seen) == list(range(11))
    assert trainer.epoch_order(0).tolist() != trainer.epoch_order(1).tolist()
    assert (tmp_path / "checkpoints" / "last").read_text().strip() == "step-6"
    assert 0.0 <= rows[0]["clip_fraction"] <= 1.0 and any(r["clip_fraction"] > 0 for r in rows)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_reproduces_the_uninterrupted_run(tiny_path, scored, tmp_path, mode):
    cfg = _cfg(num_epochs=2, save_every=1, warmup_ratio=0.2)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = Trainer(_load(tiny_path, mode), scored, cfg, ref_dir).train()
    assert len(ref) == 6

    # A run "killed" after step 2: it wrote checkpoints 1 and 2 and metrics rows up to 2.
    cfg_stop = _cfg(num_epochs=2, save_every=1, warmup_ratio=0.2, max_steps=2)
    first = Trainer(_load(tiny_path, mode), scored, cfg_stop, run_dir).train()
    assert [r["step"] for r in first] == [1, 2]
    # Debris of the kill: a half-written checkpoint folder and a metrics row past the checkpoint.
    (run_dir / "checkpoints" / ".step-3.x.tmp").mkdir()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n" + '{"step": 4, "lo')

    resumed = Trainer(_load(tiny_path, mode), scored, cfg, run_dir).train(resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(ref, resumed):
        for k in ("loss", "grad_norm", "lr", "clip_fraction", "mean_ratio"):
            assert b[k] == a[k], (a["step"], k)  # bit-for-bit on the CPU

    # Delete the later checkpoints of the finished run: a fresh Trainer resumes from step 4 (mid epoch 2).
    for s in (5, 6):
        shutil.rmtree(ref_dir / "checkpoints" / f"step-{s}")
    model = _load(tiny_path, mode)
    again = Trainer(model, scored, cfg, ref_dir).train(resume=True)
    assert [r["step"] for r in again] == list(range(1, 7))
    assert [r["loss"] for r in again[4:]] == pytest.approx([r["loss"] for r in ref[4:]], rel=1e-6)
    assert len(read_jsonl(ref_dir / "metrics.jsonl")) == 6


def test_resume_false_starts_over(tiny_path, scored, tmp_path):
    cfg = _cfg(max_steps=1)
    first = Trainer(_load(tiny_path), scored, cfg, tmp_path).train()
    second = Trainer(_load(tiny_path), scored, cfg, tmp_path).train(resume=False)
    assert [r["step"] for r in second] == [1] and second[0]["loss"] == first[0]["loss"]


def test_checkpoint_from_another_run_is_refused(tiny_path, scored, tmp_path):
    Trainer(_load(tiny_path), scored, _cfg(max_steps=1), tmp_path).train()
    with pytest.raises(ValueError, match="different data or config"):
        Trainer(_load(tiny_path), scored, _cfg(effective_batch_size=2), tmp_path).train()


def test_bad_training_tables(tiny_path, scored, tmp_path):
    model = _load(tiny_path)
    table = pq.read_table(scored)
    with pytest.raises(DataError, match="missing column"):
        Trainer(model, table.drop_columns(["ref_logps"]), _cfg(), tmp_path)
    lp = table.column("ref_logps").to_pylist()
    lp[2] = lp[2] + [0.0]
    bad = table.set_column(
        table.column_names.index("ref_logps"), "ref_logps", pa.array(lp, pa.list_(pa.float32()))
    )
    with pytest.raises(DataError, match="row 2: ref_logps has"):
        Trainer(model, bad, _cfg(), tmp_path)
    with pytest.raises(DataError, match="file not found"):
        Trainer(model, tmp_path / "nope.parquet", _cfg(), tmp_path)
    with pytest.raises(ValueError, match="no trainable parameter"):
        Trainer(_load(tiny_path, "none"), table, _cfg(), tmp_path)


@pytest.mark.parametrize("mode", ["lora", "freeze"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_path, scored, tmp_path, mode):
    grads = []
    for gc in (False, True):
        model = _load(tiny_path, mode, gradient_checkpointing=gc)
        trainer = Trainer(model, scored, _cfg(), tmp_path)
        trainer.model.train()
        trainer.forward_backward(trainer.step_rows(0))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_paged_adamw_8bit_trains_and_resumes(tiny_path, scored, tmp_path):
    cfg = _cfg(optimizer="paged_adamw_8bit", learning_rate=1e-3, max_steps=1)
    Trainer(_load(tiny_path, "lora"), scored, cfg, tmp_path).train()
    cfg.max_steps = 2
    rows = Trainer(_load(tiny_path, "lora"), scored, cfg, tmp_path).train()
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


def _bf16_weight_copies_alive(trainer, model, force_cache: bool | None, monkeypatch) -> int:
    """bf16 casts of first-layer weights still alive when the last decoder layer starts (bf16 autocast on
    the CPU, gradient checkpointing): copies that something (the autocast cache) kept."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from o1pruner import train as train_mod
    from o1pruner.modeling import decoder_of

    layers = decoder_of(model).layers
    first = {id(p) for p in layers[0].parameters() if p.dim() == 2}
    casts: list = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and id(args[0]) in first:
                casts.append(weakref.ref(out))
            return out

    if force_cache is not None:
        real = torch.autocast
        monkeypatch.setattr(
            train_mod.torch, "autocast", lambda *a, **kw: real(*a, **{**kw, "cache_enabled": force_cache})
        )
    alive = []
    handle = layers[-1].register_forward_pre_hook(
        lambda *_: alive.append(sum(r() is not None for r in casts))
    )
    try:
        trainer.autocast_dtype = torch.bfloat16  # what a bf16 GPU run uses; CPU autocast does bf16 too
        trainer.model.train()
        with Casts():
            trainer.forward_backward(trainer.step_rows(0))
    finally:
        handle.remove()
        monkeypatch.undo()
    assert casts, "no bf16 cast of a first-layer weight was seen"
    return max(alive)


def test_autocast_keeps_no_weight_copies(tiny_path, scored, tmp_path, monkeypatch):
    """The autocast weight cache would hold a bf16 copy of every float32 trainable weight until the
    forward ends (2 bytes per parameter); the trainer runs autocast without it. The control run with the
    cache forced on shows that the measurement sees such copies."""
    model = _load(tiny_path, "full", gradient_checkpointing=True)
    trainer = Trainer(model, scored, _cfg(), tmp_path)
    assert _bf16_weight_copies_alive(trainer, model, None, monkeypatch) == 0
    trainer.optimizer.zero_grad(set_to_none=True)
    assert _bf16_weight_copies_alive(trainer, model, True, monkeypatch) > 0


def test_paged_optimizer_states_are_moved_off_the_gpu_and_forgotten(monkeypatch):
    """bitsandbytes never frees its paged (CUDA managed) states; after training they are prefetched to
    the host and dropped from its page manager, so a later vLLM engine finds the GPU memory. On the CPU
    bitsandbytes does not page, so the manager is given two stand-in tensors and its prefetch recorded."""
    import bitsandbytes  # noqa: F401  (the release looks for it among the loaded modules)
    from bitsandbytes.functional import GlobalPageManager

    from o1pruner.train import release_paged_optimizer_states

    manager = GlobalPageManager.get_instance()
    calls = []
    monkeypatch.setattr(manager, "paged_tensors", [torch.zeros(10), torch.zeros(3, 2, dtype=torch.float64)])
    monkeypatch.setattr(manager, "prefetch_all", lambda to_cpu=False: calls.append(to_cpu))
    assert release_paged_optimizer_states() == 10 * 4 + 6 * 8
    assert calls == [True] and manager.paged_tensors == []
    assert release_paged_optimizer_states() == 0 and calls == [True]


def test_checkpoint_weights_stream_one_tensor_at_a_time_with_save_file_bytes(tmp_path, monkeypatch):
    """The trainable weights go to disk one host copy at a time (``save_file`` would need them all on
    the host first), and the file is byte for byte what ``save_file`` writes: awkward dtypes, a 0-d, an
    empty and a transposed (strided) tensor included."""
    import weakref

    from safetensors.torch import load_file, save_file

    from o1pruner.checkpoint import stream_safetensors

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    tensors = {
        "layers.1.w": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "layers.0.w": torch.randn(7, generator=g),
        "half": torch.randn(2, 3, generator=g).half(),
        "ids": torch.arange(4),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.randn((), generator=g),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g).t(),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
    }
    copies: list = []
    alive: list[int] = []
    real_cpu = torch.Tensor.cpu

    def cpu(self, *a, **kw):  # every host copy is a new tensor here (they start on the CPU)
        alive.append(sum(r() is not None for r in copies))
        out = real_cpu(self, *a, **kw).clone()
        copies.append(weakref.ref(out))
        return out

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    stream_safetensors(tensors.items(), tmp_path / "streamed.safetensors")
    monkeypatch.undo()
    assert len(copies) == len(tensors) and max(alive) <= 1  # the previous copy at most, never all
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "dict.safetensors")
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "dict.safetensors").read_bytes()
    back = load_file(tmp_path / "streamed.safetensors")
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
