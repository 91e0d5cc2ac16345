"""Length-harmonizing reward, its post-processing, per-problem baselines and the AES metric.

All arithmetic is float64 numpy.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
from numpy.typing import ArrayLike


def _as_f64(x: ArrayLike, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot be read as numbers ({e})") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def length_harmonizing_reward(
    lengths: ArrayLike,
    correct: ArrayLike,
    ref_mean_length: ArrayLike,
    ref_accuracy: ArrayLike,
    lam: float = 2.0,
) -> np.ndarray:
    """R_LH = ref_mean_length / lengths - 1 + lam * (correct - ref_accuracy), elementwise.

    ``lengths`` (...) positive token counts L(y); ``correct`` (...) A(x, y) in [0, 1] (bools allowed);
    ``ref_mean_length`` and ``ref_accuracy`` broadcast against them (per-problem Lbar_ref(x) > 0 and
    Abar_ref(x) in [0, 1]). Returns float64 of the broadcast shape.
    """
    lam = float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    lengths = _as_f64(lengths, "lengths")
    correct = _as_f64(correct, "correct")
    ref_mean_length = _as_f64(ref_mean_length, "ref_mean_length")
    ref_accuracy = _as_f64(ref_accuracy, "ref_accuracy")
    if np.any(lengths <= 0):
        raise ValueError(f"lengths must be positive, got min {lengths.min()}")
    if np.any(ref_mean_length <= 0):
        raise ValueError(f"ref_mean_length must be positive, got min {ref_mean_length.min()}")
    for name, arr in (("correct", correct), ("ref_accuracy", ref_accuracy)):
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ValueError(f"{name} must lie in [0, 1], got range [{arr.min()}, {arr.max()}]")
    try:
        out = ref_mean_length / lengths - 1.0 + lam * (correct - ref_accuracy)
    except ValueError as e:
        raise ValueError(f"shapes do not broadcast: {e}") from None
    return np.asarray(out, dtype=np.float64)


def postprocess_rewards(
    rewards: ArrayLike, clip: tuple[float, float] | None = (-2.0, 4.0), zscore: bool = True
) -> np.ndarray:
    """Clip to ``clip`` (None: no clipping), then z-score over the whole data set (population std).

    ``rewards`` any shape, returns float64 of the same shape. A constant set (std 0 after clipping)
    becomes all zeros (centred, not divided).
    """
    r = _as_f64(rewards, "rewards").copy()
    if clip is not None:
        lo, hi = (float(c) for c in clip)
        if not lo <= hi:
            raise ValueError(f"clip must be (low, high) with low <= high, got {clip}")
        np.clip(r, lo, hi, out=r)
    if zscore and r.size:
        r = r - r.mean()
        std = r.std()
        # A tiny std relative to the values is rounding noise of a constant set.
        if std > 1e-12 * max(1.0, float(np.abs(r).max(initial=0.0))):
            r = r / std
        else:
            r = np.zeros_like(r)
    return r


def problem_baselines(lengths: ArrayLike, correct: ArrayLike) -> tuple[float, float]:
    """(Lbar_ref, Abar_ref) of one problem's K samples: mean length and mean correctness (floats)."""
    lengths = _as_f64(lengths, "lengths").ravel()
    correct = _as_f64(correct, "correct").ravel()
    if lengths.size == 0:
        raise ValueError("problem_baselines needs at least one sample")
    if lengths.shape != correct.shape:
        raise ValueError(f"lengths ({lengths.size}) and correct ({correct.size}) differ in size")
    return float(lengths.mean()), float(correct.mean())


def group_baselines(
    problem_ids: Sequence[Hashable], lengths: ArrayLike, correct: ArrayLike
) -> dict[Hashable, tuple[float, float]]:
    """Per problem id: (mean length, accuracy) over its samples. All three are per-sample, same size."""
    lengths = _as_f64(lengths, "lengths").ravel()
    correct = _as_f64(correct, "correct").ravel()
    ids = list(problem_ids)
    if not (len(ids) == lengths.size == correct.size):
        raise ValueError(
            f"problem_ids ({len(ids)}), lengths ({lengths.size}) and correct ({correct.size}) differ in size"
        )
    sums: dict[Hashable, list[float]] = {}
    for pid, length, ok in zip(ids, lengths.tolist(), correct.tolist()):
        acc = sums.setdefault(pid, [0.0, 0.0, 0.0])
        acc[0] += length
        acc[1] += ok
        acc[2] += 1.0
    return {pid: (s[0] / s[2], s[1] / s[2]) for pid, s in sums.items()}


def aes(
    accuracy: float,
    length: float,
    base_accuracy: float,
    base_length: float,
    alpha: float = 1.0,
    beta: float = 3.0,
    gamma: float = 5.0,
) -> float:
    """Accuracy-Efficiency Score against a baseline (definition in docs/method.md).

    dL = (base_length - length) / base_length, dA = (accuracy - base_accuracy) / base_accuracy;
    AES = alpha*dL + beta*dA when dA >= 0, else alpha*dL - gamma*|dA|. Accuracies in any one unit
    (fraction or percent, the same for both). The paper's Table 2 rows with falling accuracy match
    ``+beta*|dA|`` instead; this follows the written definition.
    """
    vals = {
        "accuracy": accuracy,
        "length": length,
        "base_accuracy": base_accuracy,
        "base_length": base_length,
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
    }
    for name, v in vals.items():
        v = float(v)
        if not np.isfinite(v):
            raise ValueError(f"aes: {name} must be finite, got {v}")
        vals[name] = v
    if vals["base_length"] <= 0:
        raise ValueError(f"aes: base_length must be positive, got {vals['base_length']}")
    if vals["base_accuracy"] <= 0:
        raise ValueError(f"aes: base_accuracy must be positive, got {vals['base_accuracy']}")
    d_len = (vals["base_length"] - vals["length"]) / vals["base_length"]
    d_acc = (vals["accuracy"] - vals["base_accuracy"]) / vals["base_accuracy"]
    if d_acc >= 0:
        return float(vals["alpha"] * d_len + vals["beta"] * d_acc)
    return float(vals["alpha"] * d_len - vals["gamma"] * abs(d_acc))
