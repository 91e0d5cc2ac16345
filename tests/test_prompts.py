from __future__ import annotations

import pytest
from helpers import make_char_tokenizer

from o1pruner.prompts import DEFAULT_SYSTEM_PROMPT, build_prompt, encode_prompt

Q = "What is 2+3?"


def _with_bos_post_processor(tok):
    """Make the tokenizer prepend <bos> when add_special_tokens=True (like Llama tokenizers)."""
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    assert tok("a", add_special_tokens=True)["input_ids"][0] == tok.bos_token_id
    return tok


def test_default_system_prompt_is_the_papers():
    assert DEFAULT_SYSTEM_PROMPT == (
        "You are a helpful assistant. You should think step-by-step and put your final answer within \\boxed{}."
    )


def test_chat_template_with_generation_prompt():
    tok = make_char_tokenizer(chat_template=True)
    text = build_prompt(tok, Q)
    assert text == f"<|system|>{DEFAULT_SYSTEM_PROMPT}<|end|><|user|>{Q}<|end|><|assistant|>"
    assert build_prompt(tok, Q, system_prompt=None) == f"<|user|>{Q}<|end|><|assistant|>"
    assert build_prompt(tok, Q, system_prompt="") == f"<|user|>{Q}<|end|><|assistant|>"


def test_template_without_system_role_folds_system_into_user():
    tok = make_char_tokenizer(chat_template=True)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    text = build_prompt(tok, Q, "Be brief.")
    assert text == f"<|user|>Be brief.\n\n{Q}<|end|><|assistant|>"


def test_plain_template_without_chat_template():
    tok = make_char_tokenizer(chat_template=False)
    assert build_prompt(tok, Q) == f"{DEFAULT_SYSTEM_PROMPT}\n\nQuestion: {Q}\nAnswer:"
    assert build_prompt(tok, Q, None) == f"Question: {Q}\nAnswer:"


def test_encode_chat_prompt_has_no_added_bos():
    tok = make_char_tokenizer(chat_template=True)
    ids = encode_prompt(tok, Q)
    assert ids == tok(build_prompt(tok, Q), add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in ids
    assert tok.decode(ids) == build_prompt(tok, Q)


def test_encode_chat_prompt_keeps_templates_own_bos_once():
    tok = _with_bos_post_processor(make_char_tokenizer(chat_template=True))
    tok.chat_template = "<bos>" + tok.chat_template  # a template that writes its BOS, like Llama 3
    ids = encode_prompt(tok, Q)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids[1] != tok.bos_token_id


def test_encode_plain_prompt_bos_only_if_tokenizer_adds_one():
    plain = make_char_tokenizer(chat_template=False)
    ids = encode_prompt(plain, Q)
    assert plain.bos_token_id not in ids
    assert plain.decode(ids) == build_prompt(plain, Q)

    with_bos = _with_bos_post_processor(make_char_tokenizer(chat_template=False))
    ids = encode_prompt(with_bos, Q, None)
    assert ids[0] == with_bos.bos_token_id and ids.count(with_bos.bos_token_id) == 1
    assert ids[1:] == with_bos(f"Question: {Q}\nAnswer:", add_special_tokens=False)["input_ids"]


def test_build_prompt_rejects_non_text_question():
    with pytest.raises(TypeError, match="question"):
        build_prompt(make_char_tokenizer(), None)  # type: ignore[arg-type]
