"""``logits_dtype="input"``: the logits tile rounded to the input dtype, against float64 references.

The float64 reference rounds the float64 logits to the input dtype (straight-through gradient). Our GEMM
accumulates in float32 before rounding, so a logit within ~1e-7 of a rounding boundary may round the other
way: the checks bound the median error tightly and the maximum by one rounding step of a logit, and check
that the exact (float32-logits) reference is *farther* away than the rounded one, so the mode does round.
Outputs are poisoned with NaN; row blocks of 3 rows and chunks of 5 tokens make every chunk span several
row blocks, the last one partial; V=203 spans 4 Triton blocks of 64.
"""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch
from kernel_utils import cpu64, nan_empty, rel_err, to_device
from o1pruner_kernels.reference import reference_entropy, reference_logprobs, reference_ppo_loss
from torch.utils.flop_counter import FlopCounterMode

from o1pruner.kernels import LinearLogprobs, LinearPPOLoss, linear_logprobs, linear_ppo_loss

lp_mod = importlib.import_module("o1pruner_kernels.linear_logprobs")
fused_mod = importlib.import_module("o1pruner_kernels.ppo_token_fused")
ppo_mod = importlib.import_module("o1pruner_kernels.ppo_loss")

H, V = 16, 203
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison_small_blocks(monkeypatch):
    for mod in (lp_mod, fused_mod, ppo_mod):
        monkeypatch.setattr(mod, "_empty", nan_empty)
    monkeypatch.setattr(lp_mod, "ROW_BLOCK", 3)
    monkeypatch.setenv("O1PRUNER_KERNEL_BLOCK_V", "64")
    monkeypatch.delenv("O1PRUNER_KERNEL_CHUNK_TOKENS", raising=False)


def _inputs(key, dtype, shape=(3, 11), trainable=False):
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    hidden = (torch.randn(*shape, H, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_(trainable)
    labels = torch.randint(0, V, shape, generator=g)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: flat.numel() // 4]] = -100
    flat[0] = V - 1
    return to_device(hidden), to_device(weight), to_device(labels)


def _step(dtype) -> float:
    """One rounding step of the largest logits in these inputs (|z| < 64): 2**(6 - mantissa bits)."""
    return 2.0 ** (6 - (7 if dtype == torch.bfloat16 else 10))


def _check_rounded(out, ref_rounded, ref_exact, dtype):
    out = out.detach().cpu().double()
    err = (out - ref_rounded.detach()).abs()
    err_exact = (out - ref_exact.detach()).abs()
    assert torch.isfinite(out).all()
    assert err.median() <= 1e-5, float(err.median())
    assert err.max() <= _step(dtype), float(err.max())
    assert err_exact.mean() > 10 * err.mean(), (float(err_exact.mean()), float(err.mean()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("trainable", [False, True])
def test_linear_logprobs_rounds_the_logits(backend, dtype, trainable):
    hidden, weight, labels = _inputs(("lp", backend, dtype, trainable), dtype, trainable=trainable)
    out, ent = linear_logprobs(
        hidden, weight, labels, backend=backend, chunk_size=5, logits_dtype="input", return_entropy=True,
        temperature=0.7,
    )  # fmt: skip
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3))
    (out * g.to(out.device)).sum().backward()
    h64, w64 = cpu64(hidden, True), cpu64(weight, trainable)
    y = labels.cpu()
    ref = reference_logprobs(h64, w64, y, temperature=0.7, round_to=dtype)
    (ref * g.double()).sum().backward()
    exact = reference_logprobs(h64.detach(), w64.detach(), y, temperature=0.7)
    _check_rounded(out, ref, exact, dtype)
    assert torch.all(out[labels == -100] == 0.0) and torch.all(ent[labels == -100] == 0.0)
    ent_ref = reference_entropy(h64.detach(), w64.detach(), y, temperature=0.7, round_to=dtype)
    assert (ent.cpu().double() - ent_ref).abs().max() <= _step(dtype)
    assert rel_err(hidden.grad, h64.grad) <= 2e-2
    assert torch.all(hidden.grad[labels == -100] == 0)
    if trainable:
        assert weight.grad.dtype == dtype and rel_err(weight.grad, w64.grad) <= 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence_geomean"])
def test_ppo_loss_rounds_the_logits(backend, level):
    dtype = torch.bfloat16
    hidden, weight, labels = _inputs(("ppo", backend, level), dtype, trainable=True)
    g = torch.Generator().manual_seed(5)
    h64, w64, y = cpu64(hidden, True), cpu64(weight, True), labels.cpu()
    base = reference_logprobs(h64.detach(), w64.detach(), y, round_to=dtype)
    old = (base + 0.05 * torch.randn(labels.shape, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(labels.shape[0], 1, generator=g).expand(labels.shape).contiguous()
    kw = dict(importance_level=level, clip_low=0.2, clip_high=0.2)
    out = linear_ppo_loss(
        hidden, weight, labels, old.to(hidden.device), adv.to(hidden.device), backend=backend,
        chunk_size=5, logits_dtype="input", **kw,
    )  # fmt: skip
    out.loss.backward()
    ref = reference_ppo_loss(h64, w64, y, old.double(), adv.double(), round_to=dtype, **kw)
    ref["loss"].backward()
    loss, ref_loss = float(out.loss.detach()), float(ref["loss"].detach())
    assert abs(loss - ref_loss) <= 1e-3 * max(1.0, abs(ref_loss))
    assert rel_err(hidden.grad, h64.grad) <= 3e-2
    assert rel_err(weight.grad, w64.grad) <= 3e-2


def test_float32_inputs_ignore_the_option():
    hidden, weight, labels = _inputs("fp32", torch.float32, trainable=True)
    a = linear_logprobs(hidden, weight, labels, chunk_size=5)
    b = linear_logprobs(hidden, weight, labels, chunk_size=5, logits_dtype="input")
    assert torch.equal(a, b)


def test_same_flops_as_the_exact_path():
    hidden, weight, labels = _inputs("flops", torch.bfloat16)

    def flops(mode):
        h = hidden.detach().requires_grad_()
        with FlopCounterMode(display=False) as counter:
            linear_logprobs(h, weight, labels, chunk_size=5, logits_dtype=mode).sum().backward()
        return counter.get_total_flops()

    n_valid = int((labels != -100).sum())
    assert flops("input") == flops("float32") == 4 * n_valid * H * V


def test_modules_take_the_option_and_reject_bad_values():
    hidden, weight, labels = _inputs("mod", torch.bfloat16)
    m = LinearLogprobs(logits_dtype="input", chunk_size=4)
    direct = linear_logprobs(hidden, weight, labels, logits_dtype="input", chunk_size=4)
    assert torch.equal(m(hidden, weight, labels), direct)
    assert LinearPPOLoss(logits_dtype="input").logits_dtype == "input"
    for bad in ("bf16", None, "float64"):
        with pytest.raises(ValueError, match="logits_dtype"):
            linear_logprobs(hidden, weight, labels, logits_dtype=bad)
        with pytest.raises(ValueError, match="logits_dtype"):
            LinearPPOLoss(logits_dtype=bad)
