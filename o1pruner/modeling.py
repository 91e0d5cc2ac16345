"""Loading any causal LM for O1-Pruner training or evaluation, and running its decoder body without logits.

Modes (``load_model(..., mode=...)``):

- ``qlora``: base weights in 4-bit NF4 (double quantisation, bitsandbytes), LoRA adapters on every linear
  projection (peft ``"all-linear"``, which leaves the lm_head out); lm_head kept unquantised and frozen.
- ``lora``: the same adapters on a 16/32-bit base.
- ``full``: every parameter trains (the paper's Marco-o1 run).
- ``freeze``: only the last ``freeze_last_n_layers`` decoder layers and the final norm train (the paper's
  QwQ run trained its last 48 layers).
- ``none``: everything frozen, eval mode (scoring, evaluation).

In ``full``/``freeze`` a model loaded in 16 bit keeps its *trainable* parameters in float32 (master
weights; bf16 autocast does the compute): an AdamW update of lr 2e-7 would vanish when added to a bf16
weight. Adapters (``lora``/``qlora``) are float32 as peft creates them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from o1pruner.attention import VARLEN_SDPA
from o1pruner.attention import register as register_varlen_sdpa

log = logging.getLogger(__name__)
# On AVX-512-BF16 CPUs bitsandbytes tries an optional kernel from the Hugging Face Hub at import and warns
# when it cannot have it (offline, or the `kernels` package absent); its own CPU path is used either way.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

MODES = ("qlora", "lora", "full", "freeze", "none")
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def default_attn_implementation() -> str:
    """``flash_attention_2`` when flash-attn imports and CUDA is available, else per-sequence SDPA.

    The fallback (:data:`o1pruner.attention.VARLEN_SDPA`) isolates packed sequences without an N x N mask.
    The choice is logged once per process.
    """
    choice = VARLEN_SDPA
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            choice = "flash_attention_2"
        except ImportError:
            pass
    if choice == VARLEN_SDPA:
        register_varlen_sdpa()
    if choice not in _ANNOUNCED:
        _ANNOUNCED.add(choice)
        log.info("attention: %s", choice)
    return choice


_ANNOUNCED: set[str] = set()


def _resolve_dtype(torch_dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype is None or torch_dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if torch_dtype not in _DTYPES:
        raise ValueError(f"torch_dtype={torch_dtype!r}: expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[torch_dtype]


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Wrap peft model construction: peft reads transformers' deprecated ``is_gradient_checkpointing``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant, by the name this transformers version has."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also hooks the embeddings' output to require grad (what reentrant checkpointing needs);
    # non-reentrant checkpointing does not, and in freeze mode the hook would make autograd run backward
    # through every frozen layer. LoRA modes put it back where they need it.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def _is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def load_model(
    name_or_path: str,
    *,
    mode: str = "qlora",
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target: str | list[str] = "all-linear",
    freeze_last_n_layers: int = 0,
    attn_implementation: str | None = None,
    torch_dtype: str | torch.dtype | None = None,
    device: str | None = None,
    gradient_checkpointing: bool = False,
    seed: int | None = None,
    fp32_masters: bool = True,
):
    """Load a causal LM (Hub name or local folder; a folder holding a peft adapter loads base + adapter).

    Returns ``(model, tokenizer)``. ``attn_implementation`` None picks ``default_attn_implementation()``;
    ``torch_dtype`` None picks bf16 on a bf16-capable GPU, else float32; ``device`` None picks cuda if
    available, else cpu. ``seed`` (not None) seeds torch's generator before any weight is created, so a
    new LoRA adapter starts from the same values in every run. ``fp32_masters`` (full/freeze): trainable
    weights in float32; False keeps the load dtype (FSDP2 casts each layer as it shards it, so no process
    holds the whole model in float32).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    if device is None:  # this process's GPU under a launcher (cuda:LOCAL_RANK)
        from o1pruner.distributed import world

        device = str(world().device())
    dtype = _resolve_dtype(torch_dtype, device)
    attn = attn_implementation or default_attn_implementation()
    if attn == VARLEN_SDPA:
        register_varlen_sdpa()

    adapter_path = None
    base_path = name_or_path
    if _is_adapter_dir(name_or_path):
        adapter_path = name_or_path
        with open(os.path.join(name_or_path, "adapter_config.json"), encoding="utf-8") as f:
            base_path = json.load(f)["base_model_name_or_path"]
        if mode in ("full", "freeze"):
            raise ValueError(f"{name_or_path} holds a LoRA adapter; load it with mode lora, qlora or none")

    kwargs: dict = {"dtype": dtype, "attn_implementation": attn}
    if mode == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=["lm_head"],
        )
        kwargs["device_map"] = {"": device}
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if mode != "qlora":
        model.to(device)
    else:
        keep_4bit_layout_for_training(model)
    tok_path = adapter_path or name_or_path
    tokenizer = AutoTokenizer.from_pretrained(tok_path)

    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing and mode != "none":
        enable_checkpointing(model)

    if mode in ("lora", "qlora"):
        import peft

        if gradient_checkpointing:
            # Frozen embeddings give checkpointed layers inputs without grad; this keeps the graph alive.
            model.enable_input_require_grads()
        if adapter_path:
            with peft_quietly():
                model = peft.PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
        else:
            cfg = peft.LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=lora_target,
                bias="none",
                task_type="CAUSAL_LM",
            )
            with peft_quietly():
                model = peft.get_peft_model(model, cfg)
    elif mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif mode == "freeze":
        layers = _decoder_layers(model)
        if not 0 < freeze_last_n_layers <= len(layers):
            raise ValueError(
                f"mode='freeze' needs 0 < freeze_last_n_layers <= {len(layers)} (the model's layer count), "
                f"got {freeze_last_n_layers}"
            )
        for layer in list(layers)[-freeze_last_n_layers:]:
            layer.requires_grad_(True)
        decoder_of(model).norm.requires_grad_(True)
    elif mode == "none":
        if adapter_path:
            import peft

            with peft_quietly():
                model = peft.PeftModel.from_pretrained(model, adapter_path, is_trainable=False)
        model.eval()

    if mode in ("full", "freeze") and fp32_masters:
        # No enable_input_require_grads here: non-reentrant checkpointing needs no input that requires grad,
        # so in freeze mode autograd records nothing before the first trainable layer and the backward
        # stops there instead of running through every frozen layer.
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    if mode != "none":
        model.train()
    lm_head_weight(model).requires_grad_(mode == "full")
    return model, tokenizer


def keep_4bit_layout_for_training(model) -> int:
    """Keep bitsandbytes 4-bit weights in their trainable layout on the CPU; returns the layers changed.

    On a CPU with AVX-512 BF16, bitsandbytes repacks a ``Linear4bit`` weight into a CPU-only inference
    layout the first time the layer runs in eval mode without grad (``packing_format_for_cpu``), and from
    then on ``matmul_4bit`` takes that path even in training, where it adds the bias in place and fails
    ("a view of a leaf Variable that requires grad is being used in an in-place operation"). The layout
    also computes in bf16, so reference log-probs scored in eval mode would not match the training
    forward. The model we train, score and evaluate therefore never switches.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - qlora needs bitsandbytes
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def unwrap_model(model):
    """The transformers ``*ForCausalLM`` under any peft wrapper."""
    try:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return model.get_base_model()
    except ImportError:  # pragma: no cover
        pass
    return model


def decoder_of(model) -> torch.nn.Module:
    """The decoder body whose ``last_hidden_state`` (after the final norm) feeds the lm_head."""
    return unwrap_model(model).get_decoder()


def _decoder_layers(model) -> torch.nn.ModuleList:
    dec = decoder_of(model)
    if not hasattr(dec, "layers"):
        raise ValueError(f"{type(dec).__name__} has no `.layers`; mode='freeze' does not know its layers")
    return dec.layers


def lm_head_weight(model) -> torch.Tensor:
    """The output projection weight (V, H), through peft wrappers and tied embeddings; never quantised."""
    head = unwrap_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    w = getattr(head, "weight", None)
    if hasattr(head, "base_layer"):  # a peft-wrapped lm_head (if a user targeted it explicitly)
        w = head.base_layer.weight
    if w is None or w.dtype in (torch.uint8, torch.int8) or w.ndim != 2:
        raise ValueError(
            f"lm_head weight is quantised or missing ({None if w is None else w.dtype}); "
            "load with llm_int8_skip_modules=['lm_head']"
        )
    return w


def last_hidden_states(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **kw,
) -> torch.Tensor:
    """Final-norm hidden states (B, T, H) from the decoder body only: no logits are ever computed.

    Extra ``kw`` (e.g. flash varlen ``cu_seq_lens_q``) go to the decoder's attention layers.
    """
    out = decoder_of(model)(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False, **kw
    )
    return out.last_hidden_state


def autocast_dtype_for(bf16: bool, device: torch.device) -> torch.dtype | None:
    """The compute dtype of training (and so of scoring): bf16 autocast on a GPU when ``bf16``, else None
    (the weights' own dtype)."""
    return torch.bfloat16 if bf16 and device.type == "cuda" else None


def packed_forward(model, batch, autocast_dtype: torch.dtype | None = None):
    """The decoder body over one packed row (``packing.PackedBatch`` on the model's device), as training
    runs it; returns ``(hidden (T, H), lm_head weight (V, H))`` for the fused kernels.

    ``autocast_dtype`` (bf16 on a GPU) runs the body under autocast without its weight cache (the cache
    would keep a bf16 copy of every float32 trainable weight for the whole forward: 2 bytes per trainable
    parameter) and casts the hidden states and the lm_head weight to it, as autocast would cast the lm_head
    matmul (a float32 master lm_head would otherwise force a float32 GEMM over the vocabulary). Scoring
    runs the same function, so the reference log-probs are the step-0 policy's.
    """
    from o1pruner.packing import packed_attention_kwargs

    attn_kw = packed_attention_kwargs(
        unwrap_model(model).config._attn_implementation, batch, autocast_dtype or lm_head_weight(model).dtype
    )
    with torch.autocast(
        batch.input_ids.device.type,
        dtype=autocast_dtype or torch.float32,
        enabled=autocast_dtype is not None,
        cache_enabled=False,
    ):
        hidden = last_hidden_states(model, batch.input_ids, **attn_kw)
    weight = lm_head_weight(model)
    if autocast_dtype is not None:
        weight, hidden = weight.to(autocast_dtype), hidden.to(autocast_dtype)
    return hidden[0], weight


def save_model(
    model, tokenizer, out_dir: str | os.PathLike, merge: bool = False, state_dict: dict | None = None
) -> None:
    """Write the model + tokenizer to ``out_dir`` atomically (temp folder, rename) and mark it with ``DONE``.

    A peft model saves its adapter (loadable by ``PeftModel.from_pretrained`` and by ``load_model``) unless
    ``merge``: then the base is reloaded unquantised on the CPU in the model's 16-bit dtype, the adapter
    merged into it, and full weights written; the live model is left untouched. Full/freeze models write
    full weights, trainable float32 masters cast back to the dtype of the rest of the model.
    ``state_dict``: the model's tensors when ``model`` does not hold them whole (gathered from FSDP2 shards).
    """
    from peft import PeftModel

    with _model_folder(out_dir) as tmp:
        info: dict = {"merged": False, "adapter": False}
        if isinstance(model, PeftModel):
            if merge:
                _save_merged(model, tmp, state_dict)
                info["merged"] = True
            else:
                model.save_pretrained(tmp, state_dict=state_dict)
                _canonical_adapter_config(tmp / "adapter_config.json")
                info["adapter"] = True
        else:
            target = _config_dtype(model)
            state = state_dict
            source = state_dict if state_dict is not None else model.state_dict()
            if any(v.dtype != target for v in source.values() if v.is_floating_point()):
                # float32 masters (full/freeze) go back to the dtype the model was loaded in
                state, cast = {}, {}
                for k, v in source.items():
                    if v.is_floating_point():  # tied tensors stay one tensor
                        v = cast.setdefault(v.data_ptr(), v.to(target))
                    state[k] = v
            model.save_pretrained(tmp, state_dict=state)
            if state is not None and state is not state_dict:
                # save_pretrained records the masters' float32 as the config dtype
                cfg_path = tmp / "config.json"
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
                cfg["dtype"] = str(target).removeprefix("torch.")
                cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "DONE").write_text(json.dumps(info) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _model_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``out_dir``, renamed onto it when the block succeeds (deleted otherwise)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _canonical_adapter_config(path: Path) -> None:
    """Rewrite peft's adapter config with sorted keys and target modules: peft lists the modules from a
    set (an order that changes with the interpreter's hash seed), so two identical runs would differ."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _config_dtype(model) -> torch.dtype:
    """The dtype the model was loaded in (``config.dtype``), float32 when unknown."""
    dtype = getattr(unwrap_model(model).config, "dtype", None)
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype, getattr(torch, dtype, None))
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _save_merged(model, out: Path, state_dict: dict | None = None) -> None:
    base_name = model.peft_config[model.active_adapter].base_model_name_or_path
    with tempfile.TemporaryDirectory(dir=out.parent) as adapter_dir:
        model.save_pretrained(adapter_dir, state_dict=state_dict)
        _merge_into_base(base_name, adapter_dir, _config_dtype(model), out)


def _merge_into_base(base_name: str, adapter_dir: str | os.PathLike, dtype, out: Path) -> None:
    """Load ``base_name`` unquantised on the CPU in ``dtype``, merge the adapter in, save full weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype, device_map={"": "cpu"})
    with peft_quietly():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)


def merge_adapter_dir(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write base + the LoRA adapter saved in ``adapter_dir``, merged into full weights, to ``out_dir``.

    The base (``base_model_name_or_path`` of the adapter) is loaded unquantised on the CPU in its own
    dtype; ``out_dir`` is written atomically with the adapter folder's tokenizer and a ``DONE`` marker.
    """
    from peft import PeftConfig
    from transformers import AutoTokenizer

    base_name = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    with _model_folder(out_dir) as tmp:
        _merge_into_base(base_name, adapter_dir, "auto", tmp)
        AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
        info = {"merged": True, "adapter": False, "from": str(adapter_dir), "base": str(base_name)}
        (tmp / "DONE").write_text(json.dumps(info) + "\n", encoding="utf-8")


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst``; an existing ``dst`` is moved aside first and deleted afterwards."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def free_memory() -> None:
    """Collect garbage and return cached CUDA memory (after a model or an optimizer is dropped)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
