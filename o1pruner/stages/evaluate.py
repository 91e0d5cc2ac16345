"""Stage 4, evaluation: the base and the tuned model on the evaluation problems, ``eval/*.json``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from o1pruner.io import atomic_write_json

if TYPE_CHECKING:
    from o1pruner.pipeline import Pipeline


def evaluate(p: Pipeline, name: str, get_model: Callable[[], Any], path_for_vllm: Callable[[], str]) -> dict:
    """Evaluate one model (``name``: base or tuned) into ``eval/NAME.json``; returns its result."""
    import json

    from o1pruner.evaluate import evaluate_model

    out = p.path(f"eval/{name}.json")
    if p.is_complete(f"eval {name}", f"eval/{name}.json"):
        return json.loads(out.read_text(encoding="utf-8"))
    problems = p.eval_problems()
    if p.cfg.eval_backend == "vllm":
        p.models.release()
        model = path_for_vllm()
    else:
        model = get_model()
    p.log(f"eval {name}: {len(problems)} problems")
    result = evaluate_model(
        model,
        p.models.tokenizer(),
        problems,
        p.cfg.eval_config(),
        out_path=p.path(f"eval/{name}_responses.jsonl"),
        desc=f"eval {name}",
    )
    atomic_write_json(out, result)
    return result


def base(p: Pipeline) -> dict:
    """The base (reference) model's evaluation."""
    return evaluate(p, "base", p.models.reference, lambda: str(p.cfg.model))


def tuned(p: Pipeline) -> dict:
    """The tuned model's evaluation."""
    return evaluate(p, "tuned", p.models.tuned, lambda: str(p.path("model")))
