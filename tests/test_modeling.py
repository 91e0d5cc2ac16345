"""Model loading in every mode, lm_head access, logits-free hidden states, atomic saving."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import make_tiny_model

from o1pruner.modeling import (
    decoder_of,
    default_attn_implementation,
    last_hidden_states,
    lm_head_weight,
    load_model,
    save_model,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# hidden 64: bitsandbytes' CPU 4-bit path needs in_features >= its 64-wide quantisation block.
HIDDEN = 64


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden=HIDDEN, layers=3)


@pytest.fixture(scope="module")
def tied_path(tmp_path_factory):
    return make_tiny_model(
        tmp_path_factory.mktemp("tied") / "m", hidden=HIDDEN, layers=2, tie_word_embeddings=True
    )


def _load(path, mode, **kw):
    kw.setdefault("freeze_last_n_layers", 2 if mode == "freeze" else 0)
    return load_model(str(path), mode=mode, device="cpu", torch_dtype="float32", lora_r=4, lora_alpha=8, **kw)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_default_attention_without_flash_attn_is_per_sequence_sdpa(tiny_path):
    """No N x N mask by default: without flash-attn (always on the CPU) packed rows use per-sequence SDPA."""
    import importlib.util

    from o1pruner.attention import VARLEN_SDPA

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        assert default_attn_implementation() == "flash_attention_2"
    else:
        assert default_attn_implementation() == VARLEN_SDPA
        model, _ = _load(tiny_path, "lora")
        assert model.config._attn_implementation == VARLEN_SDPA


def test_full_and_none_modes(tiny_path):
    full, tok = _load(tiny_path, "full")
    assert _trainable(full) == {n for n, _ in full.named_parameters()}
    assert lm_head_weight(full).requires_grad and full.training
    frozen, _ = _load(tiny_path, "none")
    assert not _trainable(frozen) and not frozen.training
    assert tok.eos_token == "<eos>"


def test_freeze_mode_trains_last_layers_and_final_norm(tiny_path):
    model, _ = _load(tiny_path, "freeze")
    names = _trainable(model)
    assert names and all(n.startswith(("model.layers.1.", "model.layers.2.", "model.norm.")) for n in names)
    assert "model.norm.weight" in names and any(n.startswith("model.layers.1.") for n in names)
    assert not any(n.startswith("model.layers.0.") for n in names)
    assert not lm_head_weight(model).requires_grad
    with pytest.raises(ValueError, match=r"0 < freeze_last_n_layers <= 3"):
        _load(tiny_path, "freeze", freeze_last_n_layers=4)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_freeze_mode_backpropagates_only_the_trainable_suffix(tiny_path, checkpointing):
    """Frozen layers record no graph: their outputs need no grad and their backward never runs."""
    model, _ = _load(tiny_path, "freeze", freeze_last_n_layers=1, gradient_checkpointing=checkpointing)
    layers = decoder_of(model).layers
    needs_grad, backward_calls = [], [0] * len(layers)
    for i, layer in enumerate(layers):

        def forward_hook(_m, _args, out):
            needs_grad.append((out[0] if isinstance(out, tuple) else out).requires_grad)

        def backward_hook(_m, _gin, _gout, i=i):
            backward_calls[i] += 1

        layer.register_forward_hook(forward_hook)
        layer.register_full_backward_hook(backward_hook)
    embeds = []
    decoder_of(model).embed_tokens.register_forward_hook(lambda _m, _a, out: embeds.append(out.requires_grad))
    ids = torch.randint(0, 40, (2, 12))
    last_hidden_states(model, ids).float().pow(2).mean().backward()
    n = len(layers)
    assert embeds == [False]
    # With checkpointing the trainable layer's forward runs twice (the recompute); frozen ones once.
    assert needs_grad[: n - 1] == [False] * (n - 1) and all(needs_grad[n - 1 :])
    assert backward_calls == [0] * (n - 1) + [1]
    trained = [p for p in layers[-1].parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None for p in layers[0].parameters())


def test_lora_mode_adapts_every_linear_but_not_lm_head(tiny_path):
    model, _ = _load(tiny_path, "lora")
    names = _trainable(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f".{proj}.lora_A." in n for n in names), proj
    assert not any("lm_head" in n for n in names)
    w = lm_head_weight(model)
    assert w.shape == (model.config.vocab_size, HIDDEN) and not w.requires_grad


def test_qlora_mode_quantises_body_not_lm_head(tiny_path):
    import bitsandbytes as bnb

    try:
        model, _ = _load(tiny_path, "qlora")
    except Exception as e:  # pragma: no cover - bitsandbytes without a CPU 4-bit backend
        pytest.skip(f"bitsandbytes 4-bit does not load on this machine: {e!r}")
    base = model.get_base_model()
    q = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4"
    assert q.weight.quant_state.nested  # double quantisation
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32
    assert all(".lora_" in n for n in _trainable(model)) and not lm_head_weight(model).requires_grad
    h = last_hidden_states(model, torch.tensor([[3, 4, 5, 6]]))
    assert h.shape == (1, 4, HIDDEN) and torch.isfinite(h).all()


def test_lm_head_weight_with_tied_embeddings(tied_path):
    for mode in ("full", "lora"):
        model, _ = _load(tied_path, mode)
        emb = decoder_of(model).embed_tokens.weight
        assert lm_head_weight(model).data_ptr() == emb.data_ptr()


@pytest.mark.parametrize("mode", ["none", "lora"])
def test_last_hidden_states_never_calls_lm_head_and_matches_logits(tiny_path, mode):
    model, _ = _load(tiny_path, mode)
    model.eval()
    head = model.get_output_embeddings()
    calls = []
    handle = head.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[7, 8, 9, 10, 11], [12, 13, 14, 15, 16]])
    with torch.no_grad():
        h = last_hidden_states(model, ids)
        assert not calls
        logits = model(input_ids=ids).logits
    handle.remove()
    assert calls  # the hook works: the full forward does call it
    torch.testing.assert_close(h @ lm_head_weight(model).T, logits, atol=1e-5, rtol=1e-5)


def _perturb_adapter(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_adapter_reload_with_peft_and_load_model(tiny_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = _load(tiny_path, "lora")
    _perturb_adapter(model)
    ids = torch.tensor([[3, 9, 27, 81, 5]])
    want = _logits(model, ids)
    out = tmp_path / "model"
    save_model(model, tok, out)
    assert (out / "DONE").exists() and (out / "adapter_config.json").exists()
    assert not list(tmp_path.glob(".model.*"))  # no temp folder left behind
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(base, out), ids), want, atol=1e-5, rtol=1e-5)
    again, tok2 = load_model(str(out), mode="none", device="cpu", torch_dtype="float32")
    torch.testing.assert_close(_logits(again, ids), want, atol=1e-5, rtol=1e-5)
    assert tok2.eos_token == tok.eos_token
    # overwrite an existing folder atomically
    save_model(model, tok, out)
    assert (out / "DONE").exists()


def test_save_merged_and_full(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = _load(tiny_path, "lora")
    _perturb_adapter(model)
    ids = torch.tensor([[3, 9, 27, 81, 5]])
    want = _logits(model, ids)
    save_model(model, tok, tmp_path / "merged", merge=True)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged, ids), want, atol=1e-4, rtol=1e-4)

    full, tok = _load(tiny_path, "freeze")
    save_model(full, tok, tmp_path / "full")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(_logits(reloaded, ids), _logits(full, ids), atol=1e-6, rtol=1e-6)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode='int8'"):
        load_model("nowhere", mode="int8")


def test_save_full_bf16_with_tied_embeddings_casts_masters_back(tied_path, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = load_model(str(tied_path), mode="full", device="cpu", torch_dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float32 masters
    with torch.no_grad():
        lm_head_weight(model).add_(0.01)  # a "trained" change, shared by the tied embedding
    save_model(model, tok, tmp_path / "full")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert reloaded.lm_head.weight.dtype == torch.bfloat16
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(reloaded.lm_head.weight, lm_head_weight(model).to(torch.bfloat16))
