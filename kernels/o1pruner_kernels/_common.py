"""Shared helpers of the kernels package: backend selection, chunk sizing, argument checks."""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: the torch backend works without it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

BACKENDS = ("auto", "torch", "triton")
CHUNK_ENV = "O1PRUNER_KERNEL_CHUNK_TOKENS"
# Bytes of one C x V logits tile (plus its fp32 working copy on the torch backend).
_GPU_TILE_BYTES = 256 * 2**20
_CPU_TILE_BYTES = 16 * 2**20


def triton_interpreted() -> bool:
    """True when Triton kernels defined in this package run through the interpreter."""
    if not HAS_TRITON:
        return False
    from .triton_utils import kernels_are_interpreted

    return kernels_are_interpreted()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` ("auto" | "torch" | "triton") to "torch" or "triton" for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    if backend == "auto":
        return "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the `triton` package, which is not installed")
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device={device}); on a CPU it runs only "
                "under TRITON_INTERPRET=1 set before o1pruner_kernels is imported"
            )
    return backend


def chunk_tokens(num_tokens: int, vocab: int, device: torch.device, chunk_size: int | None = None) -> int:
    """Tokens per chunk C so that a C x V float32 tile stays near 256 MiB (GPU) / 16 MiB (CPU).

    ``chunk_size`` (keyword) or the environment variable O1PRUNER_KERNEL_CHUNK_TOKENS override it.
    """
    if chunk_size is None:
        env = os.environ.get(CHUNK_ENV)
        if env:
            try:
                chunk_size = int(env)
            except ValueError:
                raise ValueError(f"{CHUNK_ENV} must be a positive integer, got {env!r}") from None
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got chunk_size={chunk_size}")
        return int(chunk_size)
    budget = _GPU_TILE_BYTES if device.type == "cuda" else _CPU_TILE_BYTES
    c = max(1, budget // (4 * max(1, vocab)))
    if device.type == "cuda":
        c = max(16, (c // 16) * 16)  # GEMM-friendly multiple of 16
    return max(1, min(c, max(1, num_tokens)))


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0.0 and t < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got temperature={temperature!r}")
    return t
