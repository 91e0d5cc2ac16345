"""linear_logprobs (torch and Triton backends) against a float64 reference with materialised logits.

Every test runs with the kernels' uninitialised output buffers poisoned with NaN (autouse fixture), so an
element a kernel forgets to write shows up as a mismatch. Triton runs under TRITON_INTERPRET=1 on a CPU
(set by conftest.py), with BLOCK_V=64 so that V=203 spans 4 blocks, the last one partial. On a CUDA
machine the same inputs (drawn on the CPU) run on the GPU, compiled, and realistic shapes are added; the
float64 references always run on the CPU.
"""

from __future__ import annotations

import importlib
import itertools
import zlib

import pytest
import torch
from kernel_utils import DEVICE, cpu64, nan_empty, rel_err, requires_cuda, to_device
from o1pruner_kernels import _common, linear_logprobs
from o1pruner_kernels.reference import reference_logprobs

# The package re-exports the function under the module's name; fetch the module itself.
lp_mod = importlib.import_module("o1pruner_kernels.linear_logprobs")

H, V = 16, 203
TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (3e-2, 6e-2), torch.float16: (3e-2, 6e-2)}


@pytest.fixture(autouse=True)
def _poison_and_small_blocks(monkeypatch):
    monkeypatch.setattr(lp_mod, "_empty", nan_empty)
    monkeypatch.setenv("O1PRUNER_KERNEL_BLOCK_V", "64")
    monkeypatch.delenv("O1PRUNER_KERNEL_CHUNK_TOKENS", raising=False)


def _inputs(seed: int, dtype, shape=(3, 13), trainable=False, h=H, v=V, w_scale=0.4):
    """Leaves hidden (*shape, h) and weight (v, h) and labels on DEVICE; values drawn on the CPU."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * w_scale).to(dtype).requires_grad_(trainable)
    labels = torch.randint(0, v, shape, generator=g)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: flat.numel() // 4]] = -100
    flat[0] = v - 1  # the last vocabulary entry, inside the partial block
    return to_device(hidden), to_device(weight), to_device(labels)


def _check(hidden, weight, labels, backend, temperature, chunk_size, dtype):
    out = linear_logprobs(
        hidden, weight, labels, temperature=temperature, backend=backend, chunk_size=chunk_size
    )
    assert out.dtype == torch.float32 and out.shape == labels.shape and out.device == hidden.device
    assert torch.all(out[labels == -100] == 0.0)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(7))
    (out * g.to(out.device)).sum().backward()
    h64 = cpu64(hidden, True)
    w64 = cpu64(weight, weight.requires_grad)
    ref = reference_logprobs(h64, w64, labels.cpu(), temperature=temperature)
    (ref * g.double()).sum().backward()
    tol_val, tol_grad = TOL[dtype]
    assert torch.isfinite(out).all()
    err = (out.detach().cpu().double() - ref.detach()).abs().max().item()
    assert err <= tol_val * max(1.0, ref.detach().abs().max().item()), err
    assert hidden.grad.dtype == hidden.dtype and hidden.grad.device == hidden.device
    assert torch.isfinite(hidden.grad).all()
    assert rel_err(hidden.grad, h64.grad) <= tol_grad
    assert torch.all(hidden.grad[labels == -100] == 0)
    if weight.requires_grad:
        assert weight.grad.dtype == weight.dtype and weight.grad.device == weight.device
        assert rel_err(weight.grad, w64.grad) <= tol_grad


_TORCH_GRID = list(
    itertools.product(
        [torch.float32, torch.bfloat16, torch.float16], [1.0, 0.7], [False, True], [(3, 13), (29,)]
    )
)
_TRITON_GRID = [
    (torch.float32, 1.0, False, (3, 13)),
    (torch.float32, 0.7, True, (29,)),
    (torch.bfloat16, 0.7, False, (29,)),
    (torch.bfloat16, 1.0, True, (3, 13)),
    (torch.float16, 1.0, True, (29,)),
]


@pytest.mark.parametrize(("dtype", "temperature", "trainable", "shape"), _TORCH_GRID)
def test_torch_backend_matches_reference(dtype, temperature, trainable, shape):
    seed = zlib.crc32(repr((dtype, temperature, trainable, shape)).encode())
    hidden, weight, labels = _inputs(seed, dtype, shape, trainable)
    _check(hidden, weight, labels, "torch", temperature, 5, dtype)


@pytest.mark.triton
@pytest.mark.parametrize(("dtype", "temperature", "trainable", "shape"), _TRITON_GRID)
def test_triton_backend_matches_reference(dtype, temperature, trainable, shape):
    seed = zlib.crc32(repr((dtype, temperature, trainable, shape, "triton")).encode())
    hidden, weight, labels = _inputs(seed, dtype, shape, trainable)
    _check(hidden, weight, labels, "triton", temperature, 5, dtype)


@pytest.mark.triton
@requires_cuda
@pytest.mark.parametrize(("trainable", "temperature"), [(False, 1.0), (True, 0.7)])
def test_triton_realistic_shapes_on_cuda(trainable, temperature, monkeypatch):
    """bf16, H=256, V=32011 (no multiple of a block), 1011 tokens (759 valid: 3 chunks), default BLOCK_V."""
    monkeypatch.delenv(lp_mod.BLOCK_V_ENV)
    # weight scale 0.1: logits with a std of ~1.6, as a language model's, not the tiny tests' ~6
    hidden, weight, labels = _inputs(21, torch.bfloat16, (3, 337), trainable, h=256, v=32011, w_scale=0.1)
    _check(hidden, weight, labels, "triton", temperature, 256, torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_forward_only_and_chunking_agree(backend, monkeypatch):
    hidden, weight, labels = _inputs(3, torch.float32, (2, 11))
    ref = reference_logprobs(hidden.detach().cpu(), weight.detach().cpu(), labels.cpu())
    with torch.no_grad():
        a = linear_logprobs(hidden, weight, labels, backend=backend, chunk_size=1)
    b = linear_logprobs(hidden.detach(), weight, labels, backend=backend, chunk_size=1000)
    monkeypatch.setenv("O1PRUNER_KERNEL_CHUNK_TOKENS", "4")
    c = linear_logprobs(hidden.detach(), weight, labels, backend=backend)
    for x in (a, b, c):
        assert not x.requires_grad
        assert x.device == hidden.device
        torch.testing.assert_close(x.cpu().double(), ref, rtol=0, atol=2e-5)


def test_all_ignored_and_empty_inputs():
    hidden, weight, labels = _inputs(5, torch.float32, (2, 4))
    labels.fill_(-100)
    out = linear_logprobs(hidden, weight, labels, backend="torch")
    assert torch.equal(out, torch.zeros(2, 4, device=DEVICE))
    out.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    empty = linear_logprobs(
        torch.zeros(0, H, device=DEVICE),
        weight,
        torch.zeros(0, dtype=torch.long, device=DEVICE),
        backend="torch",
    )
    assert empty.shape == (0,) and empty.device == hidden.device


def test_custom_ignore_index_and_int32_labels():
    hidden, weight, labels = _inputs(6, torch.float32, (17,))
    labels[labels == -100] = 0
    ref = reference_logprobs(hidden.detach().cpu(), weight.cpu(), labels.cpu(), ignore_index=0)
    out = linear_logprobs(hidden, weight, labels.int(), ignore_index=0, backend="torch")
    torch.testing.assert_close(out.detach().cpu().double(), ref, rtol=0, atol=2e-5)
    assert torch.all(out[labels == 0] == 0.0)


def test_auto_backend_on_cpu_is_torch():
    assert _common.resolve_backend("auto", torch.device("cpu")) == "torch"


@requires_cuda
def test_auto_backend_on_cuda_is_triton():
    assert _common.resolve_backend("auto", DEVICE) == "triton"


@requires_cuda
def test_inputs_on_two_devices_are_a_clear_error():
    hidden, weight, labels = _inputs(12, torch.float32, (5,))
    with pytest.raises(ValueError, match="one device"):
        linear_logprobs(hidden, weight.cpu(), labels)
    with pytest.raises(ValueError, match="one device"):
        linear_logprobs(hidden, weight, labels.cpu())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "cuda"}, "backend"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    hidden, weight, labels = _inputs(8, torch.float32, (5,))
    with pytest.raises(ValueError, match=match):
        linear_logprobs(hidden, weight, labels, **kwargs)


def test_bad_shapes_and_labels():
    hidden, weight, labels = _inputs(9, torch.float32, (2, 5))
    with pytest.raises(ValueError, match="weight"):
        linear_logprobs(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="labels shape"):
        linear_logprobs(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="labels must be an integer"):
        linear_logprobs(hidden, weight, labels.float())
    bad = labels.clone()
    bad[1, 2] = V
    with pytest.raises(ValueError, match="labels must be in"):
        linear_logprobs(hidden, weight, bad)


def test_triton_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_common, "triton_interpreted", lambda: False)
    hidden, weight, labels = (x.cpu() for x in _inputs(10, torch.float32, (5,)))  # CPU tensors on any machine
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        linear_logprobs(hidden, weight, labels, backend="triton")


def test_bad_chunk_env(monkeypatch):
    monkeypatch.setenv("O1PRUNER_KERNEL_CHUNK_TOKENS", "many")
    hidden, weight, labels = _inputs(11, torch.float32, (5,))
    with pytest.raises(ValueError, match="O1PRUNER_KERNEL_CHUNK_TOKENS"):
        linear_logprobs(hidden, weight, labels)


def test_poison_fixture_is_active():
    assert lp_mod._empty is nan_empty
