"""Triton helpers: whether this package's kernels were defined under the interpreter."""

from __future__ import annotations

import triton


@triton.jit
def _probe_kernel(x_ptr):  # never launched; its type tells how `triton.jit` was configured at import
    pass


def kernels_are_interpreted() -> bool:
    """True when ``triton.jit`` produced interpreter functions (TRITON_INTERPRET=1 at import time)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe_kernel, InterpretedFunction)
