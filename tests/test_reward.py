from __future__ import annotations

import numpy as np
import pytest

from o1pruner.reward import (
    aes,
    group_baselines,
    length_harmonizing_reward,
    postprocess_rewards,
    problem_baselines,
)


def test_rlh_matches_hand_computation():
    # Lbar = 300, Abar = 0.5, lam = 2: R = 300/L - 1 + 2*(A - 0.5)
    r = length_harmonizing_reward([100, 300, 600, 7], [1, 0, True, False], 300.0, 0.5, lam=2.0)
    expected = [300 / 100 - 1 + 1.0, 0.0 - 1.0, 300 / 600 - 1 + 1.0, 300 / 7 - 1 - 1.0]
    assert r.dtype == np.float64
    np.testing.assert_allclose(r, expected, rtol=0, atol=1e-15)


def test_rlh_lam_zero_is_length_term_only():
    r = length_harmonizing_reward([3, 5], [1, 0], [6, 10], [0.2, 0.9], lam=0.0)
    np.testing.assert_allclose(r, [1.0, 1.0])


def test_rlh_broadcasts_per_problem_references():
    lengths = np.array([[10, 20, 40], [5, 5, 15]])  # (P=2, K=3)
    correct = np.array([[1, 0, 1], [0, 0, 1]])
    ref_len = lengths.mean(axis=1, keepdims=True)  # (2, 1)
    ref_acc = correct.mean(axis=1, keepdims=True)
    r = length_harmonizing_reward(lengths, correct, ref_len, ref_acc, lam=5.0)
    assert r.shape == (2, 3)
    for p in range(2):
        for k in range(3):
            want = ref_len[p, 0] / lengths[p, k] - 1 + 5.0 * (correct[p, k] - ref_acc[p, 0])
            assert r[p, k] == pytest.approx(want, abs=1e-14)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lam": -0.1}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"lengths": [10, 0]}, "lengths must be positive"),
        ({"lengths": [10, -3]}, "lengths must be positive"),
        ({"ref_mean_length": 0.0}, "ref_mean_length"),
        ({"correct": [1, 2]}, "correct"),
        ({"ref_accuracy": 1.5}, "ref_accuracy"),
        ({"lengths": [10, float("nan")]}, "NaN"),
        ({"lengths": [1, 2, 3]}, "broadcast"),
    ],
)
def test_rlh_rejects_bad_input(kwargs, match):
    args = {"lengths": [10, 20], "correct": [1, 0], "ref_mean_length": 15.0, "ref_accuracy": 0.5, "lam": 2.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        length_harmonizing_reward(**args)


def test_postprocess_clip_then_zscore():
    raw = np.array([-5.0, -1.0, 0.0, 2.0, 9.0])
    clipped = np.array([-2.0, -1.0, 0.0, 2.0, 4.0])
    out = postprocess_rewards(raw)
    np.testing.assert_allclose(out, (clipped - clipped.mean()) / clipped.std(), atol=1e-15)
    assert out.mean() == pytest.approx(0.0, abs=1e-15)
    assert out.std() == pytest.approx(1.0)
    np.testing.assert_array_equal(raw, [-5.0, -1.0, 0.0, 2.0, 9.0])  # input untouched


def test_postprocess_switches():
    raw = np.array([-5.0, 1.0, 9.0])
    np.testing.assert_array_equal(postprocess_rewards(raw, clip=None, zscore=False), raw)
    np.testing.assert_array_equal(postprocess_rewards(raw, zscore=False), [-2.0, 1.0, 4.0])
    np.testing.assert_allclose(postprocess_rewards(raw, clip=None), (raw - raw.mean()) / raw.std())
    np.testing.assert_array_equal(postprocess_rewards(raw, clip=(0.0, 1.0), zscore=False), [0.0, 1.0, 1.0])


def test_postprocess_constant_and_empty():
    np.testing.assert_array_equal(postprocess_rewards([0.3] * 7), np.zeros(7))
    np.testing.assert_array_equal(postprocess_rewards([7.0, 9.0]), [0.0, 0.0])  # both clip to 4
    assert postprocess_rewards([]).shape == (0,)
    with pytest.raises(ValueError, match="clip"):
        postprocess_rewards([1.0], clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="NaN"):
        postprocess_rewards([1.0, float("nan")])


def test_problem_and_group_baselines():
    assert problem_baselines([100, 200, 600], [1, 0, 1]) == (300.0, pytest.approx(2 / 3))
    with pytest.raises(ValueError):
        problem_baselines([], [])
    with pytest.raises(ValueError, match="differ"):
        problem_baselines([1, 2], [1])
    got = group_baselines(["a", "b", "a", "b", "b"], [10, 1, 30, 2, 3], [1, 0, 0, 0, 1])
    assert got == {"a": (20.0, 0.5), "b": (2.0, pytest.approx(1 / 3))}


@pytest.mark.parametrize(
    "base_acc, base_len, acc, length, reported",
    [(73.4, 932, 76.8, 554, 0.55), (88.2, 1717, 89.3, 1121, 0.38)],
)
def test_aes_reproduces_paper_rows(base_acc, base_len, acc, length, reported):
    assert aes(acc, length, base_acc, base_len) == pytest.approx(reported, abs=0.01)
    # Units of accuracy do not matter as long as both use the same one.
    assert aes(acc / 100, length, base_acc / 100, base_len) == pytest.approx(
        aes(acc, length, base_acc, base_len)
    )


def test_aes_by_hand_both_branches():
    # dL = (1000 - 700)/1000 = 0.3, dA = (0.55 - 0.5)/0.5 = 0.1 -> 0.3 + 3*0.1
    assert aes(0.55, 700, 0.5, 1000) == pytest.approx(0.6)
    # dA = (0.45 - 0.5)/0.5 = -0.1 -> 0.3 - 5*0.1 (docs/method.md definition, not the paper's +beta*|dA|)
    assert aes(0.45, 700, 0.5, 1000) == pytest.approx(-0.2)
    assert aes(0.45, 700, 0.5, 1000, alpha=2.0, gamma=1.0) == pytest.approx(0.5)
    assert aes(0.5, 1200, 0.5, 1000) == pytest.approx(-0.2)  # dA = 0 uses the beta branch (0 either way)
    with pytest.raises(ValueError, match="base_length"):
        aes(0.5, 10, 0.5, 0)
    with pytest.raises(ValueError, match="base_accuracy"):
        aes(0.5, 10, 0.0, 10)
