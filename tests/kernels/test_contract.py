"""Black-box tests of the "Contract of the core API" in ../shared/METHOD.md.

Written from METHOD.md alone (not from the implementation): every expected value comes from a float64
reference of the formulas there. Outside tests call these functions exactly as METHOD.md writes them, so
the signatures (keyword names, defaults, keyword-only markers) are checked too.
"""

from __future__ import annotations

import inspect
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from o1pruner.grading import is_correct
from o1pruner.kernels import linear_logprobs, linear_ppo_loss
from o1pruner.reward import aes, length_harmonizing_reward

LEVELS = ("token", "sequence", "sequence_geomean")
REDUCTIONS = ("sequence_mean", "token_mean")
BACKENDS = ("torch", pytest.param("triton", marks=pytest.mark.triton), "auto")
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3


# --------------------------------------------------------------------------- float64 reference (METHOD.md)


def ref_logps(hidden, weight, labels, temperature=1.0, ignore_index=-100):
    """log_softmax(hidden @ weight.T / temperature)[label] in float64; 0.0 where label == ignore_index."""
    logits = (hidden.double() @ weight.double().T) / temperature
    lsm = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lp = lsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, torch.zeros_like(lp))


def ref_f(r, a, clip_low, clip_high):
    """f(r, A) = -min(r*A, clip(r, 1-clip_low, 1+clip_high)*A)."""
    return -torch.minimum(r * a, torch.clamp(r, 1.0 - clip_low, 1.0 + clip_high) * a)


def ref_loss(
    hidden,
    weight,
    labels,
    old_logps,
    advantages,
    *,
    seq_ids=None,
    importance_level="token",
    clip_low=0.2,
    clip_high=0.2,
    reduction="sequence_mean",
    temperature=1.0,
    ignore_index=-100,
):
    """The PPO-clip loss of METHOD.md in float64 (differentiable w.r.t. float64 hidden/weight)."""
    lp = ref_logps(hidden, weight, labels, temperature, ignore_index)
    if seq_ids is None:
        assert hidden.dim() == 3
        b, t = labels.shape
        seq_ids = torch.arange(b).unsqueeze(1).expand(b, t)
    lp, lab = lp.reshape(-1), labels.reshape(-1)
    old, adv, sid = old_logps.double().reshape(-1), advantages.double().reshape(-1), seq_ids.reshape(-1)
    valid = lab != ignore_index
    d = lp - old
    seqs = sorted({int(s) for s in sid[valid].tolist()})
    if importance_level == "token":
        lt = ref_f(torch.exp(d), adv, clip_low, clip_high)
        if reduction == "token_mean":
            return lt[valid].sum() / valid.sum()
        per_seq = [lt[valid & (sid == s)].mean() for s in seqs]
        return torch.stack(per_seq).mean()
    per_seq = []
    for s in seqs:
        m = valid & (sid == s)
        agg = d[m].sum() if importance_level == "sequence" else d[m].mean()
        per_seq.append(ref_f(torch.exp(agg), adv[m][0], clip_low, clip_high))
    return torch.stack(per_seq).mean()


# --------------------------------------------------------------------------- helpers

# the implementation runs on CUDA when there is one (there "triton" needs CUDA tensors, and conftest.py does
# not set TRITON_INTERPRET); the float64 references always run on the CPU. ``.to``/``.cpu`` are
# differentiable, so gradients still reach the CPU leaves.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dev(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def logprobs(hidden, weight, labels, **kw):
    """``linear_logprobs`` on DEVICE; the result comes back to the CPU."""
    out = linear_logprobs(_dev(hidden), _dev(weight), _dev(labels), **kw)
    assert out.device.type == DEVICE.type
    return out.cpu()


def ppo(hidden, weight, labels, old_logps, advantages, *, seq_ids=None, **kw):
    """``linear_ppo_loss`` on DEVICE; loss and logps come back to the CPU."""
    out = linear_ppo_loss(
        _dev(hidden),
        _dev(weight),
        _dev(labels),
        _dev(old_logps),
        _dev(advantages),
        seq_ids=_dev(seq_ids),
        **kw,
    )
    return SimpleNamespace(loss=out.loss.cpu(), logps=out.logps.cpu(), clip_fraction=out.clip_fraction)


def rel_err(x, ref):
    x, ref = torch.as_tensor(x).double(), torch.as_tensor(ref).double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-12))


def make_rows(b=3, t=5, h=24, v=67, seed=0, seq_adv=True, noise=0.3, masked_rows=()):
    """(B, T, H) inputs with some ignored labels; old_logps near the current ones so some ratios clip."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 0] = -100
    labels[1, -1] = -100
    labels[-1, 2] = -100
    for r in masked_rows:
        labels[r] = -100
    cur = ref_logps(hidden, weight, labels)
    old = (cur + noise * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    old[labels == -100] = 3.0  # garbage where ignored: must not matter
    if seq_adv:
        adv = torch.tensor([1.3, -0.7, 0.4, -1.1, 2.0][:b]).unsqueeze(1).expand(b, t).contiguous()
    else:
        adv = torch.randn(b, t, generator=g)
    return hidden, weight, labels, old, adv


def leaf(x, dtype=torch.float32):
    return x.detach().to(dtype).clone().requires_grad_(True)


def check_loss_against_ref(hidden, weight, labels, old, adv, backend, **kw):
    h32, w32 = leaf(hidden), leaf(weight)
    out = ppo(h32, w32, labels, old, adv, backend=backend, **kw)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    out.loss.backward()
    h64, w64 = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    ref = ref_loss(h64, w64, labels, old, adv, **kw)
    ref.backward()
    ref_v = float(ref.detach())
    err = abs(float(out.loss.detach()) - ref_v) / max(abs(ref_v), 1e-6)
    assert err < LOSS_RTOL, f"loss {float(out.loss.detach())} vs ref {ref_v} ({kw}, backend={backend})"
    assert rel_err(h32.grad, h64.grad) < GRAD_RTOL, f"d/dhidden ({kw}, backend={backend})"
    assert rel_err(w32.grad, w64.grad) < GRAD_RTOL, f"d/dweight ({kw}, backend={backend})"
    return out


# --------------------------------------------------------------------------- signatures


def _params(fn):
    return inspect.signature(fn).parameters


def test_signature_logprobs():
    p = _params(linear_logprobs)
    names = list(p)
    assert names[:3] == ["hidden", "weight", "labels"]
    for n in ("hidden", "weight", "labels"):
        assert p[n].kind in (p[n].POSITIONAL_ONLY, p[n].POSITIONAL_OR_KEYWORD)
    expected = {"temperature": 1.0, "ignore_index": -100, "backend": "auto"}
    _assert_keyword_only_defaults(p, expected)


def _assert_keyword_only_defaults(p, expected: dict) -> None:
    for n, default in expected.items():
        assert n in p, n
        assert p[n].kind == p[n].KEYWORD_ONLY, n
        assert p[n].default == default, (n, p[n].default)


def test_signature_ppo():
    p = _params(linear_ppo_loss)
    assert list(p)[:5] == ["hidden", "weight", "labels", "old_logps", "advantages"]
    expected = {
        "seq_ids": None,
        "importance_level": "token",
        "clip_low": 0.2,
        "clip_high": 0.2,
        "reduction": "sequence_mean",
        "temperature": 1.0,
        "ignore_index": -100,
        "backend": "auto",
    }
    _assert_keyword_only_defaults(p, expected)


def test_signature_reward_and_grading():
    p = _params(length_harmonizing_reward)
    assert list(p)[:4] == ["lengths", "correct", "ref_mean_length", "ref_accuracy"]
    assert p["lam"].default == 2.0
    p = _params(aes)
    assert list(p)[:4] == ["accuracy", "length", "base_accuracy", "base_length"]
    assert (p["alpha"].default, p["beta"].default, p["gamma"].default) == (1.0, 3.0, 5.0)
    assert list(_params(is_correct))[:2] == ["response", "gold"]


def test_keyword_only_and_keyword_names_callable():
    # on DEVICE, so that backend="auto" below is the Triton backend where there is CUDA
    hidden, weight, labels, old, adv = (_dev(x) for x in make_rows(b=2, t=3))
    with pytest.raises(TypeError):
        linear_logprobs(hidden, weight, labels, 1.0)  # temperature is keyword-only
    out = linear_logprobs(hidden=hidden, weight=weight, labels=labels, temperature=1.0, ignore_index=-100)
    assert out.shape == labels.shape
    res = linear_ppo_loss(
        hidden=hidden,
        weight=weight,
        labels=labels,
        old_logps=old,
        advantages=adv,
        seq_ids=None,
        importance_level="token",
        clip_low=0.2,
        clip_high=0.2,
        reduction="sequence_mean",
        temperature=1.0,
        ignore_index=-100,
        backend="auto",
    )
    for attr in ("loss", "logps", "clip_fraction"):
        assert hasattr(res, attr), attr


def test_defaults_equal_explicit_defaults():
    hidden, weight, labels, old, adv = make_rows(seed=1)
    a = ppo(hidden, weight, labels, old, adv)
    b = ppo(
        hidden,
        weight,
        labels,
        old,
        adv,
        importance_level="token",
        clip_low=0.2,
        clip_high=0.2,
        reduction="sequence_mean",
        temperature=1.0,
        ignore_index=-100,
        backend="torch",
    )
    assert torch.allclose(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    ref = ref_loss(hidden.double(), weight.double(), labels, old, adv)
    assert abs(float(a.loss) - float(ref)) / max(abs(float(ref)), 1e-6) < LOSS_RTOL


# --------------------------------------------------------------------------- linear_logprobs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_values_and_grads(backend, temperature):
    hidden, weight, labels, _, _ = make_rows(b=2, t=5, h=24, v=67, seed=2)
    h32, w32 = leaf(hidden), leaf(weight)
    out = logprobs(h32, w32, labels, temperature=temperature, backend=backend)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    ign = labels == -100
    assert torch.all(out[ign] == 0.0), "ignored labels must give exactly 0.0"
    h64, w64 = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    ref = ref_logps(h64, w64, labels, temperature)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    go = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3))
    (out * go).sum().backward()
    (ref * go.double()).sum().backward()
    assert rel_err(h32.grad, h64.grad) < GRAD_RTOL
    assert rel_err(w32.grad, w64.grad) < GRAD_RTOL
    assert torch.all(h32.grad[ign] == 0.0), "ignored positions get no gradient"


def test_logprobs_layouts_and_ignore_index():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(41, 16, generator=g) * 0.3
    for shape in [(7,), (2, 3), (2, 2, 3)]:
        h = torch.randn(*shape, 16, generator=g)
        lab = torch.randint(0, 41, shape, generator=g)
        lab.view(-1)[1] = -100
        out = logprobs(h, w, lab)
        assert out.shape == lab.shape and out.dtype == torch.float32
        assert torch.allclose(out.double(), ref_logps(h, w, lab), atol=1e-5)
        assert out.view(-1)[1].item() == 0.0
    # a custom ignore_index: -100 is then an ordinary (invalid) label nowhere used; -1 is ignored
    h = torch.randn(2, 4, 16, generator=g)
    lab = torch.randint(0, 41, (2, 4), generator=g)
    lab[0, 1] = -1
    out = logprobs(h, w, lab, ignore_index=-1)
    assert out[0, 1].item() == 0.0
    assert torch.allclose(out.double(), ref_logps(h, w, lab, ignore_index=-1), atol=1e-5)


def test_logprobs_float32_output_for_other_input_dtypes():
    hidden, weight, labels, _, _ = make_rows(b=2, t=3, seed=5)
    out = logprobs(hidden.bfloat16(), weight.bfloat16(), labels, backend="torch")
    assert out.dtype == torch.float32
    ref = ref_logps(hidden.bfloat16(), weight.bfloat16(), labels)
    assert torch.allclose(out.double(), ref, atol=5e-2)
    assert torch.all(out[labels == -100] == 0.0)
    out = logprobs(hidden.double(), weight.double(), labels, backend="torch")
    assert out.dtype == torch.float32, "METHOD.md: returns float32"


def test_logprobs_no_grad_inputs_and_frozen_weight():
    hidden, weight, labels, _, _ = make_rows(b=2, t=3, seed=6)
    out = logprobs(hidden, weight, labels)
    assert not out.requires_grad
    h = leaf(hidden)
    out = logprobs(h, weight, labels)
    out.sum().backward()
    assert h.grad is not None and weight.grad is None


# --------------------------------------------------------------------------- linear_ppo_loss


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ppo_loss_rows_against_reference(backend, level, reduction):
    hidden, weight, labels, old, adv = make_rows(b=4, t=6, h=24, v=67, seed=7)
    check_loss_against_ref(
        hidden, weight, labels, old, adv, backend, importance_level=level, reduction=reduction
    )


@pytest.mark.triton
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ppo_loss_triton_against_reference(level, reduction):
    hidden, weight, labels, old, adv = make_rows(b=2, t=4, h=20, v=37, seed=8)
    check_loss_against_ref(
        hidden, weight, labels, old, adv, "triton", importance_level=level, reduction=reduction
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_loss_asymmetric_clip_temperature(backend):
    hidden, weight, labels, old, adv = make_rows(b=3, t=4, h=20, v=37, seed=9, seq_adv=False, noise=0.5)
    check_loss_against_ref(
        hidden, weight, labels, old, adv, backend, clip_low=0.1, clip_high=0.3, temperature=0.8
    )


@pytest.mark.parametrize("level", LEVELS)
def test_ppo_loss_sequence_levels_big_ratios(level):
    # larger per-token drift: sum_t d_t leaves the clip range, exercising the clipped branch
    hidden, weight, labels, old, adv = make_rows(b=4, t=5, seed=10, noise=0.6)
    check_loss_against_ref(hidden, weight, labels, old, adv, "torch", importance_level=level, clip_low=0.15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
def test_ppo_loss_packed_layout_matches_rows(backend, level):
    """(N, H) + seq_ids with ragged sequences; also equals the (B, T, H) layout of the same data."""
    g = torch.Generator().manual_seed(11)
    h_dim, v = 20, 37
    lens = [3, 5, 2]
    n = sum(lens)
    hidden = torch.randn(n, h_dim, generator=g)
    weight = torch.randn(v, h_dim, generator=g) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[0] = -100  # a "prompt" token in sequence 0
    labels[3] = -100  # first token of sequence 1
    seq_ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    old = (ref_logps(hidden, weight, labels) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    adv = torch.tensor([0.9, -1.4, 0.5])[seq_ids].contiguous()
    for red in REDUCTIONS:
        out = check_loss_against_ref(
            hidden, weight, labels, old, adv, backend, seq_ids=seq_ids, importance_level=level, reduction=red
        )
        assert out.logps.shape == labels.shape
    # the same sequences padded into rows must give the same loss
    t = max(lens)
    hb = torch.zeros(len(lens), t, h_dim)
    lb = torch.full((len(lens), t), -100, dtype=torch.long)
    ob = torch.zeros(len(lens), t)
    ab = torch.zeros(len(lens), t)
    start = 0
    for i, ln in enumerate(lens):
        hb[i, :ln], lb[i, :ln], ob[i, :ln] = (
            hidden[start : start + ln],
            labels[start : start + ln],
            old[start : start + ln],
        )
        ab[i] = adv[start]
        start += ln
    packed = ppo(hidden, weight, labels, old, adv, seq_ids=seq_ids, importance_level=level, backend=backend)
    rows = ppo(hb, weight, lb, ob, ab, importance_level=level, backend=backend)
    assert torch.allclose(packed.loss, rows.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", LEVELS)
def test_ppo_loss_seq_ids_are_group_labels(level):
    """seq_ids is a per-token sequence index: permuting the tokens together with it changes nothing."""
    g = torch.Generator().manual_seed(12)
    n, h_dim, v = 9, 16, 29
    hidden = torch.randn(n, h_dim, generator=g)
    weight = torch.randn(v, h_dim, generator=g) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[4] = -100
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    old = (ref_logps(hidden, weight, labels) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    adv = torch.tensor([1.0, -0.6, 0.3])[seq_ids].contiguous()
    base = ppo(hidden, weight, labels, old, adv, seq_ids=seq_ids, importance_level=level)
    perm = torch.tensor([7, 0, 3, 8, 1, 4, 2, 6, 5])
    shuf = ppo(
        hidden[perm],
        weight,
        labels[perm],
        old[perm],
        adv[perm],
        seq_ids=seq_ids[perm],
        importance_level=level,
    )
    assert torch.allclose(base.loss, shuf.loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(base.logps[perm], shuf.logps, atol=1e-6)


def test_ppo_loss_fully_masked_row_is_skipped_in_sequence_mean():
    hidden, weight, labels, old, adv = make_rows(b=3, t=4, seed=13, seq_adv=False, masked_rows=(1,))
    for red in REDUCTIONS:
        check_loss_against_ref(hidden, weight, labels, old, adv, "torch", reduction=red)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_output_types(backend):
    hidden, weight, labels, old, adv = make_rows(b=2, t=4, h=16, v=29, seed=14)
    h = leaf(hidden)
    out = ppo(h, weight, labels, old, adv, backend=backend)
    assert isinstance(out.loss, torch.Tensor) and out.loss.dim() == 0 and out.loss.dtype == torch.float32
    assert out.loss.requires_grad
    assert isinstance(out.logps, torch.Tensor)
    assert out.logps.dtype == torch.float32 and out.logps.shape == labels.shape
    assert not out.logps.requires_grad and out.logps.grad_fn is None
    assert torch.all(out.logps[labels == -100] == 0.0)
    assert torch.allclose(out.logps.double(), ref_logps(hidden, weight, labels), atol=1e-5)
    cf = float(out.clip_fraction)
    assert 0.0 <= cf <= 1.0
    out.loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("level", LEVELS)
def test_clip_fraction_extremes(level):
    hidden, weight, labels, _, _ = make_rows(b=3, t=4, seed=15)
    cur = ref_logps(hidden, weight, labels).float()
    adv = torch.full(labels.shape, 0.8)
    out = ppo(hidden, weight, labels, cur, adv, importance_level=level)
    assert float(out.clip_fraction) == pytest.approx(0.0, abs=1e-6)  # r == 1 everywhere
    # r = e^5 >> 1 + clip_high with A > 0: every token/sequence is clipped
    out = ppo(hidden, weight, labels, cur - 5.0, adv, importance_level=level)
    assert float(out.clip_fraction) == pytest.approx(1.0, abs=1e-6)
    assert float(out.loss) == pytest.approx(-1.2 * 0.8, rel=1e-5)


@pytest.mark.parametrize("level", ["sequence", "sequence_geomean"])
def test_sequence_levels_reject_varying_advantage(level):
    hidden, weight, labels, old, _ = make_rows(b=2, t=4, seed=16)
    adv = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, -1.0, 1.0]])
    labels[1, 2] = 5  # the differing advantage is on a valid token
    with pytest.raises(ValueError):
        ppo(hidden, weight, labels, old, adv, importance_level=level)
    seq_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError):
        ppo(
            hidden.reshape(8, -1),
            weight,
            labels.reshape(8),
            old.reshape(8),
            adv.reshape(8),
            seq_ids=seq_ids,
            importance_level=level,
        )
    # the token level accepts per-token advantages
    out = ppo(hidden, weight, labels, old, adv, importance_level="token")
    assert torch.isfinite(out.loss)


def test_frozen_weight_gradient_only_to_hidden():
    hidden, weight, labels, old, adv = make_rows(b=2, t=4, seed=17)
    h = leaf(hidden)
    out = ppo(h, weight, labels, old, adv)
    out.loss.backward()
    assert h.grad is not None and weight.grad is None
    assert torch.all(h.grad[labels == -100] == 0.0)


# --------------------------------------------------------------------------- reward


def r_lh(length, correct, lbar, abar, lam):
    return lbar / length - 1.0 + lam * (correct - abar)


def test_length_harmonizing_reward_broadcasting():
    lengths = [[100, 200, 300], [50, 400, 80]]
    correct = [[True, False, True], [True, True, False]]
    ref_len = [[150.0], [300.0]]
    ref_acc = [[2 / 3], [0.5]]
    out = length_harmonizing_reward(lengths, correct, ref_len, ref_acc)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (2, 3)
    exp = np.array(
        [
            [r_lh(lengths[i][j], float(correct[i][j]), ref_len[i][0], ref_acc[i][0], 2.0) for j in range(3)]
            for i in range(2)
        ]
    )
    np.testing.assert_allclose(out, exp, rtol=1e-12)
    out5 = length_harmonizing_reward(
        np.array(lengths), np.array(correct, dtype=int), np.array(ref_len), np.array(ref_acc), lam=5.0
    )
    assert out5.dtype == np.float64
    exp5 = np.array(
        [
            [r_lh(lengths[i][j], float(correct[i][j]), ref_len[i][0], ref_acc[i][0], 5.0) for j in range(3)]
            for i in range(2)
        ]
    )
    np.testing.assert_allclose(out5, exp5, rtol=1e-12)
    # scalar references broadcast over a 1-D batch; integer inputs still give float64
    out0 = length_harmonizing_reward(np.array([10, 20, 40]), np.array([1, 0, 1]), 20, 0.5, lam=0.0)
    assert isinstance(out0, np.ndarray) and out0.dtype == np.float64
    np.testing.assert_allclose(out0, [1.0, 0.0, -0.5], rtol=1e-12)
    # 1-D references, one per sample
    out1 = length_harmonizing_reward([100, 100], [1, 0], [100, 300], [0.25, 0.25], lam=1.0)
    np.testing.assert_allclose(out1, [0.75, 1.75], rtol=1e-12)


def aes_ref(acc, length, bacc, blen, alpha=1.0, beta=3.0, gamma=5.0):
    d_l = (blen - length) / blen
    d_a = (acc - bacc) / bacc
    return alpha * d_l + beta * d_a if d_a >= 0 else alpha * d_l - gamma * abs(d_a)


def test_aes_both_branches():
    up = aes(0.80, 600.0, 0.75, 1000.0)
    assert isinstance(up, float)
    assert up == pytest.approx(0.4 + 3.0 * (0.05 / 0.75), rel=1e-12)
    down = aes(0.70, 600.0, 0.75, 1000.0)
    assert isinstance(down, float)
    assert down == pytest.approx(0.4 - 5.0 * (0.05 / 0.75), rel=1e-12)
    assert aes(0.75, 1200.0, 0.75, 1000.0) == pytest.approx(-0.2, rel=1e-12)  # dA == 0
    custom = aes(0.70, 500.0, 0.80, 1000.0, alpha=2.0, beta=1.0, gamma=4.0)
    assert custom == pytest.approx(aes_ref(0.70, 500.0, 0.80, 1000.0, 2.0, 1.0, 4.0), rel=1e-12)
    custom = aes(0.90, 500.0, 0.80, 1000.0, alpha=2.0, beta=1.0, gamma=4.0)
    assert custom == pytest.approx(2.0 * 0.5 + 1.0 * 0.125, rel=1e-12)


@pytest.mark.parametrize(
    ("base", "tuned", "reported"),
    [((73.4, 932), (76.8, 554), 0.55), ((88.2, 1717), (89.3, 1121), 0.38)],
)
def test_aes_paper_rows(base, tuned, reported):
    val = aes(tuned[0], tuned[1], base[0], base[1])
    assert val == pytest.approx(reported, abs=0.01)
    assert val == pytest.approx(aes_ref(tuned[0], tuned[1], base[0], base[1]), rel=1e-12)
    # accuracy as fractions gives the same score
    assert aes(tuned[0] / 100, tuned[1], base[0] / 100, base[1]) == pytest.approx(val, rel=1e-9)


# --------------------------------------------------------------------------- grading


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        ("<think>so maybe \\boxed{3}</think>The answer is \\boxed{5}.", "5", True),
        ("<think>so maybe \\boxed{3}</think>The answer is \\boxed{5}.", "3", False),
        ("First \\boxed{2}. On reflection, \\boxed{7}.", "7", True),
        ("First \\boxed{2}. On reflection, \\boxed{7}.", "2", False),
        ("We get \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}", True),
        ("We get \\boxed{\\frac{3}{4}}.", "3/4", True),
        ("Thus x = 0.5, so \\boxed{0.5}", "\\frac{1}{2}", True),
        ("Hence \\boxed{\\frac{1}{2}}", "0.5", True),
        ("Hence \\boxed{\\frac{1}{2}}", "0.6", False),
        ("Compute 6*7 = 42. So the final answer is 42.", "42", True),
        ("Compute 6*7 = 42. The final answer is 42", "42", True),
        ("Compute 6*7 = 42. Therefore, the answer is 42.", "42", True),
        ("Compute 6*7 = 41. So the final answer is 41.", "42", False),
        ("The answer is 3? Let me recheck. Yes: \\boxed{5}", "5", True),
        ("The answer is 3? Let me recheck. Yes: \\boxed{5}", "3", False),
        # cut off at the token limit: gold appears but there is no final answer
        ("Let me compute. 6*7 = 42. Now let us double check by another method: 42 / 6 = ", "42", False),
        ("<think>6*7 = 42, I am fairly sure it is 42 and the answer is 42 but let me", "42", False),
        ("", "42", False),
    ],
)
def test_is_correct_rules(response, gold, expected):
    res = is_correct(response, gold)
    assert isinstance(res, bool)
    assert res is expected, (response, gold)


def test_is_correct_boxed_inside_think_only_is_not_final():
    # the final answer is the last \boxed{} *after* </think>; a closed think followed by no answer is wrong
    assert is_correct("<think>It is \\boxed{5}.</think>I could not finish", "5") is False


JUNK = [
    "\\boxed{",
    "\\boxed{{{{{{",
    "\\boxed{}",
    "}}}}\\boxed{\\frac{",
    "</think></think>\\boxed{1}}",
    "\x00\x01\ud7ff\u202e\\boxed{\u00e9}",
    "\\boxed{" * 2000,
    "(" * 20000,
    "the final answer is " + "\\frac{" * 500,
    "the final answer is " + "1" * 5000,
    "x" * 200000 + "\\boxed{1}",
]
# expressions a CAS may try to evaluate forever: each call must still come back in bounded time
HEAVY = ["\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{(10^{10^{10}})!}", "\\boxed{2**99999999999}"]


def test_is_correct_junk_never_raises_and_is_bounded():
    golds = ["1", "", "\\frac{", "}{", "\\boxed{1}", "9^{9^{9^{9}}}"]
    pairs = [(r, g) for r in JUNK for g in golds] + [(r, "1") for r in HEAVY]
    total = time.monotonic()
    for resp, gold in pairs:
        t0 = time.monotonic()
        res = is_correct(resp, gold)
        assert isinstance(res, bool)
        assert time.monotonic() - t0 < 10.0, (resp[:40], gold)
    assert time.monotonic() - total < 40.0
    assert is_correct("x" * 200000 + " so \\boxed{1}", "1") is True


# --------------------------------------------------------------------------- awkward sizes, dtypes, strides


@pytest.mark.parametrize(
    ("backend", "n", "v", "h"),
    [("torch", 2100, 1100, 8), pytest.param("triton", 70, 300, 40, marks=pytest.mark.triton)],
)
def test_sizes_crossing_chunks_and_blocks(backend, n, v, h):
    """Token and vocabulary counts that are not multiples of any power-of-two chunk or block size."""
    g = torch.Generator().manual_seed(18)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    lens = [n // 3, n // 3, n - 2 * (n // 3)]
    seq_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    old = (ref_logps(hidden, weight, labels) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    adv = torch.tensor([0.7, -1.2, 1.5])[seq_ids].contiguous()
    for level in LEVELS:
        check_loss_against_ref(
            hidden, weight, labels, old, adv, backend, seq_ids=seq_ids, importance_level=level, clip_high=0.28
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_input_dtypes_give_float32(backend, dtype):
    hidden, weight, labels, old, adv = make_rows(b=2, t=4, h=16, v=29, seed=19)
    h = leaf(hidden, dtype)
    out = ppo(h, weight.to(dtype), labels, old, adv, backend=backend)
    assert out.loss.dtype == torch.float32 and out.logps.dtype == torch.float32
    ref = ref_loss(hidden.to(dtype).double(), weight.to(dtype).double(), labels, old, adv)
    tol = 1e-4 if dtype == torch.float64 else 0.1
    assert abs(float(out.loss.detach()) - float(ref)) <= tol * max(abs(float(ref)), 1e-2)
    assert torch.all(out.logps[labels == -100] == 0.0)
    out.loss.backward()
    assert h.grad is not None and h.grad.dtype == dtype and torch.isfinite(h.grad.float()).all()
    lp = logprobs(hidden.to(dtype), weight.to(dtype), labels, backend=backend)
    assert lp.dtype == torch.float32
    assert torch.allclose(lp.double(), ref_logps(hidden.to(dtype), weight.to(dtype), labels), atol=5e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    hidden, weight, labels, old, adv = make_rows(b=3, t=4, h=16, v=29, seed=20, seq_adv=False)
    h_nc = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    w_nc = weight.t().contiguous().t()
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous()
    assert not _dev(h_nc).is_contiguous() and not _dev(w_nc).is_contiguous()  # ``.to`` keeps the strides
    lp = logprobs(h_nc, w_nc, labels, backend=backend)
    assert torch.allclose(lp.double(), ref_logps(hidden, weight, labels), atol=1e-5)
    check_loss_against_ref(h_nc, w_nc, labels, old, adv, backend, reduction="token_mean")


# --------------------------------------------------------------------------- grading: METHOD.md wording


def test_is_correct_unclosed_think_uses_last_boxed():
    # "the content of its last \boxed{} (after any </think>)": with no </think> the whole response counts
    assert is_correct("<think>Let me see. 6*7 = 42, so \\boxed{42}", "42") is True


def test_is_correct_answer_phrase_must_be_closing():
    # "an explicit closing 'the (final) answer is X'": an early phrase followed by more reasoning that
    # is then cut off at the token limit is not a closing answer
    resp = (
        "Maybe the answer is 42. Wait, that was a guess; let me check it carefully by another method. "
        "We have 6 groups of 7, so the total is 6*7 = "
    )
    assert is_correct(resp, "42") is False
