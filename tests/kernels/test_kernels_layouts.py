"""Every public entry point gives the values and gradients of contiguous copies for any input layout.

Each case builds one argument as a view (transposed, sliced with a step, expanded with stride 0) of a
leaf drawn fresh, runs the public function on the view and on ``view.contiguous()``, and compares the
outputs and the gradients of the leaves. The Triton backend runs under the interpreter (BLOCK_V=16, so
V=37 spans three blocks), with output buffers poisoned with NaN.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_utils import nan_empty, to_device

from o1pruner.kernels import linear_logprobs, linear_ppo_loss

lp_mod = importlib.import_module("o1pruner_kernels.linear_logprobs")
rows_mod = importlib.import_module("o1pruner_kernels.logit_rows")
fused_mod = importlib.import_module("o1pruner_kernels.ppo_token_fused")
ppo_mod = importlib.import_module("o1pruner_kernels.ppo_loss")

B, T, H, V = 3, 5, 8, 37
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]

# name -> (leaf shape, view of the leaf with the argument's shape)
HIDDEN_LAYOUTS = {
    "transposed": ((T, B, H), lambda x: x.transpose(0, 1)),
    "step": ((B, 2 * T, H), lambda x: x[:, ::2]),
    "last_dim_step": ((B, T, 2 * H), lambda x: x[..., ::2]),
    "expanded": ((1, T, H), lambda x: x.expand(B, T, H)),
}
WEIGHT_LAYOUTS = {
    "transposed": ((H, V), lambda x: x.t()),
    "step": ((2 * V, H), lambda x: x[::2]),
    "expanded": ((V, 1), lambda x: x.expand(V, H)),
}
TOKEN_LAYOUTS = {  # labels, old_logps, advantages (B, T)
    "transposed": ((T, B), lambda x: x.t()),
    "step": ((B, 2 * T), lambda x: x[:, ::2]),
    "expanded": ((1, T), lambda x: x.expand(B, T)),
}


@pytest.fixture(autouse=True)
def _poison_and_small_blocks(monkeypatch):
    for mod in (lp_mod, rows_mod, fused_mod, ppo_mod):
        monkeypatch.setattr(mod, "_empty", nan_empty)
    monkeypatch.setenv("O1PRUNER_KERNEL_BLOCK_V", "16")
    monkeypatch.delenv("O1PRUNER_KERNEL_CHUNK_TOKENS", raising=False)


def _leaf(g, shape, kind: str):
    if kind == "hidden":
        return to_device(torch.randn(*shape, generator=g).requires_grad_())
    if kind == "weight":
        return to_device((torch.randn(*shape, generator=g) * 0.5).requires_grad_())
    if kind == "labels":
        y = torch.randint(0, V, shape, generator=g)
        y.view(-1)[:: max(1, y.numel() // 3)] = -100
        return to_device(y)
    if kind == "old":
        return to_device(torch.randn(*shape, generator=g) * 0.3 - 3.5)
    return to_device(torch.randn(*shape, generator=g))  # advantages


def _args(seed: int, arg: str, layout):
    """(leaves, inputs as views, inputs as contiguous copies) of one random batch."""
    g = torch.Generator().manual_seed(seed)
    default = {"hidden": (B, T, H), "weight": (V, H), "labels": (B, T), "old": (B, T), "adv": (B, T)}
    leaves, views = {}, {}
    for name, shape in default.items():
        if name == arg:
            leaf_shape, view = layout
            leaves[name] = _leaf(g, leaf_shape, name)
            views[name] = view(leaves[name])
        else:
            leaves[name] = _leaf(g, shape, name)
            views[name] = leaves[name]
    assert views[arg].shape == torch.Size(default[arg])
    return leaves, views


def _run(views, contiguous: bool, backend: str, level: str, leaves):
    x = {k: (v.contiguous() if contiguous else v) for k, v in views.items()}
    out = linear_ppo_loss(
        x["hidden"], x["weight"], x["labels"], x["old"], x["adv"], importance_level=level,
        backend=backend, chunk_size=4, return_entropy=True,
    )  # fmt: skip
    lp, ent = linear_logprobs(
        x["hidden"].detach(), x["weight"].detach(), x["labels"], backend=backend, return_entropy=True
    )
    for leaf in leaves.values():
        leaf.grad = None
    out.loss.backward()
    grads = {k: leaf.grad.clone() for k, leaf in leaves.items() if leaf.requires_grad}
    return (out.loss.detach(), out.logps, out.entropy, lp, ent), grads


CASES = (
    [("hidden", k, v) for k, v in HIDDEN_LAYOUTS.items()]
    + [("weight", k, v) for k, v in WEIGHT_LAYOUTS.items()]
    + [(a, k, v) for a in ("labels", "old") for k, v in TOKEN_LAYOUTS.items()]
    + [("adv", "step", TOKEN_LAYOUTS["step"]), ("adv", "transposed", TOKEN_LAYOUTS["transposed"])]
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence_geomean"])
@pytest.mark.parametrize(("arg", "name", "layout"), CASES, ids=[f"{a}-{n}" for a, n, _ in CASES])
def test_layout_matches_contiguous_copy(arg, name, layout, level, backend):
    seed = 1000 + 17 * CASES.index((arg, name, layout)) + len(level)
    leaves, views = _args(seed, arg, layout)
    if level != "token":  # the sequence levels need one advantage per row
        views["adv"] = views["adv"][:, :1].expand(B, T)
    assert not views[arg].is_contiguous()
    got, got_g = _run(views, False, backend, level, leaves)
    ref, ref_g = _run(views, True, backend, level, leaves)
    for a, b in zip(got, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert set(got_g) == {"hidden", "weight"}
    for k in got_g:
        torch.testing.assert_close(got_g[k], ref_g[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_layouts_of_labels_and_seq_ids(backend):
    """1-D labels ``y[::2]`` and ``y[:1].expand(n)``, and strided/expanded ``seq_ids``, on packed rows."""
    g = torch.Generator().manual_seed(5)
    n = 11
    hidden = to_device(torch.randn(n, H, generator=g).requires_grad_())
    weight = to_device(torch.randn(V, H, generator=g) * 0.5)
    y_big = to_device(torch.randint(0, V, (2 * n,), generator=g))
    sid_big = to_device(torch.randint(0, 3, (2 * n,), generator=g))
    old = to_device(torch.randn(n, generator=g) - 3.0)
    adv = to_device(torch.randn(n, generator=g))
    for labels in (y_big[::2], y_big[:1].expand(n)):
        for sid in (sid_big[::2], sid_big[:1].expand(n), None):
            outs = []
            for y, s in ((labels, sid), (labels.contiguous(), None if sid is None else sid.contiguous())):
                hidden.grad = None
                out = linear_ppo_loss(hidden, weight, y, old, adv, seq_ids=s, backend=backend, chunk_size=3)
                out.loss.backward()
                outs.append((out.loss.detach(), out.logps, hidden.grad.clone()))
            for a, b in zip(*outs, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_on_the_second_gpu_runs_there(backend):
    """A model split over GPUs: the kernels launch on cuda:1 while cuda:0 is the current device."""
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    old, adv = torch.full((B, T), -3.5), torch.randn(B, 1, generator=g).expand(B, T)
    dev = torch.device("cuda:1")
    h1 = hidden.to(dev).requires_grad_()
    with torch.cuda.device(0):
        out = linear_ppo_loss(h1, weight.to(dev), labels.to(dev), old.to(dev), adv.to(dev), backend=backend)
        out.loss.backward()
    h0 = hidden.clone().requires_grad_()
    ref = linear_ppo_loss(h0, weight, labels, old, adv, backend="torch")
    ref.loss.backward()
    assert out.loss.device == dev
    torch.testing.assert_close(out.loss.detach().cpu(), ref.loss.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h1.grad.cpu(), h0.grad, rtol=1e-3, atol=1e-5)
