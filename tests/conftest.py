"""Test-wide setup: Triton runs through its interpreter on machines without CUDA.

The variable must be set before triton is imported (``triton.jit`` reads it when a kernel is defined).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Real problem files (MATH, GSM8K, ... as .jsonl), if a data folder is at hand: $O1PRUNER_TEST_DATA, else a
# data folder beside the repository.
SHARED_DATA = Path(
    os.environ.get("O1PRUNER_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real problem files of the data folder; tests that need them skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA
