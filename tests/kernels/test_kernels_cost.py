"""Cost of the torch backend: matmul FLOPs (FlopCounterMode) and peak temporary memory (live tensor bytes).

FLOP budget (docs/design.md): forward-only log-probs 2*N*H*V; loss forward+backward with a frozen head
4*N*H*V at every importance level; with a trainable head 6*N*H*V at the token level (one fused pass) and
8*N*H*V at the sequence levels (the logits are recomputed for grad W). Memory: O(N*H + C*V), below the N x V
float32 logits a naive implementation materialises (several times).

The FLOP counts run on DEVICE (CUDA when there is one, where the Triton backend is counted too: its GEMMs
are torch ops, its row kernels do no matmul). The live-bytes meter runs on the CPU everywhere; on CUDA the
allocator's peak statistics check the same bound at realistic sizes.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from kernel_utils import DEVICE, requires_cuda, to_device
from o1pruner_kernels.reference import reference_logprobs
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from o1pruner.kernels import IMPORTANCE_LEVELS, linear_logprobs, linear_ppo_loss

B, T, H, V = 4, 16, 32, 257
NHV = B * T * H * V
# The Triton backend's FLOPs are counted on CUDA only: under the interpreter it would only add CPU time.
BACKENDS = ["torch", pytest.param("triton", marks=[pytest.mark.triton, requires_cuda])]


def _batch(trainable: bool, seed: int = 0):
    """Drawn on the CPU, returned on DEVICE (hidden and weight as leaves)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g).requires_grad_(trainable)
    labels = torch.randint(0, V, (B, T), generator=g)
    old = torch.randn(B, T, generator=g) - 6.0
    adv = torch.randn(B, 1, generator=g).expand(B, T)
    return tuple(to_device(x) for x in (hidden, weight, labels, old, adv))


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only_logprobs_costs_2nhv(backend):
    hidden, weight, labels, _, _ = _batch(False)
    flops = _flops(lambda: linear_logprobs(hidden.detach(), weight, labels, backend=backend, chunk_size=10))
    assert flops == 2 * NHV


def _loss_step_flops(trainable: bool, level: str, backend: str) -> int:
    """Matmul FLOPs of one linear_ppo_loss forward + backward."""
    hidden, weight, labels, old, adv = _batch(trainable)

    def step():
        out = linear_ppo_loss(
            hidden, weight, labels, old, adv, importance_level=level, backend=backend, chunk_size=10
        )
        out.loss.backward()

    return _flops(step)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", IMPORTANCE_LEVELS)
def test_frozen_head_loss_forward_backward_costs_4nhv(level, backend):
    flops = _loss_step_flops(False, level, backend)
    assert flops <= 4.1 * NHV, flops / NHV
    assert flops >= 3.9 * NHV  # the count sees the GEMMs at all


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_head_token_level_costs_6nhv(backend):
    flops = _loss_step_flops(True, "token", backend)
    assert 5.9 * NHV <= flops <= 6.1 * NHV, flops / NHV


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", [lv for lv in IMPORTANCE_LEVELS if lv != "token"])
def test_trainable_head_sequence_levels_cost_8nhv(level, backend):
    flops = _loss_step_flops(True, level, backend)
    assert 7.9 * NHV <= flops <= 8.1 * NHV, flops / NHV


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_tokens_are_not_computed(backend):
    hidden, weight, labels, _, _ = _batch(False)
    labels[:, T // 2 :] = -100
    flops = _flops(lambda: linear_logprobs(hidden.detach(), weight, labels, backend=backend, chunk_size=10))
    assert flops == NHV  # half the tokens, forward only


class _PeakLiveBytes(TorchDispatchMode):
    """Peak total bytes of the storages of tensors created inside the mode that are still referenced.

    Deterministic (no allocator statistics): each op's outputs are recorded by storage, with weak
    references to every tensor seen on that storage; a storage counts while any of them is alive.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[list, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if any(r() is not None for r in v[0])}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                refs, _ = self.live.setdefault(st.data_ptr(), ([], st.nbytes()))
                refs.append(weakref.ref(t))
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def _peak_bytes(fn) -> int:
    with _PeakLiveBytes() as meter:
        fn()
    return meter.peak


def test_peak_memory_stays_below_the_logits():
    """CPU tensors on every machine: the meter sees the storages of CPU ops only."""
    g = torch.Generator().manual_seed(1)
    n, h, v, chunk = 512, 16, 2000, 32
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    old = torch.randn(n, generator=g) - 7.0
    adv = torch.ones(n)
    logits_bytes = n * v * 4  # one float32 N x V tensor: 4 MB

    def fused():
        out = linear_ppo_loss(hidden, weight, labels, old, adv, backend="torch", chunk_size=chunk)
        out.loss.backward()

    def naive():
        lp = reference_logprobs(hidden.float(), weight, labels)
        (-(lp - old).exp() * adv).mean().backward()

    fused_peak = _peak_bytes(fused)
    naive_peak = _peak_bytes(naive)
    # The meter sees the naive path's logits (and their float64 copies) ...
    assert naive_peak > 2 * logits_bytes
    # ... while the fused path holds O(N*H + C*V): D and grad_h (2*N*H*4 = 64 KB) plus a few C x V tiles.
    assert fused_peak < logits_bytes / 4, (fused_peak, logits_bytes)
    assert fused_peak < 2 * n * h * 4 + 6 * chunk * v * 4 + 64 * 1024, fused_peak
    hidden.grad = None


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_cuda_peak_memory_stays_below_the_logits(backend):
    """Allocator statistics at realistic sizes: 4096 tokens, H=256, V=32000, bf16, frozen head, C=128."""
    g = torch.Generator().manual_seed(2)
    n, h, v, chunk = 4096, 256, 32000, 128
    hidden = to_device(torch.randn(n, h, generator=g).bfloat16().requires_grad_())
    weight = to_device((torch.randn(v, h, generator=g) * 0.1).bfloat16())
    labels = to_device(torch.randint(0, v, (n,), generator=g))
    old = to_device(torch.randn(n, generator=g) - 10.0)
    adv = torch.ones(n, device=DEVICE)
    logits_bytes = n * v * 4  # one float32 N x V tensor: 524 MB

    def step():
        out = linear_ppo_loss(hidden, weight, labels, old, adv, backend=backend, chunk_size=chunk)
        out.loss.backward()
        hidden.grad = None

    step()  # warm-up: compiles the kernels and allocates the cuBLAS workspace outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # O(N*H + C*V): D, grad_h (N*H*2 = 2 MB each) and a few C x V tiles (8 MB in bf16, 16 MB in float32).
    assert chunk * v * 2 <= extra < logits_bytes / 4, (extra, logits_bytes)
