"""Plain-torch references of the Triton INT8 kernels (`nnpq.kernels.triton_int8`).

Each function states, in float32/float64 torch arithmetic on any device, what its kernel
computes, so the kernels can be tested against it (on the CPU through Triton's interpreter,
on a GPU directly). Units follow the caller (ANI: AEV features in, Hartree-scaled hidden
activations out); nothing here knows about chemistry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nnpq.kernels.int8 import dequantize_weight

# CELU's alpha in every ANI hidden layer
ANI_CELU_ALPHA = 0.1


def celu_grad_from_output(y: Tensor, alpha: float) -> Tensor:
    """dCELU/dz from the layer's *output* ``y = celu(z)``: 1 where ``z > 0``, ``y/alpha + 1`` (= exp(z/alpha)) elsewhere.

    The explicit backward needs only the stored output, not the pre-activation.
    """
    return torch.where(y > 0, torch.ones_like(y), y / alpha + 1.0)


def _epilogue(y: Tensor, bias: Tensor | None, celu_alpha: float | None) -> Tensor:
    if bias is not None:
        y = y + bias.to(torch.float32)
    if celu_alpha is not None:
        y = torch.nn.functional.celu(y, alpha=celu_alpha)
    return y


def w8_linear_reference(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int,
                        bias: Tensor | None = None, col_scale: Tensor | None = None,
                        celu_alpha: float | None = None) -> Tensor:
    """Float32 ``celu(x W^T + b)`` with ``W = ((q - zero) * scale) / col_scale`` (see `dequantize_weight`)."""
    if zero is None:
        zero = torch.zeros(1, 1, dtype=torch.int8, device=qweight.device)
    w = dequantize_weight(qweight, scale, zero, group_size, col_scale)
    return _epilogue(x.to(torch.float32) @ w.T, bias, celu_alpha)


def w8_linear_input_grad_reference(grad_y: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None,
                                   group_size: int, col_scale: Tensor | None = None,
                                   celu_output: Tensor | None = None, celu_alpha: float | None = None) -> Tensor:
    """Float32 ``dE/dx = (grad_y * celu'(z)) @ W`` for ``y = celu(x W^T + b)``; without ``celu_output``, ``grad_y @ W``."""
    if zero is None:
        zero = torch.zeros(1, 1, dtype=torch.int8, device=qweight.device)
    g = grad_y.to(torch.float32)
    if celu_output is not None:
        g = g * celu_grad_from_output(celu_output.to(torch.float32), celu_alpha)
    return g @ dequantize_weight(qweight, scale, zero, group_size, col_scale)


def segment_bounds(in_features: int, act_splits: Sequence[int] = ()) -> tuple[int, ...]:
    """``(0, *act_splits, in_features)``: the K ranges that get their own activation scale per row."""
    return (0, *tuple(int(s) for s in act_splits), in_features)


def quantize_rows(x: Tensor, act_splits: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
    """Symmetric INT8 codes of ``x`` (M, K) with one scale per row and K segment, as the W8A8 kernel rounds them.

    Returns ``(codes int8 (M, K), scales float32 (M, segments))`` with ``x ~ codes * scale``,
    ``scale = absmax / 127`` (absmax clamped to 1e-12) and ``codes = round(x * (127 / absmax))``,
    rounding half to even. Multiplying by the reciprocal (not dividing by the scale, as
    `fake_quantize_activation` does) keeps the kernel's inner loop free of divisions; the codes
    differ only where ``x / scale`` lies within an ulp of a rounding boundary.
    """
    x = x.to(torch.float32)
    bounds = segment_bounds(x.shape[1], act_splits)
    codes, scales = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        seg = x[:, lo:hi]
        amax = seg.abs().amax(dim=1).clamp_min(1e-12)
        # an explicit tensor division: torch evaluates `127.0 / t` as reciprocal-then-multiply
        inv = torch.full_like(amax, 127.0) / amax
        codes.append(torch.clamp(torch.round(seg * inv[:, None]), -127.0, 127.0).to(torch.int8))
        scales.append(amax / 127.0)
    return torch.cat(codes, dim=1), torch.stack(scales, dim=1)


def w8a8_linear_reference(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None = None,
                          celu_alpha: float | None = None, act_splits: Sequence[int] = ()) -> Tensor:
    """Float32 ``celu(sum_s (xq_s @ q_s^T) * xscale_s * wscale + b)`` with `quantize_rows` activations.

    The integer products are exact (float64 holds every int32 sum); the float32 rescale runs
    in the kernel's order: per segment ``acc += int_sum * row_scale``, then ``acc * wscale``.
    """
    codes, xscales = quantize_rows(x, act_splits)
    bounds = segment_bounds(x.shape[1], act_splits)
    acc = torch.zeros(x.shape[0], qweight.shape[0], dtype=torch.float32, device=x.device)
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        isum = codes[:, lo:hi].to(torch.float64) @ qweight[:, lo:hi].to(torch.float64).T
        acc = acc + isum.to(torch.float32) * xscales[:, s:s + 1]
    return _epilogue(acc * wscale.reshape(1, -1).to(torch.float32), bias, celu_alpha)


def dot_error_bound(a: Tensor, b: Tensor, relative: float) -> Tensor:
    """``relative * (|a| @ |b|)`` in float64: the error allowed when the terms of ``a @ b`` carry ``relative`` error each."""
    return relative * (a.abs().to(torch.float64) @ b.abs().to(torch.float64))
