"""The float32-result GEMMs (``o1pruner_kernels.gemm``) and the tile layouts, against float64.

bf16 operands on a CPU run as float32 GEMMs of upcast copies, in oneDNN's bf16 math mode where the machine
has it: exact products, float32 accumulation. The checks bound the error by float32 accumulation of
|a| @ |b| and require it to be far below one bf16 rounding of the result, so a GEMM that rounded its output
(or its accumulator) to bf16 fails. Sizes are awkward (V spans 3 upcast blocks of 8, the last partial);
outputs are poisoned with NaN; the process-wide math mode must be restored, also after an error.
"""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch
from kernel_utils import cpu64, nan_empty
from o1pruner_kernels.reference import reference_logprobs

from o1pruner.kernels import linear_logprobs

gemm = importlib.import_module("o1pruner_kernels.gemm")
lp_mod = importlib.import_module("o1pruner_kernels.linear_logprobs")

M, K, N = 13, 67, 21
FPMATH = [
    "machine",
    pytest.param("off", id="fpmath-off"),
]


def _gen(key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.fixture(params=FPMATH)
def math_mode(request, monkeypatch):
    """Each test runs with the machine's bf16 math mode (where it has one) and with it switched off."""
    monkeypatch.setattr(gemm, "UPCAST_BLOCK", 8)
    if request.param == "off":
        monkeypatch.setattr(gemm, "has_bf16_fpmath", lambda: False)
    return request.param


def _bound(a64: torch.Tensor, b64: torch.Tensor) -> torch.Tensor:
    """Float32 accumulation bound of a @ b: K * 2**-24 * (|a| @ |b|), plus a tiny absolute floor."""
    return a64.shape[1] * 2.0**-24 * (a64.abs() @ b64.abs()) + 1e-30


def _check(out: torch.Tensor, ref64: torch.Tensor, bound: torch.Tensor) -> None:
    out64 = out.double()
    assert torch.isfinite(out64).all()
    err = (out64 - ref64).abs()
    assert torch.all(err <= bound), float((err - bound).max())
    bf16_step = (ref64.float().bfloat16().double() - ref64).abs()
    # one bf16 rounding of the result is far larger than what the GEMM is allowed
    assert bf16_step.mean() > 50 * err.mean(), (float(bf16_step.mean()), float(err.mean()))


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("strided_weight", [False, True])
def test_mm_f32_bf16_is_float32_exact(math_mode, layout, strided_weight):
    g = _gen(("mm", math_mode, layout, strided_weight))
    a = torch.randn(M, K, generator=g).bfloat16()
    if strided_weight:  # a transposed, sliced weight: (N, K) view of a (K, 2N) buffer
        b_t = torch.randn(K, 2 * N, generator=g).bfloat16().t()[::2]
    else:
        b_t = torch.randn(N, K, generator=g).bfloat16()
    out = nan_empty(M * N, dtype=torch.float32, device="cpu")
    out = out.view(N, M).t() if layout == "col" else out.view(M, N)
    before = torch.backends.mkldnn.matmul.fp32_precision
    res = gemm.mm_f32(a, b_t, out)
    assert res.data_ptr() == out.data_ptr() and res.stride() == out.stride()
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    a64, b64 = cpu64(a), cpu64(b_t).t()
    _check(out, a64 @ b64, _bound(a64, b64))


def test_addmm_f32_bf16_accumulates_in_float32(math_mode):
    g = _gen(("addmm", math_mode))
    a_t = torch.randn(M, N, generator=g).bfloat16()  # (K', M') = (M, N): the gradient tile layout
    b = torch.randn(M, K, generator=g).bfloat16()
    acc0 = torch.randn(N, K, generator=g) * 3
    acc = acc0.clone()
    gemm.addmm_f32(acc, a_t, b)
    a64, b64 = cpu64(a_t).t(), cpu64(b)
    ref = acc0.double() + a64 @ b64
    bound = _bound(a64, b64) + 2.0**-23 * ref.abs()
    _check(acc, ref, bound)


def test_math_mode_is_restored_after_an_error():
    if not gemm.has_bf16_fpmath():
        pytest.skip("this machine's oneDNN has no bf16 math mode")
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    a = torch.randn(3, 5).bfloat16()
    b_t = torch.randn(4, 6).bfloat16()
    with pytest.raises(RuntimeError):
        gemm.mm_f32(a, b_t, torch.empty(3, 4))  # inner sizes 5 and 6 differ
    assert matmul.fp32_precision == before


def test_float32_and_mixed_operands_keep_ieee_math(monkeypatch):
    """The bf16 math mode is only for bf16 x bf16: float32 values are not bf16 numbers."""
    seen = []
    real_mm = torch.mm

    def spy(*args, **kwargs):
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(gemm.torch, "mm", spy)
    g = _gen("ieee")
    a32 = torch.randn(M, K, generator=g)
    b16 = torch.randn(N, K, generator=g).bfloat16()
    gemm.mm_f32(a32, b16.float(), torch.empty(M, N))
    gemm.mm_f32(a32.bfloat16(), b16.half(), torch.empty(M, N))
    assert seen and "bf16" not in seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_major_tiles_match_row_major(monkeypatch, dtype):
    """The CPU torch backend's vocabulary-major tiles give the row-major result (chunks of 4 tokens, the
    last partial, entropy and the trainable head included)."""
    monkeypatch.setattr(lp_mod, "_empty", nan_empty)
    g = _gen(("layout", dtype))
    hidden = (torch.randn(3, 7, 24, generator=g) * 2).to(dtype)
    weight = torch.randn(203, 24, generator=g).to(dtype)
    labels = torch.randint(0, 203, (3, 7), generator=g)
    labels[1, 2] = -100

    def run(col: bool):
        monkeypatch.setattr(lp_mod, "vocab_major", lambda backend, device, dtype: col)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = linear_logprobs(h, w, labels, backend="torch", chunk_size=4, return_entropy=True)
        lp.square().sum().backward()
        return lp.detach(), ent, h.grad, w.grad

    col, row = run(True), run(False)
    for x, y in zip(col, row):
        # summation order differs between the layouts: float32 rounding, relative to the tensor's scale
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()))
    ref = reference_logprobs(cpu64(hidden), cpu64(weight), labels)
    assert (col[0].double() - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols,block", [(1, 7, 16), (2, 5, 1), (17, 203, 16), (33, 9, 3), (100, 31, 16)])
@pytest.mark.parametrize("col", [False, True])
def test_narrow_in_place_equals_a_rounded_copy(dtype, rows, cols, block, col):
    """The gradient tile rounded into its own float32 storage: equal to ``x.to(dtype)``, every element."""
    g = _gen(("narrow", dtype, rows, cols, block, col))
    storage = torch.randn(rows * cols, generator=g) * 50
    x = storage.view(cols, rows).t() if col else storage.view(rows, cols)
    want = x.to(dtype)
    got = lp_mod.narrow_in_place(x, dtype, block)
    assert got.shape == x.shape and got.dtype == dtype
    assert got.data_ptr() == storage.data_ptr()
    assert (got.t() if col else got).is_contiguous()
    assert torch.equal(got, want)


def test_narrow_in_place_rejects_a_strided_tile():
    x = torch.randn(6, 8)[:, ::2]
    with pytest.raises(ValueError, match="dense tile"):
        lp_mod.narrow_in_place(x, torch.bfloat16)
