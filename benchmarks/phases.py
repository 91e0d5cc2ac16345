"""Where one call of the fused loss spends its time: GEMM1 (logits), the row pass, GEMM2 (d logp / d h).

One call runs under ``torch.profiler`` with input shapes recorded. Matrix products are told apart by
their shapes, which the chunked algorithm fixes whatever its internals: GEMM1 is ``(C, H) @ (H, V)``
(its first operand's last dimension is H), GEMM2 is ``(C, V) @ (V, H)`` (last dimension V). On CUDA the
row pass is the device time of the ``_logprob_rows_kernel`` launches and "other" the rest of the call
(the PPO op on N scalars, copies, launch gaps); on the CPU (torch backend) the row pass is everything
that is not a GEMM. Profiling adds overhead, so the phases are shares of a profiled call, not timings to
compare with the median of the unprofiled calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from benchmarks.common import synchronize

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
ROW_KERNEL = "_logprob_rows_kernel"
PHASES = ("gemm1_ms", "row_ms", "gemm2_ms", "other_ms")


def classify(op: str, input_shapes, hidden_size: int, vocab: int) -> str | None:
    """ "gemm1" / "gemm2" for a matrix product of the fused pass, None for anything else."""
    if op not in MATMUL_OPS or not input_shapes:
        return None
    # addmm's first input is the accumulator; the product's left operand follows it
    left = input_shapes[1] if op == "aten::addmm" and len(input_shapes) > 1 else input_shapes[0]
    if not left:
        return None
    if left[-1] == hidden_size:
        return "gemm1"
    if left[-1] == vocab:
        return "gemm2"
    return None


def phase_breakdown(fn: Callable[[], object], device: torch.device, hidden_size: int, vocab: int) -> dict:
    """{gemm1_ms, row_ms, gemm2_ms, other_ms} of one profiled call of ``fn`` (they add up to its time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        fn()
        synchronize(device)
        total_ms = (time.perf_counter() - start) * 1e3
    ms = {"gemm1": 0.0, "gemm2": 0.0, "row": 0.0}
    for ev in prof.key_averages(group_by_input_shape=True):
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        kind = classify(ev.key, ev.input_shapes, hidden_size, vocab)
        if kind:
            ms[kind] += us / 1e3
        elif cuda and ROW_KERNEL in ev.key:
            ms["row"] += us / 1e3
    rest = max(0.0, total_ms - ms["gemm1"] - ms["gemm2"] - ms["row"])
    if not cuda:
        ms["row"], rest = rest, 0.0
    return {"gemm1_ms": ms["gemm1"], "row_ms": ms["row"], "gemm2_ms": ms["gemm2"], "other_ms": rest}
