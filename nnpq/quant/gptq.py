"""Error-compensating rounding (GPTQ): round one input column at a time and push each
column's rounding error onto the columns not yet rounded, weighted by the inverse of a
layer-input Hessian H. With H built from force tangents (`LayerStats.hessian`), the
rounding minimizes the force error proxy instead of the layer-output error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nnpq.quant.quantizers import QuantizedWeight, quant_params
from nnpq.spec.formats import TensorFormat, code_range

BLOCK = 128


def gptq_quantize(weight: Tensor, hessian: Tensor, fmt: TensorFormat, damp: float = 0.01) -> QuantizedWeight:
    """Quantize ``weight`` (out, in) to ``fmt`` minimizing tr(dW H dW^T).

    Scales follow the format (per tensor / channel from the original weight; per group
    from the partly updated weight when the group starts), as in the GPTQ paper.
    """
    w = weight.detach().to(torch.float64).clone()
    out_features, n = w.shape
    h = hessian.to(torch.float64).clone()
    # Inputs that calibration rarely or never excites (AEV features of element pairs and angles
    # absent from it) do fire in other molecules: they must keep their round-to-nearest weights.
    # Damping by a fraction of the mean diagonal is negligible for well-excited inputs and
    # dominates for barely-excited ones, so no rounding error is pushed into the latter.
    h += damp * max(float(torch.mean(torch.diag(h))), 1e-30) * torch.eye(n, dtype=torch.float64)
    chol = torch.linalg.cholesky(h)
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)

    lo, hi = code_range(fmt)
    grouped = fmt.granularity == "group"
    group_size = fmt.group_size_for(n)
    if grouped:
        scale = torch.zeros(out_features, n // group_size, dtype=torch.float64)
        zero = torch.zeros_like(scale)
    else:
        s, z, _ = quant_params(w, fmt)
        scale, zero = s.to(torch.float64), z.to(torch.float64)
    q = torch.zeros(out_features, n, dtype=torch.int8)
    # lazy batch updates: errors are pushed within a block of columns at once, and onto the
    # remaining columns with one matrix product per block (same result, far less memory traffic)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        block = w[:, b0:b1].clone()
        errors = torch.zeros_like(block)
        for j in range(b1 - b0):
            i = b0 + j
            g = i // group_size
            if grouped and i % group_size == 0:
                # group scales from the partly updated weights, as in GPTQ with groups
                upcoming = torch.cat([block[:, j:], w[:, b1:]], dim=1)[:, :group_size]
                s, z, _ = quant_params(upcoming, TensorFormat("int", fmt.bits, "channel", 0, fmt.symmetric))
                scale[:, g], zero[:, g] = s[:, 0].to(torch.float64), z[:, 0].to(torch.float64)
            s_col = scale[:, g] if scale.shape[0] > 1 else scale[0, g].expand(out_features)
            z_col = zero[:, g] if zero.shape[0] > 1 else zero[0, g].expand(out_features)
            # round with the float32 scale the runtime will use, so codes and dequantization agree
            s32 = s_col.to(torch.float32).to(torch.float64)
            code = torch.clamp(torch.round(block[:, j] / s32 + z_col), lo, hi)
            err = (block[:, j] - (code - z_col) * s32) / u[i, i]
            block[:, j + 1:] -= err.unsqueeze(1) * u[i, i + 1:b1].unsqueeze(0)
            errors[:, j] = err
            q[:, i] = code.to(torch.int8)
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    zero_out = torch.zeros(1, 1, dtype=torch.int8) if fmt.symmetric else zero.to(torch.int8)
    return QuantizedWeight(q, scale.to(torch.float32).contiguous(), zero_out.contiguous(), group_size)
