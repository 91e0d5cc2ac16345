"""Stage 4, evaluation: the base and the tuned model on the evaluation problems, ``eval/*.json``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from o1pruner import distributed
from o1pruner.io import atomic_write_json, read_jsonl

if TYPE_CHECKING:
    from o1pruner.pipeline import Pipeline


def evaluate(
    p: Pipeline,
    name: str,
    get_model: Callable[[], Any],
    path_for_vllm: Callable[[], str],
    *,
    backend: str | None = None,
    lora_path: str | None = None,
) -> dict:
    """Evaluate one model (``name``: base or tuned) into ``eval/NAME.json``; returns its result.

    ``backend`` overrides the configured one; ``lora_path`` is an adapter that vLLM serves on the model.
    """
    import json

    from o1pruner.evaluate import evaluate_model, summarize_responses
    from o1pruner.stages.sample import generation_shard, run_generation

    out = p.path(f"eval/{name}.json")
    if p.is_complete(f"eval {name}", f"eval/{name}.json"):
        return json.loads(out.read_text(encoding="utf-8"))
    problems = p.eval_problems()
    config = p.cfg.eval_config()
    config = dataclasses.replace(config, backend=backend or config.backend, lora_path=lora_path)
    if config.backend == "vllm":
        p.models.release()
        model = path_for_vllm()
    else:
        model = get_model()
    p.log(f"eval {name}: {len(problems)} problems (backend {config.backend})")
    responses = p.path(f"eval/{name}_responses.jsonl")
    tokenizer = p.models.tokenizer()
    shard_config, dp = generation_shard(p, config)

    desc = f"eval {name}"

    def work(shard, out_path, done_paths) -> None:
        run_generation(
            p, desc, shard_config, evaluate_model, model, tokenizer, shard, shard_config,
            out_path=out_path, desc=desc, done_paths=done_paths,
        )  # fmt: skip

    distributed.sharded_stage(
        responses, problems, lambda f: read_jsonl(f, tolerate_partial_tail=True), work, dp=dp
    )
    with distributed.main_first() as main:
        if main:  # every response is in place: this only grades and measures
            atomic_write_json(out, summarize_responses(problems, config, responses))
    return json.loads(out.read_text(encoding="utf-8"))


def base(p: Pipeline) -> dict:
    """The base (reference) model's evaluation."""
    return evaluate(p, "base", p.models.reference, lambda: str(p.cfg.model))


def tuned(p: Pipeline) -> dict:
    """The tuned model's evaluation; with vLLM a LoRA adapter is served on the base model, unmerged."""
    model_dir = p.path("model")
    if p.cfg.eval_backend == "vllm" and (model_dir / "adapter_config.json").exists():
        from o1pruner.vllm_engine import lora_unsupported_reason

        reason = lora_unsupported_reason(model_dir)
        if reason is None:  # enable_lora + a LoRARequest per prompt
            return evaluate(p, "tuned", p.models.tuned, lambda: str(p.cfg.model), lora_path=str(model_dir))
        p.log(f"eval tuned: vLLM cannot serve this adapter ({reason}); evaluating it with hf")
        return evaluate(p, "tuned", p.models.tuned, lambda: str(p.cfg.model), backend="hf")
    return evaluate(p, "tuned", p.models.tuned, lambda: str(model_dir))
