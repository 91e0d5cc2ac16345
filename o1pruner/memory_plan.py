"""Peak GPU memory of each pipeline stage, planned from the model's architecture before any weight is loaded.

The plan counts parameters exactly (the model is built on the ``meta`` device from its config, so no weight
is read and nothing is downloaded beyond ``config.json``) and estimates activations with per-token formulas
for a pre-norm decoder (attention + gated MLP, the Llama/Qwen2 family). Each stage's peak is the sum of named
parts, so a plan that does not fit says which part to shrink and which option shrinks it.

Units: bytes everywhere inside; :meth:`MemoryPlan.table` prints GiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
# CUDA context, cuBLAS workspaces and the caching allocator's slack, measured on Hopper and Ampere cards
# as 0.5-0.9 GiB; the larger value keeps the plan on the safe side.
CUDA_RESERVE = int(0.9 * GIB)
# Allocator fragmentation on top of the activation peak.
FRAGMENTATION = 1.10
NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits per weight + double-quantised absmax (bitsandbytes, block 64)
WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "nf4": NF4_BYTES, "fp8": 1.0}
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0}
VLLM_QUANT_BYTES = {None: 2.0, "fp8": 1.0, "bitsandbytes": NF4_BYTES, "awq": NF4_BYTES, "gptq": NF4_BYTES}
# vLLM beyond weights and KV cache: CUDA graphs and non-torch allocations (fixed), plus the activations of
# its profiling forward over max_num_batched_tokens tokens.
VLLM_FIXED = int(2.0 * GIB)
VLLM_BATCHED_TOKENS = 8192
# Sequence length (prompt) assumed when the data has not been tokenized yet: MATH/GSM8K prompts with the
# chat template stay well under it.
DEFAULT_PROMPT_TOKENS = 512


@dataclass(frozen=True)
class ModelArch:
    """Parameter counts and shapes of a decoder-only LM, read off a meta-device instance."""

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    embed_params: int  # input embedding
    head_params: int  # lm_head (0 when tied to the embedding)
    layer_linear_params: int  # nn.Linear weights of ONE decoder layer (what NF4 quantises)
    layer_other_params: int  # norms and biases of one decoder layer
    lora_params_per_rank: int  # sum over one layer's linears of (in + out): LoRA params = r * this
    largest_linear: int  # elements of the largest linear weight of a layer (dequantised per call)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def total_params(self) -> int:
        layer = self.layer_linear_params + self.layer_other_params
        return self.embed_params + self.head_params + self.num_layers * layer + self.hidden_size

    @classmethod
    def from_config(cls, config: Any) -> ModelArch:
        """From a transformers ``PretrainedConfig`` (or a dict with ``model_type``), without weights."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        if isinstance(config, Mapping):
            values = dict(config)
            config = AutoConfig.for_model(values.pop("model_type"), **values)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        decoder = model.get_decoder()
        layer = decoder.layers[0]
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        linear = sum(m.weight.numel() for m in linears)
        head = model.get_output_embeddings()
        tied = head.weight is decoder.embed_tokens.weight
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(
            hidden_size=text.hidden_size,
            num_layers=len(decoder.layers),
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate_size=text.intermediate_size,
            vocab_size=text.vocab_size,
            embed_params=decoder.embed_tokens.weight.numel(),
            head_params=0 if tied else head.weight.numel(),
            layer_linear_params=linear,
            layer_other_params=sum(p.numel() for p in layer.parameters()) - linear,
            lora_params_per_rank=sum(m.in_features + m.out_features for m in linears),
            largest_linear=max(m.weight.numel() for m in linears),
        )


@dataclass
class StagePlan:
    """One stage's peak: named parts in bytes, and the option that shrinks the largest variable part."""

    name: str
    parts: dict[str, float]
    knob: str
    # A vLLM engine must fit in its reserved share of the card (gpu_memory_utilization); None: the card.
    share: float | None = None

    @property
    def peak(self) -> float:
        return sum(self.parts.values())

    def limit(self, budget: float) -> float:
        return budget if self.share is None else budget * self.share


@dataclass
class MemoryPlan:
    """Per-stage peaks against one card's memory (``budget`` bytes)."""

    budget: float
    stages: list[StagePlan] = field(default_factory=list)
    num_gpus: int = 1  # peaks are per GPU
    card: str | None = None  # the card name the budget came from, if any

    def failures(self) -> list[StagePlan]:
        return [s for s in self.stages if s.peak > s.limit(self.budget)]

    def fits(self) -> bool:
        return not self.failures()

    def table(self) -> str:
        """A plain-text table: stage, peak GiB, verdict, and the parts of each stage."""
        rows = [f"{'stage':<10} {'peak GiB':>9}  {'fits':<4}  parts (GiB)", "-" * 78]
        for s in self.stages:
            parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in s.parts.items() if v >= 0.005 * GIB)
            fits = "yes" if s.peak <= s.limit(self.budget) else "NO"
            share = "" if s.share is None else f" [within vLLM's {s.share:.0%} share]"
            rows.append(f"{s.name:<10} {s.peak / GIB:>9.2f}  {fits:<4}  {parts}{share}")
        card = f" (card {self.card})" if self.card else ""
        per = f", peaks per GPU of {self.num_gpus} GPUs" if self.num_gpus > 1 else ""
        rows.append(f"budget: {self.budget / GIB:.1f} GiB{card}{per}")
        return "\n".join(rows)

    def error_message(self) -> str:
        """One line per stage that does not fit: estimate, budget and the knob that fixes it."""
        return "\n".join(
            f"stage {s.name!r} needs ~{s.peak / GIB:.1f} GiB{' per GPU' if self.num_gpus > 1 else ''}, over its {s.limit(self.budget) / GIB:.1f} GiB "
            f"({'vLLM share of the card' if s.share else 'the card'}) "
            f"(largest parts: {_largest(s.parts)}); to fit: {s.knob}"
            for s in self.failures()
        )


def _largest(parts: Mapping[str, float], n: int = 2) -> str:
    top = sorted(parts.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in top)


def _opt(options: Mapping[str, Any], key: str, default: Any) -> Any:
    value = options.get(key)
    return default if value is None else value


# ------------------------------------------------------------------------------------------- the parts
def weight_bytes(arch: ModelArch, mode: str, freeze_last_n_layers: int = 0) -> float:
    """Bytes of the model as the trainer holds it: frozen weights, fp32 trainable weights, adapters."""
    layer = arch.layer_linear_params + arch.layer_other_params
    outer = arch.embed_params + arch.head_params + arch.hidden_size
    if mode == "qlora":
        base = arch.num_layers * (arch.layer_linear_params * NF4_BYTES + arch.layer_other_params * 2.0)
        return base + outer * 2.0
    if mode in ("lora", "none"):
        return (arch.num_layers * layer + outer) * 2.0
    if mode == "full":
        return arch.total_params * 4.0
    if mode == "freeze":
        n = min(freeze_last_n_layers, arch.num_layers)
        frozen = (arch.num_layers - n) * layer + arch.embed_params + arch.head_params
        return frozen * 2.0 + (n * layer + arch.hidden_size) * 4.0
    raise ValueError(f"mode={mode!r}: expected qlora, lora, full, freeze or none")


def _num_gpus(options: Mapping[str, Any]) -> int:
    return max(1, int(_opt(options, "num_gpus", 1)))


def _fsdp_gpus(options: Mapping[str, Any]) -> int:
    """The processes FSDP2 shards over (``fsdp`` with ``num_gpus`` > 1), else 1 (one GPU, or DDP)."""
    gpus = _num_gpus(options)
    return gpus if gpus > 1 and bool(_opt(options, "fsdp", False)) else 1


def _run_weights(arch: ModelArch, options: Mapping[str, Any], sharded: bool = False) -> dict[str, float]:
    """The stage parts dict, started with one GPU's weights of the model in the run's mode.

    Under FSDP2 (``fsdp`` with ``num_gpus`` > 1) every process loads the whole model in 16 bits and scores
    with it; training (``sharded``) shards every layer, the float32 trainable ones and the frozen ones.
    qlora does not shard (4-bit weights): with several GPUs it runs data parallel, whole on every GPU.
    """
    mode = _opt(options, "mode", "qlora")
    n_freeze = int(_opt(options, "freeze_last_n_layers", 0))
    gpus = _fsdp_gpus(options)
    if gpus == 1 or mode == "qlora":
        return {"weights": weight_bytes(arch, mode, n_freeze)}
    if not sharded:
        return {"weights": weight_bytes(arch, "none")}
    return {"weights": weight_bytes(arch, mode, n_freeze) / gpus}


def trainable_params(arch: ModelArch, mode: str, lora_r: int, freeze_last_n_layers: int) -> int:
    if mode in ("qlora", "lora"):
        return arch.num_layers * lora_r * arch.lora_params_per_rank
    if mode == "full":
        return arch.total_params
    if mode == "freeze":
        n = min(freeze_last_n_layers, arch.num_layers)
        return n * (arch.layer_linear_params + arch.layer_other_params) + arch.hidden_size
    return 0


def layer_activation_bytes(arch: ModelArch, tokens: int, act_bytes: float) -> float:
    """Tensors one decoder layer keeps for its backward, for ``tokens`` tokens.

    Per token: norm inputs/outputs and the attention block's q, o, input and output (8 H), k and v before and
    after rotary embedding (4 kv_dim), and the gated MLP's gate, up, activation and product (4 I).
    """
    per_token = 8 * arch.hidden_size + 4 * arch.kv_dim + 4 * arch.intermediate_size
    return tokens * per_token * act_bytes


def forward_peak_bytes(arch: ModelArch, tokens: int, act_bytes: float) -> float:
    """Live tensors inside one layer of a no-grad forward: residual, q/k/v/o and the MLP's gate, up, product."""
    return tokens * (4 * arch.hidden_size + 2 * arch.kv_dim + 3 * arch.intermediate_size) * act_bytes


def attention_extra_bytes(arch: ModelArch, tokens: int, attn: str, packed: bool) -> float:
    """What attention adds beyond its inputs and outputs: a dense mask or score matrix when there is one."""
    if attn not in ("sdpa", "eager") or not packed:  # flash-attn and per-sequence SDPA hold no mask
        return 0.0
    # The (1, 1, N, N) boolean block-diagonal mask and the additive bf16 copy SDPA turns it into.
    mask = 3.0 * tokens * tokens
    if attn == "eager":  # additive float mask + fp32 scores and probabilities of every head
        return mask * 2 + 2.0 * arch.hidden_size // arch.head_dim * tokens * tokens * 4
    return mask


def loss_bytes(arch: ModelArch, tokens: int, act_bytes: float, need_grad: bool = True) -> float:
    """The fused loss: last hidden states, one logits tile of the kernel's GPU chunk, and d logp / d h."""
    import torch
    from o1pruner_kernels._common import chunk_tokens

    chunk = chunk_tokens(tokens, arch.vocab_size, torch.device("cuda"))
    tile = chunk * arch.vocab_size * (4.0 + act_bytes)
    hidden = tokens * arch.hidden_size * act_bytes
    return hidden + tile + (tokens * arch.hidden_size * (act_bytes + 4.0) if need_grad else 0.0)


def kv_cache_bytes(arch: ModelArch, sequences: int, seq_len: int, act_bytes: float = 2.0) -> float:
    return 2.0 * arch.num_layers * arch.kv_dim * act_bytes * sequences * seq_len


# ------------------------------------------------------------------------------------------- the stages
def training_stage(arch: ModelArch, options: Mapping[str, Any], act_bytes: float) -> StagePlan:
    mode = _opt(options, "mode", "qlora")
    tokens = int(_opt(options, "micro_batch_tokens", 8192))
    n_train = trainable_params(
        arch, mode, int(_opt(options, "lora_r", 16)), int(_opt(options, "freeze_last_n_layers", 0))
    )
    optimizer = _opt(options, "optimizer", "adamw")
    ckpt = bool(_opt(options, "gradient_checkpointing", True))
    attn = _opt(options, "attn_implementation", "o1pruner_varlen_sdpa")
    layer = layer_activation_bytes(arch, tokens, act_bytes)
    gpus = _fsdp_gpus(options)
    parts = _run_weights(arch, options, sharded=True)
    parts["gradients"] = n_train * 4.0 / gpus
    parts["optimizer"] = n_train * OPTIMIZER_STATE_BYTES.get(optimizer, 8.0) / gpus
    # The trainer's autocast keeps no weight cache, so fp32 weights are cast per use: one layer's worth.
    if mode in ("full", "freeze"):
        layer_params = arch.layer_linear_params + arch.layer_other_params
        parts["bf16 weight casts"] = layer_params * 2.0
        if gpus > 1:  # FSDP all-gathers the layer it runs and prefetches the next, in fp32
            parts["gathered layers"] = 2 * layer_params * 4.0
    # Backward of a layer holds its saved tensors plus about twice as much in gradients in flight
    # (measured on the CPU: tests/test_memory_plan.py).
    # freeze: autograd records nothing before the first trainable layer, so only the suffix keeps tensors.
    graph_layers = arch.num_layers
    if mode == "freeze":
        graph_layers = min(int(_opt(options, "freeze_last_n_layers", 0)), arch.num_layers)
    if ckpt:
        parts["checkpoints"] = graph_layers * tokens * arch.hidden_size * act_bytes
        parts["layer recompute"] = 3 * layer
    else:
        parts["activations"] = (graph_layers + 2) * layer
    if mode == "qlora":
        parts["dequantized weight"] = 2 * arch.largest_linear * act_bytes
    parts["attention"] = attention_extra_bytes(arch, tokens, attn, packed=True)
    parts["loss"] = loss_bytes(arch, tokens, act_bytes)
    _add_reserve(parts)
    knob = "lower micro_batch_tokens" if ckpt else "set gradient_checkpointing: true"
    if parts["attention"] > parts.get("layer recompute", 0):
        knob = "install flash-attn (per-sequence attention without an N x N mask) or lower micro_batch_tokens"
    state = ("weights", "gradients", "optimizer")
    if sum(parts.get(k, 0.0) for k in state) > 0.6 * sum(parts.values()):
        eight_bit = (
            "" if OPTIMIZER_STATE_BYTES.get(optimizer, 8.0) <= 2.0 else "optimizer paged_adamw_8bit, or "
        )
        knob = f"mode qlora, or {eight_bit}more GPUs with fsdp (num_gpus), or a card with more memory"
    return StagePlan("train", parts, knob)


def scoring_stage(arch: ModelArch, options: Mapping[str, Any], act_bytes: float) -> StagePlan:
    tokens = int(_opt(options, "score_batch_tokens", 16384))
    parts = _run_weights(arch, options)
    parts["activations"] = forward_peak_bytes(arch, tokens, act_bytes)
    parts["loss"] = loss_bytes(arch, tokens, act_bytes, need_grad=False)
    _add_reserve(parts)
    knob = "lower score_batch_tokens"
    if parts["weights"] > 0.6 * sum(parts.values()):
        knob = "mode qlora, or a card with more memory (every GPU holds the whole model to score)"
    return StagePlan("score", parts, knob)


def generation_stage(
    arch: ModelArch, options: Mapping[str, Any], name: str, act_bytes: float, prompt_tokens: int
) -> StagePlan:
    """hf ``generate`` or a vLLM engine, for pre-sampling (``name='sample'``) or evaluation (``'eval'``)."""
    prefix = "sampling" if name == "sample" else "eval"
    backend = _opt(options, f"{prefix}_backend", "hf")
    new = int(_opt(options, "max_new_tokens" if name == "sample" else "eval_max_new_tokens", 8192))
    seq = prompt_tokens + new
    if backend == "vllm":
        quant = options.get("quantization")
        weights = arch.total_params * VLLM_QUANT_BYTES.get(quant, 2.0)
        util = float(_opt(options, "gpu_memory_utilization", 0.85))
        parts = {
            "weights": weights,
            "engine overhead": VLLM_FIXED + forward_peak_bytes(arch, VLLM_BATCHED_TOKENS, 2.0),
            "kv cache, one longest sequence": kv_cache_bytes(arch, 1, seq),
        }
        knob = (
            "set quantization: fp8 (or bitsandbytes), raise gpu_memory_utilization, or lower max_new_tokens"
        )
        return StagePlan(name, parts, knob, share=util)
    batch = int(_opt(options, "sampling_batch_size" if name == "sample" else "eval_batch_size", 64))
    parts = _run_weights(arch, options)
    parts["kv cache"] = kv_cache_bytes(arch, batch, seq, act_bytes)
    parts["kv cache growth"] = (
        kv_cache_bytes(arch, batch, seq, act_bytes) / arch.num_layers
    )  # one layer concatenated
    parts["prefill"] = forward_peak_bytes(arch, batch * prompt_tokens, act_bytes)
    parts["logits"] = 3 * batch * arch.vocab_size * 4.0
    _add_reserve(parts)
    key = "sampling_batch_size" if name == "sample" else "eval_batch_size"
    return StagePlan(name, parts, f"lower {key}, or use the vllm backend")


def _add_reserve(parts: dict[str, float]) -> None:
    variable = sum(v for k, v in parts.items() if k not in ("weights", "gradients", "optimizer"))
    parts["allocator slack"] = (FRAGMENTATION - 1.0) * variable
    parts["cuda context"] = CUDA_RESERVE


def plan_memory(
    arch: ModelArch,
    options: Mapping[str, Any],
    gpu_memory_gb: float,
    *,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    act_bytes: float = 2.0,
) -> MemoryPlan:
    """Plan every stage of a run with these (flat, YAML-key) ``options`` on a card of ``gpu_memory_gb`` GiB.

    ``act_bytes`` is the activation dtype's size (2 for bf16 autocast). A vLLM stage fits when its share of
    the card (``gpu_memory_utilization``) holds the weights, the engine's overhead and the KV cache of one
    longest sequence.
    """
    budget = gpu_memory_gb * GIB
    plan = MemoryPlan(budget=budget, num_gpus=_num_gpus(options))
    stages = [
        generation_stage(arch, options, "sample", act_bytes, prompt_tokens),
        scoring_stage(arch, options, act_bytes),
        training_stage(arch, options, act_bytes),
    ]
    if options.get("eval_dataset"):
        stages.append(generation_stage(arch, options, "eval", act_bytes, prompt_tokens))
    plan.stages = stages
    return plan


def _recipe_data(filename: str) -> dict[str, Any]:
    """The mapping in the packaged data file ``o1pruner/recipes/FILENAME``."""
    from importlib.resources import files

    import yaml

    return yaml.safe_load((files("o1pruner") / "recipes" / filename).read_text(encoding="utf-8"))


def known_architectures() -> dict[str, dict[str, Any]]:
    """Model id -> config.json values, for the models the shipped recipes name (no download needed)."""
    return _recipe_data("architectures.yaml")


def architecture_for(model: str) -> ModelArch:
    """The architecture of a recipe's model, a local folder, or a Hub id (reads only its config.json)."""
    from o1pruner.options import ConfigError

    known = known_architectures()
    if model in known:
        return ModelArch.from_config(known[model])
    from transformers import AutoConfig

    try:
        return ModelArch.from_config(AutoConfig.from_pretrained(model))
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"model {model!r}: cannot read its config.json to plan memory: {first}", key="model"
        ) from None


def visible_gpu_memory_gb() -> float | None:
    """Total memory of the current CUDA device in GiB, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def known_cards() -> dict[str, dict[str, Any]]:
    """Card name -> ``{usable_gib, examples}`` (``o1pruner/recipes/cards.yaml``)."""
    return _recipe_data("cards.yaml")


def card_memory_gb(card: str) -> float:
    """Usable GiB of the named card; ConfigError (key ``card``) naming the known cards otherwise."""
    from o1pruner.options import ConfigError

    cards = known_cards()
    if card not in cards:
        raise ConfigError(f"card = {card!r}: unknown card; known: {', '.join(cards)}", key="card")
    return float(cards[card]["usable_gib"])


def plan_run(options: Mapping[str, Any], gpu_memory_gb: float | None = None) -> MemoryPlan:
    """The plan of a resolved run (flat option keys, e.g. ``PipelineConfig.to_dict()``) on a card of
    ``gpu_memory_gb`` GiB (default: the run's ``card``, else the visible GPU's memory)."""
    from o1pruner.options import ConfigError

    card = options.get("card") if gpu_memory_gb is None else None
    budget = gpu_memory_gb
    if budget is None and card:
        budget = card_memory_gb(str(card))
    if budget is None:
        budget = visible_gpu_memory_gb()
    if budget is None:
        raise ConfigError(
            "no GPU is visible: give the card's memory with --gpu-memory-gb or a --card", key="gpu_memory_gb"
        )
    if not options.get("model"):
        raise ConfigError("model is not set: pass --model or a --recipe", key="model")
    plan = plan_memory(architecture_for(str(options["model"])), options, budget)
    plan.card = str(card) if card else None
    return plan
