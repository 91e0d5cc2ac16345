"""Per-sequence packed attention (no N x N mask) against plain SDPA on each sequence alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from o1pruner.attention import VARLEN_SDPA, register

REPO = Path(__file__).resolve().parents[1]


def _model(cls, attn: str, seed: int = 0):
    register()
    cfg = cls(
        vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=80, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).double()


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.nn.functional.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32)


@pytest.mark.parametrize("cls", [Qwen2Config, LlamaConfig])
def test_packed_row_equals_each_sequence_alone(cls):
    lens = [7, 1, 13, 4]
    ids = torch.randint(0, 97, (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    packed = _model(cls, VARLEN_SDPA)
    ref = _model(cls, "sdpa")
    ref.load_state_dict(packed.state_dict())
    cu = _cu(lens)
    h = packed.model(
        input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
        max_length_q=max(lens), max_length_k=max(lens), use_cache=False,
    ).last_hidden_state  # fmt: skip
    w = torch.randn_like(h)
    (h * w).sum().backward()
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        outs.append(ref.model(input_ids=ids[:, s:e], use_cache=False).last_hidden_state)
    h_ref = torch.cat(outs, dim=1)
    (h_ref * w).sum().backward()
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(packed.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_padded_generation_matches_sdpa():
    """Left-padded batched greedy decoding with a KV cache: same tokens and logits as transformers' SDPA."""
    ours, ref = _model(Qwen2Config, VARLEN_SDPA, seed=1), _model(Qwen2Config, "sdpa", seed=1)
    ids = torch.randint(3, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)  # fmt: skip
    a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_dropout_is_refused():
    from o1pruner.attention import varlen_sdpa_attention

    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="dropout"):
        varlen_sdpa_attention(torch.nn.Module(), q, q, q, None, dropout=0.1)


_MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    from benchmarks.common import measure_peak
    from o1pruner.attention import register
    from o1pruner.packing import block_causal_mask
    n, impl = int(sys.argv[1]), sys.argv[2]
    register()
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, attn_implementation=impl)
    model = AutoModelForCausalLM.from_config(cfg)
    lens = [n // 4] * 4
    pos = torch.cat([torch.arange(k) for k in lens]).unsqueeze(0)
    cu = torch.nn.functional.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32)
    kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": n // 4, "max_length_k": n // 4}
    if impl == "sdpa":
        sid = torch.repeat_interleave(torch.arange(4), torch.tensor(lens)).unsqueeze(0)
        kw = {"attention_mask": block_causal_mask(sid)}
    ids = torch.randint(0, 64, (1, n))
    model.model(input_ids=ids[:, :64], use_cache=False, position_ids=pos[:, :64]).last_hidden_state.sum()
    step = lambda: model.model(input_ids=ids, position_ids=pos, use_cache=False, **kw).last_hidden_state.sum().backward()
    print(json.dumps({"extra": measure_peak(step, torch.device("cpu"))[0]}))
    """
)


def _extra_memory(n: int, impl: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(n), impl],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra"]


def test_no_quadratic_memory_at_4096_tokens():
    """A forward + backward over one packed row of N = 4096 tokens (four sequences) raises resident memory by
    less than one N x N float32 matrix (64 MiB), grows linearly from N = 2048, and stays below the 4D-mask
    SDPA path it replaces by more than that path's boolean mask (N x N bytes)."""
    n = 4096
    ours = _extra_memory(n, VARLEN_SDPA)
    assert ours < n * n * 4, ours
    assert ours < 3.0 * _extra_memory(n // 2, VARLEN_SDPA), ours  # linear: 2x, quadratic: 4x
    dense = _extra_memory(n, "sdpa")
    assert dense - ours > n * n, (dense, ours)
