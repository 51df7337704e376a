"""Input equalization of a layer before rounding, folded into the quantized layer.

The 1008 AEV features that feed each element's first layer span very different ranges, so
one scale per group of weights fits some columns badly. We round ``W diag(s)`` instead of
``W`` and divide the dequantized columns by ``s`` (`dequantize_weight`'s ``col_scale``):
``W x = (W diag(s)) (x / s)``. ``s`` is the RMS of each input feature to a power alpha,
chosen per layer among a few values by the force-aware rounding objective, and bounded: the
objective gives no weight to features calibration never excites, so their factors must not be
free to shrink (round away) or blow up (amplify) their columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nnpq.spec.formats import TensorFormat
from nnpq.quant.gptq import gptq_quantize
from nnpq.quant.quantizers import QuantizedWeight, quantize_nearest
from nnpq.quant.stats import LayerStats

ALPHAS = (0.0, 0.25, 0.5)
MAX_FACTOR = 4.0  # equalization never rescales a column by more than this, either way


def equalization_factors(rms: Tensor, alpha: float) -> Tensor:
    """Per-input factors ``rms**alpha`` normalized to a mean of 1 over excited inputs, bounded to
    [1/MAX_FACTOR, MAX_FACTOR]. Inputs calibration never excites get 1: their weights are
    rounded as they are, neither shrunk towards zero nor amplified by an unseen scale."""
    seen = rms > 0
    s = torch.ones_like(rms)
    if alpha == 0 or not bool(seen.any()):
        return s
    powered = rms[seen] ** alpha
    s[seen] = (powered / powered.mean()).clamp(1.0 / MAX_FACTOR, MAX_FACTOR)
    return s


def equalized_quantize(weight: Tensor, fmt: TensorFormat, stats: LayerStats, force_weight: float, damp: float,
                       method: str = "gptq") -> QuantizedWeight:
    """Round ``weight`` (out, in) with input equalization; returns codes with ``col_scale`` set.

    The equalization strength alpha (0 = none) minimizing tr(dW H dW^T) of the effective weight
    error, with H the force-aware layer-input Hessian, is kept.
    """
    hessian = stats.hessian(force_weight)
    rms = torch.sqrt(torch.diag(stats.xx) / max(stats.count, 1))
    w64 = weight.detach().to(torch.float64)
    best, best_loss = None, float("inf")
    for alpha in ALPHAS:
        # on the bfloat16 grid, so a model file stores them in 2 bytes each (any factor works)
        s = equalization_factors(rms, alpha).to(torch.bfloat16).to(torch.float32)
        scaled = weight.detach() * s
        if method == "gptq":
            s64 = s.to(torch.float64)
            qw = gptq_quantize(scaled, hessian / s64[:, None] / s64[None, :], fmt, damp)
        else:
            qw = quantize_nearest(scaled, fmt)
        qw.col_scale = s
        d = qw.dequantize().to(torch.float64) - w64
        loss = float(torch.sum((d @ hessian) * d))
        if loss < best_loss:
            best, best_loss = qw, loss
    assert best is not None
    return best
