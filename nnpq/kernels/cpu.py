"""CPU kernels of the fused runtime, each beside the plain-torch reference it is tested against.

W8A8 products run on ``torch._int_mm`` (int8 x int8 -> exact int32; VNNI/AMX on x86). The
weight is symmetric INT8 with one scale per output row and block of columns. The activation
of each row is split into INT8 *planes* sharing one scale: the first rounds it, the second
rounds what the first left, 254 times finer, so two planes carry ~15 bits, and the planes are
stacked as rows of one product. One plane (plain per-row W8A8) loses the small AEV features:
on held-out drug-like molecules it erred 2.2 kcal/mol/Å against FP32 where the weight-only
model erred 1.06; two planes 1.06 (0.01 from the weight-only forces). The int32 products
are rescaled in float32.

Rounding the activations makes a product piecewise constant in its input: the W8A8 kernels
serve the ``fast`` mode only. The ``exact`` mode multiplies float32 activations by weights
that `dequantize_codes` expands per call (reference: `nnpq.kernels.int8.dequantize_weight`).
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127.0
PLANE_RATIO = 254.0  # a plane's remainder lies in [-0.5, 0.5] of its step: the next plane's step is 1/254 of it


def _row_scale(x: Tensor) -> Tensor:
    """``max |x|`` of each row ``/ 127`` as ``(M, 1)``: one pass (min and max together), no ``|x|`` copy."""
    low, high = torch.aminmax(x, dim=1, keepdim=True)
    return torch.maximum(high, low.neg()).clamp_min_(1e-30).div_(INT8_MAX)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric INT8 codes of ``x`` ``(M, K)`` with one scale per row: ``x ~ codes * scale``."""
    scale = _row_scale(x)
    codes = torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def quantize_weight_blocks(weight: Tensor, width: int) -> tuple[list[Tensor], Tensor]:
    """Symmetric INT8 codes of ``weight`` ``(N, K)``, one scale per output row and block of ``width`` columns.

    Returns the codes of each block (``(N, width)``, contiguous) and the scales ``(N, K // width)``.
    """
    codes, scales = [], []
    for start in range(0, weight.shape[1], width):
        q, s = quantize_rows(weight[:, start:start + width])
        codes.append(q.contiguous())
        scales.append(s)
    return codes, torch.cat(scales, dim=1)


def quantize_planes(x: Tensor, planes: int) -> tuple[Tensor, Tensor]:
    """``x`` ``(M, K)`` as ``planes`` stacked INT8 codes ``(planes * M, K)`` and row scales ``(M, 1)``.

    ``x ~ scale * sum_p codes[p] / 254**p``: each plane rounds what the planes before it left,
    so two planes carry ~15 bits per row at the cost of a product with twice the rows.
    """
    m = x.shape[0]
    scale = _row_scale(x)
    t = x * scale.reciprocal()  # |t| <= 127
    codes = torch.empty(planes * m, x.shape[1], dtype=torch.int8, device=x.device)
    for p in range(planes):
        q = torch.round(t)
        codes[p * m:(p + 1) * m].copy_(q)
        if p + 1 < planes:
            t = t.sub_(q).mul_(PLANE_RATIO)
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


def _sum_planes(products: Tensor, planes: int) -> Tensor:
    """``sum_p products[p] / 254**p`` of an int32 ``(planes * M, N)`` product, float32 ``(M, N)``."""
    parts = products.to(torch.float32).view(planes, products.shape[0] // planes, products.shape[1])
    out = parts[planes - 1]
    for p in range(planes - 2, -1, -1):
        out = torch.add(parts[p], out, alpha=1.0 / PLANE_RATIO)
    return out


def _dequantize_planes(codes: Tensor, scale: Tensor, planes: int) -> Tensor:
    """Float64 value of `quantize_planes`' output (for the references)."""
    parts = codes.double().view(planes, -1, codes.shape[1])
    weights = torch.tensor([PLANE_RATIO ** -p for p in range(planes)], dtype=torch.float64).view(planes, 1, 1)
    return (parts * weights).sum(0) * scale.double()


def int8_linear(x: Tensor, codes: list[Tensor], w_scale: Tensor, bias: Tensor | None, planes: int = 1) -> Tensor:
    """``x @ W.T + bias`` on ``torch._int_mm``, ``W`` as block codes ``(N, K_b)`` and scales ``(N, blocks)``.

    ``x`` ``(M, K)`` float32 is rounded to ``planes`` INT8 planes per row and block, stacked as
    rows of one product per block. Result ``(M, N)`` float32.
    """
    out: Tensor | None = None
    start = 0
    for b, q_w in enumerate(codes):
        stop = start + q_w.shape[1]
        q_x, s_x = quantize_planes(x[:, start:stop], planes)
        part = _sum_planes(int_mm(q_x, q_w.t()), planes).mul_(s_x).mul_(w_scale[:, b])
        out = part if out is None else out.add_(part)
        start = stop
    assert out is not None
    return out if bias is None else out.add_(bias)


def int8_linear_reference(x: Tensor, codes: list[Tensor], w_scale: Tensor, bias: Tensor | None,
                          planes: int = 1) -> Tensor:
    """Plain-torch `int8_linear`: the same roundings, dequantized, in a float64 matmul."""
    xs, ws, start = [], [], 0
    for b, q_w in enumerate(codes):
        stop = start + q_w.shape[1]
        xs.append(_dequantize_planes(*quantize_planes(x[:, start:stop], planes), planes))
        ws.append(q_w.double() * w_scale[:, b:b + 1].double())
        start = stop
    out = torch.cat(xs, 1) @ torch.cat(ws, 1).t()
    return (out if bias is None else out + bias.double()).to(torch.float32)


def int8_input_grad(grad_out: Tensor, codes: list[Tensor], w_scale: Tensor, planes: int = 1) -> Tensor:
    """``grad_out @ W`` (the input gradient of `int8_linear`'s product) on ``torch._int_mm``.

    ``W``'s row scales lie on the reduction axis, so they are folded into ``grad_out`` (exact),
    which is then rounded to ``planes`` INT8 planes per row. Result ``(M, K)`` float32.
    """
    parts = []
    for b, q_w in enumerate(codes):
        q_g, s_g = quantize_planes(grad_out * w_scale[:, b], planes)
        parts.append(_sum_planes(int_mm(q_g, q_w), planes).mul_(s_g))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def int8_input_grad_reference(grad_out: Tensor, codes: list[Tensor], w_scale: Tensor, planes: int = 1) -> Tensor:
    """Plain-torch `int8_input_grad`: the same roundings in float64."""
    parts = []
    for b, q_w in enumerate(codes):
        g = _dequantize_planes(*quantize_planes(grad_out * w_scale[:, b], planes), planes)
        parts.append(g @ q_w.double())
    return torch.cat(parts, dim=1).to(torch.float32)


def celu_slope(y: Tensor, alpha: float) -> Tensor:
    """``d celu(z) / dz`` from the output ``y = celu(z)``: 1 where ``z > 0``, else ``y / alpha + 1``.

    ``y / alpha + 1`` exceeds 1 exactly where ``y > 0``, so clamping it at 1 gives both branches.
    """
    return y.mul(1.0 / alpha).add_(1.0).clamp_(max=1.0)


def celu_slope_reference(y: Tensor, alpha: float) -> Tensor:
    """Plain-torch `celu_slope`: the two branches written out."""
    return torch.where(y > 0, torch.ones_like(y), y / alpha + 1.0)


def dequantize_codes(qweight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int) -> Tensor:
    """Float32 ``(q - zero) * scale`` ``(out, in)`` from int8 codes, scales ``(rows, groups)``, zero points.

    The int8 codes are widened inside the multiplication (one pass, no float32 copy of the
    codes); an asymmetric format subtracts ``zero * scale`` per group in place.
    Reference: `nnpq.kernels.int8.dequantize_weight`.
    """
    out_features, in_features = qweight.shape
    groups = in_features // group_size
    w = qweight.view(out_features, groups, group_size) * scale.unsqueeze(-1)
    if zero is not None:
        w.sub_((zero.to(torch.float32) * scale).unsqueeze(-1))
    return w.view(out_features, in_features)
