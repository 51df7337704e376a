"""Weight-only integer linear algebra, TorchScript-compatible.

Weights stay int8 in memory (codes of 2-8 bits) with float32 scales and zero points laid
out as ``(rows, groups)``: rows is 1 (per tensor) or ``out_features``, and each group
covers ``group_size`` consecutive inputs. The weight is expanded to float32 inside the
call, so the energy stays a smooth function of the inputs and autograd gives forces that
are its exact gradient.
"""

import torch
from torch import Tensor


def dequantize_weight(qweight: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                      col_scale: Tensor | None = None) -> Tensor:
    """Float32 weight ``(q - zero) * scale / col_scale`` of shape ``(out, in)`` from int8 codes.

    ``col_scale`` (one factor per input, or a single 1) undoes input equalization: the codes
    quantize ``W diag(col_scale)``, whose columns have more even ranges than ``W``'s.
    """
    out_features, in_features = qweight.shape
    groups = in_features // group_size
    q = qweight.to(torch.float32).view(out_features, groups, group_size)
    w = ((q - zero.to(torch.float32).unsqueeze(-1)) * scale.unsqueeze(-1)).view(out_features, in_features)
    if col_scale is not None:
        w = w / col_scale
    return w


def int_weight_linear(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor,
                      group_size: int, bias: Tensor | None, col_scale: Tensor | None = None) -> Tensor:
    """``x @ W.T + bias`` with ``W`` held as integer codes."""
    return torch.nn.functional.linear(x, dequantize_weight(qweight, scale, zero, group_size, col_scale), bias)


def fake_quantize_activation(x: Tensor, static_scale: Tensor, dynamic: bool) -> Tensor:
    """Round ``x`` to symmetric INT8 (per row when ``dynamic``, else with ``static_scale``).

    The value is the rounded one; the gradient passes straight through (the rounding's
    derivative, zero almost everywhere, is replaced by 1), so forces stay informative but
    are not the exact gradient of the rounded energy.
    """
    if dynamic:
        scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    else:
        scale = static_scale
    rounded = torch.clamp(torch.round(x / scale), -127.0, 127.0) * scale
    return x + (rounded - x).detach()
