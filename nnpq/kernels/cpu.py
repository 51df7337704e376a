"""CPU kernels of the fused runtime, each beside the plain-torch reference it is tested against.

W8A8 products run on ``torch._int_mm`` (int8 x int8 -> exact int32; VNNI on x86). Both
operands are split into two INT8 *planes* sharing one scale per row: the first rounds the
row, the second rounds what the first left, 254 times finer, so a row carries ~15 bits
(`split_rows`). One plane per row (plain W8A8) loses the small AEV features (held-out
drug-like molecules: 2.2 kcal/mol/Å against FP32 where the weight-only model erred 1.06),
and re-rounding a group-wise weight to one INT8 code per element loses the plan's accuracy
(int8/g8 -> per-row codes: 0.42 on held-out chemistry). Two planes each way cost three INT8
products (`split_product`), still ~2x faster than the float32 product on this VNNI CPU, and
add ~1e-4 relative error. The int32 products are rescaled in float32.

Rounding the activations makes a product piecewise constant in its input: the W8A8 kernels
serve the ``fast`` mode only. The ``exact`` mode multiplies float32 activations by weights
that `dequantize_codes` expands per call (reference: `nnpq.kernels.int8.dequantize_weight`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from nnpq.kernels.build import load_extension

INT8_MAX = 127.0
PLANE_RATIO = 254.0  # a plane's remainder lies in [-0.5, 0.5] of its step: the next plane's step is 1/254 of it


def cpp_kernels(build: bool = True) -> bool:
    """Whether the fused C++ passes (``int8_cpu.cpp``, ``torch.ops.nnpq_int8``) are loaded, building them if ``build``."""
    return load_extension("nnpq_int8", Path(__file__).with_name("int8_cpu.cpp"), build)


def split_rows(x: Tensor, col_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``y = x * col_scale`` (``x`` ``(M, K)`` float32, ``col_scale`` ``(K,)`` or None) as two stacked
    INT8 planes ``(2M, K)`` and row scales ``(M, 1)``.

    ``y ~ scale * (q1 + q2 / 254)``: the first plane rounds ``y / scale`` (``|y / scale| <= 127``),
    the second rounds what the first left, 254 times finer, so a row carries ~15 bits. One C++
    pass where the kernels are built (CPU tensors), else `split_rows_torch`.
    """
    if x.device.type == "cpu" and cpp_kernels(build=False):
        return torch.ops.nnpq_int8.split_rows(x, x.new_zeros(0) if col_scale is None else col_scale)
    return split_rows_torch(x, col_scale)


def split_rows_torch(x: Tensor, col_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Plain-torch `split_rows` (reference and fallback)."""
    if col_scale is not None:
        x = x * col_scale
    m = x.shape[0]
    scale = x.abs().amax(1, keepdim=True).clamp_min_(1e-30).div_(INT8_MAX)
    t = (x / scale).clamp_(-INT8_MAX, INT8_MAX)
    codes = torch.empty(2 * m, x.shape[1], dtype=torch.int8, device=x.device)
    first = torch.round(t)
    codes[:m].copy_(first)
    codes[m:].copy_(torch.round(t.sub_(first).mul_(PLANE_RATIO)))
    return codes, scale


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``torch._int_mm(a, b)`` (int8 x int8 -> int32) for any number of rows of ``a``.

    CUDA's kernel needs more than 16 rows (rare elements often have fewer atoms): short
    inputs are padded with zero rows on every device, so the CPU tests cover that branch too.
    """
    m = a.shape[0]
    if m > 16:
        return torch._int_mm(a, b)
    return torch._int_mm(torch.cat([a, a.new_zeros(17 - m, a.shape[1])]), b)[:m]


def split_product(codes: Tensor, scale: Tensor, w1: Tensor, w2: Optional[Tensor], col_scale: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, alpha: float = 0.0) -> Tensor:
    """``x @ (w1 + w2 / 254)`` for ``x`` given by `split_rows` and INT8 ``w1, w2`` ``(K, N)`` (views allowed;
    ``w2`` None for a one-plane weight), times ``col_scale`` ``(N,)``, plus ``bias`` ``(N,)``, through
    CELU(``alpha``) if ``alpha > 0``.

    INT8 products, each exact in int32: both activation planes times ``w1`` (one product of ``2M``
    rows) and, for a two-plane weight, the first plane times ``w2``; the plane-2 x plane-2 term
    (``254**-2``) is dropped. The scales, bias and CELU are applied in one C++ pass where the
    kernels are built. Result ``(M, N)`` float32.
    """
    m = codes.shape[0] // 2
    coarse = int_mm(codes, w1)
    fine = int_mm(codes[:m], w2) if w2 is not None else None
    if coarse.device.type == "cpu" and cpp_kernels(build=False):
        empty = scale.new_zeros(0)
        return torch.ops.nnpq_int8.combine(coarse, coarse.new_zeros(0) if fine is None else fine, scale,
                                           empty if col_scale is None else col_scale, empty if bias is None else bias,
                                           alpha)
    second = coarse[m:].to(torch.float32)
    if fine is not None:
        second.add_(fine.to(torch.float32))
    out = coarse[:m].to(torch.float32).add_(second, alpha=1.0 / PLANE_RATIO).mul_(scale)
    if col_scale is not None:
        out.mul_(col_scale)
    if bias is not None:
        out.add_(bias)
    return torch.nn.functional.celu(out, alpha) if alpha > 0 else out


def split_product_reference(codes: Tensor, scale: Tensor, w1: Tensor, w2: Optional[Tensor],
                            col_scale: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                            alpha: float = 0.0) -> Tensor:
    """Plain-torch `split_product`: the same codes and the same terms in float64."""
    m = codes.shape[0] // 2
    q1, q2 = codes[:m].double(), codes[m:].double()
    fine = q2 @ w1.double() + (q1 @ w2.double() if w2 is not None else 0.0)
    out = (q1 @ w1.double() + fine / PLANE_RATIO) * scale.double()
    if col_scale is not None:
        out = out * col_scale.double()
    if bias is not None:
        out = out + bias.double()
    return torch.nn.functional.celu(out, alpha).to(torch.float32) if alpha > 0 else out.to(torch.float32)


def celu_slope(y: Tensor, alpha: float) -> Tensor:
    """``d celu(z) / dz`` from the output ``y = celu(z)``: 1 where ``z > 0``, else ``y / alpha + 1``.

    ``y / alpha + 1`` exceeds 1 exactly where ``y > 0``, so clamping it at 1 gives both branches.
    """
    return y.mul(1.0 / alpha).add_(1.0).clamp_(max=1.0)


def celu_slope_reference(y: Tensor, alpha: float) -> Tensor:
    """Plain-torch `celu_slope`: the two branches written out."""
    return torch.where(y > 0, torch.ones_like(y), y / alpha + 1.0)


def dequantize_codes(qweight: Tensor, scale: Tensor, zero: Optional[Tensor], group_size: int,
                     col_scale: Optional[Tensor] = None) -> Tensor:
    """Float32 ``(q - zero) * scale / col_scale`` ``(out, in)`` from int8 codes, scales and zero points
    ``(out, groups)`` and, for equalized layers, ``col_scale`` ``(members, in)`` (rows split evenly
    among members). One C++ pass where the kernels are built (CPU), else `dequantize_codes_torch`.
    Reference: `nnpq.kernels.int8.dequantize_weight`.
    """
    if qweight.device.type == "cpu" and cpp_kernels(build=False):
        empty = scale.new_zeros(0)
        return torch.ops.nnpq_int8.dequantize(qweight, scale, empty if zero is None else zero,
                                              empty if col_scale is None else col_scale, group_size)
    return dequantize_codes_torch(qweight, scale, zero, group_size, col_scale)


def dequantize_codes_torch(qweight: Tensor, scale: Tensor, zero: Optional[Tensor], group_size: int,
                           col_scale: Optional[Tensor] = None) -> Tensor:
    """Plain-torch `dequantize_codes` (fallback, and the TorchScript path): the int8 codes widen
    inside the multiplication, so no float32 copy of the codes is made."""
    out_features, in_features = qweight.shape
    groups = in_features // group_size
    w = qweight.view(out_features, groups, group_size) * scale.unsqueeze(-1)
    if zero is not None:
        w.sub_((zero.to(torch.float32) * scale).unsqueeze(-1))
    w = w.view(out_features, in_features)
    if col_scale is not None:
        members = col_scale.shape[0]
        w.view(members, out_features // members, in_features).div_(col_scale.unsqueeze(1))
    return w
