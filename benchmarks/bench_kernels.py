"""Microbenchmarks of the fused lm_head log-prob and PPO-loss kernels against the usual alternatives.

Providers
  ours-triton    o1pruner.kernels, backend="triton" (fused Triton kernels)
  ours-torch     o1pruner.kernels, backend="torch" (chunked PyTorch)
  ours-torch-rounded  the same with logits_dtype="input": the logits tile rounded to bf16/fp16 as a
                 plain lm_head forward rounds them (bf16 GEMMs on CPUs); fp32 inputs: not run (the same
                 as ours-torch)
  naive          materialised logits h @ W^T, log_softmax in float32, gather, PPO-clip loss (what TRL does)
  naive-compile  torch.compile of the naive path
  liger-grpo     Liger-Kernel's LigerFusedLinearGRPOLoss (loss_type "grpo", beta 0, no reference model);
                 loss mode only, skipped when liger_kernel does not import
  cce            Apple's cut-cross-entropy (linear_cross_entropy, reduction "none", its default gradient
                 filter) giving -logp, with the naive PPO-clip op on top; impl "cce" (Triton) on CUDA,
                 "torch_compile" elsewhere; skipped when cut_cross_entropy does not import
Modes
  logprobs-fwd   forward-only per-token log-probs (under torch.no_grad, as when scoring reference samples)
  loss-fwd-bwd   PPO-clip loss forward + backward with a frozen lm_head (weight.requires_grad False,
                 hidden requires grad): the training step's loss
Metrics per row: median/p20/p80 ms over ``reps`` timed calls (at least --min-reps), peak memory above the
inputs, effective TFLOP/s against 2*n*H*V (fwd) or 4*n*H*V (fwd+bwd) with n the VALID tokens (the masked
prompt tokens are no useful work, whoever computes them) and the ratio of the time to that work at the
dense matmul rate measured in the same run. --phases adds, for ours-*, the split of one profiled call into
GEMM1 / row pass / GEMM2 / other (benchmarks/phases.py).

Run from the repository root, e.g.
  python -m benchmarks.bench_kernels --heads 7b --tokens 2k,4k,8k,16k,32k,64k
  python -m benchmarks.bench_kernels --quick          # tiny shapes on the CPU (CI)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    MIB,
    MIN_REPS,
    RESULTS_DIR,
    CsvLog,
    apply_quick_defaults,
    environment,
    free_memory,
    is_oom,
    load_average,
    matmul_ceiling_tflops,
    measure_peak,
    package_version,
    resolve_device,
    time_fn,
)
from benchmarks.phases import phase_breakdown

# lm_head shapes (hidden size H, vocabulary V) of the Qwen2.5 family (config.json of each model)
HEADS: dict[str, tuple[int, int]] = {
    "1.5b": (1536, 151936),
    "7b": (3584, 152064),
    "32b": (5120, 152064),
}
QUICK_HEADS: dict[str, tuple[int, int]] = {"tiny": (64, 1003)}
PROVIDERS = ("ours-triton", "ours-torch", "ours-torch-rounded", "naive", "naive-compile", "liger-grpo", "cce")
MODES = ("logprobs-fwd", "loss-fwd-bwd")
LEVELS = ("token", "sequence_geomean")
IGNORE_INDEX = -100
PROMPT_FRACTION = 0.1  # leading labels of each sequence masked with ignore_index (the prompt)
CLIP = 0.2

COLUMNS = [
    "device", "device_name", "date", "torch", "triton", "transformers", "peft", "bitsandbytes", "liger",
    "cce", "load", "provider", "mode", "level", "head", "N", "valid_tokens", "H", "V", "dtype", "seq_len",
    "status", "median_ms", "p20_ms", "p80_ms", "reps", "peak_extra_mib", "output_mib", "flops", "tflops",
    "ceiling_tflops", "ratio_to_ceiling", "gemm1_ms", "row_ms", "gemm2_ms", "other_ms", "check_value", "note",
]  # fmt: skip


def parse_tokens(text: str) -> list[int]:
    """ "2k,4k,8192" -> [2048, 4096, 8192]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise SystemExit(f"--tokens: {part!r} is not a token count like 4096 or 4k") from None
    return out


def parse_choice(text: str, allowed, flag: str) -> list[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in items if p not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; choose from {list(allowed)}")
    return items


@dataclass
class Inputs:
    """One problem: N packed tokens in N // seq_len sequences of seq_len tokens (rows of the Liger layout)."""

    hidden: torch.Tensor  # (N, H) dtype, requires grad in loss mode
    weight: torch.Tensor  # (V, H) dtype, frozen
    labels: torch.Tensor  # (N,) int64, ignore_index on each sequence's prompt part
    old_logps: torch.Tensor  # (N,) float32, log-probs under the sampling policy (current ones + noise)
    advantages: torch.Tensor  # (N,) float32, constant within a sequence
    seq_adv: torch.Tensor  # (B,) float32
    seq_ids: torch.Tensor  # (N,) int64
    num_seqs: int
    seq_len: int

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.hidden, self.weight, self.labels, self.old_logps, self.advantages, self.seq_ids)
        )


def prompt_tokens(seq_len: int) -> int:
    """Leading labels of each sequence masked with ignore_index."""
    return max(1, int(PROMPT_FRACTION * seq_len))


def valid_tokens(n: int, seq_len: int) -> int:
    """Tokens with a label among N packed tokens in sequences of ``seq_len``."""
    return n - (n // seq_len) * prompt_tokens(seq_len)


def make_inputs(
    n: int, h: int, v: int, seq_len: int, dtype: torch.dtype, device: torch.device, seed: int
) -> Inputs:
    if n % seq_len:
        raise SystemExit(f"N={n} is not a multiple of --seq-len {seq_len}")
    gen = torch.Generator(device=device).manual_seed(seed)
    num_seqs = n // seq_len
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=gen)
    # scale so that logits have a standard deviation near 1.5, as a trained lm_head gives
    weight = (torch.randn(v, h, device=device, dtype=torch.float32, generator=gen) * (1.5 / math.sqrt(h))).to(
        dtype
    )
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    pos = torch.arange(n, device=device) % seq_len
    labels[pos < prompt_tokens(seq_len)] = IGNORE_INDEX
    seq_ids = torch.arange(n, device=device) // seq_len
    seq_adv = torch.randn(num_seqs, device=device, generator=gen)
    with torch.no_grad():
        logps = torch.empty(n, device=device, dtype=torch.float32)
        for s in range(0, n, 4096):
            logits = (hidden[s : s + 4096] @ weight.T).float()
            logps[s : s + 4096] = torch.log_softmax(logits, -1).gather(
                -1, labels[s : s + 4096].clamp_min(0)[:, None]
            )[:, 0]
            del logits
        old = logps + 0.1 * torch.randn(n, device=device, generator=gen)
        old = torch.where(labels == IGNORE_INDEX, torch.zeros_like(old), old)
    return Inputs(hidden, weight, labels, old, seq_adv[seq_ids], seq_adv, seq_ids, num_seqs, seq_len)


# ----------------------------------------------------------------------------------------------- naive path
def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Materialised float32 logits -> log_softmax -> gather; 0 on ignored labels."""
    logits = (hidden @ weight.T).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0)[:, None])[:, 0]
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(logp), logp)


def ppo_loss_from_logps(
    logp: torch.Tensor,
    labels: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    seq_adv: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    level: str,
) -> torch.Tensor:
    """PPO-clip loss, reduction "sequence_mean", of per-token log-probs (N,) float32 (0 where ignored)."""
    valid = (labels != IGNORE_INDEX).float()
    d = (logp - old_logps) * valid
    count = torch.zeros(num_seqs, device=logp.device).index_add_(0, seq_ids, valid)
    if level == "token":
        r = torch.exp(d)
        per_tok = -torch.minimum(r * advantages, r.clamp(1 - CLIP, 1 + CLIP) * advantages) * valid
        per_seq = torch.zeros(num_seqs, device=logp.device).index_add_(0, seq_ids, per_tok) / count.clamp_min(
            1
        )
    else:
        mean_d = torch.zeros(num_seqs, device=logp.device).index_add_(0, seq_ids, d) / count.clamp_min(1)
        r = torch.exp(mean_d)
        per_seq = -torch.minimum(r * seq_adv, r.clamp(1 - CLIP, 1 + CLIP) * seq_adv)
    has = (count > 0).float()
    return (per_seq * has).sum() / has.sum()


# ------------------------------------------------------------------------------------------------ providers
class Unavailable(Exception):
    """The provider cannot run here (package missing, mode not offered)."""


def build_case(
    provider: str, mode: str, level: str, x: Inputs, device: torch.device
) -> Callable[[], torch.Tensor]:
    """A closure running one call; returns the loss (loss mode) or the log-probs (logprobs mode)."""
    if provider.startswith("ours-"):
        try:
            from o1pruner.kernels import linear_logprobs, linear_ppo_loss
        except ImportError as exc:
            raise Unavailable(f"o1pruner.kernels does not import: {exc}") from exc
        backend, _, variant = provider.removeprefix("ours-").partition("-")
        logits_dtype = "input" if variant == "rounded" else "float32"
        if variant == "rounded" and x.hidden.dtype == torch.float32:
            raise Unavailable("float32 inputs: the same as ours-torch")
        if mode == "logprobs-fwd":
            return _no_grad(
                lambda: linear_logprobs(
                    x.hidden, x.weight, x.labels, backend=backend, logits_dtype=logits_dtype
                )
            )

        def ours_loss():
            out = linear_ppo_loss(
                x.hidden, x.weight, x.labels, x.old_logps, x.advantages, seq_ids=x.seq_ids,
                importance_level=level, clip_low=CLIP, clip_high=CLIP, reduction="sequence_mean", backend=backend,
                logits_dtype=logits_dtype,
            )  # fmt: skip
            out.loss.backward()
            return out.loss.detach()

        return ours_loss

    if provider in ("naive", "naive-compile"):
        if mode == "logprobs-fwd":
            fn = naive_logprobs
            if provider == "naive-compile":
                fn = torch.compile(naive_logprobs)
            return _no_grad(lambda: fn(x.hidden, x.weight, x.labels))

        def naive_ppo_loss(hidden, weight, labels, old_logps, advantages, seq_adv, seq_ids):
            """The PPO-clip loss on materialised logits (the contract in docs/method.md)."""
            logp = naive_logprobs(hidden, weight, labels)
            return ppo_loss_from_logps(
                logp, labels, old_logps, advantages, seq_adv, seq_ids, x.num_seqs, level
            )

        loss_fn = torch.compile(naive_ppo_loss) if provider == "naive-compile" else naive_ppo_loss

        def naive_loss():
            loss = loss_fn(x.hidden, x.weight, x.labels, x.old_logps, x.advantages, x.seq_adv, x.seq_ids)
            loss.backward()
            return loss.detach()

        return naive_loss

    if provider == "liger-grpo":
        if mode != "loss-fwd-bwd":
            raise Unavailable("Liger offers no public forward-only log-prob API")
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError as exc:
            raise Unavailable(f"liger_kernel does not import: {exc}") from exc
        # Liger's "sequence" level is the GSPO ratio exp(mean_t d_t), i.e. our "sequence_geomean"
        liger_level = {"token": "token", "sequence_geomean": "sequence"}.get(level)
        if liger_level is None:
            raise Unavailable(f"Liger has no importance level matching {level!r}")
        loss_mod = LigerFusedLinearGRPOLoss(
            beta=0.0, use_ref_model=False, loss_type="grpo", importance_sampling_level=liger_level,
            epsilon_low=CLIP, epsilon_high=CLIP, compiled=device.type == "cuda",
        )  # fmt: skip
        b, t, h = x.num_seqs, x.seq_len, x.hidden.shape[1]
        mask = (x.labels != IGNORE_INDEX).view(b, t).long()
        tokens = x.labels.clamp_min(0).view(b, t)
        old = x.old_logps.view(b, t)

        def liger_loss():
            loss, _metrics = loss_mod(
                x.hidden.view(b, t, h), x.weight, tokens, mask, x.seq_adv, old_per_token_logps=old
            )
            loss.backward()
            return loss.detach()

        return liger_loss
    if provider == "cce":
        return _cce_case(mode, level, x, device)
    raise ValueError(f"unknown provider {provider!r}")


def _cce_case(mode: str, level: str, x: Inputs, device: torch.device) -> Callable[[], torch.Tensor]:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise Unavailable(f"cut_cross_entropy does not import: {exc}") from exc
    impl = "cce" if device.type == "cuda" else "torch_compile"

    def logps() -> torch.Tensor:
        nll = linear_cross_entropy(
            x.hidden, x.weight, x.labels, ignore_index=IGNORE_INDEX, reduction="none", impl=impl
        )
        return -nll.float()

    if mode == "logprobs-fwd":
        return _no_grad(logps)

    def cce_loss():
        loss = ppo_loss_from_logps(
            logps(), x.labels, x.old_logps, x.advantages, x.seq_adv, x.seq_ids, x.num_seqs, level
        )
        loss.backward()
        return loss.detach()

    return cce_loss


def _no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return fn()

    return run


# ------------------------------------------------------------------------------------------------- the sweep
def run_sweep(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    heads = QUICK_HEADS if args.quick else HEADS
    head_names = parse_choice(args.heads, heads, "--heads")
    providers = parse_choice(args.providers, PROVIDERS, "--providers")
    modes = parse_choice(args.modes, MODES, "--modes")
    levels = parse_choice(args.levels, LEVELS, "--levels")
    tokens = parse_tokens(args.tokens)
    bad = [n for n in tokens if n % min(args.seq_len, n)]
    if bad:
        raise SystemExit(f"--tokens {bad} are not multiples of --seq-len {args.seq_len}")
    if args.dry_run:
        for head in head_names:
            for mode in modes:
                for n in tokens:
                    for provider in providers:
                        if not (provider == "liger-grpo" and mode == "logprobs-fwd"):
                            lv = ",".join(levels) if mode == "loss-fwd-bwd" else "-"
                            print(f"  plan: {head} H,V={heads[head]} {mode} N={n} {provider} levels {lv}")
        return 0
    out = Path(args.out) if args.out else RESULTS_DIR / f"kernels-{device.type}.csv"
    log = CsvLog(out, COLUMNS)
    env = dict(environment(device), cce=package_version("cut-cross-entropy"), load=load_average())
    torch.manual_seed(args.seed)

    ceiling = matmul_ceiling_tflops(device, dtype if device.type == "cuda" else torch.float32)
    print(f"[bench_kernels] {env['device_name']}: dense matmul ceiling {ceiling:.1f} TFLOP/s; writing {out}")
    start = time.monotonic()
    failures = 0
    oom_at: dict[tuple, int] = {}  # (provider, mode, level, head) -> smallest N that ran out of memory
    for head in head_names:
        h, v = heads[head]
        for mode in modes:
            for n in tokens:
                seq_len = min(args.seq_len, n)
                x = None
                for provider in providers:
                    if provider == "liger-grpo" and mode == "logprobs-fwd":
                        continue  # Liger offers no public forward-only log-prob API
                    for level in levels if mode == "loss-fwd-bwd" else ["-"]:
                        row = dict(env, provider=provider, mode=mode, level=level, head=head, N=n, H=h, V=v,
                                   dtype=args.dtype, seq_len=seq_len, ceiling_tflops=ceiling)  # fmt: skip
                        row["valid_tokens"] = valid_tokens(n, seq_len)
                        row["flops"] = (4 if mode == "loss-fwd-bwd" else 2) * row["valid_tokens"] * h * v
                        key = (provider, mode, level, head)
                        if args.time_budget_s and time.monotonic() - start > args.time_budget_s:
                            log.write(
                                dict(row, status="skipped", note=f"time budget {args.time_budget_s} s spent")
                            )
                            continue
                        if key in oom_at:
                            log.write(
                                dict(row, status="oom", note=f"not run: out of memory at N={oom_at[key]}")
                            )
                            continue
                        if x is None:
                            try:
                                x = make_inputs(n, h, v, seq_len, dtype, device, args.seed)
                            except Exception as exc:
                                if not is_oom(exc):
                                    raise
                                free_memory(device)
                                log.write(dict(row, status="oom", note="inputs do not fit"))
                                continue
                        status = bench_one(provider, mode, level, x, device, row, args)
                        log.write(row)
                        _print_row(row)
                        if status == "oom":
                            oom_at[key] = n
                        failures += status == "error"
                del x
                free_memory(device)
    print(f"[bench_kernels] done in {time.monotonic() - start:.0f} s; rows in {out}")
    return 1 if failures and args.strict else 0


def bench_one(provider: str, mode: str, level: str, x: Inputs, device: torch.device, row: dict, args) -> str:
    """Fills ``row`` with the measurements of one (provider, mode, level, inputs); returns its status."""
    grad = mode == "loss-fwd-bwd"
    x.hidden.requires_grad_(grad)
    x.hidden.grad = None
    fn = None
    try:
        fn = build_case(provider, mode, level, x, device)
        # the first call compiles / autotunes where the provider does: a warm-up, kept out of the peak
        value = fn()
        row["check_value"] = float(value.float().sum()) if mode == "logprobs-fwd" else float(value)
        x.hidden.grad = None
        peak, _ = measure_peak(fn, device)
        output = x.hidden.numel() * x.hidden.element_size() if grad else x.hidden.shape[0] * 4
        x.hidden.grad = None
        med, p20, p80, reps = time_fn(
            fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, grad_to_none=[x.hidden],
            min_reps=args.min_reps,
        )  # fmt: skip
        if args.phases and provider.startswith("ours-"):
            x.hidden.grad = None
            row.update(phase_breakdown(fn, device, x.hidden.shape[1], x.weight.shape[0]))
    except Unavailable as exc:
        status, note = "unavailable", str(exc)
    except Exception as exc:
        if is_oom(exc):
            status, note = "oom", type(exc).__name__
        else:
            traceback.print_exc()
            status, note = (
                "error",
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
            )
    else:
        status, note = "ok", ""
    finally:
        x.hidden.grad = None
        fn = None
    if status != "ok":
        free_memory(device)  # here, not in the except block, whose traceback still holds the tensors
        row.update(status=status, note=note)
        return status
    tflops = row["flops"] / (med * 1e-3) / 1e12
    ideal_ms = row["flops"] / (row["ceiling_tflops"] * 1e12) * 1e3
    row.update(
        status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, reps=reps, peak_extra_mib=peak / MIB, output_mib=output / MIB,
        tflops=tflops, ratio_to_ceiling=med / ideal_ms,
    )  # fmt: skip
    return "ok"


def _print_row(row: dict) -> None:
    if row["status"] == "ok":
        print(
            f"  {row['head']:>5} {row['mode']:<13} {row['level']:<16} N={row['N']:<6} {row['provider']:<13} "
            f"{row['median_ms']:9.3f} ms  {row['tflops']:7.1f} TFLOP/s  x{row['ratio_to_ceiling']:.2f} of ideal  "
            f"peak +{row['peak_extra_mib']:.0f} MiB",
            flush=True,
        )
    else:
        print(f"  {row['head']:>5} {row['mode']:<13} {row['level']:<16} N={row['N']:<6} {row['provider']:<13} "
              f"{row['status']}: {row.get('note', '')}", flush=True)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list from {PROVIDERS}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list from {MODES}")
    p.add_argument(
        "--levels", default=",".join(LEVELS), help=f"importance levels in loss mode, from {LEVELS}"
    )
    p.add_argument("--heads", default=None, help=f"comma list from {list(HEADS)} (default: all)")
    p.add_argument("--tokens", default="2k,4k,8k,16k,32k,64k", help="packed tokens N per call, e.g. 4k,16384")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (N must be a multiple)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:1 | cpu")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument(
        "--min-reps", type=int, default=MIN_REPS, help="timed calls at least (p20/p80 need several)"
    )
    p.add_argument(
        "--phases", action="store_true", help="GEMM1 / row / GEMM2 split of one profiled ours-* call"
    )
    p.add_argument("--time-budget-s", type=float, default=0.0, help="stop starting new rows after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, help="CSV to append to (default benchmarks/results/kernels-<device>.csv)"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a row ends in an error")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: ours-torch and naive (CI)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the rows the sweep would measure, run nothing"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        quick = dict(providers="ours-torch,naive", tokens="128,256", seq_len=32, device="cpu")
        apply_quick_defaults(args, build_parser(), **quick)
        args.rep_ms = min(args.rep_ms, 20.0)
    if args.heads is None:
        args.heads = ",".join(QUICK_HEADS if args.quick else HEADS)
    return run_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
