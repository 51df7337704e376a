"""CPU kernels of the fused runtime, each beside the plain-torch reference it is tested against.

W8A8 products run on ``torch._int_mm`` (int8 x int8 -> exact int32; VNNI on x86), with the
activations rounded to symmetric INT8 per row and per input block (one scale for each row of
each block of columns), so a block of small features (the AEV's angular terms) is not rounded
on the scale of a block of large ones (its radial terms). The weight is symmetric INT8 with one
scale per output row and block. The int32 partial products of the blocks are rescaled and
summed in float32; the bias is added in the same pass.

Rounding the activations makes a product piecewise constant in its input: these kernels serve
the ``fast`` mode only. The ``exact`` mode multiplies float32 activations by weights dequantized
with `nnpq.kernels.int8.dequantize_weight`.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127.0


def block_bounds(width: int, blocks: list[int]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of consecutive column blocks of the given widths, which must add up to ``width``."""
    if sum(blocks) != width or any(b <= 0 for b in blocks):
        raise ValueError(f"blocks {blocks} do not tile {width} columns")
    bounds, start = [], 0
    for b in blocks:
        bounds.append((start, start + b))
        start += b
    return bounds


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric INT8 codes of ``x`` ``(M, K)`` with one scale per row: ``x ~ codes * scale``."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / INT8_MAX
    codes = torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def quantize_weight_blocks(weight: Tensor, blocks: list[int]) -> tuple[list[Tensor], Tensor]:
    """Symmetric INT8 codes of ``weight`` ``(N, K)``, one scale per output row and column block.

    Returns the codes of each block (``(N, K_b)``, contiguous) and the scales ``(N, blocks)``.
    """
    codes, scales = [], []
    for start, stop in block_bounds(weight.shape[1], blocks):
        q, s = quantize_rows(weight[:, start:stop])
        codes.append(q.contiguous())
        scales.append(s)
    return codes, torch.cat(scales, dim=1)


def int8_linear(x: Tensor, codes: list[Tensor], w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ W.T + bias`` on ``torch._int_mm``, ``W`` as block codes ``(N, K_b)`` and scales ``(N, blocks)``.

    ``x`` ``(M, K)`` float32 is rounded to INT8 per row and block. Result ``(M, N)`` float32.
    """
    out: Tensor | None = None
    start = 0
    for b, q_w in enumerate(codes):
        stop = start + q_w.shape[1]
        q_x, s_x = quantize_rows(x[:, start:stop])
        part = torch._int_mm(q_x, q_w.t()).to(torch.float32).mul_(s_x).mul_(w_scale[:, b])
        out = part if out is None else out.add_(part)
        start = stop
    assert out is not None
    return out if bias is None else out.add_(bias)


def int8_linear_reference(x: Tensor, codes: list[Tensor], w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """Plain-torch `int8_linear`: the same roundings, dequantized, in a float64 matmul."""
    xs, ws, start = [], [], 0
    for b, q_w in enumerate(codes):
        stop = start + q_w.shape[1]
        q_x, s_x = quantize_rows(x[:, start:stop])
        xs.append(q_x.double() * s_x.double())
        ws.append(q_w.double() * w_scale[:, b:b + 1].double())
        start = stop
    out = torch.cat(xs, 1) @ torch.cat(ws, 1).t()
    return (out if bias is None else out + bias.double()).to(torch.float32)


def int8_input_grad(grad_out: Tensor, codes: list[Tensor], w_scale: Tensor) -> Tensor:
    """``grad_out @ W`` (the input gradient of `int8_linear`'s product) on ``torch._int_mm``.

    ``W``'s row scales lie on the reduction axis, so they are folded into ``grad_out`` (exact),
    which is then rounded to INT8 per row and block. Result ``(M, K)`` float32.
    """
    parts = []
    for b, q_w in enumerate(codes):
        q_g, s_g = quantize_rows(grad_out * w_scale[:, b])
        parts.append(torch._int_mm(q_g, q_w).to(torch.float32).mul_(s_g))
    return torch.cat(parts, dim=1)


def int8_input_grad_reference(grad_out: Tensor, codes: list[Tensor], w_scale: Tensor) -> Tensor:
    """Plain-torch `int8_input_grad`: the same roundings in float64."""
    parts = []
    for b, q_w in enumerate(codes):
        q_g, s_g = quantize_rows(grad_out * w_scale[:, b])
        parts.append((q_g.double() * s_g.double()) @ q_w.double())
    return torch.cat(parts, dim=1).to(torch.float32)


def celu_slope(y: Tensor, alpha: float) -> Tensor:
    """``d celu(z) / dz`` from the output ``y = celu(z)``: 1 where ``z > 0``, else ``y / alpha + 1``."""
    return torch.where(y > 0, torch.ones_like(y), y / alpha + 1.0)
