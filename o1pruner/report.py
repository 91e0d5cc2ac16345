"""The run's report: eval.json, metrics.json, summary.md, report.md and PNG plots (all written atomically).

``base`` and ``tuned`` are the result dicts of :func:`o1pruner.evaluate.evaluate_model`. AES follows
docs/method.md (alpha=1, beta=3, gamma=5; a fall in accuracy costs ``gamma*|dA|``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from o1pruner.io import atomic_path, atomic_write_json, atomic_write_text, read_jsonl

PLOTS = {
    "lengths": "plots/length_distribution.png",
    "accuracy": "plots/accuracy.png",
    "training": "plots/training_curves.png",
    "length_by_level": "plots/length_by_level.png",
}


def _pct_change(new: float, old: float) -> float | None:
    return None if not old else 100.0 * (new - old) / old


def compute_aes(base: dict, tuned: dict) -> float | None:
    """AES of ``tuned`` against ``base``; None when the baseline's accuracy or length is zero."""
    from o1pruner.reward import aes

    if not base.get("accuracy") or not base.get("mean_length"):
        return None
    return float(aes(tuned["accuracy"], tuned["mean_length"], base["accuracy"], base["mean_length"]))


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "lengths"}


def summary_rows(base: dict, tuned: dict) -> list[tuple[str, str, str, str]]:
    """(metric, base, tuned, change) rows of the final comparison table."""
    aes_value = compute_aes(base, tuned)
    change_len = _pct_change(tuned["mean_length"], base["mean_length"])
    change_med = _pct_change(tuned.get("median_length", 0.0), base.get("median_length", 0.0))
    acc_pts = 100.0 * (tuned["accuracy"] - base["accuracy"])
    return [
        (
            "accuracy (%)",
            f"{100 * base['accuracy']:.1f}",
            f"{100 * tuned['accuracy']:.1f}",
            f"{acc_pts:+.1f} pts",
        ),
        (
            "mean length (tokens)",
            f"{base['mean_length']:.0f}",
            f"{tuned['mean_length']:.0f}",
            "n/a" if change_len is None else f"{change_len:+.1f}%",
        ),
        (
            "median length (tokens)",
            f"{base.get('median_length', 0.0):.0f}",
            f"{tuned.get('median_length', 0.0):.0f}",
            "n/a" if change_med is None else f"{change_med:+.1f}%",
        ),
        (
            "truncated (%)",
            f"{100 * base.get('truncated_fraction', 0.0):.1f}",
            f"{100 * tuned.get('truncated_fraction', 0.0):.1f}",
            "",
        ),
        ("AES", "", "n/a" if aes_value is None else f"{aes_value:.3f}", ""),
    ]


def _markdown_table(header: list[str], rows: list[list[str]] | list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_markdown(base: dict, tuned: dict) -> str:
    n = tuned.get("num_problems", base.get("num_problems", 0))
    return f"# o1pruner: base vs tuned ({n} evaluation problems)\n\n" + _markdown_table(
        ["metric", "base", "tuned", "change"], summary_rows(base, tuned)
    )


def format_table(base: dict, tuned: dict) -> str:
    """The final comparison as a plain-text table for the terminal."""
    header = ("metric", "base", "tuned", "change")
    rows = [header, *summary_rows(base, tuned)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [line]
    for j, row in enumerate(rows):
        out.append(
            "|".join(f" {c:<{w}} " if i == 0 else f" {c:>{w}} " for i, (c, w) in enumerate(zip(row, widths)))
        )
        if j == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out)


def print_summary(base: dict, tuned: dict, file=None) -> None:
    """Print the final table (plain text; rich is not a dependency)."""
    print(format_table(base, tuned), file=file, flush=True)


def per_level_rows(base: dict, tuned: dict) -> list[list[str]]:
    rows = []
    levels = list(dict.fromkeys([*base.get("per_level", {}), *tuned.get("per_level", {})]))
    for lvl in levels:
        b = base.get("per_level", {}).get(lvl)
        t = tuned.get("per_level", {}).get(lvl)
        if b is None or t is None:
            continue
        change = _pct_change(t["mean_length"], b["mean_length"])
        rows.append(
            [
                lvl,
                str(t.get("num_problems", "")),
                f"{100 * b['accuracy']:.1f}",
                f"{100 * t['accuracy']:.1f}",
                f"{b['mean_length']:.0f}",
                f"{t['mean_length']:.0f}",
                "n/a" if change is None else f"{change:+.1f}%",
            ]
        )
    return rows


def read_training_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return read_jsonl(path, tolerate_partial_tail=True)


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(records):
        if isinstance(r.get(key), (int, float)):
            xs.append(float(r.get("step", i + 1)))
            ys.append(float(r[key]))
    return xs, ys


def training_summary(records: list[dict]) -> dict[str, Any]:
    if not records:
        return {}
    out: dict[str, Any] = {"steps": len(records)}
    for key in ("loss", "clip_fraction", "mean_ratio", "grad_norm", "lr", "learning_rate"):
        _, ys = _series(records, key)
        if ys:
            out[key] = {"first": ys[0], "last": ys[-1]}
    return out


# ---------------------------------------------------------------------- plots
def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_lengths(base: dict, tuned: dict, path: Path) -> bool:
    base_l, tuned_l = base.get("lengths") or [], tuned.get("lengths") or []
    if not base_l and not tuned_l:
        return False
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    both = np.asarray(list(base_l) + list(tuned_l), dtype=np.float64)
    bins = np.linspace(0.0, max(1.0, float(both.max())), 41)
    ax.hist(base_l, bins=bins, alpha=0.55, label=f"base (mean {base['mean_length']:.0f})")
    ax.hist(tuned_l, bins=bins, alpha=0.55, label=f"tuned (mean {tuned['mean_length']:.0f})")
    ax.axvline(base["mean_length"], color="C0", linestyle="--", linewidth=1)
    ax.axvline(tuned["mean_length"], color="C1", linestyle="--", linewidth=1)
    ax.set_xlabel("generated tokens per response")
    ax.set_ylabel("responses")
    ax.set_title("Response length before and after length-harmonizing fine-tuning")
    ax.legend()
    _save_fig(fig, path)
    return True


def plot_accuracy(base: dict, tuned: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    levels = [lvl for lvl in base.get("per_level", {}) if lvl in tuned.get("per_level", {})]
    labels = ["all", *levels]
    b = [base["accuracy"]] + [base["per_level"][lvl]["accuracy"] for lvl in levels]
    t = [tuned["accuracy"]] + [tuned["per_level"][lvl]["accuracy"] for lvl in levels]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(labels)), 4))
    ax.bar(x - 0.2, [100 * v for v in b], width=0.4, label="base")
    ax.bar(x + 0.2, [100 * v for v in t], width=0.4, label="tuned")
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("level" if levels else "")
    ax.set_title("Accuracy, base vs tuned")
    ax.legend()
    _save_fig(fig, path)


def plot_length_by_level(base: dict, tuned: dict, path: Path) -> bool:
    """Mean length per level, base vs tuned (O1-Pruner should shorten easy problems the most)."""
    levels = [lvl for lvl in base.get("per_level", {}) if lvl in tuned.get("per_level", {})]
    if not levels:
        return False
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(levels))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(levels)), 4))
    ax.bar(x - 0.2, [base["per_level"][lvl]["mean_length"] for lvl in levels], width=0.4, label="base")
    ax.bar(x + 0.2, [tuned["per_level"][lvl]["mean_length"] for lvl in levels], width=0.4, label="tuned")
    ax.set_xticks(x, levels)
    ax.set_xlabel("level")
    ax.set_ylabel("mean generated tokens")
    ax.set_title("Mean response length per level")
    ax.legend()
    _save_fig(fig, path)
    return True


def plot_training(records: list[dict], path: Path) -> bool:
    keys = [k for k in ("loss", "clip_fraction") if _series(records, k)[1]]
    if not keys:
        return False
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs, ys = _series(records, key)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
    _save_fig(fig, path)
    return True


# ---------------------------------------------------------------------- the report
def write_report(
    run_dir: str | os.PathLike,
    base: dict,
    tuned: dict,
    *,
    training_metrics: str | os.PathLike | None = None,
    config: dict | None = None,
    title: str = "O1-Pruner run report",
) -> dict[str, Any]:
    """Write eval.json, metrics.json, summary.md, report.md and plots/*.png into ``run_dir``.

    ``training_metrics`` is the trainer's metrics.jsonl (default: ``run_dir/metrics.jsonl`` if present).
    Returns the eval.json content.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    aes_value = compute_aes(base, tuned)
    n_problems = int(tuned.get("num_problems", base.get("num_problems", 0)))
    length_change = _pct_change(tuned["mean_length"], base["mean_length"])

    eval_doc = {
        "base": _strip(base),
        "tuned": _strip(tuned),
        "aes": aes_value,
        "accuracy_change_points": 100.0 * (tuned["accuracy"] - base["accuracy"]),
        "length_change_percent": length_change,
        "per_level": {
            lvl: {"base": base["per_level"][lvl], "tuned": tuned["per_level"][lvl]}
            for lvl in base.get("per_level", {})
            if lvl in tuned.get("per_level", {})
        },
        "eval_problems": n_problems,
    }
    atomic_write_json(run_dir / "eval.json", eval_doc)
    atomic_write_json(
        run_dir / "metrics.json",
        {
            "baseline": {"accuracy": float(base["accuracy"]), "mean_length": float(base["mean_length"])},
            "pruned": {"accuracy": float(tuned["accuracy"]), "mean_length": float(tuned["mean_length"])},
            "aes": aes_value,
            "eval_problems": n_problems,
        },
    )
    atomic_write_text(run_dir / "summary.md", summary_markdown(base, tuned))

    plots_written = []
    if plot_lengths(base, tuned, run_dir / PLOTS["lengths"]):
        plots_written.append(("Length distribution", PLOTS["lengths"]))
    plot_accuracy(base, tuned, run_dir / PLOTS["accuracy"])
    plots_written.append(("Accuracy", PLOTS["accuracy"]))
    if plot_length_by_level(base, tuned, run_dir / PLOTS["length_by_level"]):
        plots_written.append(("Mean length per level", PLOTS["length_by_level"]))
    metrics_path = Path(training_metrics) if training_metrics else run_dir / "metrics.jsonl"
    train_records = read_training_metrics(metrics_path)
    if train_records and plot_training(train_records, run_dir / PLOTS["training"]):
        plots_written.append(("Training curves", PLOTS["training"]))

    md = [f"# {title}\n\n"]
    if config:
        md.append(
            f"Model `{config.get('model')}`, mode `{config.get('mode')}`; training problems "
            f"`{config.get('dataset')}`, K={config.get('k')}, lambda={config.get('lam')}, "
            f"lr={config.get('learning_rate')}; evaluation on `{config.get('eval_dataset')}` "
            f"({'greedy' if config.get('eval_greedy', True) else 'sampled'}, up to "
            f"{config.get('eval_max_new_tokens')} new tokens).\n\n"
        )
    md.append(f"## Base vs tuned ({n_problems} problems)\n\n")
    md.append(_markdown_table(["metric", "base", "tuned", "change"], summary_rows(base, tuned)))
    md.append(
        "\nAccuracy is the fraction of responses whose final answer matches the gold answer (math-verify); "
        "length is the number of generated tokens. AES = dL + 3 dA if accuracy did not fall, else "
        "dL - 5 |dA|, with dL and dA the relative changes of length and accuracy (O1-Pruner, arXiv 2501.12570; "
        "its Table 2 scores falls of accuracy as +3|dA|, which contradicts its own definition).\n"
    )
    level_rows = per_level_rows(base, tuned)
    if level_rows:
        md.append("\n## Per level\n\n")
        md.append(
            _markdown_table(
                ["level", "problems", "base acc %", "tuned acc %", "base len", "tuned len", "length change"],
                level_rows,
            )
        )
    summary = training_summary(train_records)
    if summary:
        md.append("\n## Training\n\n")
        rows = [
            [key, f"{v['first']:.4g}", f"{v['last']:.4g}"]
            for key, v in summary.items()
            if isinstance(v, dict)
        ]
        md.append(f"{summary['steps']} logged optimizer steps.\n\n")
        md.append(_markdown_table(["metric", "first", "last"], rows))
    md.append("\n## Plots\n")
    md += [f"\n![{name}]({rel})\n" for name, rel in plots_written]
    atomic_write_text(run_dir / "report.md", "".join(md))
    return json.loads(json.dumps(eval_doc))
