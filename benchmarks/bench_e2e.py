"""One QLoRA training step (forward + backward + optimizer step) of Qwen2.5-size models: ours vs naive logits.

The models have the real configurations of Qwen2.5-7B (also Marco-o1's shape) and Qwen2.5-32B / QwQ-32B,
written below (no Hub download), with random weights: each decoder layer is materialised in bf16 on the
device, initialised, and its linear layers quantised to NF4 (bitsandbytes, double quantisation, bf16
compute) before the next layer is built, so the bf16 model never exists whole. LoRA (peft, r=16, all
linear layers of the decoder) is trained; the lm_head and embeddings stay frozen in bf16. Gradient
checkpointing is on; the micro-batch is one packed row of N tokens in sequences of --seq-len tokens,
separated by position ids (transformers builds the block-causal mask from them).

Losses (the sequence-level GSPO ratio, PPO-clip 0.2, as the trainer uses):
  ours   last hidden states (no logits) + o1pruner.kernels.linear_ppo_loss on the frozen lm_head
  naive  model(...).logits (N x V materialised), float32 log_softmax, gather, the same PPO-clip loss

--layers 2,4 builds only that many decoder layers and extrapolates peak memory and step time linearly
(a + b * layers) to the model's full depth: such rows say extrapolated=true. Without --layers the full
depth is built.

  python -m benchmarks.bench_e2e --models qwen2.5-7b --tokens 4k,8k,16k
  python -m benchmarks.bench_e2e --models qwq-32b --tokens 8k --layers 2,4
  python -m benchmarks.bench_e2e --quick            # tiny model on the CPU (CI)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from benchmarks.bench_kernels import CLIP, IGNORE_INDEX, parse_choice, parse_tokens
from benchmarks.common import (
    GIB,
    RESULTS_DIR,
    CsvLog,
    apply_quick_defaults,
    environment,
    free_memory,
    is_oom,
    resolve_device,
)

# config.json values of the real models (architecture Qwen2ForCausalLM)
MODEL_CONFIGS: dict[str, dict] = {
    "qwen2.5-7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, hidden_act="silu",
        tie_word_embeddings=False, use_sliding_window=False, max_window_layers=28,
    ),
    "qwq-32b": dict(  # Qwen2.5-32B shape
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, max_position_embeddings=40960, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, hidden_act="silu",
        tie_word_embeddings=False, use_sliding_window=False, max_window_layers=64,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1003, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, hidden_act="silu",
        tie_word_embeddings=False, use_sliding_window=False, max_window_layers=2,
    ),
}  # fmt: skip
LOSSES = ("ours", "naive")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

COLUMNS = [
    "device", "device_name", "date", "torch", "triton", "transformers", "peft", "bitsandbytes", "liger",
    "model", "layers", "full_layers", "extrapolated", "quant", "attn", "loss", "backend", "N", "seq_len",
    "status", "step_s", "tokens_per_s", "peak_gib", "weights_gib", "trainable_params", "note",
]  # fmt: skip


# ------------------------------------------------------------------------------------------- model building
def build_model(
    name: str, layers: int, device: torch.device, quant: str, attn: str, seed: int = 0
) -> nn.Module:
    """Random-weight Qwen2 causal LM of config ``name`` with ``layers`` decoder layers, QLoRA-wrapped.

    Built on the meta device and materialised part by part on ``device`` (bf16); with quant="nf4" each
    layer's linear layers are quantised before the next layer is materialised.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = dict(MODEL_CONFIGS[name], num_hidden_layers=layers, max_window_layers=layers, use_cache=False)
    config = Qwen2Config(**cfg)
    config._attn_implementation = attn
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    gen = torch.Generator(device=device).manual_seed(seed)
    body = model.model
    for part in (body.embed_tokens, model.lm_head, body.norm):
        part.to_empty(device=device)
        _init(part, gen)
    with torch.device(device):  # its inv_freq buffers are computed in __init__, not initialised
        body.rotary_emb = type(body.rotary_emb)(config=model.config)
    for layer in body.layers:
        layer.to_empty(device=device)
        _init(layer, gen)
        if quant == "nf4":
            _quantize_linears(layer, device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device: {leftover[:5]}")
    if quant == "nf4":
        model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; peft reads it
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


@torch.no_grad()
def _init(module: nn.Module, gen: torch.Generator) -> None:
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        elif name.endswith("bias"):
            p.zero_()
        else:  # RMSNorm weight
            p.fill_(1.0)


def _quantize_linears(layer: nn.Module, device: torch.device) -> None:
    import bitsandbytes as bnb

    for parent in list(layer.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=torch.bfloat16,
                compress_statistics=True, quant_type="nf4", device="meta",
            )  # fmt: skip
            q.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
            )._quantize(device)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, q)
            del child


def last_hidden(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(1, N, H) last hidden states without logits; o1pruner.modeling's helper when it is there."""
    try:
        from o1pruner.modeling import last_hidden_states
    except ImportError:
        last_hidden_states = None
    if last_hidden_states is not None:
        return last_hidden_states(model, input_ids, position_ids=position_ids)
    body = model.get_base_model().model
    return body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


# ----------------------------------------------------------------------------------------------- the step
def make_batch(n: int, seq_len: int, vocab: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """One packed row of N tokens; labels are the next tokens, ignore_index on prompts and at boundaries."""
    gen = torch.Generator(device=device).manual_seed(seed)
    input_ids = torch.randint(0, vocab, (1, n), device=device, generator=gen)
    pos = torch.arange(n, device=device) % seq_len
    seq_ids = torch.arange(n, device=device) // seq_len
    labels = torch.roll(input_ids[0], -1)
    labels[(pos == seq_len - 1) | (pos < seq_len // 10)] = IGNORE_INDEX
    num_seqs = int(seq_ids[-1]) + 1
    seq_adv = torch.randn(num_seqs, device=device, generator=gen)
    old = -math.log(vocab) + 0.05 * torch.randn(n, device=device, generator=gen)
    old = torch.where(labels == IGNORE_INDEX, torch.zeros_like(old), old)
    return dict(input_ids=input_ids, position_ids=pos[None], labels=labels, seq_ids=seq_ids, num_seqs=num_seqs,
                seq_adv=seq_adv, advantages=seq_adv[seq_ids], old_logps=old)  # fmt: skip


def step_loss(model: nn.Module, batch: dict, loss: str, backend: str) -> torch.Tensor:
    if loss == "ours":
        from o1pruner.kernels import linear_ppo_loss

        hidden = last_hidden(model, batch["input_ids"], batch["position_ids"])[0]
        weight = model.get_output_embeddings().weight
        out = linear_ppo_loss(
            hidden, weight, batch["labels"], batch["old_logps"], batch["advantages"], seq_ids=batch["seq_ids"],
            importance_level="sequence_geomean", clip_low=CLIP, clip_high=CLIP, reduction="sequence_mean",
            backend=backend,
        )  # fmt: skip
        return out.loss
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[
        0
    ]
    labels = batch["labels"]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp_min(0)[:, None])[:, 0]
    valid = (labels != IGNORE_INDEX).float()
    d = (logp - batch["old_logps"]) * valid
    seq_ids, num_seqs, adv = batch["seq_ids"], batch["num_seqs"], batch["seq_adv"]
    count = torch.zeros(num_seqs, device=d.device).index_add_(0, seq_ids, valid)
    mean_d = torch.zeros(num_seqs, device=d.device).index_add_(0, seq_ids, d) / count.clamp_min(1)
    r = torch.exp(mean_d)
    per_seq = -torch.minimum(r * adv, r.clamp(1 - CLIP, 1 + CLIP) * adv)
    has = (count > 0).float()
    return (per_seq * has).sum() / has.sum()


def train_step(model, optimizer, batch, loss: str, backend: str, check_grads: bool = False) -> float:
    value = step_loss(model, batch, loss, backend)
    value.backward()
    if check_grads:  # a graph cut by checkpointing would leave the LoRA weights without gradient
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        if not grads or any(g is None for g in grads) or not any(bool(g.abs().sum() > 0) for g in grads):
            raise RuntimeError(f"{loss} loss: LoRA parameters got no (or all-zero) gradient")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(value.detach())


def measure(model, batch, loss: str, backend: str, steps: int, device: torch.device) -> dict:
    """Peak memory (GiB, whole allocator: weights included) and median step seconds over ``steps`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    times = []
    values = []
    for i in range(steps + 1):  # the first step warms up (kernel compilation, optimizer state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        values.append(train_step(model, optimizer, batch, loss, backend, check_grads=i == 0))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:
            times.append(time.perf_counter() - start)
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(f"non-finite loss values {values}")
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    del optimizer
    model.zero_grad(set_to_none=True)
    step_s = statistics.median(times)
    return dict(step_s=step_s, peak_gib=peak, weights_gib=weights, note=f"loss {values[-1]:.4g}")


# -------------------------------------------------------------------------------------------------- sweep
def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    models = parse_choice(args.models, MODEL_CONFIGS, "--models")
    losses = parse_choice(args.losses, LOSSES, "--losses")
    tokens = parse_tokens(args.tokens)
    layer_counts = [int(x) for x in args.layers.split(",")] if args.layers else []
    if len(layer_counts) == 1:
        raise SystemExit("--layers needs two or more depths to fit memory = a + b * layers, e.g. 2,4")
    if args.dry_run:
        for name in models:
            depths = layer_counts or [MODEL_CONFIGS[name]["num_hidden_layers"]]
            print(
                f"  plan: {name} layers {depths} N={tokens} losses {losses} quant {args.quant} attn {args.attn}"
            )
        return 0
    out = Path(args.out) if args.out else RESULTS_DIR / f"e2e-{device.type}.csv"
    log = CsvLog(out, COLUMNS)
    env = environment(device)
    failures = 0
    start = time.monotonic()
    for name in models:
        full = MODEL_CONFIGS[name]["num_hidden_layers"]
        depths = layer_counts or [full]
        # results[(loss, N)] -> list of (layers, step_s, peak_gib)
        results: dict[tuple[str, int], list[tuple[int, float, float]]] = {}
        for layers in depths:
            if args.time_budget_s and time.monotonic() - start > args.time_budget_s:
                print(f"[bench_e2e] time budget spent; {name} at {layers} layers not run")
                continue
            t0 = time.monotonic()
            model = build_model(name, layers, device, args.quant, args.attn, seed=args.seed)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(
                f"[bench_e2e] built {name} with {layers} layers in {time.monotonic() - t0:.1f} s", flush=True
            )
            for n in tokens:
                seq_len = min(args.seq_len, n)
                batch = make_batch(n, seq_len, MODEL_CONFIGS[name]["vocab_size"], device, args.seed)
                for loss in losses:
                    row = dict(env, model=name, layers=layers, full_layers=full, extrapolated="false",
                               quant=args.quant, attn=args.attn, loss=loss,
                               backend=args.backend if loss == "ours" else "-", N=n, seq_len=seq_len,
                               trainable_params=trainable)  # fmt: skip
                    try:
                        row.update(measure(model, batch, loss, args.backend, args.steps, device), status="ok")
                        row["tokens_per_s"] = n / row["step_s"]
                        results.setdefault((loss, n), []).append((layers, row["step_s"], row["peak_gib"]))
                    except Exception as exc:
                        if is_oom(exc):
                            row.update(status="oom", note=type(exc).__name__)
                        else:
                            traceback.print_exc()
                            row.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:200]}")
                            failures += 1
                    if row["status"] != "ok":  # outside the except block, whose traceback holds the tensors
                        model.zero_grad(set_to_none=True)
                        free_memory(device)
                    log.write(row)
                    _print(row)
                del batch
                free_memory(device)
            del model
            free_memory(device)
        if layer_counts:
            for (loss, n), points in results.items():
                if len(points) < 2:
                    continue
                row = dict(env, model=name, layers=full, full_layers=full, extrapolated="true", quant=args.quant,
                           attn=args.attn, loss=loss, backend=args.backend if loss == "ours" else "-", N=n,
                           seq_len=min(args.seq_len, n), status="ok",
                           note="linear fit a + b*layers over measured depths "
                                + "/".join(str(p[0]) for p in points))  # fmt: skip
                row["step_s"] = _linear_extrapolate([(p[0], p[1]) for p in points], full)
                row["peak_gib"] = _linear_extrapolate([(p[0], p[2]) for p in points], full)
                row["tokens_per_s"] = n / row["step_s"]
                log.write(row)
                _print(row)
    print(f"[bench_e2e] done in {time.monotonic() - start:.0f} s; rows in {out}")
    return 1 if failures and args.strict else 0


def _linear_extrapolate(points: list[tuple[int, float]], x: int) -> float:
    """Least-squares line through (layers, value) points, evaluated at ``x``."""
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx
    return my + slope * (x - mx)


def _print(row: dict) -> None:
    head = (f"  {row['model']:<11} L={row['layers']:<3}{'(extrap.)' if row['extrapolated'] == 'true' else '':<9} "
            f"N={row['N']:<6} {row['loss']:<6}")  # fmt: skip
    if row["status"] == "ok":
        print(f"{head} {row['step_s']:8.3f} s/step  {row['tokens_per_s']:9.0f} tok/s  peak {row['peak_gib']:.2f} GiB",
              flush=True)  # fmt: skip
    else:
        print(f"{head} {row['status']}: {row.get('note', '')}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen2.5-7b", help=f"comma list from {list(MODEL_CONFIGS)}")
    p.add_argument("--tokens", default="4k,8k,16k", help="packed tokens per micro-batch, e.g. 4k,8k,16k")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed sequence")
    p.add_argument("--layers", default="", help="build only these depths and extrapolate, e.g. 2,4")
    p.add_argument("--losses", default=",".join(LOSSES), help=f"comma list from {LOSSES}")
    p.add_argument("--backend", default="auto", help="kernel backend of the ours loss: auto | triton | torch")
    p.add_argument("--quant", default="nf4", choices=["nf4", "none"], help="4-bit NF4 base weights or bf16")
    p.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa | eager | flash_attention_2")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--device", default="auto")
    p.add_argument("--time-budget-s", type=float, default=0.0, help="build no further model after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, help="CSV to append to (default benchmarks/results/e2e-<device>.csv)"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a row ends in an error")
    p.add_argument("--quick", action="store_true", help="tiny random NF4 model on the CPU (CI)")
    p.add_argument("--dry-run", action="store_true", help="print what would be measured, run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        apply_quick_defaults(args, build_parser(), models="tiny", tokens="128", seq_len=32, device="cpu")
        args.steps = min(args.steps, 1)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
