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
    "truncated": "plots/truncated.png",
    "rounds": "plots/rounds.png",
}
# Training curves: metrics.jsonl key -> (panel title, y-axis label with its unit).
TRAINING_CURVES = {
    "loss": ("loss", "PPO-clip loss (advantage-weighted, unitless)"),
    "mean_ratio": ("mean importance ratio", "pi_theta / pi_ref (ratio, 1 = reference)"),
    "clip_fraction": ("clip fraction", "share of ratios clipped (fraction)"),
    "entropy": ("policy entropy", "entropy (nats per token)"),
    "grad_norm": ("gradient norm", "L2 norm before clipping"),
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


def rounds_metrics(base: dict, rounds: list[tuple[int, dict]]) -> list[dict[str, Any]]:
    """metrics.json's ``rounds``: each round's accuracy, mean length and AES against the original base."""
    return [
        {
            "round": r,
            "accuracy": float(t["accuracy"]),
            "mean_length": float(t["mean_length"]),
            "aes": compute_aes(base, t),
        }
        for r, t in rounds
    ]


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
    for key in ("loss", "clip_fraction", "mean_ratio", "entropy", "grad_norm", "lr", "learning_rate"):
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
    ax.set_xlabel("difficulty level")
    ax.set_ylabel("mean response length (generated tokens)")
    ax.set_title("Mean response length per level, before and after")
    ax.legend()
    _save_fig(fig, path)
    return True


def plot_training(records: list[dict] | dict[str, list[dict]], path: Path) -> bool:
    """The training curves of :data:`TRAINING_CURVES` against the optimizer step, one line per run.

    ``records``: one run's metrics.jsonl rows, or label (e.g. "round 2") -> rows, overlaid.
    """
    runs = records if isinstance(records, dict) else {"": records}
    keys = [k for k in TRAINING_CURVES if any(_series(rows, k)[1] for rows in runs.values())]
    if not keys:
        return False
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows_n = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.5 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, rows in runs.items():
            xs, ys = _series(rows, key)
            if ys:
                ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label or None)
        title, ylabel = TRAINING_CURVES[key]
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.tight_layout()
    _save_fig(fig, path)
    return True


def plot_truncated(base: dict, tuned: dict, path: Path) -> None:
    """Share of responses cut at the token limit (finish reason "length"), overall and per level."""
    import matplotlib.pyplot as plt
    import numpy as np

    levels = [lvl for lvl in base.get("per_level", {}) if lvl in tuned.get("per_level", {})]
    labels = ["all", *levels]
    b = [base.get("truncated_fraction", 0.0)] + [
        base["per_level"][lvl].get("truncated_fraction", 0.0) for lvl in levels
    ]
    t = [tuned.get("truncated_fraction", 0.0)] + [
        tuned["per_level"][lvl].get("truncated_fraction", 0.0) for lvl in levels
    ]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(labels)), 4))
    ax.bar(x - 0.2, [100 * v for v in b], width=0.4, label="base")
    ax.bar(x + 0.2, [100 * v for v in t], width=0.4, label="tuned")
    ax.set_xticks(x, labels)
    ax.set_ylim(0, max(5.0, 100 * max(b + t) * 1.15))
    ax.set_xlabel("difficulty level" if levels else "")
    ax.set_ylabel("truncated responses (% of responses)")
    ax.set_title("Responses cut at the token limit")
    ax.legend()
    _save_fig(fig, path)


def plot_rounds(base: dict, rounds: list[tuple[int, dict]], path: Path) -> None:
    """Accuracy vs mean length: the base model, then one point per round (the trade-off across rounds)."""
    import matplotlib.pyplot as plt

    xs = [base["mean_length"], *(t["mean_length"] for _, t in rounds)]
    ys = [100 * base["accuracy"], *(100 * t["accuracy"] for _, t in rounds)]
    labels = ["base", *(f"round {r}" for r, _ in rounds)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, color="0.6", linewidth=1, zorder=1)
    ax.scatter(xs, ys, c=[f"C{i}" for i in range(len(xs))], zorder=2)
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("mean response length (generated tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs length across rounds")
    lo, hi = min(ys), max(ys)
    ax.set_ylim(max(0.0, lo - max(2.0, 0.2 * (hi - lo))), min(100.0, hi + 2.0) + 0.5)
    ax.grid(alpha=0.3)
    _save_fig(fig, path)


def rounds_rows(base: dict, rounds: list[tuple[int, dict]]) -> list[list[str]]:
    rows = [["base", f"{100 * base['accuracy']:.1f}", f"{base['mean_length']:.1f}", "", ""]]
    for r, t in rounds:
        a = compute_aes(base, t)
        change = _pct_change(t["mean_length"], base["mean_length"])
        rows.append(
            [
                str(r),
                f"{100 * t['accuracy']:.1f}",
                f"{t['mean_length']:.1f}",
                "n/a" if change is None else f"{change:+.1f}%",
                "n/a" if a is None else f"{a:.3f}",
            ]
        )
    return rows


# ---------------------------------------------------------------------- the report
def write_report(
    run_dir: str | os.PathLike,
    base: dict,
    tuned: dict,
    *,
    training_metrics: str | os.PathLike | dict[str, str | os.PathLike] | None = None,
    config: dict | None = None,
    title: str = "O1-Pruner run report",
    rounds: list[tuple[int, dict]] | None = None,
) -> dict[str, Any]:
    """Write eval.json, metrics.json, summary.md, report.md and plots/*.png into ``run_dir``.

    ``training_metrics`` is the trainer's metrics.jsonl (default: ``run_dir/metrics.jsonl`` if present),
    or label -> metrics.jsonl of several rounds. ``rounds``: ``(round, tuned evaluation)`` of rounds
    1..R when the run has several (``tuned`` is then the last one's); metrics.json gets a ``rounds``
    list (AES against ``base``) and report.md the accuracy-vs-length plot. Returns the eval.json content.
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
            **({"rounds": rounds_metrics(base, rounds)} if rounds else {}),
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
    plot_truncated(base, tuned, run_dir / PLOTS["truncated"])
    plots_written.append(("Truncated responses", PLOTS["truncated"]))
    if rounds:
        plot_rounds(base, rounds, run_dir / PLOTS["rounds"])
        plots_written.append(("Accuracy vs length across rounds", PLOTS["rounds"]))
    if isinstance(training_metrics, dict):
        curves = {label: read_training_metrics(path) for label, path in training_metrics.items()}
        curves = {label: rows for label, rows in curves.items() if rows}
    else:
        metrics_path = Path(training_metrics) if training_metrics else run_dir / "metrics.jsonl"
        curves = {"": read_training_metrics(metrics_path)} if metrics_path.exists() else {}
    train_records = next(reversed(curves.values())) if curves else []  # the final model's training
    if curves and plot_training(curves if len(curves) > 1 else train_records, run_dir / PLOTS["training"]):
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
    if rounds:
        md.append(
            f"\n## Rounds (each against the original base; the table above is round {rounds[-1][0]})\n\n"
        )
        md.append(
            _markdown_table(
                ["round", "accuracy %", "mean length", "length change", "AES"], rounds_rows(base, rounds)
            )
        )
        md.append(
            "\nRound r >= 2 sampled from and was referenced against round r-1's tuned model; accuracy, "
            "length and AES are all measured against the original base model.\n"
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
        which = f" (round {rounds[-1][0]})" if rounds else ""
        md.append(f"{summary['steps']} logged optimizer steps{which}.\n\n")
        md.append(_markdown_table(["metric", "first", "last"], rows))
    md.append("\n## Plots\n")
    md += [f"\n![{name}]({rel})\n" for name, rel in plots_written]
    atomic_write_text(run_dir / "report.md", "".join(md))
    return json.loads(json.dumps(eval_doc))
