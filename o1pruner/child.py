"""Run one function in a fresh child process, so whatever it allocates (a vLLM engine, its CUDA context,
its KV cache) is returned to the system for certain when it ends.

The child is started with ``spawn`` (never ``fork``: a forked CUDA context is unusable), runs
``fn(*args, **kwargs)`` and sends back either nothing or the text of its exception. Its work must be
written to files (the generation stages append to resumable logs), not returned. A child that dies
without a word (killed, out of host memory, a native crash) is reported with its exit code.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any


class ChildFailed(RuntimeError):
    """The function failed in its child process; the message carries the child's traceback."""


def _child_main(conn, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        fn(*args, **kwargs)
    except BaseException as exc:  # everything, KeyboardInterrupt included, is reported to the parent
        conn.send(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        conn.close()
        raise SystemExit(1) from None
    conn.send(None)
    conn.close()


def run_in_child(desc: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
    """Run ``fn(*args, **kwargs)`` in a spawned process and wait for it; ``fn`` and the arguments must be
    picklable (a module-level function, dataclasses, paths, a tokenizer).

    Raises :class:`ChildFailed` naming ``desc`` when the function raises or the process dies; a
    KeyboardInterrupt in the parent terminates the child first.
    """
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, fn, args, kwargs), name=f"o1pruner-{desc}")
    proc.start()
    send.close()
    message: str | None = None
    try:
        try:
            message = recv.recv()
        except EOFError:  # the child ended without reporting
            message = None
        proc.join()
    except BaseException:
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        raise
    finally:
        recv.close()
    if message is not None:
        raise ChildFailed(f"{desc} failed in its child process: {message}")
    if proc.exitcode != 0:
        raise ChildFailed(
            f"{desc}: its child process ended with exit code {proc.exitcode} (killed, out of memory, or a "
            "native crash); rerun to resume from what it wrote"
        )
