"""Benchmark CSVs -> PNG plots and a markdown table that the docs can quote.

Kernel CSVs (bench_kernels.py): per mode and importance level, one figure with a column per lm_head: time
(median, p20-p80 bars) against N per provider, and peak extra memory against N. E2E CSVs (bench_e2e.py):
step time and peak memory per model, N and loss. When a key was measured more than once, the newest row wins.

  python -m benchmarks.plot benchmarks/results/kernels-cuda.csv benchmarks/results/e2e-cuda.csv \
      --out-dir benchmarks/results --md benchmarks/results/summary-cuda.md
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

from o1pruner.io import atomic_write_text

KERNEL_KEY = ("device_name", "provider", "mode", "level", "head", "N")
E2E_KEY = ("device_name", "model", "layers", "extrapolated", "quant", "loss", "N")
PROVIDER_ORDER = ["ours-triton", "ours-torch", "naive", "naive-compile", "liger-grpo"]
TARGET_N = 16384
TARGET_HEAD = "7b"


def read_rows(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """(kernel rows, e2e rows), newest row per key, numeric fields parsed."""
    kernels: dict[tuple, dict] = {}
    e2e: dict[tuple, dict] = {}
    for path in paths:
        with path.open(newline="") as f:
            for i, row in enumerate(csv.DictReader(f), start=2):
                if "provider" in row:
                    key, table = KERNEL_KEY, kernels
                elif "tokens_per_s" in row:
                    key, table = E2E_KEY, e2e
                else:
                    raise SystemExit(f"{path}:{i}: neither a bench_kernels nor a bench_e2e row")
                for name in ("N", "H", "V", "layers", "full_layers", "seq_len"):
                    if row.get(name):
                        row[name] = int(row[name])
                k = tuple(row[c] for c in key)
                if k not in table or row["date"] >= table[k]["date"]:
                    table[k] = row
    return list(kernels.values()), list(e2e.values())


def num(row: dict, name: str) -> float:
    try:
        return float(row.get(name) or "nan")
    except ValueError:
        return math.nan


def _providers(rows: list[dict]) -> list[str]:
    seen = {r["provider"] for r in rows}
    return [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))


# ---------------------------------------------------------------------------------------------------- plots
def plot_kernels(rows: list[dict], out_dir: Path, prefix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["mode"], r["level"])].append(r)
    for (mode, level), group in sorted(groups.items()):
        heads = sorted({r["head"] for r in group}, key=lambda h: min(r["H"] for r in group if r["head"] == h))
        fig, axes = plt.subplots(2, len(heads), figsize=(5 * len(heads), 8), squeeze=False)
        for col, head in enumerate(heads):
            hrows = [r for r in group if r["head"] == head]
            for provider in _providers(hrows):
                pts = sorted((r for r in hrows if r["provider"] == provider and r["status"] == "ok"),
                             key=lambda r: r["N"])  # fmt: skip
                if not pts:
                    continue
                ns = [r["N"] for r in pts]
                med = [num(r, "median_ms") for r in pts]
                lo = [m - num(r, "p20_ms") for m, r in zip(med, pts)]
                hi = [num(r, "p80_ms") - m for m, r in zip(med, pts)]
                axes[0][col].errorbar(ns, med, yerr=[lo, hi], marker="o", capsize=3, label=provider)
                mem = [num(r, "peak_extra_mib") for r in pts]
                if any(math.isfinite(m) for m in mem):
                    axes[1][col].plot(ns, mem, marker="o", label=provider)
                ooms = sorted(r["N"] for r in hrows if r["provider"] == provider and r["status"] == "oom")
                if ooms:
                    axes[0][col].plot(ooms, [med[-1]] * len(ooms), "x", color="red")
            if not axes[1][col].has_data():
                axes[1][col].text(0.5, 0.5, "no allocator statistics on this device", ha="center",
                                  transform=axes[1][col].transAxes)  # fmt: skip
            h, v = hrows[0]["H"], hrows[0]["V"]
            axes[0][col].set_title(f"{head} head (H={h}, V={v})")
            for row_i, ylabel in enumerate(["median time per call (ms)", "peak memory above inputs (MiB)"]):
                ax = axes[row_i][col]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("tokens N")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
                if ax.has_data():
                    ax.legend(fontsize=8)
        device = group[0]["device_name"]
        fig.suptitle(f"{mode}" + ("" if level == "-" else f", level {level}") + f"\n{device} ({group[0]['dtype']})"
                     + "; red x: out of memory", fontsize=10)  # fmt: skip
        fig.tight_layout()
        path = out_dir / (f"{prefix}kernels-{mode}" + ("" if level == "-" else f"-{level}") + ".png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def plot_e2e(rows: list[dict], out_dir: Path, prefix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        mrows = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        for (layers, extrap, loss), pts in sorted(_group(mrows, ("layers", "extrapolated", "loss")).items()):
            pts = sorted(pts, key=lambda r: r["N"])
            label = f"{loss}, {layers} layers" + (" (extrapolated)" if extrap == "true" else "")
            style = "--" if extrap == "true" else "-"
            ns = [r["N"] for r in pts]
            axes[0][col].plot(ns, [num(r, "tokens_per_s") for r in pts], style, marker="o", label=label)
            axes[1][col].plot(ns, [num(r, "peak_gib") for r in pts], style, marker="o", label=label)
        axes[0][col].set_title(model)
        for row_i, ylabel in enumerate(["tokens / s (one QLoRA step)", "peak GPU memory (GiB)"]):
            ax = axes[row_i][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per micro-batch")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
    fig.suptitle(f"QLoRA training step\n{rows[0]['device_name']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{prefix}e2e.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def _group(rows: list[dict], cols: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[c] for c in cols)].append(r)
    return out


# -------------------------------------------------------------------------------------------------- tables
def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"]
    mem = num(r, "peak_extra_mib")
    mem_s = f", {mem:,.0f} MiB" if math.isfinite(mem) else ""
    return f"{num(r, 'median_ms'):.3g} ms (x{num(r, 'ratio_to_ceiling'):.2f}{mem_s})"


def kernels_markdown(rows: list[dict]) -> str:
    lines = []
    devices = sorted(
        {(r["device_name"], r["torch"], r["triton"], r["liger"], r["ceiling_tflops"]) for r in rows}
    )
    for name, torch_v, triton_v, liger_v, ceil in devices:
        lines.append(f"- device: {name}; torch {torch_v}, triton {triton_v or '-'}, liger-kernel {liger_v or '-'}; "
                     f"measured dense matmul rate {float(ceil):.3g} TFLOP/s")  # fmt: skip
    lines.append("")
    lines.append(
        "Cells: median time (time / ideal time at the measured matmul rate; peak memory above the inputs)."
    )
    lines.append("")
    for (head, mode, level), group in sorted(_group(rows, ("head", "mode", "level")).items(),
                                              key=lambda kv: (kv[1][0]["H"], kv[0][1], kv[0][2])):  # fmt: skip
        providers = _providers(group)
        lines.append(f"**{head} head (H={group[0]['H']}, V={group[0]['V']}), {mode}, level {level}**")
        lines.append("")
        lines.append("| N | " + " | ".join(providers) + " |")
        lines.append("|---:|" + "---|" * len(providers))
        by = {(r["N"], r["provider"]): r for r in group}
        for n in sorted({r["N"] for r in group}):
            lines.append(f"| {n} | " + " | ".join(_cell(by.get((n, p))) for p in providers) + " |")
        lines.append("")
    return "\n".join(lines)


def targets_markdown(rows: list[dict]) -> str:
    """The README's targets at the 7B head, N=16384 (the fused provider: ours-triton, else ours-torch)."""
    at = {
        (r["provider"], r["mode"], r["level"]): r
        for r in rows
        if r["head"] == TARGET_HEAD and r["N"] == TARGET_N
    }
    ours = (
        "ours-triton"
        if any(k[0] == "ours-triton" and v["status"] == "ok" for k, v in at.items())
        else "ours-torch"
    )
    lines = [f"Targets at the {TARGET_HEAD} head, N={TARGET_N}, provider {ours}:", "",
             "| target | measured | met |", "|---|---|---|"]  # fmt: skip

    def add(name: str, value: float | None, goal: float, fmt: str, less: bool = True):
        if value is None or not math.isfinite(value):
            lines.append(f"| {name} | not measured | - |")
        else:
            met = value <= goal if less else value >= goal
            lines.append(f"| {name} | {fmt.format(value)} | {'yes' if met else 'NO'} |")

    def get(provider, mode, level, col):
        r = at.get((provider, mode, level))
        return num(r, col) if r and r["status"] == "ok" else None

    for level in ("sequence_geomean", "token"):
        add(
            f"loss fwd+bwd ({level}) within 1.3x of 4NHV at the matmul rate",
            get(ours, "loss-fwd-bwd", level, "ratio_to_ceiling"),
            1.3,
            "x{:.2f}",
        )
    add(
        "log-probs fwd within 1.2x of 2NHV",
        get(ours, "logprobs-fwd", "-", "ratio_to_ceiling"),
        1.2,
        "x{:.2f}",
    )
    for level in ("sequence_geomean", "token"):
        mine = get(ours, "loss-fwd-bwd", level, "median_ms")
        for other, goal in (("liger-grpo", 2.0), ("naive", 3.0)):
            theirs = get(other, "loss-fwd-bwd", level, "median_ms")
            speedup = theirs / mine if mine and theirs else None
            if mine and at.get((other, "loss-fwd-bwd", level), {}).get("status") == "oom":
                lines.append(f"| >= {goal:g}x faster than {other} ({level}) | {other} out of memory | yes |")
            else:
                add(f">= {goal:g}x faster than {other} ({level})", speedup, goal, "{:.2f}x", less=False)
    peaks = [num(r, "peak_extra_mib") for r in rows
             if r["head"] == TARGET_HEAD and r["provider"] == ours and r["status"] == "ok"]  # fmt: skip
    add("peak extra memory <= 2 GiB (largest over all N, modes, levels)", max(peaks) / 1024 if peaks else None,
        2.0, "{:.2f} GiB")  # fmt: skip
    return "\n".join(lines)


def e2e_markdown(rows: list[dict]) -> str:
    lines = ["| model | layers | N | loss | step (s) | tokens/s | peak GiB | note |",
             "|---|---|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["model"], r["extrapolated"], r["layers"], r["N"], r["loss"])):
        layers = f"{r['layers']} (extrapolated)" if r["extrapolated"] == "true" else str(r["layers"])
        if r["status"] == "ok":
            peak = num(r, "peak_gib")
            peak_s = f"{peak:.2f}" if math.isfinite(peak) else "-"
            cells = f"{num(r, 'step_s'):.3g} | {num(r, 'tokens_per_s'):,.0f} | {peak_s}"
        else:
            cells = f"{r['status']} | | "
        lines.append(f"| {r['model']} | {layers} | {r['N']} | {r['loss']} | {cells} | {r.get('note', '')} |")
    devices = sorted({r["device_name"] for r in rows})
    return (
        f"Device: {', '.join(devices)}; quant {rows[0]['quant']}, attention {rows[0]['attn']}.\n\n"
        + "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", type=Path, help="CSV files written by bench_kernels.py / bench_e2e.py")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument(
        "--md", type=Path, default=None, help="markdown file (default OUT_DIR/<first csv stem>.md)"
    )
    p.add_argument("--prefix", default="", help="prefix of the PNG file names")
    p.add_argument("--title", default="Benchmark results")
    args = p.parse_args(argv)
    missing = [str(c) for c in args.csv if not c.is_file()]
    if missing:  # a benchmark phase that never ran must not cost the plots of the others
        print(f"[plot] skipping missing CSV file(s): {', '.join(missing)}")
    present = [c for c in args.csv if c.is_file()]
    if not present:
        raise SystemExit("[plot] none of the CSV files exists")
    kernels, e2e = read_rows(present)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pngs = []
    parts = [f"# {args.title}", ""]
    if kernels:
        pngs += plot_kernels(kernels, args.out_dir, args.prefix)
        parts += ["## Kernels", "", targets_markdown(kernels), "", kernels_markdown(kernels), ""]
    if e2e:
        pngs += plot_e2e(e2e, args.out_dir, args.prefix)
        parts += ["## One QLoRA training step", "", e2e_markdown(e2e), ""]
    md = args.md or args.out_dir / f"{present[0].stem}.md"
    parts += ["Plots: " + ", ".join(p.name for p in pngs), ""]
    atomic_write_text(md, "\n".join(parts))
    print(f"[plot] wrote {md} and {len(pngs)} PNG file(s): {', '.join(str(p) for p in pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
