"""Pre-sampling: K solutions per training problem from the reference model, graded and appended to a log.

Two backends share one interface:

- ``"hf"``: transformers ``generate`` (left-padded batches, KV cache, bf16 on a GPU). Always available.
- ``"vllm"``: vLLM's offline ``LLM`` (optional extra ``o1pruner[vllm]``), far faster for long samples.

``sample_problems`` is crash-safe: it appends each finished batch to ``samples.jsonl`` with one fsync and,
when started again, skips every (problem_id, sample_index) already in the file, so a run killed at any moment
loses at most the batch in flight and never duplicates a sample.

Sampling knobs follow the paper (temperature 0.5, top_p 0.8, no top-k, no repetition penalty), whatever the
model's ``generation_config.json`` says: the hf backend sets ``top_k=0`` and ``repetition_penalty=1.0``
explicitly (transformers would otherwise fall back to the checkpoint's values or to its global default
``top_k=50``), which matches vLLM, where explicit ``SamplingParams`` ignore the checkpoint's defaults.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from o1pruner import distributed
from o1pruner.io import DataError, append_jsonl
from o1pruner.options import check_options, option, shared
from o1pruner.prompts import DEFAULT_SYSTEM_PROMPT, encode_prompt
from o1pruner.records import SAMPLE_KEYS, read_samples, sample_record

__all__ = ["SAMPLE_KEYS", "SamplingConfig", "generate", "read_samples", "sample_problems"]

logger = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")


def default_backend() -> str:
    """``"vllm"`` when vLLM is installed (its package is found; importing it takes seconds), else ``"hf"``."""
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def backend_option(what: str, stage: str, key: str) -> Any:
    """The generation-backend option of pre-sampling or evaluation (``what``), defaulting by machine."""
    return option(
        help=f"Generation backend for {what}: hf or vllm (default: vllm when it is installed, else hf).",
        stage=stage,
        default_factory=default_backend,
        key=key,
        choices=BACKENDS,
    )


@dataclass
class SamplingConfig:
    """How pre-samples (and greedy evaluation answers, with ``temperature=0``, ``k=1``) are drawn.

    ``batch_size``: sequences per ``generate`` call for ``hf``; problems per engine call for ``vllm``.
    ``seed``: batch ``b`` of the hf backend runs under ``torch.manual_seed(seed + b)``; with vllm, problem
    ``j`` is one request ``SamplingParams(n=k, seed=seed + j*k)``, whose sample ``i`` vLLM draws under
    ``seed + j*k + i``. A resumed run with the same config therefore redraws the lost samples exactly (up
    to kernel nondeterminism on a GPU).
    """

    k: int = option(
        16, "Solutions per training problem (paper: 16 Marco-o1, 12 QwQ).", stage="sample", range="[1,)"
    )
    temperature: float = option(
        0.5, "Sampling temperature of the pre-sampling.", stage="sample", range="[0,)"
    )
    top_p: float = option(0.8, "Top-p of the pre-sampling.", stage="sample", range="(0,1]")
    max_new_tokens: int = option(8192, "Maximum new tokens per pre-sample.", stage="sample", range="[1,)")
    backend: str = backend_option("pre-sampling", "sample", "sampling_backend")
    batch_size: int = option(
        64,
        "Sequences per generate call (hf) / prompts per call (vllm).",
        stage="sample",
        key="sampling_batch_size",
        range="[1,)",
    )
    gpu_memory_utilization: float | None = option(
        None,
        "vLLM: fraction of GPU memory (of RAM on a CPU) to use; default 0.85, 0.1 on a CPU.",
        stage=None,
        range="(0,1]",
    )
    quantization: str | None = option(
        None, "vLLM: weight quantization (e.g. bitsandbytes, fp8).", stage="sample"
    )
    tensor_parallel_size: int = option(
        1,
        "vLLM: GPUs one engine spans (tensor parallel), for models that do not fit one GPU; under torchrun "
        "the processes form WORLD_SIZE / this many data-parallel engines.",
        stage=None,
        key="vllm_tensor_parallel_size",
        range="[1,)",
    )
    seed: int = shared("seed", 0)
    # hf generation on a GPU runs under the training's bf16 autocast (float32 masters of full/freeze
    # would otherwise give float32 attention inputs, which flash-attn refuses).
    bf16: bool = shared("bf16", True)
    system_prompt: str | None = shared("system_prompt", DEFAULT_SYSTEM_PROMPT)
    # Not an option: the evaluation stage sets it to the tuned adapter that vLLM serves on the base model.
    lora_path: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first option with a bad value."""
        check_options(self)


@dataclass
class Generation:
    """One generated response.

    ``token_ids``: generated ids only (no prompt), cut before the first EOS, which is not included.
    ``finish_reason``: ``"stop"`` when the model emitted an EOS id, ``"length"`` when it hit the token limit.
    """

    token_ids: list[int]
    text: str
    finish_reason: str


# --------------------------------------------------------------------------------------------- helpers


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids that end a response: ``generation_config.eos_token_id`` (int or list) plus the tokenizer's."""
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        ids += _as_id_list(getattr(gen_cfg, "eos_token_id", None))
    ids += _as_id_list(getattr(tokenizer, "eos_token_id", None))
    return list(dict.fromkeys(ids))


def cut_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> tuple[list[int], str]:
    """Cut generated ids before the first EOS id; returns (ids, finish_reason).

    Everything after the first EOS (padding of a finished row in a batch) is dropped. A row without EOS ran
    into the token limit; its ids are kept whole (a pad id inside it was a real generated token).
    """
    eos = set(eos_ids)
    ids = [int(t) for t in ids]
    for pos, tok in enumerate(ids):
        if tok in eos:
            return ids[:pos], "stop"
    return ids, "length"


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _is_path(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike))


def _load_hf(path: str | os.PathLike, tokenizer: Any) -> tuple[Any, Any]:
    """Load a frozen model (and tokenizer when not given) for generation."""
    try:
        from o1pruner.modeling import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        model, tok = load_model(str(path), mode="none")
    else:  # pragma: no cover - modeling.py always exists in a full install
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        on_gpu = torch.cuda.is_available()
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.bfloat16 if on_gpu else torch.float32
        )
        model.to("cuda" if on_gpu else "cpu")
        tok = AutoTokenizer.from_pretrained(str(path))
    model.eval()
    return model, tokenizer if tokenizer is not None else tok


def _model_device(model: Any):
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


# ------------------------------------------------------------------------------------------ hf backend


def _pad_id(model: Any, tokenizer: Any, eos_ids: list[int]) -> int:
    for value in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
    ):
        if value is not None:
            return int(value)
    if eos_ids:
        return eos_ids[0]
    raise ValueError("cannot batch prompts: the tokenizer has no pad_token_id and the model no eos_token_id")


def _hf_generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    config: SamplingConfig,
    seed: int,
    eos_ids: list[int],
    pad_id: int,
) -> list[Generation]:
    """Generate one sequence per prompt in a single left-padded ``generate`` call."""
    import torch

    device = _model_device(model)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    greedy = config.temperature == 0
    kwargs: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "do_sample": not greedy,
        "num_return_sequences": 1,
        "use_cache": True,
        "eos_token_id": eos_ids or None,
        "pad_token_id": pad_id,
        "repetition_penalty": 1.0,
    }
    if not greedy:
        kwargs.update(temperature=float(config.temperature), top_p=float(config.top_p), top_k=0)
    torch.manual_seed(seed)
    # eval mode for the call: the pipeline may hand over the model in its training mode (dropout on,
    # gradient checkpointing, which would switch the KV cache off)
    was_training = model.training
    model.eval()
    try:
        from o1pruner.modeling import autocast_dtype_for

        dtype = autocast_dtype_for(config.bf16, device)
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
            )
    except torch.OutOfMemoryError:
        if len(prompts) == 1:
            raise
        # Halve and retry: the KV cache of a batch grows with its rows; each half draws under a seed
        # derived from this batch's, so a rerun on the same card redraws the same tokens.
        del input_ids, attention_mask
        from o1pruner.modeling import free_memory

        free_memory()
        half = len(prompts) // 2
        logger.warning(
            "hf generate: out of memory at %d sequences; retrying as %d + %d",
            len(prompts),
            half,
            len(prompts) - half,
        )
        return [
            gen
            for part, rows in enumerate((prompts[:half], prompts[half:]))
            for gen in _hf_generate_batch(
                model, tokenizer, rows, config, child_seed(seed, part), eos_ids, pad_id
            )
        ]
    finally:
        model.train(was_training)
    new_tokens = out[:, width:].tolist()
    gens = []
    for row in new_tokens:
        ids, reason = cut_at_eos(row, eos_ids)
        gens.append(Generation(token_ids=ids, text=_decode(tokenizer, ids), finish_reason=reason))
    return gens


def child_seed(seed: int, part: int) -> int:
    """A seed derived from ``seed`` for part ``part`` (of a split batch, or one process's shard of a
    stage), distinct from every ``seed + b`` of the unsplit ones."""
    import numpy as np

    return int(np.random.SeedSequence([seed, part]).generate_state(1)[0])


def _hf_generate(
    model: Any, tokenizer: Any, prompts_ids: list[list[int]], n: int, config: SamplingConfig, seed_offset: int
) -> list[list[Generation]]:
    eos_ids = stop_token_ids(model, tokenizer)
    pad_id = _pad_id(model, tokenizer, eos_ids)
    # n copies of each prompt, longest first: rows of a batch have similar lengths (little padding) and an
    # out-of-memory error shows up in the first batch rather than at the end.
    rows = [(i, j) for i in range(len(prompts_ids)) for j in range(n)]
    rows.sort(key=lambda r: -len(prompts_ids[r[0]]))
    results: list[list[Generation | None]] = [[None] * n for _ in prompts_ids]
    for b, start in enumerate(range(0, len(rows), config.batch_size)):
        chunk = rows[start : start + config.batch_size]
        gens = _hf_generate_batch(
            model,
            tokenizer,
            [list(prompts_ids[i]) for i, _ in chunk],
            config,
            config.seed + seed_offset + b,
            eos_ids,
            pad_id,
        )
        for (i, j), gen in zip(chunk, gens):
            results[i][j] = gen
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- vLLM backend


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "the 'vllm' sampling backend needs vLLM: pip install 'o1pruner[vllm]' (or use backend='hf')"
        ) from e
    return vllm


def make_vllm_engine(path: str | os.PathLike, config: SamplingConfig, longest_prompt: int | None = None):
    """Start a vLLM offline engine on a model folder or Hub name (bf16, prefix caching on; LoRA serving
    when ``config.lora_path`` is set; ``max_model_len`` from ``longest_prompt``: see
    :func:`o1pruner.vllm_engine.engine_kwargs`)."""
    from o1pruner.vllm_engine import engine_kwargs

    vllm = _import_vllm()
    if distributed.world().distributed:  # one engine configuration for every data-parallel rank
        longest_prompt = distributed.all_max(longest_prompt or 0) or None
    return vllm.LLM(**engine_kwargs(path, config, longest_prompt))


class _EngineHolder:
    """Owns the only reference to an engine, so that releasing it can really drop it before cleanup."""

    def __init__(self, llm: Any, owned: bool) -> None:
        self.llm = llm
        self.owned = owned


def release_vllm_engine(engine: Any) -> None:
    """Shut a vLLM engine down and free its GPU memory, so training can start in this process.

    ``engine``: a ``vllm.LLM`` (drop your own references to it too) or an internal holder. The engine-core
    process is shut down (``LLM.shutdown`` or ``llm_engine.engine_core.shutdown``, whichever this vLLM has),
    then the distributed state is destroyed (``cleanup_dist_env_and_memory``; under a launcher the
    launcher's process group stays) and the CUDA cache emptied.
    """
    from o1pruner import distributed

    keep = distributed.keep_default_group() if distributed.world().distributed else contextlib.nullcontext()
    box, engine = [engine], None  # the only reference left to the engine goes with the shutdown
    with keep:  # under a launcher the next stages need the process group vLLM ran on
        _shutdown_vllm(box)
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _shutdown_vllm(box: list) -> None:
    engine = box.pop()
    if isinstance(engine, _EngineHolder):
        llm, engine.llm = engine.llm, None
    else:
        llm = engine
    engine = None
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    for owner in (llm, getattr(llm, "llm_engine", None), core):
        fn = getattr(owner, "shutdown", None) if owner is not None else None
        if callable(fn):
            try:
                fn()
                break
            except Exception as e:  # the next, lower-level shutdown may still work
                logger.debug("vLLM %s.shutdown() failed: %s", type(owner).__name__, e)
    owner = fn = None
    del llm, core, owner, fn
    gc.collect()
    cleanup = None
    with contextlib.suppress(Exception):
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory as cleanup
    if cleanup is not None:
        with contextlib.suppress(Exception):
            cleanup()
    else:
        with contextlib.suppress(Exception):
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()


@contextlib.contextmanager
def _vllm_engine(
    model_or_path: Any, config: SamplingConfig, prompts_ids: Sequence[Sequence[int]] = ()
) -> Iterator[_EngineHolder]:
    """Yield a holder of an engine: the given ``vllm.LLM`` as is (not released), or a new one started on a
    path and released on exit."""
    if not _is_path(model_or_path):
        if isinstance(model_or_path, _import_vllm().LLM):
            yield _EngineHolder(model_or_path, owned=False)
            return
        raise ValueError(
            "the 'vllm' backend needs a model folder or Hub name (or a vllm.LLM), not a loaded "
            f"{type(model_or_path).__name__}; save the model first or use backend='hf'"
        )
    longest = max(map(len, prompts_ids), default=None)
    holder = _EngineHolder(make_vllm_engine(model_or_path, config, longest), owned=True)
    try:
        yield holder
    finally:
        release_vllm_engine(holder)


def _vllm_generate_requests(
    llm: Any, tokenizer: Any, requests: list[tuple[list[int], int, int]], config: SamplingConfig
) -> list[list[Generation]]:
    """One engine call for ``(prompt ids, seed, n)`` requests; returns each request's n Generations.

    vLLM runs a request with ``n`` > 1 as n child requests seeded ``seed + i``: one request per problem
    with n = K draws exactly what K requests seeded ``seed, ..., seed + K - 1`` draw, so a problem
    resumed with some samples done can ask for just its missing ones under their own seeds.
    """
    vllm = _import_vllm()
    greedy = config.temperature == 0
    params = [
        vllm.SamplingParams(
            n=n,
            temperature=0.0 if greedy else float(config.temperature),
            top_p=1.0 if greedy else float(config.top_p),
            max_tokens=config.max_new_tokens,
            seed=seed,
        )
        for _, seed, n in requests
    ]
    prompts = [{"prompt_token_ids": list(ids)} for ids, _, _ in requests]
    from o1pruner.vllm_engine import lora_request

    adapter = lora_request(config)
    outputs = llm.generate(prompts, params, use_tqdm=False, **({"lora_request": adapter} if adapter else {}))
    eos_ids = _as_id_list(getattr(tokenizer, "eos_token_id", None))
    with contextlib.suppress(Exception):
        eos_ids += _as_id_list(getattr(llm.llm_engine.model_config.hf_config, "eos_token_id", None))
    result = []
    for out, (_, _, n) in zip(outputs, requests):
        completions = sorted(out.outputs, key=lambda c: getattr(c, "index", 0))
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for a request of n={n}")
        gens = []
        for completion in completions:
            stops = list(eos_ids)
            if isinstance(getattr(completion, "stop_reason", None), int):
                stops.append(completion.stop_reason)  # a stop id from the checkpoint's generation_config
            ids, reason = cut_at_eos(list(completion.token_ids), stops)
            if completion.finish_reason == "stop":
                reason = "stop"
            gens.append(Generation(token_ids=ids, text=_decode(tokenizer, ids), finish_reason=reason))
        result.append(gens)
    return result


# ------------------------------------------------------------------------------------------ public API


def generate(
    model_or_path: Any,
    tokenizer: Any,
    prompts_ids: list[list[int]],
    *,
    n: int,
    config: SamplingConfig,
    seed_offset: int = 0,
) -> list[list[Generation]]:
    """Draw ``n`` responses for each prompt (token ids, e.g. from ``encode_prompt``).

    Returns a list (one per prompt, in input order) of ``n`` Generations. ``temperature == 0`` decodes
    greedily. ``model_or_path``: a loaded transformers model or a path (hf), a path or a ``vllm.LLM``
    (vllm); an engine started here is released before returning.
    """
    config.validate()
    if n < 1:
        raise ValueError(f"n must be >= 1 (responses per prompt), got {n!r}")
    prompts_ids = [list(p) for p in prompts_ids]
    if not prompts_ids:
        return []
    if config.backend == "vllm":
        requests = [(p, config.seed + seed_offset + i * n, n) for i, p in enumerate(prompts_ids)]
        with _vllm_engine(model_or_path, config, prompts_ids) as engine:
            return _vllm_generate_requests(engine.llm, tokenizer, requests, config)
    model = model_or_path
    if _is_path(model_or_path):
        model, tokenizer = _load_hf(model_or_path, tokenizer)
    return _hf_generate(model, tokenizer, prompts_ids, n, config, seed_offset)


def sample_problems(
    problems: Sequence[Any],
    model_or_path: Any,
    tokenizer: Any,
    out_path: str | os.PathLike,
    config: SamplingConfig,
    *,
    done_paths: Sequence[str | os.PathLike] = (),
) -> list[dict]:
    """Draw ``config.k`` graded samples per problem into ``out_path`` (``samples.jsonl``), resumably.

    Pairs (problem_id, sample_index) already in ``out_path`` or in a file of ``done_paths`` (another
    process's log) are skipped. Work runs in batches of whole
    pairs; each finished batch is graded with ``is_correct`` and appended with one fsync. Problems are
    taken longest prompt first. Returns the records of ``problems`` (old and new), in problem order then
    sample index. ``tokenizer`` may be None when ``model_or_path`` is a path (loaded from there).
    """
    config.validate()
    problems = list(problems)
    by_id: dict[str, Any] = {}
    for p in problems:
        if p.id in by_id:
            raise DataError(f"duplicate problem id {p.id!r} (question {p.question[:60]!r})")
        by_id[p.id] = p
    out_path = Path(out_path)
    done: dict[tuple[str, int], dict] = {}
    for path in [out_path, *map(Path, done_paths)]:
        for rec in read_samples(path) if path.exists() else ():
            if rec["problem_id"] in by_id and rec["sample_index"] < config.k:
                done[(rec["problem_id"], rec["sample_index"])] = rec

    if tokenizer is None:
        if not _is_path(model_or_path):
            raise ValueError("tokenizer is None: pass one, or pass the model as a path to load it from")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_or_path))

    k = config.k
    total = len(problems) * k
    todo = total - len(done)
    lockstep = distributed.lockstep(config.backend)
    if todo == 0 and not lockstep:
        return _ordered(problems, done, k)
    prompt_ids = {p.id: encode_prompt(tokenizer, p.question, config.system_prompt) for p in problems}
    order = sorted(problems, key=lambda p: -len(prompt_ids[p.id]))  # stable: ties keep input order
    remaining = {p.id: k - sum((p.id, i) in done for i in range(k)) for p in problems}
    bar = tqdm(total=total, initial=len(done), desc="sampling", unit="sample", dynamic_ncols=True)
    bar.set_postfix(problems=f"{sum(r == 0 for r in remaining.values())}/{len(problems)}")

    def commit(pairs: list[tuple[Any, int]], gens: list[Generation]) -> None:
        records = [sample_record(p, i, g) for (p, i), g in zip(pairs, gens)]
        append_jsonl(out_path, records)
        for rec, (p, _) in zip(records, pairs):
            done[(rec["problem_id"], rec["sample_index"])] = rec
            remaining[p.id] -= 1
        bar.update(len(records))
        bar.set_postfix(problems=f"{sum(r == 0 for r in remaining.values())}/{len(problems)}")

    try:
        if config.backend == "vllm":
            # One request per pair with its own seed: resuming a problem with some samples done redraws
            # exactly the missing ones; prefix caching shares the prompt's KV blocks between them.
            # Problem j draws its samples under seeds seed + j*k + i: one request with n = k when none
            # is done, else one request per missing sample (the same draws, see _vllm_generate_requests).
            calls = []
            for start in range(0, len(order), config.batch_size):
                pairs, requests = [], []
                for j, p in enumerate(order[start : start + config.batch_size], start):
                    missing = [i for i in range(k) if (p.id, i) not in done]
                    pairs += [(p, i) for i in missing]
                    if len(missing) == k:
                        requests.append((prompt_ids[p.id], config.seed + j * k, k))
                    else:
                        requests += [(prompt_ids[p.id], config.seed + j * k + i, 1) for i in missing]
                if pairs:
                    calls.append((pairs, requests))
            n_calls = distributed.all_max(len(calls)) if lockstep else len(calls)
            if n_calls:
                with _vllm_engine(model_or_path, config, list(prompt_ids.values())) as engine:
                    for pairs, requests in calls:
                        gens = _vllm_generate_requests(engine.llm, tokenizer, requests, config)
                        commit(pairs, [g for per_request in gens for g in per_request])
                    for _ in range(n_calls - len(calls)):  # data-parallel engines step together
                        _vllm_generate_requests(engine.llm, tokenizer, [], config)
        else:
            model = model_or_path
            if _is_path(model_or_path):
                model, tokenizer = _load_hf(model_or_path, tokenizer)
            eos_ids = stop_token_ids(model, tokenizer)
            pad_id = _pad_id(model, tokenizer, eos_ids)
            all_pairs = [(p, i) for p in order for i in range(k)]
            # Batches are cut from the full pair list, not the pending one, and a batch with any pair
            # missing is drawn whole (seed + b, same rows, same padding), only its missing pairs written:
            # a resumed run redraws exactly what an uninterrupted one would have, even after a kill in the
            # middle of a batch's write.
            for b, start in enumerate(range(0, len(all_pairs), config.batch_size)):
                batch = all_pairs[start : start + config.batch_size]
                if all((p.id, i) in done for p, i in batch):
                    continue
                gens = _hf_generate_batch(
                    model,
                    tokenizer,
                    [prompt_ids[p.id] for p, _ in batch],
                    config,
                    config.seed + b,
                    eos_ids,
                    pad_id,
                )
                todo_rows = [r for r, (p, i) in enumerate(batch) if (p.id, i) not in done]
                commit([batch[r] for r in todo_rows], [gens[r] for r in todo_rows])
    finally:
        bar.close()
    return _ordered(problems, done, k)


def _ordered(problems: list[Any], done: dict[tuple[str, int], dict], k: int) -> list[dict]:
    return [done[(p.id, i)] for p in problems for i in range(k) if (p.id, i) in done]
