"""Entropy from the row pass and float32 exactness of the log-probs, against float64 references.

Entropy: ``linear_logprobs(..., return_entropy=True)`` and ``PPOLossOutput.entropy`` on every path (no
gradient, frozen head, trainable head at the token level (fused pass) and at a sequence level), both
backends, chunks that split sequences, buffers poisoned with NaN. Exactness: float32 inputs at realistic
logit scales (label logit ~20, H=256) give log-probs within 1e-5 of float64 on the CPU path.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_utils import ON_CUDA, cpu64, nan_empty, requires_cuda, to_device
from o1pruner_kernels.reference import reference_entropy, reference_logprobs

from o1pruner.kernels import linear_logprobs, linear_ppo_loss

MODULES = [
    importlib.import_module(f"o1pruner_kernels.{m}")
    for m in ("linear_logprobs", "logit_rows", "ppo_token_fused", "ppo_loss")
]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.fixture(autouse=True)
def _poison_and_small_blocks(monkeypatch):
    for mod in MODULES:
        monkeypatch.setattr(mod, "_empty", nan_empty)
    monkeypatch.setenv("O1PRUNER_KERNEL_BLOCK_V", "32")


def _batch(seed: int, b=3, t=7, h=12, v=71, dtype=torch.float32, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100
    labels[2, -1] = -100
    old = torch.randn(b, t, generator=g) * 0.2 - 4.0
    adv = torch.randn(b, 1, generator=g).expand(b, t)
    return [to_device(x) for x in (hidden, weight, labels, old, adv)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_entropy_matches_float64(backend, temperature):
    hidden, weight, labels, _, _ = _batch(11 + int(temperature * 10))
    lp, ent = linear_logprobs(
        hidden, weight, labels, temperature=temperature, backend=backend, chunk_size=5, return_entropy=True
    )
    ref = reference_entropy(cpu64(hidden), cpu64(weight), labels.cpu(), temperature=temperature)
    assert ent.dtype == torch.float32 and ent.shape == labels.shape and not ent.requires_grad
    assert torch.all(ent[labels == -100] == 0.0)
    assert (ent.cpu().double() - ref).abs().max() <= 1e-4
    assert ref[labels.cpu() != -100].mean() > 0.5  # a real, non-degenerate entropy was compared
    lp_only = linear_logprobs(hidden, weight, labels, temperature=temperature, backend=backend, chunk_size=5)
    torch.testing.assert_close(lp, lp_only, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("level", "trainable", "grad"),
    [("token", True, True), ("token", False, True), ("sequence", True, True), ("token", True, False)],
)
def test_ppo_entropy_on_every_path(backend, level, trainable, grad):
    hidden, weight, labels, old, adv = _batch(23 + len(level) + 2 * trainable + grad)
    weight.requires_grad_(trainable)
    with torch.set_grad_enabled(grad):
        out = linear_ppo_loss(
            hidden, weight, labels, old, adv, importance_level=level, backend=backend, chunk_size=4,
            return_entropy=True,
        )  # fmt: skip
    ref = reference_entropy(cpu64(hidden), cpu64(weight), labels.cpu())
    assert out.entropy.shape == labels.shape and not out.entropy.requires_grad
    assert torch.all(out.entropy[labels == -100] == 0.0)
    assert (out.entropy.cpu().double() - ref).abs().max() <= 1e-4
    plain = linear_ppo_loss(hidden, weight, labels, old, adv, importance_level=level, backend=backend)
    assert plain.entropy is None
    torch.testing.assert_close(plain.loss.detach(), out.loss.detach(), rtol=1e-5, atol=1e-7)


def _realistic(seed: int, n=48, h=256, v=2048, dtype=torch.float32):
    """Logits with std ~6 and the label logit ~20 (a confident model)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (6.0 / h**0.5)
    labels = torch.randint(0, v, (n,), generator=g)
    weight[labels] += hidden * (20.0 / h)  # pushes z[label] up by ~20
    return hidden.to(dtype), weight.to(dtype), labels


def test_float32_logprobs_are_exact_to_1e5_on_the_cpu():
    hidden, weight, labels = _realistic(3)
    ref = reference_logprobs(hidden.double(), weight.double(), labels)
    z_label = (hidden.double() * weight.double()[labels]).sum(1)
    assert z_label.mean() > 15  # the regime where bf16-rounded logits are off by ~0.03 nats
    for chunk in (7, 48):
        lp = linear_logprobs(hidden, weight, labels, backend="torch", chunk_size=chunk)
        assert (lp.double() - ref).abs().max() <= 1e-5


@pytest.mark.triton
def test_float32_logprobs_are_exact_on_the_triton_backend():
    hidden, weight, labels = _realistic(4, n=12, v=300)
    ref = reference_logprobs(hidden.double(), weight.double(), labels)
    lp = linear_logprobs(to_device(hidden), to_device(weight), to_device(labels), backend="triton")
    assert (lp.cpu().double() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_scoring_and_training_logprobs_agree_exactly(backend):
    """The ratio is exactly 1 at step 0: no-grad scoring and the training forward share the arithmetic."""
    hidden, weight, labels, _, adv = _batch(31, dtype=torch.bfloat16 if ON_CUDA else torch.float32)
    with torch.no_grad():
        old = linear_logprobs(hidden, weight, labels, backend=backend, chunk_size=4)
    weight.requires_grad_()
    out = linear_ppo_loss(hidden, weight, labels, old, adv, backend=backend, chunk_size=4)
    torch.testing.assert_close(out.logps, old, rtol=0, atol=0)
    assert float(out.clip_fraction) == 0.0 and abs(float(out.mean_ratio) - 1.0) < 1e-6


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_inputs_use_a_float32_tile(backend, dtype):
    """bf16/fp16 inputs: the log-probs of the given (rounded) values match float64 far better than
    bf16-rounded logits could (those err by ~0.03 nats median at this scale)."""
    hidden, weight, labels = _realistic(6, n=512, h=1024, v=32000, dtype=dtype)
    ref = reference_logprobs(hidden.double(), weight.double(), labels)
    lp = linear_logprobs(to_device(hidden), to_device(weight), to_device(labels), backend=backend)
    err = (lp.cpu().double() - ref).abs()
    assert float(err.max()) <= 2e-3, float(err.max())
    assert float(err.median()) <= 2e-4, float(err.median())
