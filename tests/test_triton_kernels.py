"""The Triton INT8 kernels agree with their plain-torch references (`nnpq.kernels.reference`).

Without a GPU the kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1,
which must be set before triton is imported). With ``TRITON_INTERPRET=0`` on a CUDA machine
the same tests check the compiled kernels.

Tolerances follow the arithmetic: each is a bound ``u * (|a| @ |b|)`` on the rounding the
kernel is allowed (16-bit or tf32 operands, float32 sums, the output dtype), so a wrong
group, scale or zero point, which changes results by O(|y|), fails.
"""

from __future__ import annotations

import os

import pytest
import torch

from triton_mode import triton_kernels  # noqa: E402

T, DEVICE, _INTERPRET = triton_kernels()
from nnpq.errors import NnpqError  # noqa: E402
from nnpq.kernels import reference as R  # noqa: E402
from nnpq.kernels.int8 import dequantize_weight  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpret_mode():
    """Triton reads TRITON_INTERPRET again when it launches (lazy imports), so keep it set while these tests run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", _INTERPRET)
        yield


EPS32 = 2.0**-24
# unit roundoff of a value rounded to each dtype. bf16 allows a whole ulp: the interpreter
# truncates fp32 -> bf16 where the GPU rounds to nearest. float32 operands of a tf32 dot keep 10 bits.
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7, torch.float32: EPS32}
TF32 = 2.0**-11
# how large a worst-case rounding bound may be against the largest output: |x| @ |W| exceeds |x @ W|
# about sqrt(K)-fold for random signs, so a bf16 bound is a few percent of the signal
SIGNAL_FRACTION = {torch.float16: 0.02, torch.bfloat16: 0.1, torch.float32: 0.02}
ALPHA = R.ANI_CELU_ALPHA


def _layer(n: int, k: int, group_size: int, layout: str, seed: int = 0):
    """Random codes and quantization parameters of one layout: (qweight, scale, zero)."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    rows = 1 if layout == "tensor-group" else n
    scale = (torch.rand(rows, groups, generator=gen) + 0.5) * 0.01
    if layout in ("group-asym", "tensor-group"):
        zero = torch.randint(-30, 30, (rows, groups), dtype=torch.int8, generator=gen)
    elif layout == "channel-zero11":
        zero = torch.zeros(1, 1, dtype=torch.int8)  # what QuantizedLinear holds for symmetric formats
    else:
        zero = None
    return q, scale, zero


def _to(device: str, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _assert_within(got: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, signal_fraction: float) -> None:
    """|got - ref| <= tol everywhere, and tol is small against the signal (so the check can fail)."""
    err = (got.double().cpu() - ref.double().cpu()).abs()
    tol = tol.cpu()
    if os.environ.get("NNPQ_SHOW_ERRORS"):
        print(f"max error {err.max():.3g}, max error/tolerance {(err / tol).max():.3g}, max |ref| {ref.abs().max():.3g}")
    assert tol.max() < signal_fraction * ref.abs().max().item()
    worst = (err - tol).argmax()
    assert bool((err <= tol).all()), f"error {err.flatten()[worst]:.3g} > tolerance {tol.flatten()[worst]:.3g}"


def _dequantized(q, scale, zero, group_size, col):
    return dequantize_weight(q, scale, torch.zeros(1, 1, dtype=torch.int8) if zero is None else zero, group_size, col)


# (M, K, N, group_size, x dtype, precision, layout, col_scale, bias, CELU, fold_scales)
LINEAR_CASES = [
    (1, 224, 32, 32, torch.float16, "tf32", "group-asym", False, True, True, True),
    (5, 224, 96, 32, torch.float16, "tf32", "group-asym", True, True, True, False),
    (17, 112, 96, 112, torch.float16, "tf32", "channel-sym", False, True, True, True),
    (64, 224, 32, 224, torch.float16, "tf32", "channel-zero11", True, False, False, True),
    (17, 224, 96, 32, torch.bfloat16, "tf32", "group-asym", True, True, True, True),
    (5, 112, 32, 16, torch.bfloat16, "tf32", "tensor-group", False, True, False, False),
    (17, 112, 96, 16, torch.float16, "tf32", "tensor-group", True, True, True, True),
    (17, 224, 96, 32, torch.float32, "ieee", "group-asym", True, True, True, True),
    (64, 112, 96, 112, torch.float32, "tf32", "channel-sym", False, True, True, True),
    (1, 112, 32, 16, torch.float32, "tf32x3", "tensor-group", True, False, True, False),
    # ANI layer 0: K = 1008 AEV features, "g32" groups of 28
    (5, 1008, 32, 28, torch.float16, "tf32", "group-asym", True, True, True, True),
    (5, 1008, 32, 28, torch.float16, "tf32", "group-asym", True, True, True, False),
]


@pytest.mark.parametrize("m,k,n,group_size,dtype,precision,layout,use_col,use_bias,celu,fold", LINEAR_CASES)
def test_w8_linear_matches_reference(m, k, n, group_size, dtype, precision, layout, use_col, use_bias, celu, fold):
    gen = torch.Generator().manual_seed(m * 7 + n)
    q, scale, zero = _layer(n, k, group_size, layout)
    x = torch.randn(m, k, generator=gen).to(dtype)
    col = torch.rand(k, generator=gen) + 0.5 if use_col else None
    bias = torch.randn(n, generator=gen) if use_bias else None
    alpha = ALPHA if celu else None
    y = T.w8_linear(*_to(DEVICE, x, q, scale, zero), group_size, *_to(DEVICE, bias, col), celu_alpha=alpha,
                    precision=precision, fold_scales=fold)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = R.w8_linear_reference(x, q, scale, zero, group_size, bias, col, alpha)

    # operand rounding: x / col_scale to x's dtype (16-bit), or x to tf32; codes minus zeros are exact
    u_in = UNIT[dtype] if (use_col and dtype != torch.float32) else 0.0
    if dtype == torch.float32 and precision == "tf32":
        u_in = TF32
    # folded group scales: the dequantized weight is rounded to the dot dtype too
    u_w = (TF32 if precision == "tf32" else EPS32) if dtype == torch.float32 else UNIT[dtype]
    u_w = u_w if (fold and k // group_size > 1) else 0.0
    relative = u_in + u_w + (k + 4) * EPS32  # + float32 sums, scales, the reference's own roundings
    mag = R.dot_error_bound(x.float(), _dequantized(q, scale, zero, group_size, col).T, 1.0)
    if bias is not None:
        mag = mag + bias.abs().double()
    tol = relative * mag + UNIT[dtype] * ref.abs().double() + 8 * EPS32 * ALPHA  # CELU is 1-Lipschitz
    _assert_within(y, ref, tol, SIGNAL_FRACTION[dtype])


def test_w8_linear_reads_quantized_linear_buffers():
    """The kernel takes the runtime layer's buffers as they are (asymmetric groups, equalization) and agrees with it."""
    pytest.importorskip("torchani")  # nnpq.models needs it (absent on bare GPU machines)
    from nnpq.models.layers import QuantizedLinear

    k, n, group_size = 224, 96, 32
    layer = QuantizedLinear(k, n, rows=n, group_size=group_size, symmetric=False, equalized=True)
    q, scale, zero = _layer(n, k, group_size, "group-asym", seed=3)
    gen = torch.Generator().manual_seed(5)
    layer.load_state_dict({"qweight": q, "scale": scale, "zero": zero, "bias": torch.randn(n, generator=gen),
                           "col_scale": torch.rand(k, generator=gen) + 0.5, "act_scale": torch.zeros(1)})
    x = torch.randn(33, k, generator=gen)
    with torch.no_grad():
        expected = torch.nn.functional.celu(layer(x), alpha=ALPHA)
    bufs = _to(DEVICE, x, layer.qweight, layer.scale, layer.zero)
    y = T.w8_linear(*bufs, layer.group_size, *_to(DEVICE, layer.bias, layer.col_scale), celu_alpha=ALPHA,
                    precision="ieee")
    mag = R.dot_error_bound(x, _dequantized(q, scale, zero, group_size, layer.col_scale).T, 1.0) + layer.bias.abs()
    _assert_within(y, expected, (k + 4) * EPS32 * mag + 8 * EPS32, signal_fraction=1e-4)


# (M, K, N, group_size, dtype, precision, layout, col_scale, CELU derivative)
GRAD_CASES = [
    (1, 224, 96, 32, torch.float32, "ieee", "group-asym", True, True),
    (17, 112, 32, 112, torch.float16, "tf32", "channel-sym", False, True),
    (64, 112, 96, 16, torch.bfloat16, "tf32", "tensor-group", True, False),
    (5, 1008, 32, 28, torch.float16, "tf32", "group-asym", True, True),
]


@pytest.mark.parametrize("m,k,n,group_size,dtype,precision,layout,use_col,celu", GRAD_CASES)
def test_w8_linear_input_grad_is_the_input_gradient(m, k, n, group_size, dtype, precision, layout, use_col, celu):
    gen = torch.Generator().manual_seed(m + k)
    q, scale, zero = _layer(n, k, group_size, layout, seed=1)
    col = torch.rand(k, generator=gen) + 0.5 if use_col else None
    bias = torch.randn(n, generator=gen)
    grad_y = torch.randn(m, n, generator=gen)
    # the true gradient of the reference layer, by autograd
    x = torch.randn(m, k, generator=gen, requires_grad=True)
    y = R.w8_linear_reference(x, q, scale, zero, group_size, bias, col, ALPHA if celu else None)
    (autograd,) = torch.autograd.grad(y, x, grad_y)
    y = y.detach()
    alpha = ALPHA if celu else None
    celu_out = y.to(dtype) if celu else None
    got = T.w8_linear_input_grad(*_to(DEVICE, grad_y.to(dtype), q, scale, zero), group_size,
                                 *_to(DEVICE, col, celu_out), celu_alpha=alpha, precision=precision)
    assert got.shape == (m, k) and got.dtype == dtype
    ref = R.w8_linear_input_grad_reference(grad_y.to(dtype), q, scale, zero, group_size, col, celu_out, alpha)

    # grad_y * celu' * scale is rounded to the dot dtype once; codes minus zeros are exact
    u_op = TF32 if (dtype == torch.float32 and precision == "tf32") else UNIT[dtype]
    if dtype == torch.float32 and precision == "ieee":
        u_op = EPS32
    g = grad_y.to(dtype).float() * (R.celu_grad_from_output(celu_out.float(), ALPHA) if celu else 1.0)
    mag = R.dot_error_bound(g, _dequantized(q, scale, zero, group_size, col), 1.0)
    tol = (u_op + (n + 4) * EPS32) * mag + UNIT[dtype] * ref.abs().double()
    _assert_within(got, ref, tol, SIGNAL_FRACTION[dtype])
    if dtype == torch.float32:
        # the reference itself is the autograd gradient (celu' from the output) up to float32 sums
        _assert_within(ref, autograd, (n + 4) * EPS32 * mag + 1e-7 * mag.max(), signal_fraction=1e-4)


def _w8a8_tolerance(x, q, wscale, bias, splits, out_dtype, ref):
    """Integer sums are exact; the rescale is a few float32 roundings of |x_q| @ |W_q|^T."""
    codes, xscales = R.quantize_rows(x, splits)
    bounds = R.segment_bounds(x.shape[1], splits)
    mag = torch.zeros(x.shape[0], q.shape[0], dtype=torch.float64)
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        mag += R.dot_error_bound(codes[:, lo:hi].float(), q[:, lo:hi].float().T, 1.0) * xscales[:, s:s + 1].double()
    mag = mag * wscale.double()[None, :] + (0.0 if bias is None else bias.abs().double())
    return (len(bounds) + 6) * EPS32 * mag + UNIT[out_dtype] * ref.abs().double() + 8 * EPS32 * ALPHA


# (M, K, N, act_splits, x dtype, bias, CELU): M covers tl.dot's 16-row minimum from both sides
W8A8_CASES = [
    (1, 112, 32, (), torch.float32, True, True),
    (5, 224, 96, (112,), torch.float32, True, True),
    (16, 224, 32, (), torch.float16, False, False),
    (17, 224, 96, (112,), torch.float32, True, False),
    (300, 112, 32, (48,), torch.float32, True, True),
    (17, 1008, 32, (112,), torch.bfloat16, True, True),
]


@pytest.mark.parametrize("m,k,n,splits,dtype,use_bias,celu", W8A8_CASES)
def test_w8a8_linear_matches_reference(m, k, n, splits, dtype, use_bias, celu):
    gen = torch.Generator().manual_seed(m + n + k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    wscale = (torch.rand(n, generator=gen) + 0.5) * 0.01
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen) if use_bias else None
    alpha = ALPHA if celu else None
    y = T.w8a8_linear(*_to(DEVICE, x, q, wscale, bias), celu_alpha=alpha, act_splits=splits)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = R.w8a8_linear_reference(x, q, wscale, bias, alpha, splits)
    _assert_within(y, ref, _w8a8_tolerance(x, q, wscale, bias, splits, dtype, ref), signal_fraction=0.01)


def test_w8a8_segment_scales_help_features_of_different_ranges():
    """An AEV-like input (112 large radial, 896 small angular features): a scale per block cuts the error."""
    gen = torch.Generator().manual_seed(11)
    m, k, n = 20, 1008, 32
    x = torch.cat([torch.randn(m, 112, generator=gen), 0.01 * torch.randn(m, 896, generator=gen)], dim=1)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    wscale = torch.full((n,), 0.01)
    exact = x @ (q.float() * wscale[:, None]).T
    xd, qd, wd = _to(DEVICE, x, q, wscale)
    one = (T.w8a8_linear(xd, qd, wd).cpu() - exact).abs().max().item()
    two = (T.w8a8_linear(xd, qd, wd, act_splits=(112,)).cpu() - exact).abs().max().item()
    assert two < 0.5 * one


def test_empty_rows_give_empty_outputs():
    q, scale, zero = _layer(32, 112, 16, "group-asym")
    x = torch.zeros(0, 112)
    assert T.w8_linear(*_to(DEVICE, x, q, scale, zero), 16).shape == (0, 32)
    assert T.w8a8_linear(*_to(DEVICE, x, q, scale[:, 0].contiguous())).shape == (0, 32)
    assert T.w8_linear_input_grad(*_to(DEVICE, torch.zeros(0, 32), q, scale, zero), 16).shape == (0, 112)


@pytest.mark.parametrize("call,message", [
    (lambda x, q, s, z: T.w8_linear(x.to(torch.int32), q, s, z, 16), "x must be float16"),
    (lambda x, q, s, z: T.w8_linear(x[:, :100], q, s, z, 16), r"x must have shape \(M, 112\)"),
    (lambda x, q, s, z: T.w8_linear(x, q.float(), s, z, 16), "qweight must be a 2-D int8"),
    (lambda x, q, s, z: T.w8_linear(x, q, s, z, 15), "group_size 15 must divide"),
    (lambda x, q, s, z: T.w8_linear(x, q, s[:, :3], z, 16), "scale must be float32 of shape"),
    (lambda x, q, s, z: T.w8_linear(x, q, s, z.float(), 16), "zero must be int8"),
    (lambda x, q, s, z: T.w8_linear(x, q, s, z, 16, celu_alpha=-1.0), "celu_alpha must be positive"),
    (lambda x, q, s, z: T.w8_linear(x, q, s, z, 16, precision="fp8"), "precision must be one of"),
    (lambda x, q, s, z: T.w8_linear(x, q, s, z, 16, fold_scales="yes"), "fold_scales must be True or False"),
    (lambda x, q, s, z: T.w8_linear_input_grad(x[:, :32], q, s, z, 16, celu_alpha=0.1), "celu_output and celu_alpha"),
    (lambda x, q, s, z: T.w8a8_linear(x, q, s[:, 0].contiguous(), act_splits=(200,)), "act_splits must increase"),
    (lambda x, q, s, z: T.w8a8_linear(x, q, s), "wscale must be float32 with one scale per output channel"),
])
def test_bad_inputs_raise_one_line_errors(call, message):
    q, scale, zero = _layer(32, 112, 16, "group-asym")
    x = torch.randn(4, 112)
    with pytest.raises(NnpqError, match=message):
        call(*_to(DEVICE, x, q, scale, zero))


def test_wrong_device_is_reported():
    q, scale, zero = _layer(32, 112, 16, "group-asym")
    other = "meta"
    with pytest.raises(NnpqError, match="one device"):
        T.w8_linear(torch.randn(4, 112, device=other), *_to(DEVICE, q, scale, zero), 16)


@pytest.mark.parametrize("rows,block_m", [(1, {16}), (16, {16}), (17, {32}), (64, {64}), (300, {64, 128}), (20000, {64, 128})])
def test_autotuning_keeps_tiles_that_fit_the_rows(rows, block_m):
    """The GPU path tunes over at most four tiles whose BLOCK_M suits the atom count (16 for rare elements)."""
    kept = T._prune(T._CONFIGS, {}, M_BUCKET=T.m_bucket(rows))
    assert {c.kwargs["BLOCK_M"] for c in kept} == block_m and 1 <= len(kept) <= 4
