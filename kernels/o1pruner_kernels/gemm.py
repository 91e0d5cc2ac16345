"""GEMMs with a float32 result from float32, bf16 or fp16 operands.

On CUDA with bf16/fp16 operands: cuBLAS with float32 output (``torch.mm(..., out_dtype=torch.float32)``,
``torch.addmm(..., out_dtype=torch.float32)``) where the installed torch has them; the logits are then
never rounded to the input dtype. Elsewhere (CPU, or an older torch) the low-precision operands are
upcast to float32 in blocks of ``UPCAST_BLOCK`` rows of the large operand, so the extra memory is one
block, not a float32 copy of the weight. On a CPU whose oneDNN has bf16 matrix units (AVX512-BF16, AMX),
bf16 operands upcast this way run as oneDNN float32 GEMMs in its bf16 math mode: every upcast value is a
bf16 number, so the conversion back is exact, the products are exact and the accumulation is float32,
i.e. the same result as the float32 GEMM at bf16-GEMM speed. All forms do 2*M*K*N FLOPs.
"""

from __future__ import annotations

import contextlib
import functools

import torch

# Rows of the weight upcast at a time by the fallback; small enough for the block to stay in cache
# (measured on a 2-core AVX-512 CPU at H=1536: 1024 rows 10% faster than 8192).
UPCAST_BLOCK = 1024


@functools.cache
def has_out_dtype(device_type: str) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs on ``device_type`` with bf16 operands."""
    try:
        a = torch.zeros(2, 2, dtype=torch.bfloat16, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32)
        acc = torch.zeros(2, 2, device=device_type)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@functools.cache
def has_bf16_fpmath() -> bool:
    """Whether CPU float32 GEMMs can run in oneDNN's bf16 math mode on this machine and torch."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        prev = matmul.fp32_precision
        matmul.fp32_precision = "bf16"
        matmul.fp32_precision = prev
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return False
    return supported


@contextlib.contextmanager
def _exact_bf16_math(a: torch.Tensor, b: torch.Tensor):
    """oneDNN's bf16 math mode around GEMMs of float32 copies of the bf16 operands ``a`` and ``b`` (exact,
    see the module docstring); a no-op unless both are bf16 CPU tensors on a machine that has the mode.
    The setting is process-wide, so it is restored right after the GEMMs it is for."""
    both_bf16 = a.dtype == b.dtype == torch.bfloat16
    if not both_bf16 or a.device.type != "cpu" or not has_bf16_fpmath():
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    prev = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = prev


def mm_f32(a: torch.Tensor, b_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out (M, N) float32 = a (M, K) @ b_t.T``, with ``b_t`` (N, K) (the weight layout, any strides).

    ``out`` may be row-major or column-major (``out.t()`` contiguous); the GEMM writes it in place.
    """
    if a.dtype == torch.float32 and b_t.dtype == torch.float32:
        return torch.mm(a, b_t.t(), out=out)
    if has_out_dtype(a.device.type):
        return torch.mm(a, b_t.t(), out_dtype=torch.float32, out=out)
    af = a.float()
    block = torch.empty(min(UPCAST_BLOCK, b_t.shape[0]), b_t.shape[1], device=a.device)
    with _exact_bf16_math(a, b_t):
        for j in range(0, b_t.shape[0], UPCAST_BLOCK):
            k = min(j + UPCAST_BLOCK, b_t.shape[0])
            bj = block[: k - j].copy_(b_t[j:k])
            torch.mm(af, bj.t(), out=out[:, j:k])
    return out


def addmm_f32(acc: torch.Tensor, a_t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc (M, N) float32 += a_t.T @ b`` with ``a_t`` (K, M) (the gradient tile), ``b`` (K, N)."""
    if a_t.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.addmm(acc, a_t.t(), b, out=acc)
    if has_out_dtype(a_t.device.type):
        return torch.addmm(acc, a_t.t(), b, out_dtype=torch.float32, out=acc)
    bf = b.float()
    with _exact_bf16_math(a_t, b):
        for j in range(0, a_t.shape[1], UPCAST_BLOCK):
            k = min(j + UPCAST_BLOCK, a_t.shape[1])
            torch.addmm(acc[j:k], a_t[:, j:k].float().t(), bf, out=acc[j:k])
    return acc
