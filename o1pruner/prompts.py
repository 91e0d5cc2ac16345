"""The one prompt builder used by sampling, scoring, training and evaluation.

A prompt is the tokenizer's chat template applied to ``[system, user]`` with the generation prompt
appended. A template that rejects the system role (Gemma-style ``raise_exception``) gets the system prompt
folded into the user turn. A tokenizer without a chat template (a base model) gets the plain template::

    {system}\\n\\nQuestion: {question}\\nAnswer:

(``Question: {question}\\nAnswer:`` when the system prompt is None or empty).
"""

from __future__ import annotations

from typing import Any

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. You should think step-by-step and put your final answer within \\boxed{}."
)

PLAIN_TEMPLATE = "{system}\n\nQuestion: {question}\nAnswer:"
PLAIN_TEMPLATE_NO_SYSTEM = "Question: {question}\nAnswer:"


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer: Any, question: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """The prompt text for ``question``: chat template with generation prompt, else the plain template."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    system = system_prompt or None
    if not _has_chat_template(tokenizer):
        if system is None:
            return PLAIN_TEMPLATE_NO_SYSTEM.format(question=question)
        return PLAIN_TEMPLATE.format(system=system, question=question)

    user = {"role": "user", "content": question}
    if system is None:
        return _apply(tokenizer, [user])
    try:
        return _apply(tokenizer, [{"role": "system", "content": system}, user])
    except Exception:
        # Templates without a system role raise from inside Jinja (TemplateError) or from transformers
        # (ValueError); either way the system text goes into the user turn instead.
        folded = {"role": "user", "content": f"{system}\n\n{question}"}
        return _apply(tokenizer, [folded])


def _apply(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):  # pragma: no cover - defensive against API drift
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends BOS when asked for special tokens (probed on a one-letter text)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_prompt(
    tokenizer: Any, question: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> list[int]:
    """Token ids of ``build_prompt(...)`` as fed to the model: list[int], exactly one BOS at most.

    Chat templates write their own BOS text (e.g. ``<|begin_of_text|>``), so the text is tokenized without
    special tokens; the plain template gets a BOS only when the tokenizer normally adds one.
    """
    text = build_prompt(tokenizer, question, system_prompt)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not _has_chat_template(tokenizer) and _adds_bos(tokenizer):
        bos = tokenizer.bos_token_id
        if not ids or ids[0] != bos:
            ids.insert(0, bos)
    return ids
