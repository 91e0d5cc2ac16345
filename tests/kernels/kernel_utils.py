"""Device handling shared by the kernel tests (tests/test_kernels_*.py).

Inputs are drawn on the CPU from seeded generators (so the values are the same on every machine) and then
moved to DEVICE: CUDA when there is one (where conftest.py does not set TRITON_INTERPRET, so the Triton
backend needs CUDA tensors), else the CPU (Triton through its interpreter). Float64 references always run
on the CPU, on the same values moved back with ``cpu64``.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"

# Realistic sizes (vocabulary ~32k, ~1000 tokens, H=256) are cheap compiled on a GPU but far too slow for
# the Triton interpreter on a shared CPU.
requires_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")


def to_device(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values on DEVICE; a tensor that requires grad comes back as a leaf that requires grad."""
    return t.detach().to(DEVICE).requires_grad_(t.requires_grad)


def cpu64(t: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    """A float64 CPU leaf holding ``t``'s values (for the float64 references)."""
    return t.detach().cpu().double().requires_grad_(requires_grad)


def nan_empty(*shape, dtype, device) -> torch.Tensor:
    """Replacement for the kernels' ``_empty`` seam: NaN (floats) or -2**30 (integers) on any device."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU (either tensor may live on any device)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))
