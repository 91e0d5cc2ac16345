"""Shared helpers of the kernels package: constants, backend selection, chunk sizing, argument checks."""

from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton is optional: the torch backend works without it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

IGNORE_INDEX = -100  # label value of tokens without a loss (padding, prompt), as in Hugging Face
BACKENDS = ("auto", "torch", "triton")
CHUNK_ENV = "O1PRUNER_KERNEL_CHUNK_TOKENS"
BLOCK_V_ENV = "O1PRUNER_KERNEL_BLOCK_V"
# Bytes of one float32 C x V logits tile. On a GPU the budget bounds memory; on a CPU the chunk is sized
# for arithmetic intensity instead (the GEMMs re-read the V x H weight once per chunk, so C tokens give
# C/2 FLOPs per weight byte in fp32) and the budget only caps it.
_GPU_TILE_BYTES = 256 * 2**20
_CPU_TILE_BYTES = 160 * 2**20
_CPU_CHUNK_TOKENS = 256
# logits_dtype="input": the C x V logits tile is in the input dtype and the row pass upcasts it to float32
# ROW_BLOCK rows at a time, so the float32 working memory is ROW_BLOCK x V instead of C x V.
ROW_BLOCK = 64
LOGITS_DTYPES = ("float32", "input")


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
    """Tokens per chunk C: a C x V float32 tile near 256 MiB on a GPU; on a CPU 256 tokens (the weight is
    re-read N/256 times; measured on a 2-core AVX-512 CPU at V=152k, GEMMs of 256 rows run 1.1-1.7x faster
    per token than of 128 and as fast as of 512), capped by a 160 MiB tile. Independent of N beyond N
    itself (memory flat in N).

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
    else:
        c = max(16, min(c, _CPU_CHUNK_TOKENS))
    return max(1, min(c, max(1, num_tokens)))


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for CUDA tensors (Triton launches on the current device and stream),
    a no-op elsewhere."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_logits_dtype(logits_dtype: str) -> bool:
    """Whether the logits tile is rounded to the input dtype (``logits_dtype="input"``); ValueError for a
    value outside ``LOGITS_DTYPES``."""
    if logits_dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got logits_dtype={logits_dtype!r}")
    return logits_dtype == "input"


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0.0 and t < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got temperature={temperature!r}")
    return t
