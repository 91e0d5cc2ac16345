"""Side-by-side loss forward+backward (frozen lm_head) of every provider, each in its own process.

One process per (head, dtype, provider) so that a provider's peak memory (CPU: peak resident set) and
its allocator or compile caches do not leak into another's numbers. The rows go to one CSV; a markdown
summary gives, per head and dtype, each provider's time and memory and ours' ratios against the naive
path and Liger-Kernel with the targets:

  ours time <= naive time,  ours time <= 0.8 x liger-grpo time,  ours extra memory <= 0.25 x naive's.

  python -m benchmarks.side_by_side                      # 1.5b at N=1024 and 7b at N=512, fp32 and bf16
  python -m benchmarks.side_by_side --cases 1.5b:1024 --dtypes fp32 --providers ours-torch,naive
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_kernels import HEADS, PROVIDERS, QUICK_HEADS, parse_choice
from benchmarks.common import MIN_REPS, RESULTS_DIR, load_average

DEFAULT_CASES = "1.5b:1024,7b:512"
DEFAULT_PROVIDERS = "ours-torch,ours-torch-rounded,naive,liger-grpo,cce"
TARGETS = {"naive_time": 1.0, "liger_time": 0.8, "naive_memory": 0.25}
ROOT = Path(__file__).resolve().parents[1]
ALL_HEADS = {**HEADS, **QUICK_HEADS}  # the tiny head (tests) runs bench_kernels in --quick mode


def parse_cases(text: str) -> list[tuple[str, int]]:
    """ "1.5b:1024,7b:512" -> [("1.5b", 1024), ("7b", 512)]."""
    cases = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        head, _, n = part.partition(":")
        if head not in ALL_HEADS or not n.isdigit() or int(n) < 1:
            raise SystemExit(
                f"--cases: {part!r} is not HEAD:N with HEAD in {list(ALL_HEADS)}, e.g. 1.5b:1024"
            )
        cases.append((head, int(n)))
    return cases


def run_provider(head: str, n: int, dtype: str, provider: str, out: Path, args) -> int:
    cmd = [
        sys.executable, "-m", "benchmarks.bench_kernels", "--device", args.device, "--heads", head,
        "--tokens", str(n), "--seq-len", str(min(args.seq_len, n)), "--dtype", dtype, "--providers", provider,
        "--modes", "loss-fwd-bwd", "--levels", args.level, "--min-reps", str(args.min_reps), "--rep-ms", "0",
        "--out", str(out),
    ] + (["--phases"] if provider.startswith("ours-") else []) + (["--quick"] if head in QUICK_HEADS else [])  # fmt: skip
    print(f"[side_by_side] {head} N={n} {dtype} {provider} (load {load_average()})", flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), timeout=args.timeout_s).returncode


def _num(row: dict | None, key: str) -> float:
    try:
        return float(row[key]) if row and row.get(key, "") != "" else float("nan")
    except ValueError:
        return float("nan")


def ratios(rows: list[dict], ours: str) -> dict[str, float]:
    """ours/naive time, ours/liger time, ours/naive extra memory (NaN where a row is missing)."""
    by = {r["provider"]: r for r in rows if r["status"] == "ok"}
    o, nv, lg = by.get(ours), by.get("naive"), by.get("liger-grpo")
    return {
        "naive_time": _ratio(_num(o, "median_ms"), _num(nv, "median_ms")),
        "liger_time": _ratio(_num(o, "median_ms"), _num(lg, "median_ms")),
        "naive_memory": _ratio(_num(o, "peak_extra_mib"), _num(nv, "peak_extra_mib")),
    }


def _ours_providers(group: list[dict], ours: str) -> list[str]:
    """``ours`` and every other ours-* provider measured in ``group`` (in row order)."""
    names = [r["provider"] for r in group if r["provider"].startswith("ours-") and r["status"] == "ok"]
    return list(dict.fromkeys([ours, *names]))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def summary(rows: list[dict], ours: str, command: str, loads: tuple[str, str]) -> str:
    """Markdown: per (head, dtype) a table of providers and ours' ratios against the targets."""
    first = rows[0] if rows else {}
    lines = [
        "# Side-by-side: PPO-clip loss forward + backward, frozen lm_head, one process per provider",
        "",
        f"- device: {first.get('device_name', '?')}; date {first.get('date', '?')}; torch {first.get('torch', '?')}, "
        f"triton {first.get('triton', '?')}, liger-kernel {first.get('liger') or '-'}, "
        f"cut-cross-entropy {first.get('cce') or '-'}",
        f"- machine load (1-min load average / CPUs) at the start and end: {loads[0]} and {loads[1]} "
        "(a shared machine: other work ran alongside)",
        f"- level {first.get('level', '?')}, reduction sequence_mean, 10% of each sequence's labels masked; "
        "peak = extra peak resident set (CPU) or allocated bytes (CUDA) of one call; cce runs its "
        "`torch_compile` implementation off CUDA (materialised logits), its Triton one on CUDA",
        f"- command: `{command}`",
        "",
    ]
    keys = sorted(
        {(r["head"], r["N"], r["dtype"]) for r in rows}, key=lambda k: (ALL_HEADS[k[0]], int(k[1]), k[2])
    )
    for head, n, dtype in keys:
        group = [r for r in rows if (r["head"], r["N"], r["dtype"]) == (head, n, dtype)]
        h, v = ALL_HEADS[head]
        lines += [f"## {head} head (H={h}, V={v}), N={n}, {dtype}", ""]
        lines += ["| provider | median ms | p20-p80 ms | reps | peak extra MiB | GEMM1/row/GEMM2/other ms |"]
        lines += ["|---|---:|---:|---:|---:|---|"]
        for r in group:
            if r["status"] != "ok":
                lines.append(f"| {r['provider']} | {r['status']} | {r.get('note', '')[:80]} | | | |")
                continue
            ph = "/".join(f"{_num(r, k):.0f}" for k in ("gemm1_ms", "row_ms", "gemm2_ms", "other_ms"))
            lines.append(
                f"| {r['provider']} | {_num(r, 'median_ms'):.0f} | {_num(r, 'p20_ms'):.0f}-{_num(r, 'p80_ms'):.0f} "
                f"| {r['reps']} | {_num(r, 'peak_extra_mib'):.0f} | {ph if r['gemm1_ms'] else '-'} |"
            )
        lines += ["", "| ratio | measured | target | met |", "|---|---:|---:|---|"]
        for name in _ours_providers(group, ours):
            rt = ratios(group, name)
            for key, label in (("naive_time", "time / naive"), ("liger_time", "time / liger-grpo"),
                               ("naive_memory", "extra memory / naive")):  # fmt: skip
                val = rt[key]
                met = "-" if val != val else ("yes" if val <= TARGETS[key] else "no")
                lines.append(f"| {name} {label} | {val:.2f} | <= {TARGETS[key]} | {met} |")
        lines.append("")
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summarize_csv(path: Path, args) -> int:
    """Rewrites ``path``'s markdown summary from its rows (the command recorded is the one that measured)."""
    if not path.is_file():
        print(f"side_by_side: --summarize {path}: no such file", file=sys.stderr)
        return 2
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "provider" not in rows[0]:
        print(f"side_by_side: --summarize {path}: no benchmark rows", file=sys.stderr)
        return 2
    ours = next((r["provider"] for r in rows if r["provider"].startswith("ours-")), "ours-torch")
    loads = (rows[0].get("load", "?"), rows[-1].get("load", "?"))
    _write_atomic(path.with_suffix(".md"), summary(rows, ours, args.command, loads))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help="HEAD:N list, e.g. 1.5b:1024,7b:512")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list from bf16, fp16, fp32")
    p.add_argument("--providers", default=DEFAULT_PROVIDERS, help=f"comma list from {PROVIDERS}")
    p.add_argument("--level", default="sequence_geomean", choices=["token", "sequence_geomean"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--min-reps", type=int, default=MIN_REPS)
    p.add_argument("--timeout-s", type=float, default=1800.0, help="limit per provider process")
    p.add_argument("--out", default=None, help="CSV (default benchmarks/results/side-by-side-<device>.csv)")
    p.add_argument(
        "--command",
        default="python -m benchmarks.side_by_side",
        help="with --summarize: the command to quote",
    )
    p.add_argument(
        "--summarize", metavar="CSV", default=None, help="rewrite CSV's summary (.md), run nothing"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.summarize:
        return summarize_csv(Path(args.summarize), args)
    cases = parse_cases(args.cases)
    dtypes = parse_choice(args.dtypes, ("bf16", "fp16", "fp32"), "--dtypes")
    providers = parse_choice(args.providers, PROVIDERS, "--providers")
    ours = next((p for p in providers if p.startswith("ours-")), "ours-torch")
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out) if args.out else RESULTS_DIR / f"side-by-side-{dev}.csv"
    part = out.with_suffix(".partial.csv")
    part.unlink(missing_ok=True)
    loads = [load_average()]
    start = time.monotonic()
    failed = 0
    for head, n in cases:
        for dtype in dtypes:
            for provider in providers:
                if provider.endswith("-rounded") and dtype == "fp32":
                    continue  # the same code path as the exact provider
                failed += run_provider(head, n, dtype, provider, part, args) != 0
    loads.append(load_average())
    with part.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{part}: no rows were measured")
    os.replace(part, out)
    command = "python -m benchmarks.side_by_side " + " ".join(argv if argv is not None else sys.argv[1:])
    _write_atomic(out.with_suffix(".md"), summary(rows, ours, command.strip(), tuple(loads)))
    print(f"[side_by_side] {len(rows)} rows in {out}, summary {out.with_suffix('.md')}, "
          f"{time.monotonic() - start:.0f} s", flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
