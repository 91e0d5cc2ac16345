"""Supervised warm-up of the tiny reference model on the toy traces (the "long-thinking model").

Plain next-token cross-entropy on prompt-masked traces (prompt built with the pipeline's own
``encode_prompt``, response = trace + EOS), AdamW with linear warm-up and cosine decay. The result is
saved with ``save_pretrained`` (model + tokenizer) so the pipeline loads it by path like a Hub model.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from o1pruner.toy.task import LEVELS, TaskConfig, ToyProblem, draw_problem, write_trace
from o1pruner.toy.tokenizer import make_tokenizer

#: The toy model is trained without a system message (the pipeline's ``system_prompt: none``): the default
#: system prompt is 100 characters, i.e. 100 tokens for a character-level model, which would triple the
#: cost of every forward pass on a CPU.
TOY_SYSTEM_PROMPT: str | None = None


@dataclass(frozen=True)
class WarmupConfig:
    """Model shape and SFT schedule (0.28M parameters; 1.5-4 min on 2 idle CPU cores).

    Whether the operand look-up (an induction step) has formed after a given number of steps varies with
    the seed, so the warm-up trains at a constant LR until greedy decoding solves ``target_accuracy`` of
    ``num_validation`` fresh problems (checked every ``validate_every`` steps from ``steps`` on, up to
    ``max_steps``), then anneals the LR to 0 over ``anneal_steps``. Deterministic for a given seed.
    """

    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 2  # head dim 32: the operand look-up (an induction step) forms much sooner than with 16
    num_kv_heads: int = 2
    steps: int = 1200  # minimum number of constant-LR steps before the first validation
    max_steps: int = 3200  # give up extending at this many steps
    validate_every: int = 400  # steps between validations after ``steps``
    anneal_steps: int = 200  # final linear LR decay to 0, after validation passed (or max_steps)
    target_accuracy: float = 0.9  # greedy accuracy on fresh validation problems that ends the training
    num_validation: int = 100
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    max_position_embeddings: int = 512

    def to_dict(self) -> dict:
        return asdict(self)


def encode_prompt_ids(tokenizer, question: str, system_prompt: str | None = TOY_SYSTEM_PROMPT) -> list[int]:
    """The prompt token ids exactly as the pipeline builds them (``o1pruner.prompts.encode_prompt``)."""
    from o1pruner.prompts import encode_prompt

    return list(encode_prompt(tokenizer, question, system_prompt))


def build_model(tokenizer, config: WarmupConfig, seed: int):
    """A randomly initialised Llama causal LM sized by ``config``.

    Llama, not Qwen2: transformers 5 lists ``qwen2`` among the model types whose Hub tokenizer class it
    overrides, so ``AutoTokenizer`` would reload this character tokenizer as a byte-level BPE
    ``Qwen2Tokenizer`` that drops every space and newline.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def check_reload(model_dir: str | Path, tokenizer) -> None:
    """Raise RuntimeError unless ``AutoTokenizer`` reloads ``model_dir`` with the same token ids."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(model_dir)
    sample = "Compute 5+4-7.\n5+4=9\ncheck 5+4=9\nanswer \\boxed{2}"
    want = tokenizer(sample, add_special_tokens=False)["input_ids"]
    got = loaded(sample, add_special_tokens=False)["input_ids"]
    if list(want) != list(got) or loaded.eos_token_id != tokenizer.eos_token_id:
        raise RuntimeError(
            f"{model_dir}: AutoTokenizer reloads the toy tokenizer as {type(loaded).__name__}, which encodes "
            f"{sample!r} as {list(got)} instead of {list(want)}"
        )


def _batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (B, T) int64 input_ids, labels (-100 on prompt and padding), attention_mask."""
    import torch

    width = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p) : n] = torch.tensor(r)
        mask[i, :n] = 1
    return ids, labels, mask


def warmup(
    out_dir: str | Path,
    *,
    seed: int = 0,
    exclude_questions: set[str] | frozenset[str] = frozenset(),
    config: WarmupConfig | None = None,
    task: TaskConfig | None = None,
    system_prompt: str | None = TOY_SYSTEM_PROMPT,
    log=print,
) -> dict:
    """Train the reference model from scratch on fresh traces and save it to ``out_dir``.

    Problems whose question is in ``exclude_questions`` (the held-out evaluation set) are never drawn.
    Returns {"losses", "steps", "validations", "final_validation_accuracy", "seconds", "num_parameters"}.
    """
    import torch

    config = config or WarmupConfig()
    task = task or TaskConfig()
    t0 = time.time()
    tokenizer = make_tokenizer()
    model = build_model(tokenizer, config, seed)
    model.train()
    rng = random.Random(f"toy-warmup-{seed}")
    prompt_cache: dict[str, list[int]] = {}
    eos = tokenizer.eos_token_id

    def example() -> tuple[list[int], list[int]]:
        while True:
            problem: ToyProblem = draw_problem(rng, rng.choice(LEVELS), task)
            if problem.question not in exclude_questions:
                break
        q = problem.question
        if q not in prompt_cache:
            prompt_cache[q] = encode_prompt_ids(tokenizer, q, system_prompt)
        response = tokenizer(write_trace(problem, rng, task), add_special_tokens=False)["input_ids"]
        return prompt_cache[q], [*list(response), eos]

    opt = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.98)
    )

    from o1pruner.grading import is_correct
    from o1pruner.sampling import SamplingConfig, generate

    val_problems = []
    val_rng = random.Random(f"toy-validation-{seed}")
    while len(val_problems) < config.num_validation:
        p = draw_problem(val_rng, LEVELS[len(val_problems) % len(LEVELS)], task)
        if p.question not in exclude_questions:
            val_problems.append(p)
    val_prompts = [encode_prompt_ids(tokenizer, p.question, system_prompt) for p in val_problems]
    greedy = SamplingConfig(k=1, temperature=0.0, max_new_tokens=192, batch_size=len(val_prompts))

    def validate() -> float:
        model.eval()
        gens = generate(model, tokenizer, val_prompts, n=1, config=greedy)
        model.train()
        return sum(is_correct(g[0].text, p.answer) for p, g in zip(val_problems, gens)) / len(val_problems)

    pending: list[list[tuple[list[int], list[int]]]] = []

    def train_step(lr: float) -> float:
        nonlocal pending
        if not pending:
            # Batches of similar lengths waste less compute on padding.
            pool = sorted(
                (example() for _ in range(8 * config.batch_size)), key=lambda e: len(e[0]) + len(e[1])
            )
            pending = [pool[i : i + config.batch_size] for i in range(0, len(pool), config.batch_size)]
            rng.shuffle(pending)
        for group in opt.param_groups:
            group["lr"] = lr
        ids, labels, mask = _batch(pending.pop(), tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    losses: list[float] = []
    validations: list[tuple[int, float]] = []

    def report(step: int, total: int | str) -> None:
        if log and step % 100 == 0:
            log(f"[toy warm-up] step {step}/{total} loss {losses[-1]:.4f} ({time.time() - t0:.0f}s)")

    step = 0
    while True:
        step += 1
        lr = config.learning_rate * min(1.0, step / config.warmup_steps)
        losses.append(train_step(lr))
        report(step, f"{config.steps}+")
        if step >= config.steps and (step - config.steps) % config.validate_every == 0:
            acc = validate()
            validations.append((step, acc))
            if log:
                log(
                    f"[toy warm-up] step {step}: greedy accuracy {acc:.2f} on {len(val_problems)} fresh problems"
                )
            if acc >= config.target_accuracy or step + config.validate_every > config.max_steps:
                break
    for i in range(config.anneal_steps):
        step += 1
        losses.append(train_step(config.learning_rate * (1 - (i + 1) / (config.anneal_steps + 1))))
        report(step, "anneal")
    final_accuracy = validate()
    if log:
        log(
            f"[toy warm-up] done: {step} steps, greedy accuracy {final_accuracy:.2f} ({time.time() - t0:.0f}s)"
        )
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    check_reload(out_dir, tokenizer)
    return {
        "losses": losses,
        "steps": step,
        "validations": validations,
        "final_validation_accuracy": final_accuracy,
        "seconds": time.time() - t0,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
