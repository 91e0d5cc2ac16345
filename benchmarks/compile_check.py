"""Compile every Triton kernel of o1pruner_kernels for real GPUs, on any machine (no GPU needed).

Triton wheels ship ``ptxas`` and ``cuobjdump``, so ``triton.compile`` builds TTGIR, PTX and a cubin for a
named target without a device. For each ``@triton.jit`` kernel found by walking the package's modules, this
compiles the launch configurations its wrapper really uses (dtypes, constexprs, num_warps, the Qwen2.5
vocabulary) for sm_80, sm_90 and sm_100 and prints registers, spilled (local-memory) bytes, shared memory
and the tensor-core instruction found in the PTX. Exit status 1 on a compile error, a spill, a kernel
marked ``mma`` that uses no tensor-core instruction, or a kernel with no compile spec; 2 on bad usage
(e.g. TRITON_INTERPRET set, which turns the kernels into interpreter functions).

  env -u TRITON_INTERPRET python -m benchmarks.compile_check
  python -m benchmarks.compile_check --targets 90 --only _fused_logprob_partial_kernel
  python -m benchmarks.compile_check --list      # discovery and spec coverage only

To cover a new or changed kernel, edit ``launch_specs`` (one entry per kernel) or, for a ``@triton.jit``
device function that is only called from kernels, ``DEVICE_FUNCTIONS``.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

QWEN_VOCAB = 151936
TARGETS = (80, 90, 100)
WARP_SIZE = 32
DEFAULT_NUM_STAGES = 3
# Scalar kernel arguments that are floats; every other non-pointer, non-constexpr argument is an i32.
FLOAT_ARGS = frozenset({"inv_T", "clip_low", "clip_high"})
# Tensor-core instructions by how they appear in PTX (sm_80 mma.sync, sm_90 wgmma, sm_100 tcgen05).
MMA_PATTERNS = ("tcgen05.mma", "wgmma", "mma.sync")
# device function -> the kernels that inline it (it is compiled as part of them)
DEVICE_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "ppo_loss._clip_objective": ("ppo_loss._ppo_token_kernel", "ppo_loss._ppo_seq_kernel"),
}
RESOURCE_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class Launch:
    """One launch configuration: pointer dtypes (others default to fp32), constexprs, warps, stages."""

    label: str
    pointers: dict[str, str] = field(default_factory=dict)
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = DEFAULT_NUM_STAGES
    mma: bool = False  # the kernel must use tensor-core instructions
    # As the launcher specialises them: integer arguments passed as 1 (compiled as constants) and integer
    # arguments that are multiples of 16 (pointers from torch allocations always are, 16-byte aligned).
    ones: frozenset[str] = frozenset()
    divisible: frozenset[str] = frozenset()


def launch_specs() -> dict[str, list[Launch]]:
    """kernel ("module._name") -> the launch configurations its wrapper uses, from the wrappers' constants."""
    rows_mod = importlib.import_module("o1pruner_kernels.logit_rows")
    ppo = importlib.import_module("o1pruner_kernels.ppo_loss")
    fused = importlib.import_module("o1pruner_kernels.fused_logprobs")
    block_v = rows_mod.block_v(QWEN_VOCAB)
    rows_warps = 8 if block_v >= 2048 else 4  # as in logit_rows._rows_triton
    dtypes = ("bf16", "fp16", "fp32")
    # The logits tile is always float32; the gradient tile is in the input dtype.
    rows = [
        Launch(
            f"grad {dt} grad={g} scale={s} entropy={e}",
            {"z_ptr": "*fp32", "g_ptr": f"*{dt}", "labels_ptr": "*i64"},
            {"WRITE_GRAD": g, "HAS_SCALE": s, "WRITE_ENT": e, "BLOCK_V": block_v},
            rows_warps,
            divisible=frozenset({"stride_z", "stride_g", "V"}),
        )
        for dt, (g, s, e) in itertools.product(
            dtypes, ((False, False, False), (False, False, True), (True, False, True), (True, True, False))
        )
    ]
    seg = {"valid_ptr": "*i1", "sid_ptr": "*i64"}
    fused_launches = []
    for dt in dtypes:
        cfg = fused.config_for(_torch_dtype(dt))
        consts = {
            "BLOCK_N": cfg.block_n,
            "BLOCK_V": cfg.block_v,
            "BLOCK_K": cfg.block_k,
            "IEEE": dt == "fp32",
            "UPCAST": False,
        }
        ptrs = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "labels_ptr": "*i64"}
        # IEEE float32 products run on the FMA units, not the tensor cores: no MMA expected for fp32
        mma = dt != "fp32"
        ones = frozenset({"stride_hk", "stride_wk"})  # contiguous rows of hidden and weight
        div = frozenset({"stride_hn", "stride_wv", "V", "H"})
        fused_launches.append(Launch(dt, ptrs, consts, cfg.num_warps, cfg.num_stages, mma, ones, div))
    return {
        "logit_rows._logprob_rows_kernel": rows,
        "ppo_loss._segment_sums_kernel": [Launch("", seg, {"BLOCK": ppo._BLOCK})],
        "ppo_loss._ppo_token_kernel": [
            Launch(f"seq_mean={m}", seg, {"SEQ_MEAN": m, "BLOCK": ppo._BLOCK}) for m in (True, False)
        ],
        "ppo_loss._ppo_seq_kernel": [
            Launch(f"geomean={g}", {}, {"GEOMEAN": g, "BLOCK": ppo._BLOCK}) for g in (True, False)
        ],
        "ppo_loss._gather_coef_kernel": [Launch("", seg, {"BLOCK": ppo._BLOCK})],
        "fused_logprobs._fused_logprob_partial_kernel": fused_launches,
        "fused_logprobs._fused_logprob_merge_kernel": [
            Launch("", {"labels_ptr": "*i64"}, {"BLOCK": fused.MERGE_BLOCK})
        ],
        "triton_utils._probe_kernel": [Launch("never launched")],
    }


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def discover_kernels() -> dict[str, object]:
    """Every ``@triton.jit`` function defined in a module of o1pruner_kernels, as "module._name" -> JITFunction."""
    import o1pruner_kernels
    from triton.runtime.jit import JITFunction

    found = {}
    for info in pkgutil.walk_packages(o1pruner_kernels.__path__, "o1pruner_kernels."):
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                found[f"{info.name.removeprefix('o1pruner_kernels.')}.{name}"] = obj
    return found


def coverage_errors(discovered, specs, device_functions) -> list[str]:
    """Names without a spec, specs without a kernel, and device functions whose callers have no spec."""
    errors = []
    for name in sorted(discovered):
        if name not in specs and name not in device_functions:
            errors.append(f"{name}: a @triton.jit kernel without a compile spec (add it to launch_specs)")
    for name in sorted(set(specs) | set(device_functions)):
        if name not in discovered:
            errors.append(f"{name}: has a compile spec but no such kernel exists (remove or rename the spec)")
    for name, callers in sorted(device_functions.items()):
        for c in callers:
            if c not in specs:
                errors.append(f"{name}: its caller {c} has no compile spec")
    return errors


def signature(kernel, launch: Launch) -> dict[str, str]:
    """Triton signature of ``kernel`` for ``launch``: pointer dtypes, i32/fp32 scalars, constexpr markers."""
    sig = {}
    for i, arg in enumerate(kernel.arg_names):
        if kernel.params[i].is_constexpr or arg in launch.ones:
            if arg not in launch.constexprs and arg not in launch.ones:
                raise ValueError(f"{kernel.fn.__name__}: the spec gives no value for constexpr {arg!r}")
            sig[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            sig[arg] = launch.pointers.get(arg, "*fp32")
        else:
            sig[arg] = "fp32" if arg in FLOAT_ARGS else "i32"
    unknown = (set(launch.pointers) | launch.ones | launch.divisible) - set(sig)
    if unknown:
        raise ValueError(
            f"{kernel.fn.__name__}: the spec names arguments it does not have: {sorted(unknown)}"
        )
    return sig


def cuobjdump_path() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise SystemExit(f"compile_check: {path} is missing (this triton wheel ships no cuobjdump)")
    return path


def resource_usage(cubin: bytes, tool: Path) -> dict[str, int]:
    """Registers, stack, static shared and local (spill) bytes of the one function in ``cubin``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True)
    match = RESOURCE_RE.search(out.stdout)
    if out.returncode or not match:
        raise RuntimeError(f"cuobjdump failed: {out.stderr.strip() or out.stdout.strip()}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return {"regs": reg, "stack": stack, "static_shared": shared, "local": local}


def compile_one(kernel, launch: Launch, cc: int, tool: Path) -> dict:
    """Compile ``kernel`` for sm_``cc``; a row of the report (raises on a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig = signature(kernel, launch)
    consts = dict(launch.constexprs, **{a: 1 for a in launch.ones})
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, arg in enumerate(kernel.arg_names)
        if sig[arg].startswith("*") or arg in launch.divisible
    }
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", cc, WARP_SIZE),
        options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
    )
    seconds = time.perf_counter() - start
    usage = resource_usage(compiled.asm["cubin"], tool)
    ptx = compiled.asm["ptx"]
    mma = next((p for p in MMA_PATTERNS if p in ptx), "-")
    shared = int(compiled.metadata.shared) + usage["static_shared"]
    return dict(usage, shared=shared, mma=mma, seconds=seconds)


def check(rows: list[tuple[str, Launch, int, dict | str]]) -> list[str]:
    """Failures among compiled rows: errors, spills, missing tensor-core use."""
    problems = []
    for name, launch, cc, res in rows:
        where = f"{name} [{launch.label}] sm_{cc}"
        if isinstance(res, str):
            problems.append(f"{where}: compile error: {res}")
        elif res["local"] > 0:
            problems.append(f"{where}: spills {res['local']} bytes to local memory")
        elif launch.mma and res["mma"] == "-":
            problems.append(f"{where}: no tensor-core MMA instruction in the PTX")
    return problems


def _print_row(name: str, launch: Launch, cc: int, res: dict | str) -> None:
    head = f"{name:<46} {launch.label:<26} sm_{cc:<4} w{launch.num_warps:<2}"
    if isinstance(res, str):
        print(f"{head} ERROR {res}", flush=True)
        return
    print(
        f"{head} regs {res['regs']:>3}  spill {res['local']:>5} B  stack {res['stack']:>4} B  "
        f"shared {res['shared']:>6} B  mma {res['mma']:<11} {res['seconds']:5.1f} s",
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90,100"
    )
    p.add_argument("--only", default="", help="comma list of kernel names (suffix match) to compile")
    p.add_argument("--list", action="store_true", help="check discovery and spec coverage, compile nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        targets = [int(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        print(f"compile_check: --targets {args.targets!r} must be integers like 80,90,100", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (env -u TRITON_INTERPRET ...): it disables compilation",
              file=sys.stderr)  # fmt: skip
        return 2
    discovered = discover_kernels()
    specs = launch_specs()
    errors = coverage_errors(discovered, specs, DEVICE_FUNCTIONS)
    for e in errors:
        print(f"ERROR {e}", flush=True)
    print(
        f"compile_check: {len(discovered)} @triton.jit functions, {len(specs)} kernels with specs", flush=True
    )
    if args.list:
        return 1 if errors else 0
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    names = [n for n in sorted(specs) if n in discovered and (not only or any(n.endswith(o) for o in only))]
    if only and not names:
        print(f"compile_check: --only {args.only!r} matches no kernel with a spec", file=sys.stderr)
        return 2
    tool = cuobjdump_path()
    rows = []
    for name, cc in itertools.product(names, targets):
        for launch in specs[name]:
            try:
                res = compile_one(discovered[name], launch, cc, tool)
            except Exception as exc:  # report every failing configuration, then fail
                res = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc) else ''}"
            _print_row(name, launch, cc, res)
            rows.append((name, launch, cc, res))
    problems = errors + check(rows)
    for p in problems:
        print(f"FAIL {p}", flush=True)
    print(f"compile_check: {len(rows)} compiles, {len(problems)} problem(s)", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
