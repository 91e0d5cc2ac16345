"""Shared helpers of the benchmark scripts: environment description, timing, memory and CSV rows."""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1024.0**2
GIB = 1024.0**3
# Timed calls at least, per measurement: enough that p20 and p80 are two different samples.
MIN_REPS = 5


def apply_quick_defaults(args, parser, **quick) -> None:
    """``--quick``: every option named in ``quick`` that is still at its default takes the tiny CPU value."""
    defaults = parser.parse_args([])
    for name, value in quick.items():
        if getattr(args, name) == getattr(defaults, name):
            setattr(args, name, value)


def package_version(name: str) -> str:
    """Installed version of a distribution, or "" when it is absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def environment(device: torch.device) -> dict[str, str]:
    """Columns that say where and with what a row was measured."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.machine()}, {os.cpu_count()} threads, torch uses {torch.get_num_threads()})"
    return {
        "device": device.type,
        "device_name": name,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "bitsandbytes": package_version("bitsandbytes"),
        "liger": package_version("liger-kernel"),
    }


def load_average() -> str:
    """The 1-minute load average over the CPU count ("1.93/2"): how shared the machine was."""
    try:
        return f"{os.getloadavg()[0]:.2f}/{os.cpu_count()}"
    except OSError:
        return ""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


class CsvLog:
    """Appends rows to a CSV file, one flushed and fsynced write per row.

    Rows are appended as they are measured (not written atomically at the end) so that a run killed by
    its time limit keeps everything it measured. A file whose header differs from ``columns`` is an error,
    so that two versions of a script never mix their columns in one file.
    """

    def __init__(self, path: str | Path, columns: Sequence[str]):
        self.path = Path(path)
        self.columns = list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if header != self.columns:
                raise SystemExit(
                    f"{self.path}: its header {header} differs from this script's columns {self.columns}; "
                    "write to a new file with --out"
                )
        else:
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)

    def write(self, row: dict) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"CSV row has columns {sorted(unknown)} that {self.path} does not have")
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(
                {k: _fmt(row.get(k, "")) for k in self.columns}
            )
            f.flush()
            os.fsync(f.fileno())


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.10g}"
    return str(value)


def free_memory(device: torch.device) -> None:
    """Drops cached blocks so the next measurement starts from what is really allocated (CUDA only)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error (also when a library re-raised it as a RuntimeError)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_cpu_peak() -> int | None:
    """Resets the process's peak resident set (Linux ``clear_refs``); returns the resident KiB, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmRSS")
    except (OSError, KeyError):
        return None


def measure_peak(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Runs ``fn`` once; returns (peak bytes above what was in use before, seconds).

    CUDA: the caching allocator's peak of allocated bytes. CPU (Linux): the peak resident set (VmHWM,
    reset just before the call) minus the resident set before it, so one provider per process gives
    comparable numbers; NaN where /proc offers no reset.
    """
    free_memory(device)
    rss_before = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        gc.collect()
        rss_before = _reset_cpu_peak()
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type != "cuda":
        if rss_before is None:
            return float("nan"), seconds
        return float((_proc_status_kib("VmHWM") - rss_before) * 1024), seconds
    return float(torch.cuda.max_memory_allocated(device) - before), seconds


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    min_reps: int = MIN_REPS,
) -> tuple[float, float, float, int]:
    """(median, p20, p80) milliseconds per call and the number of timed calls.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls) over at least ``min_reps``
    calls: do_bench times ``rep_ms / estimate`` calls, so its budget is raised to ``min_reps`` times one
    call's time (a one-sample median of a 500 ms call says nothing about its spread). CPU: wall clock after
    one warm-up call, at least ``min_reps`` calls and about ``rep_ms`` in all.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        start = time.perf_counter()
        fn()
        synchronize(device)
        one_ms = (time.perf_counter() - start) * 1e3
        rep = max(rep_ms, min_reps * one_ms * 1.2)
        warmup = min(warmup_ms, 2 * one_ms)
        reps = max(1, int(rep / max(one_ms, 1e-3)))
        med, p20, p80 = do_bench(
            fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none or []), quantiles=[0.5, 0.2, 0.8]
        )
        return float(med), float(p20), float(p80), reps
    fn()
    times: list[float] = []
    total = 0.0
    while len(times) < min_reps or (total < rep_ms / 1e3 and len(times) < 1000):
        for t in grad_to_none or []:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        total += times[-1]
    times_ms = sorted(t * 1e3 for t in times)
    return statistics.median(times_ms), _quantile(times_ms, 0.2), _quantile(times_ms, 0.8), len(times)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """Measured dense matmul rate (TFLOP/s) of ``size``^3 products in ``dtype``: the roofline of the run.

    CUDA default: 8192 (bf16 products of that size run at the chip's sustained tensor-core rate); CPU: 512.
    Random data (zeros run faster on some chips).
    """
    size = size or (8192 if device.type == "cuda" else 512)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    med, _, _, _ = time_fn(lambda: torch.matmul(a, b), device, warmup_ms=50, rep_ms=200)
    return 2.0 * size**3 / (med * 1e-3) / 1e12
