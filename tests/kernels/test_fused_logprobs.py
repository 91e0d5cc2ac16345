"""The fused scoring kernel (GEMM + online logsumexp epilogue, split over V) against float64.

On a CPU the kernel runs under TRITON_INTERPRET=1 (conftest.py) with small tiles so that awkward sizes
(V=203 and H=45, multiples of no block) span several tiles with partial ones at the edges; outputs are
poisoned with NaN so an unwritten element shows. On CUDA the default tiles and realistic shapes are added.
"""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch
from kernel_utils import DEVICE, ON_CUDA, nan_empty, requires_cuda, to_device
from o1pruner_kernels import linear_logprobs
from o1pruner_kernels.fused_logprobs import FusedLogprobConfig, fused_logprobs, num_splits
from o1pruner_kernels.reference import reference_logprobs

fused_mod = importlib.import_module("o1pruner_kernels.fused_logprobs")
lp_mod = importlib.import_module("o1pruner_kernels.linear_logprobs")

pytestmark = pytest.mark.triton

H, V = 45, 203
SMALL = FusedLogprobConfig(block_n=16, block_v=32, block_k=16, num_warps=4, num_stages=2)
CONFIG = None if ON_CUDA else SMALL  # the interpreter is too slow for the default 128 x 128 tiles
# Max |error| against float64 of the same (rounded) inputs: the products are exact in float32 and the
# accumulation is float32 whatever the input dtype, so bf16/fp16 inputs get float32-level errors too.
ATOL = 2e-5


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(fused_mod, "_empty", nan_empty)


def _inputs(seed: int, dtype, n: int, h: int = H, v: int = V, w_scale: float = 0.4, strided: bool = False):
    """hidden (n, h), weight (v, h), labels (n,) on DEVICE (values drawn on the CPU); a quarter ignored."""
    g = torch.Generator().manual_seed(seed)
    if strided:  # column-major hidden and a weight view with a padded row stride
        hidden = torch.randn(h, n, generator=g).to(dtype).t()
        weight = (torch.randn(v, h + 7, generator=g) * w_scale).to(dtype)[:, 3 : 3 + h]
    else:
        hidden = torch.randn(n, h, generator=g).to(dtype)
        weight = (torch.randn(v, h, generator=g) * w_scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[: n // 4]] = -100
    labels[0] = v - 1  # the last vocabulary entry, in the partial last tile
    return to_device(hidden), to_device(weight), to_device(labels)


def _reference(hidden, weight, labels, temperature):
    return reference_logprobs(
        hidden.cpu().double(), weight.cpu().double(), labels.cpu(), temperature=temperature
    )


@pytest.mark.parametrize(
    ("dtype", "n", "temperature", "splits", "strided"),
    [
        (torch.float32, 37, 1.0, 1, False),
        (torch.float32, 37, 0.7, 3, True),
        (torch.float32, 1, 1.0, 7, False),
        (torch.bfloat16, 37, 0.7, 2, False),
        (torch.bfloat16, 16, 1.0, 1, True),
        (torch.float16, 29, 1.3, 4, False),
    ],
)
def test_matches_float64(dtype, n, temperature, splits, strided):
    seed = zlib.crc32(repr((dtype, n, temperature, splits, strided)).encode())
    hidden, weight, labels = _inputs(seed, dtype, n, strided=strided)
    assert hidden.is_contiguous() != strided
    out = fused_logprobs(hidden, weight, labels, 1.0 / temperature, -100, splits=splits, config=CONFIG)
    assert out.dtype == torch.float32 and out.shape == (n,) and out.device == hidden.device
    assert torch.isfinite(out).all()
    assert torch.all(out[labels == -100] == 0.0)
    ref = _reference(hidden, weight, labels, temperature)
    err = (out.cpu().double() - ref).abs().max().item()
    assert err <= ATOL, err


def test_splits_partition_the_vocabulary_exactly():
    """Every split count, up to one tile per split and beyond, gives the same log-probs."""
    hidden, weight, labels = _inputs(4, torch.float32, 20)
    ref = _reference(hidden, weight, labels, 1.0)
    tiles = -(-V // SMALL.block_v)
    for splits in (1, 2, tiles - 1, tiles, tiles + 5):
        out = fused_logprobs(hidden, weight, labels, 1.0, -100, splits=splits, config=SMALL)
        assert (out.cpu().double() - ref).abs().max().item() <= ATOL, splits


def test_custom_ignore_index_all_ignored_and_empty():
    hidden, weight, labels = _inputs(5, torch.float32, 9)
    labels[labels == -100] = 3
    out = fused_logprobs(hidden, weight, labels, 1.0, 3, splits=2, config=CONFIG)
    ref = reference_logprobs(hidden.cpu().double(), weight.cpu().double(), labels.cpu(), ignore_index=3)
    assert torch.all(out[labels == 3] == 0.0)
    assert (out.cpu().double() - ref).abs().max().item() <= ATOL
    labels.fill_(-100)
    assert torch.equal(
        fused_logprobs(hidden, weight, labels, 1.0, -100, config=CONFIG), torch.zeros_like(out)
    )
    empty = fused_logprobs(hidden[:0], weight, labels[:0], 1.0, -100, config=CONFIG)
    assert empty.shape == (0,)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_agrees_with_the_training_path(temperature):
    """Scoring and training log-probs of the same fp32 inputs: the step-0 ratio exp(d) is 1 within 5e-6 (float32 rounding of logp ~ 6: measured <= 2e-6)."""
    hidden, weight, labels = _inputs(6, torch.float32, 40, w_scale=0.2)
    scored = fused_logprobs(hidden, weight, labels, 1.0 / temperature, -100, splits=3, config=CONFIG)
    trained = linear_logprobs(
        hidden.clone().requires_grad_(),
        weight,
        labels,
        temperature=temperature,
        backend="torch",
        chunk_size=7,
    )
    ratio = torch.exp(trained.detach() - scored)
    assert (ratio - 1.0).abs().max().item() <= 5e-6


def test_large_logits_stay_finite():
    """Logits of magnitude ~1e3 (sharp distributions): the online max keeps exp in range."""
    hidden, weight, labels = _inputs(7, torch.float32, 12, w_scale=150.0)
    out = fused_logprobs(hidden, weight, labels, 1.0, -100, splits=3, config=CONFIG)
    ref = _reference(hidden, weight, labels, 1.0)
    assert torch.isfinite(out).all()
    assert (out.cpu().double() - ref).abs().max().item() <= 1e-6 * ref.abs().max().item() + ATOL


def test_bad_inputs_are_clear_errors():
    hidden, weight, labels = _inputs(8, torch.float32, 5)
    with pytest.raises(ValueError, match="share a dtype"):
        fused_logprobs(hidden, weight.double(), labels, 1.0, -100)
    with pytest.raises(ValueError, match=r"\(V, H\)"):
        fused_logprobs(hidden, weight[:, :-1], labels, 1.0, -100)


def test_split_count_off_cuda_is_one():
    assert num_splits(4096, 151936, torch.device("cpu"), SMALL) == 1


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_realistic_shape_default_tiles_on_cuda(dtype):
    """H=256, V=32011 (no multiple of a tile), 1011 tokens; default tiles and split count."""
    hidden, weight, labels = _inputs(9, dtype, 1011, h=256, v=32011, w_scale=0.1)
    out = fused_logprobs(hidden, weight, labels, 1.0, -100)
    assert (out.cpu().double() - _reference(hidden, weight, labels, 1.0)).abs().max().item() <= 1e-4


@requires_cuda
def test_linear_logprobs_scores_through_the_fused_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(lp_mod, "fused_logprobs", lambda *a, **k: calls.append(1) or fused_logprobs(*a, **k))
    hidden, weight, labels = _inputs(10, torch.bfloat16, 64, h=64, v=1000)
    with torch.no_grad():
        out = linear_logprobs(hidden, weight, labels, backend="triton")
    assert calls == [1]
    assert (out.cpu().double() - _reference(hidden, weight, labels, 1.0)).abs().max().item() <= 1e-4
    assert DEVICE.type == "cuda"
