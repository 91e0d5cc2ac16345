"""linear_ppo_loss (torch and Triton backends) against the float64 per-sequence reference.

Inputs are awkward on purpose: V=203 with BLOCK_V=64, chunks of 5 tokens so sequences span chunks, a
one-token sequence, an all-ignored sequence, scattered ignored tokens. Output buffers of both kernels
are poisoned with NaN (autouse fixture). Inputs are drawn on the CPU and run on DEVICE (CUDA when there is
one, where realistic shapes are added); the float64 references always run on the CPU.
"""

from __future__ import annotations

import importlib
import itertools
import zlib

import pytest
import torch
from kernel_utils import DEVICE, cpu64, nan_empty, rel_err, requires_cuda, to_device
from o1pruner_kernels.reference import reference_logprobs, reference_ppo_loss

from o1pruner.kernels import IMPORTANCE_LEVELS, REDUCTIONS, PPOLossOutput, linear_ppo_loss

lp_mod = importlib.import_module("o1pruner_kernels.linear_logprobs")
ppo_mod = importlib.import_module("o1pruner_kernels.ppo_loss")

H, V, B, T = 16, 203, 5, 9
TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (3e-2, 6e-2), torch.float16: (3e-2, 6e-2)}


@pytest.fixture(autouse=True)
def _poison_and_small_blocks(monkeypatch):
    monkeypatch.setattr(lp_mod, "_empty", nan_empty)
    monkeypatch.setattr(ppo_mod, "_empty", nan_empty)
    monkeypatch.setenv("O1PRUNER_KERNEL_BLOCK_V", "64")
    monkeypatch.delenv("O1PRUNER_KERNEL_CHUNK_TOKENS", raising=False)


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


# Log-ratios are drawn at least ~0.1 away from the clip boundaries log(0.8) and log(1.2), so bf16 rounding
# (~1e-2 on a log-prob) cannot flip a clip decision, which would change the gradient discontinuously.
_LOG_RATIOS = torch.tensor([-0.6, -0.1, 0.0, 0.08, 0.5])


def _inputs(
    seed: int,
    dtype,
    trainable: bool,
    temperature: float,
    level: str = "token",
    size=(B, T, H, V),
    w_scale=0.4,
):
    """Padded (B, T, H) batch with awkward masks; old log-probs chosen so that some ratios are clipped.

    Drawn on the CPU (``size`` = (B >= 5, T >= 8, H, V)); returned on DEVICE, hidden and weight as leaves.
    """
    B, T, H, V = size
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * w_scale).to(dtype).requires_grad_(trainable)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 7:] = -100  # right padding
    labels[1, 1:] = -100  # a one-token sequence
    labels[2, :] = -100  # a sequence with no valid token
    labels[3, 4] = -100  # a hole in the middle
    labels[4, 0] = V - 1
    valid = labels != -100
    cur = reference_logprobs(hidden.detach(), weight.detach(), labels, temperature=temperature).float()
    pick = lambda *shape: _LOG_RATIOS[torch.randint(0, len(_LOG_RATIOS), shape, generator=g)]
    if level == "token":
        d = pick(B, T) + 0.02 * (torch.rand(B, T, generator=g) - 0.5)
    else:
        n = valid.sum(1, keepdim=True).clamp(min=1)
        jitter = 0.02 * torch.randn(B, T, generator=g) * valid
        jitter = (jitter - jitter.sum(1, keepdim=True) / n) * valid  # sums to 0 over a sequence
        target = pick(B, 1)
        d = (target / n if level == "sequence" else target) + jitter
    old = cur - d
    old[~valid] = float("nan")  # must never be read
    adv = torch.randn(B, 1, generator=g).expand(B, T).clone()
    adv[4] = 0.0  # A = 0: no loss, no gradient
    adv[~valid] = float("nan")  # advantages at ignored tokens are ignored too
    return tuple(to_device(x) for x in (hidden, weight, labels, old, adv))


def _run_and_compare(
    backend,
    level,
    reduction,
    dtype,
    temperature,
    trainable,
    seed,
    size=(B, T, H, V),
    w_scale=0.4,
    chunk_size=5,
):
    hidden, weight, labels, old, adv = _inputs(seed, dtype, trainable, temperature, level, size, w_scale)
    out = linear_ppo_loss(
        hidden, weight, labels, old, adv, importance_level=level, reduction=reduction,
        temperature=temperature, backend=backend, chunk_size=chunk_size,
    )  # fmt: skip
    assert isinstance(out, PPOLossOutput)
    for x in (out.loss, out.clip_fraction, out.mean_ratio):
        assert x.dtype == torch.float32 and x.shape == () and x.device == hidden.device
    assert (
        out.logps.dtype == torch.float32 and out.logps.shape == labels.shape and not out.logps.requires_grad
    )
    assert not out.clip_fraction.requires_grad and not out.mean_ratio.requires_grad
    out.loss.backward()

    h64, w64 = cpu64(hidden, True), cpu64(weight, trainable)
    ref = reference_ppo_loss(
        h64, w64, labels.cpu(), old.cpu(), adv.cpu(), importance_level=level, reduction=reduction,
        temperature=temperature,
    )  # fmt: skip
    ref["loss"].backward()
    tol_loss, tol_grad = TOL[dtype]
    ref_loss = float(ref["loss"].detach())
    # Relative to the size of one loss term (~|A|): the mean can be near 0 by cancellation.
    scale = max(abs(ref_loss), float(adv[labels != -100].abs().mean()))
    assert abs(float(out.loss.detach()) - ref_loss) <= tol_loss * scale, (float(out.loss.detach()), ref_loss)
    torch.testing.assert_close(out.logps.cpu().double(), ref["logps"].detach(), rtol=0, atol=tol_loss)
    assert torch.all(out.logps[labels == -100] == 0.0)
    assert abs(float(out.clip_fraction) - float(ref["clip_fraction"])) <= 1e-6
    assert abs(float(out.mean_ratio) - float(ref["mean_ratio"])) <= tol_loss * float(ref["mean_ratio"])
    assert hidden.grad.device == hidden.device and torch.isfinite(hidden.grad).all()
    assert rel_err(hidden.grad, h64.grad) <= tol_grad
    assert torch.all(hidden.grad[labels == -100] == 0)
    if trainable:
        assert rel_err(weight.grad, w64.grad) <= tol_grad
    return out


_TORCH_GRID = list(
    itertools.product(
        IMPORTANCE_LEVELS, REDUCTIONS, [torch.float32, torch.bfloat16], [1.0, 0.7], [False, True]
    )
) + [(lvl, "sequence_mean", torch.float16, 1.0, True) for lvl in IMPORTANCE_LEVELS]

# Every level x reduction x dtype at least once on Triton, temperatures and trainable heads mixed in.
_TRITON_GRID = [
    ("token", "sequence_mean", torch.float32, 1.0, False),
    ("token", "token_mean", torch.float32, 0.7, True),
    ("token", "sequence_mean", torch.bfloat16, 0.7, True),
    ("token", "token_mean", torch.bfloat16, 1.0, False),
    ("sequence", "sequence_mean", torch.float32, 0.7, False),
    ("sequence", "token_mean", torch.float32, 1.0, True),
    ("sequence", "sequence_mean", torch.bfloat16, 1.0, True),
    ("sequence", "token_mean", torch.bfloat16, 0.7, False),
    ("sequence_geomean", "sequence_mean", torch.float32, 1.0, True),
    ("sequence_geomean", "token_mean", torch.float32, 0.7, False),
    ("sequence_geomean", "sequence_mean", torch.bfloat16, 0.7, False),
    ("sequence_geomean", "token_mean", torch.bfloat16, 1.0, True),
    ("token", "sequence_mean", torch.float16, 1.0, True),
    ("sequence_geomean", "sequence_mean", torch.float16, 0.7, False),
]


@pytest.mark.parametrize(("level", "reduction", "dtype", "temperature", "trainable"), _TORCH_GRID)
def test_torch_backend_matches_reference(level, reduction, dtype, temperature, trainable):
    _run_and_compare(
        "torch",
        level,
        reduction,
        dtype,
        temperature,
        trainable,
        _seed(level, reduction, dtype, temperature, trainable),
    )


@pytest.mark.triton
@pytest.mark.parametrize(("level", "reduction", "dtype", "temperature", "trainable"), _TRITON_GRID)
def test_triton_backend_matches_reference(level, reduction, dtype, temperature, trainable):
    seed = _seed(level, reduction, dtype, temperature, trainable, "triton")
    _run_and_compare("triton", level, reduction, dtype, temperature, trainable, seed)


# The "sequence" level runs in float32: its log-ratio sums ~125 per-token log-probs, and the rounding of bf16
# logits (~5e-3 per token) moves that sum by ~0.07 against the float64 reference, i.e. the ratio by ~7% and
# the loss by up to ~2.5% of |A| (measured on the CPU), too close to the bf16 tolerance of 3%.
_CUDA_GRID = [
    ("token", "token_mean", torch.bfloat16, 1.0, True),
    ("sequence_geomean", "sequence_mean", torch.bfloat16, 1.0, False),
    ("sequence", "sequence_mean", torch.float32, 0.7, True),
]


@pytest.mark.triton
@requires_cuda
@pytest.mark.parametrize(("level", "reduction", "dtype", "temperature", "trainable"), _CUDA_GRID)
def test_triton_realistic_shapes_on_cuda(level, reduction, dtype, temperature, trainable, monkeypatch):
    """8 x 125 tokens, H=256, V=32011 (not a multiple of any block), chunks of 256, the default BLOCK_V."""
    monkeypatch.delenv(lp_mod.BLOCK_V_ENV)
    seed = _seed(level, reduction, dtype, temperature, trainable, "cuda")
    # weight scale 0.1: logits with a std of ~1.6, as a language model's, not the tiny tests' ~6
    _run_and_compare(
        "triton", level, reduction, dtype, temperature, trainable, seed, size=(8, 125, 256, 32011),
        w_scale=0.1, chunk_size=256,
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("level", IMPORTANCE_LEVELS)
def test_packed_with_shuffled_ids_equals_padded(backend, level):
    hidden, weight, labels, old, adv = _inputs(_seed("packed", level), torch.float32, True, 1.0, level)
    kw = {"importance_level": level, "reduction": "sequence_mean", "backend": backend, "chunk_size": 4}
    padded = linear_ppo_loss(hidden, weight, labels, old, adv, **kw)
    padded.loss.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(B * T, generator=g).to(DEVICE)  # tokens of one sequence end up scattered
    ids = torch.tensor([17, 3, 42, 0, 9])[torch.arange(B).repeat_interleave(T)].to(DEVICE)
    h2 = hidden.detach().reshape(B * T, H)[perm].requires_grad_()
    packed = linear_ppo_loss(
        h2, weight, labels.reshape(-1)[perm], old.reshape(-1)[perm], adv.reshape(-1)[perm],
        seq_ids=ids[perm], **kw,
    )  # fmt: skip
    packed.loss.backward()
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(packed.clip_fraction, padded.clip_fraction)
    torch.testing.assert_close(packed.mean_ratio, padded.mean_ratio)
    torch.testing.assert_close(packed.logps, padded.logps.reshape(-1)[perm])
    torch.testing.assert_close(h2.grad, gh.reshape(B * T, H)[perm], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, gw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("level", IMPORTANCE_LEVELS)
def test_extreme_log_ratios_are_finite(backend, level):
    """|log-ratio| up to 50 (per token, or per sequence at the "sequence" level): finite, and as reference."""
    hidden, weight, labels, _, _ = _inputs(_seed("extreme", level), torch.float32, False, 1.0)
    labels_cpu = labels.cpu()
    cur = reference_logprobs(hidden.detach().cpu(), weight.cpu(), labels_cpu).float()
    n_valid = (labels_cpu != -100).sum(1, keepdim=True).clamp(min=1)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]).unsqueeze(1)
    per_tok = 50.0 / n_valid if level == "sequence" else torch.full((B, 1), 50.0)
    old_cpu = cur - sign * per_tok  # d = +-50 (or the sum is +-50)
    old = old_cpu.to(DEVICE)
    for adv_row in ([2.0, -1.5, 0.0, 1.0, 0.0], [-2.0, 1.5, 1.0, -1.0, -0.5], [0.0] * 5):
        adv_cpu = torch.tensor(adv_row).unsqueeze(1).expand(B, T).contiguous()
        adv = adv_cpu.to(DEVICE)
        h = hidden.detach().requires_grad_()
        out = linear_ppo_loss(
            h, weight, labels, old, adv, importance_level=level, backend=backend, chunk_size=7
        )
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all()
        assert torch.isfinite(out.mean_ratio) and torch.isfinite(out.clip_fraction)
        h64 = cpu64(hidden, True)
        ref = reference_ppo_loss(h64, cpu64(weight), labels_cpu, old_cpu, adv_cpu, importance_level=level)
        assert abs(out.loss.item() - ref["loss"].item()) <= 1e-4 * max(abs(ref["loss"].item()), 1.0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_no_valid_token_gives_zero_loss(backend):
    hidden, weight, labels, old, adv = _inputs(5, torch.float32, False, 1.0)
    labels.fill_(-100)
    for level in IMPORTANCE_LEVELS:
        h = hidden.detach().requires_grad_()
        out = linear_ppo_loss(h, weight, labels, old, adv, importance_level=level, backend=backend)
        out.loss.backward()
        assert out.loss.item() == 0.0 and float(out.clip_fraction) == 0.0
        assert torch.equal(h.grad, torch.zeros_like(h))


def test_two_dim_hidden_without_seq_ids_is_one_sequence():
    hidden, weight, labels, old, adv = _inputs(6, torch.float32, False, 1.0)
    adv = torch.full((B, T), 0.7, device=DEVICE)
    a = linear_ppo_loss(hidden.reshape(B * T, H), weight, labels.reshape(-1), old.reshape(-1), adv.reshape(-1),
                        importance_level="sequence_geomean", backend="torch")  # fmt: skip
    b = linear_ppo_loss(hidden, weight, labels, old, adv, importance_level="sequence_geomean", backend="torch",
                        seq_ids=torch.zeros(B, T, dtype=torch.long, device=DEVICE))  # fmt: skip
    torch.testing.assert_close(a.loss, b.loss)


def test_errors_name_the_argument():
    hidden, weight, labels, old, adv = _inputs(7, torch.float32, False, 1.0)
    call = lambda **kw: linear_ppo_loss(hidden, weight, labels, old, kw.pop("adv", adv), **kw)
    with pytest.raises(ValueError, match="importance_level"):
        call(importance_level="tokens")
    with pytest.raises(ValueError, match="reduction"):
        call(reduction="mean")
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda")
    with pytest.raises(ValueError, match="clip_low"):
        call(clip_low=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0)
    with pytest.raises(ValueError, match="advantages shape"):
        call(adv=adv[:, :-1])
    with pytest.raises(ValueError, match="old_logps shape"):
        linear_ppo_loss(hidden, weight, labels, old[:, :-1], adv)
    with pytest.raises(ValueError, match="seq_ids shape"):
        call(seq_ids=torch.zeros(B, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="seq_ids must be non-negative"):
        call(seq_ids=torch.full((B, T), -1, device=DEVICE))
    with pytest.raises(ValueError, match="seq_ids must be an integer"):
        call(seq_ids=torch.zeros(B, T, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        linear_ppo_loss(hidden, weight[:, :3], labels, old, adv)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_advantage_must_be_constant_per_sequence_at_sequence_levels(backend):
    hidden, weight, labels, old, adv = _inputs(8, torch.float32, False, 1.0)
    varying = adv.clone()
    varying[0, 3] += 0.5  # a valid token of sequence 0
    for level in ("sequence", "sequence_geomean"):
        with pytest.raises(ValueError, match=r"advantages must be .*constant"):
            linear_ppo_loss(hidden, weight, labels, old, varying, importance_level=level, backend=backend)
    linear_ppo_loss(hidden, weight, labels, old, varying, importance_level="token", backend=backend)
    # Different values at ignored tokens (here NaN) are fine.
    assert torch.isnan(adv[labels == -100]).all()
    linear_ppo_loss(hidden, weight, labels, old, adv, importance_level="sequence", backend=backend)


def test_clip_fraction_and_ratio_on_a_hand_made_case():
    """One frozen token per sequence with known log-ratios: r = e^0.5 (A>0 clipped), e^-0.5 (A<0 clipped),
    e^0.1 (A>0 not clipped); loss = -(1.2*1 + 0.8*(-1) + e^0.1*2)/3 at every level."""
    hidden = torch.zeros(3, 1, H, device=DEVICE, requires_grad=True)
    weight = torch.zeros(V, H, device=DEVICE)
    labels = torch.zeros(3, 1, dtype=torch.long, device=DEVICE)
    logp = -torch.log(torch.tensor(float(V)))
    old = (logp - torch.tensor([0.5, -0.5, 0.1])).reshape(3, 1).to(DEVICE)
    adv = torch.tensor([1.0, -1.0, 2.0]).reshape(3, 1).to(DEVICE)
    expect = -(1.2 - 0.8 + 2 * torch.exp(torch.tensor(0.1))) / 3
    for level in IMPORTANCE_LEVELS:
        out = linear_ppo_loss(hidden, weight, labels, old, adv, importance_level=level, backend="torch")
        torch.testing.assert_close(out.loss.detach().cpu(), expect)
        torch.testing.assert_close(out.clip_fraction.cpu(), torch.tensor(2 / 3))
        expect_ratio = torch.exp(torch.tensor([0.5, -0.5, 0.1])).mean()
        torch.testing.assert_close(out.mean_ratio.cpu(), expect_ratio)
