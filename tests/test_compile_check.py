"""benchmarks.compile_check on the CPU: discovery covers every kernel, real sm_90 compiles, bad usage.

The compiles run in a subprocess without TRITON_INTERPRET (conftest.py sets it for this process, and it
turns ``triton.jit`` into the interpreter, which cannot compile).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks import compile_check

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, interpret: bool = False, module: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_check", *args] if module else [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_kernel_of_the_package_has_a_spec():
    res = _run("--list")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ERROR" not in res.stdout


def test_coverage_errors_name_missing_stale_and_orphaned_specs():
    found = {"a.k1": 0, "a.k2": 0, "a.helper": 0}
    specs = {"a.k1": [], "a.gone": []}
    errors = compile_check.coverage_errors(found, specs, {"a.helper": ("a.k1", "a.k3")})
    assert any(e.startswith("a.k2: a @triton.jit kernel without a compile spec") for e in errors)
    assert any(e.startswith("a.gone: has a compile spec but no such kernel") for e in errors)
    assert any(e.startswith("a.helper: its caller a.k3 has no compile spec") for e in errors)
    assert len(errors) == 3
    assert compile_check.coverage_errors(found, {"a.k1": [], "a.k2": []}, {"a.helper": ("a.k1",)}) == []


def test_fused_scoring_kernel_compiles_for_sm90_with_tensor_cores():
    res = _run("--targets", "90", "--only", "_fused_logprob_partial_kernel,_fused_logprob_merge_kernel")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if "sm_90" in ln]
    assert len(lines) == 4  # bf16, fp16, fp32 partial kernels + the merge kernel
    for dt in ("bf16", "fp16"):
        (line,) = [ln for ln in lines if f"partial_kernel   {dt}" in ln]
        assert "mma wgmma" in line and "spill     0 B" in line
    assert "0 problem(s)" in res.stdout


SIGNATURE_SCRIPT = """
from benchmarks import compile_check as cc
name = "fused_logprobs._fused_logprob_partial_kernel"
kernel = cc.discover_kernels()[name]
spec = cc.launch_specs()[name][0]
sig = cc.signature(kernel, spec)
assert sig["h_ptr"] == "*bf16" and sig["labels_ptr"] == "*i64" and sig["m_ptr"] == "*fp32", sig
assert sig["stride_hk"] == "constexpr" and sig["BLOCK_K"] == "constexpr", sig
assert sig["inv_T"] == "fp32" and sig["N"] == "i32", sig
try:
    cc.signature(kernel, cc.Launch("x", {"no_such_ptr": "*fp32"}, spec.constexprs))
except ValueError as exc:
    assert "no_such_ptr" in str(exc)
else:
    raise AssertionError("an unknown argument in a spec was accepted")
print("signature ok")
"""


def test_signature_marks_constexprs_ones_and_pointer_dtypes():
    res = _run("-c", SIGNATURE_SCRIPT, module=False)
    assert res.returncode == 0 and "signature ok" in res.stdout, res.stdout + res.stderr


def test_interpreter_and_bad_targets_are_usage_errors():
    res = _run("--list", interpret=True)
    assert res.returncode == 2 and "TRITON_INTERPRET" in res.stderr
    res = _run("--targets", "sm90")
    assert res.returncode == 2 and "--targets" in res.stderr
    res = _run("--only", "no_such_kernel")
    assert res.returncode == 2 and "no_such_kernel" in res.stderr
