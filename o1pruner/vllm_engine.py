"""vLLM engine settings, and serving a tuned LoRA adapter through vLLM without merging it.

A LoRA (or QLoRA) run saves only its adapter (``model/adapter_config.json``, ``adapter_model.safetensors``).
vLLM serves it on top of the base model: the engine starts on the base with ``enable_lora=True`` and a
``max_lora_rank`` that fits the adapter, and every request carries a ``LoRARequest`` naming the adapter
folder. The base model of a QLoRA run is served unquantized (or with ``quantization`` when set), like its
base evaluation, so base and tuned are measured on the same engine kind.

:func:`lora_unsupported_reason` names the adapters vLLM cannot serve (DoRA, extra trained modules, an
adapter on the embeddings or the lm_head, a rank above vLLM's limit); for those the pipeline evaluates the
tuned model with the hf backend and says so in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# The ranks vLLM compiles LoRA kernels for (``max_lora_rank`` must be one of them).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Adapter targets vLLM's LoRA layers do not cover in this setup (no extra vocabulary).
UNSERVED_TARGETS = ("embed_tokens", "lm_head", "wte", "wpe")
# On a CPU, vLLM reads gpu_memory_utilization as the fraction of RAM it reserves for weights and KV cache;
# the GPU default would claim most of the machine.
GPU_MEMORY_UTILIZATION, CPU_MEMORY_UTILIZATION = 0.85, 0.1
LORA_NAME, LORA_ID = "tuned", 1


def adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` (ValueError naming the file when it is missing or bad)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable LoRA adapter config ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("r"), int):
        raise ValueError(f"{path}: no integer 'r' (LoRA rank)")
    return cfg


def lora_unsupported_reason(adapter_dir: str | os.PathLike) -> str | None:
    """Why vLLM cannot serve this adapter, or None when it can."""
    cfg = adapter_config(adapter_dir)
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if cfg.get("use_dora"):
        return "DoRA adapters are not served by vLLM"
    if cfg.get("modules_to_save"):
        return f"the adapter also trains whole modules ({cfg['modules_to_save']})"
    if any(t.split(".")[-1] in UNSERVED_TARGETS for t in targets):
        return f"the adapter targets the embeddings or the lm_head ({targets})"
    if cfg["r"] > VLLM_LORA_RANKS[-1]:
        return f"LoRA rank {cfg['r']} is above vLLM's maximum {VLLM_LORA_RANKS[-1]}"
    return None


def max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM supports that holds an adapter of rank ``rank``."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def engine_kwargs(path: str | os.PathLike, config: Any, longest_prompt: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for a :class:`o1pruner.sampling.SamplingConfig`.

    bf16 weights, prefix caching (the K samples of a problem share its prompt), the config's seed, and
    LoRA serving when ``config.lora_path`` names an adapter folder. ``longest_prompt`` (tokens) sets
    ``max_model_len`` to it plus ``config.max_new_tokens``: the model's own limit (131,072 for
    R1-Distill) would make vLLM reserve KV memory for sequences this run never has.
    """
    kwargs: dict[str, Any] = {
        "model": str(path),
        "dtype": "bfloat16",
        "gpu_memory_utilization": memory_utilization(config.gpu_memory_utilization),
        "seed": config.seed,
        "quantization": config.quantization,
        "enable_prefix_caching": True,
    }
    if longest_prompt is not None:
        needed = int(longest_prompt) + int(config.max_new_tokens)
        limit = _model_max_len(path)
        kwargs["max_model_len"] = needed if limit is None else min(needed, limit)
    kwargs.update(parallel_kwargs(int(getattr(config, "tensor_parallel_size", 1))))
    if getattr(config, "lora_path", None):
        rank = adapter_config(config.lora_path)["r"]
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=max_lora_rank(rank))
    return kwargs


def parallel_kwargs(tensor_parallel_size: int, world_size: int | None = None) -> dict[str, Any]:
    """The engine's parallel layout: ``tensor_parallel_size`` GPUs per engine; under a launcher with
    ``world_size`` processes, vLLM joins the launcher's processes (``external_launcher``) as
    ``world_size / tensor_parallel_size`` data-parallel engines (each fed its own share of the prompts)."""
    if world_size is None:
        from o1pruner.distributed import world

        world_size = world().size
    tp = int(tensor_parallel_size)
    if world_size <= 1:
        return {"tensor_parallel_size": tp} if tp > 1 else {}
    if world_size % tp:
        raise ValueError(
            f"vllm_tensor_parallel_size={tp} does not divide the {world_size} processes of this launch"
        )
    return {
        "tensor_parallel_size": tp,
        "data_parallel_size": world_size // tp,
        "distributed_executor_backend": "external_launcher",
    }


def data_parallel_rank(tensor_parallel_size: int) -> tuple[int, int]:
    """``(data-parallel rank, data-parallel size)`` of this process: the ranks of one tensor-parallel
    engine share one shard of the prompts."""
    from o1pruner.distributed import world

    w = world()
    tp = max(1, int(tensor_parallel_size))
    return w.rank // tp, max(1, w.size // tp)


def _model_max_len(path: str | os.PathLike) -> int | None:
    """The model's own position limit (``max_position_embeddings``), None when its config cannot be read:
    vLLM refuses a ``max_model_len`` above it."""
    try:
        from transformers import AutoConfig

        value = getattr(AutoConfig.from_pretrained(str(path)), "max_position_embeddings", None)
    except Exception:  # an unreadable or remote config: vLLM applies its own limit
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def lora_request(config: Any):
    """The ``vllm.lora.request.LoRARequest`` for ``config.lora_path`` (None without an adapter)."""
    path = getattr(config, "lora_path", None)
    if not path:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(LORA_NAME, LORA_ID, str(Path(path).resolve()))


def memory_utilization(value: float | None) -> float:
    """``value``, or when None the default fraction of accelerator memory (of RAM on a CPU) to reserve."""
    if value is not None:
        return float(value)
    import torch

    return GPU_MEMORY_UTILIZATION if torch.cuda.is_available() else CPU_MEMORY_UTILIZATION
