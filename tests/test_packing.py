"""Packing: label alignment, the micro-batch planners, and attention isolation of packed sequences."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import make_tiny_model

from o1pruner.packing import (
    IGNORE_INDEX,
    block_causal_mask,
    build_example,
    collate_packed,
    collate_padded,
    packed_attention_kwargs,
    plan_micro_batches,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_build_example_aligns_labels_with_ref_logps():
    ex = build_example([5, 6, 7], [8, 9], [-0.5, -1.5], 0.3, row=4)
    assert ex.input_ids == [5, 6, 7, 8, 9]
    # position t predicts token t+1: the last prompt position predicts the first response token
    assert ex.labels == [IGNORE_INDEX, IGNORE_INDEX, 8, 9, IGNORE_INDEX]
    assert ex.old_logps == [0.0, 0.0, -0.5, -1.5, 0.0]
    assert ex.advantage == 0.3 and ex.row == 4


def test_build_example_rejects_bad_rows():
    with pytest.raises(ValueError, match="row 7: ref_logps has 1 values but response_ids has 2"):
        build_example([1], [2, 3], [0.0], 1.0, row=7)
    with pytest.raises(ValueError, match="empty prompt_ids"):
        build_example([], [2], [0.0], 1.0)


@pytest.mark.parametrize("strategy", ["ffd", "sequential"])
def test_planner_respects_budget_and_places_every_sequence_once(strategy):
    lengths = [7, 3, 11, 1, 5, 5, 2, 9, 13, 4]  # 13 > budget: alone
    budget = 12
    plan = plan_micro_batches(lengths, budget, strategy)
    flat = sorted(i for b in plan for i in b)
    assert flat == list(range(len(lengths)))
    for b in plan:
        assert sum(lengths[i] for i in b) <= budget or len(b) == 1
        assert b == sorted(b)
    assert [8] in plan
    if strategy == "sequential":
        assert [i for b in plan for i in b] == list(range(len(lengths)))


def test_ffd_uses_fewer_bins_than_sequential_on_this_case():
    lengths = [3, 9, 3, 9, 1]
    assert plan_micro_batches(lengths, 10, "ffd") == [[1, 4], [3], [0, 2]]
    assert plan_micro_batches(lengths, 10, "sequential") == [[0], [1], [2], [3, 4]]


def test_planner_errors():
    with pytest.raises(ValueError, match="budget must be positive"):
        plan_micro_batches([1], 0)
    with pytest.raises(ValueError, match="unknown packing strategy 'best'"):
        plan_micro_batches([1], 4, "best")


def test_collate_packed_positions_and_seq_ids():
    exs = [build_example([1, 2], [3], [-1.0], 0.5), build_example([4], [5, 6], [-2.0, -3.0], -1.0)]
    b = collate_packed(exs)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert b.seq_ids.tolist() == [[0, 0, 0, 1, 1, 1]]
    assert b.labels.tolist() == [[-100, 3, -100, 5, 6, -100]]
    assert b.advantages.tolist() == [[0.5] * 3 + [-1.0] * 3]
    assert b.num_valid_tokens() == 3 and b.num_sequences == 2 and b.num_tokens == 6
    p = collate_padded(exs, pad_id=0)
    assert p.input_ids.tolist() == [[1, 2, 3], [4, 5, 6]] and p.attention_mask.all()


def test_block_causal_mask():
    m = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    expect = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert m.shape == (1, 1, 5, 5) and torch.equal(m[0, 0], expect)


def test_flash_kwargs_are_varlen_boundaries():
    exs = [build_example([1, 2], [3], [0.0], 0.0), build_example([4], [5, 6, 7], [0.0] * 3, 0.0)]
    kw = packed_attention_kwargs("flash_attention_2", collate_packed(exs), torch.bfloat16)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 7] and kw["max_length_q"] == 4
    assert "attention_mask" not in kw and kw["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match="'mystery' has no isolation path"):
        packed_attention_kwargs("mystery", collate_packed(exs), torch.float32)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden=32, layers=2)


def _random_examples(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, r in lens:
        prompt = torch.randint(7, 100, (p,), generator=g).tolist()
        resp = torch.randint(7, 100, (r,), generator=g).tolist()
        out.append(build_example(prompt, resp, [0.0] * r, 1.0))
    return out


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention", "flash_attention_2"])
def test_packed_hidden_states_equal_each_sequence_alone(tiny_path, impl):
    """Each packed sequence sees only itself: packed hidden states == the sequence run alone (fp32)."""
    from o1pruner.modeling import last_hidden_states, load_model

    if impl == "flash_attention_2":
        pytest.skip("flash-attn is not installable on this CPU-only machine: the varlen path is unverified")
    model, _ = load_model(
        str(tiny_path), mode="none", attn_implementation=impl, torch_dtype="float32", device="cpu"
    )
    exs = _random_examples([(3, 5), (1, 1), (6, 9), (2, 4)])
    batch = collate_packed(exs)
    try:
        with torch.no_grad():
            packed = last_hidden_states(
                model, batch.input_ids, **packed_attention_kwargs(impl, batch, torch.float32)
            )
    except Exception as e:  # pragma: no cover - only where torch cannot run flex attention on CPU
        if impl == "flex_attention":
            pytest.skip(f"flex_attention does not run here: {e!r}")
        raise
    off = 0
    with torch.no_grad():
        for ex in exs:
            alone = last_hidden_states(model, torch.tensor([ex.input_ids]))
            torch.testing.assert_close(packed[0, off : off + len(ex)], alone[0], atol=1e-5, rtol=1e-5)
            off += len(ex)


def test_position_ids_alone_are_not_enough_with_a_cache(tiny_path):
    """Why we pass explicit masks: with use_cache=True (the config default) transformers 5 skips its
    packed-sequence detection, so restarting position_ids alone lets sequences attend to each other."""
    from o1pruner.modeling import decoder_of, load_model

    model, _ = load_model(
        str(tiny_path), mode="none", attn_implementation="sdpa", torch_dtype="float32", device="cpu"
    )
    exs = _random_examples([(3, 5), (4, 6)])
    batch = collate_packed(exs)
    with torch.no_grad():
        leaky = decoder_of(model)(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=True
        ).last_hidden_state
        alone = decoder_of(model)(
            input_ids=torch.tensor([exs[1].input_ids]), use_cache=False
        ).last_hidden_state
    if torch.allclose(leaky[0, len(exs[0]) :], alone[0], atol=1e-5):
        pytest.skip("this transformers version isolates packed sequences from position_ids even with a cache")
    assert not torch.allclose(leaky[0, len(exs[0]) :], alone[0], atol=1e-3)
