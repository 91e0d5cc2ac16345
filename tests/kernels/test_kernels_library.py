"""The stand-alone library: import isolation, the modules, shift_labels, and bad input named clearly."""

from __future__ import annotations

import os
import subprocess
import sys

import o1pruner_kernels
import pytest
import torch
from kernel_utils import DEVICE, to_device
from o1pruner_kernels import IGNORE_INDEX, LinearLogprobs, LinearPPOLoss, shift_labels
from o1pruner_kernels.reference import reference_logprobs, reference_ppo_loss

import o1pruner.kernels

HEAVY = ("transformers", "peft", "bitsandbytes", "vllm", "datasets")


def test_import_pulls_no_training_stack():
    code = f"import sys, o1pruner_kernels\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"importing o1pruner_kernels imported {res.stdout.strip()}"


def test_o1pruner_reexports_every_public_name():
    for name in o1pruner_kernels.__all__:
        assert getattr(o1pruner.kernels, name) is getattr(o1pruner_kernels, name), name
    assert IGNORE_INDEX == -100


def test_shift_labels_aligns_and_respects_packed_sequences():
    y = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    assert shift_labels(y).tolist() == [[6, 7, 8, -100], [2, 3, 4, -100]]
    packed = torch.tensor([10, 11, 12, 20, 21, 30])
    sid = torch.tensor([0, 0, 0, 1, 1, 2])
    assert shift_labels(packed, sid).tolist() == [11, 12, -100, 21, -100, -100]
    assert shift_labels(y, ignore_index=-1)[:, -1].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="seq_ids"):
        shift_labels(packed, sid[:3])
    with pytest.raises(ValueError, match="labels"):
        shift_labels(torch.zeros(3))


def test_modules_match_the_float64_reference():
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 30, (2, 6), generator=g)
    labels = shift_labels(ids)
    old = torch.randn(2, 6, generator=g) - 3.4
    adv = torch.randn(2, 1, generator=g).expand(2, 6)
    loss_fn = LinearPPOLoss(importance_level="sequence_geomean", clip_low=0.1, clip_high=0.3)
    assert "sequence_geomean" in repr(loss_fn)
    out = loss_fn(to_device(hidden), to_device(weight), to_device(labels), to_device(old), to_device(adv))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = reference_ppo_loss(
        h64, w64, labels, old, adv, importance_level="sequence_geomean", clip_low=0.1, clip_high=0.3
    )
    got, want = float(out.loss.detach()), float(ref["loss"].detach())
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want))
    lp = LinearLogprobs(temperature=0.8)(to_device(hidden), to_device(weight), to_device(labels))
    ref_lp = reference_logprobs(h64, w64, labels, temperature=0.8)
    assert (lp.detach().cpu().double() - ref_lp.detach()).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"importance_level": "seq"}, "importance_level"),
        ({"reduction": "sum"}, "reduction"),
        ({"clip_low": -0.1}, "clip_low"),
        ({"clip_high": "wide"}, "clip_high"),
        ({"temperature": 0.0}, "temperature"),
        ({"ignore_index": 1.5}, "ignore_index"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_module_options_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearPPOLoss(**kwargs)


def _good():
    g = torch.Generator().manual_seed(2)
    return {
        "hidden": torch.randn(2, 4, 8, generator=g),
        "weight": torch.randn(20, 8, generator=g),
        "labels": torch.randint(0, 20, (2, 4), generator=g),
        "old_logps": torch.full((2, 4), -3.0),
        "advantages": torch.ones(2, 4),
    }


@pytest.mark.parametrize(
    ("arg", "bad", "match"),
    [
        (
            "advantages",
            lambda a: a.index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("nan"))),
            "advantages must be finite.*position 6",
        ),
        ("advantages", lambda a: a.fill_(float("inf")), "advantages must be finite"),
        (
            "old_logps",
            lambda a: a.index_fill_(1, torch.tensor([3]), float("-inf")),
            "old_logps must be finite",
        ),
        ("labels", lambda y: y.index_fill_(1, torch.tensor([1]), 20), "label 20 at flat position 1"),
        ("labels", lambda y: y.index_fill_(1, torch.tensor([0]), -5), "label -5"),
        ("labels", lambda y: y.bool(), "labels must be an integer"),
        ("labels", lambda y: y.float(), "labels must be an integer"),
        ("labels", lambda y: y[:, :3], "labels shape"),
        ("hidden", lambda h: h.long(), "hidden must be a floating-point"),
        ("weight", lambda w: w[:, :5], "does not match hidden"),
        ("weight", lambda w: w[0], "weight must be a floating-point"),
        ("old_logps", lambda a: a[:1], "old_logps shape"),
        ("advantages", lambda a: a.bool(), "advantages must be a real"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(arg, bad, match):
    kw = _good()
    kw[arg] = bad(kw[arg])
    args = [kw.pop(k) for k in ("hidden", "weight", "labels", "old_logps", "advantages")]
    with pytest.raises(ValueError, match=match):
        o1pruner_kernels.linear_ppo_loss(*[to_device(a) for a in args], backend="torch")


def test_ignored_tokens_may_hold_any_advantage_and_label():
    kw = _good()
    kw["labels"][0, 1] = IGNORE_INDEX
    kw["advantages"][0, 1] = float("nan")
    kw["old_logps"][0, 1] = float("-inf")
    out = o1pruner_kernels.linear_ppo_loss(*[to_device(v) for v in kw.values()], backend="torch")
    assert torch.isfinite(out.loss)
    assert out.loss.device == DEVICE
