"""Tiny random models of real architectures, saved to a folder and loaded by path like a Hub model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def make_char_tokenizer(chat_template: bool = True):
    """A byte-level PreTrainedTokenizerFast (one token per byte, no merges) plus chat special tokens.

    Byte-level, like the real Qwen2 and Llama 3 tokenizers: transformers 5 reloads any tokenizer saved
    next to a Qwen2 config as ``Qwen2Tokenizer``, which re-applies byte-level pre-tokenization; a
    WordLevel character vocabulary would then silently lose every space and newline.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in sorted(ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    path: str | Path,
    arch: str = "qwen2",
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    chat_template: bool = True,
    tie_word_embeddings: bool = False,
    stop_prob: float | None = None,
) -> Path:
    """Save a random tiny Qwen2 or Llama causal LM with a char tokenizer to ``path``; returns the path."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path = Path(path)
    tokenizer = make_char_tokenizer(chat_template)
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    config = cls(
        vocab_size=len(tokenizer) + 8,  # room for tokens a reloading class adds (as real checkpoints pad V)
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if stop_prob is not None:
        _stop_sometimes(model, tokenizer.eos_token_id, stop_prob, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _stop_sometimes(model, eos_id: int, stop_prob: float, seed: int) -> None:
    """Make a random model emit EOS with about ``stop_prob`` per step, so sampled lengths vary.

    A random model spreads its mass over the whole vocabulary and almost never stops. The input
    embeddings of every other ordinary token get a shared direction u, which survives to the last hidden
    state; the EOS row of the lm_head is set along u, scaled so that EOS follows such a token with about
    ``stop_prob`` (at temperature 1), and the others rarely. Greedy decoding then stops after a token or
    two instead of at once.
    """
    import math

    if model.config.tie_word_embeddings:
        raise ValueError("stop_prob needs an untied lm_head")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        u = torch.randn(emb.shape[1], generator=g)
        u /= u.norm()
        stoppers = torch.arange(len(SPECIAL_TOKENS), emb.shape[0], 2)
        emb[stoppers] += emb.std() * math.sqrt(emb.shape[1]) * u
        ids = stoppers[torch.randint(0, len(stoppers), (4, 32), generator=g)]
        h = model.get_decoder()(input_ids=ids).last_hidden_state
        proj = float((h @ u).mean())
        head = model.get_output_embeddings().weight
        others = math.log(head.shape[0] - 1)  # the other logits are ~0: log-sum-exp ~ log(V - 1)
        head[eos_id] = u * (math.log(stop_prob / (1 - stop_prob)) + others) / proj


def make_scored(path, model, n=11, seed=0, noise=0.3):
    """A small scored.parquet with the documented columns; ref_logps = the model's own log-probs + noise
    (so ratios differ from 1 and some get clipped), awkward lengths, one advantage per row."""
    rng = np.random.default_rng(seed)
    v = model.config.vocab_size
    cols = {
        k: []
        for k in (
            "problem_id",
            "sample_index",
            "prompt_ids",
            "response_ids",
            "ref_logps",
            "length",
            "correct",
            "ref_mean_length",
            "ref_accuracy",
            "reward",
            "advantage",
        )
    }
    for i in range(n):
        prompt = rng.integers(7, v, size=int(rng.integers(1, 6))).tolist()
        resp = rng.integers(7, v, size=int(rng.integers(1, 13))).tolist()
        ids = torch.tensor([prompt + resp])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
        p = len(prompt)
        lp = logp[p - 1 : -1].gather(-1, ids[0, p:, None])[:, 0].numpy()
        lp = lp + rng.normal(0.0, noise, size=lp.shape)
        cols["problem_id"].append(f"p{i // 2}")
        cols["sample_index"].append(i % 2)
        cols["prompt_ids"].append(prompt)
        cols["response_ids"].append(resp)
        cols["ref_logps"].append(lp.astype(np.float32).tolist())
        cols["length"].append(len(resp))
        cols["correct"].append(bool(i % 3))
        cols["ref_mean_length"].append(6.0)
        cols["ref_accuracy"].append(0.5)
        cols["reward"].append(float(rng.normal()))
        cols["advantage"].append(float(rng.normal()))
    from o1pruner.scoring import SCHEMA

    pq.write_table(pa.table(cols, schema=SCHEMA), path)
    return path
