"""GEMMs with a float32 result from float32, bf16 or fp16 operands.

On CUDA with bf16/fp16 operands: cuBLAS with float32 output (``torch.mm(..., out_dtype=torch.float32)``,
``torch.addmm(..., out_dtype=torch.float32)``) where the installed torch has them; the logits are then
never rounded to the input dtype. Elsewhere (CPU, or an older torch) the low-precision operands are
upcast to float32 in blocks of ``UPCAST_BLOCK`` rows of the large operand, so the extra memory is one
block, not a float32 copy of the weight. Both forms give the same FLOP count (2*M*K*N).
"""

from __future__ import annotations

import functools

import torch

UPCAST_BLOCK = 8192  # rows of the weight upcast at a time by the fallback


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


def mm_f32(a: torch.Tensor, b_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out (M, N) float32 = a (M, K) @ b_t.T``, with ``b_t`` (N, K) (the weight layout, any strides)."""
    if a.dtype == torch.float32 and b_t.dtype == torch.float32:
        return torch.mm(a, b_t.t(), out=out)
    if has_out_dtype(a.device.type):
        return torch.mm(a, b_t.t(), out_dtype=torch.float32, out=out)
    af = a.float()
    for j in range(0, b_t.shape[0], UPCAST_BLOCK):
        k = min(j + UPCAST_BLOCK, b_t.shape[0])
        out[:, j:k] = torch.mm(af, b_t[j:k].float().t())
    return out


def addmm_f32(acc: torch.Tensor, a_t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc (M, N) float32 += a_t.T @ b`` with ``a_t`` (K, M) (the gradient tile), ``b`` (K, N)."""
    if a_t.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.addmm(acc, a_t.t(), b, out=acc)
    if has_out_dtype(a_t.device.type):
        return torch.addmm(acc, a_t.t(), b, out_dtype=torch.float32, out=acc)
    bf = b.float()
    for j in range(0, a_t.shape[1], UPCAST_BLOCK):
        k = min(j + UPCAST_BLOCK, a_t.shape[1])
        torch.addmm(acc[j:k], a_t[:, j:k].float().t(), bf, out=acc[j:k])
    return acc
