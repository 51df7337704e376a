"""Turn an FP32 ANI model into its quantized runtime form according to a plan."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor
from torchani.arch import ANI

from nnpq.models.layers import HALF_DTYPES, HalfLinear, QuantizedLinear
from nnpq.models.runtime import LayerKey, replace_layers
from nnpq.quant.formats import TensorFormat
from nnpq.quant.plan import QuantPlan
from nnpq.quant.quantizers import QuantizedWeight, quantize_nearest

# A weight quantizer sees the layer's key, its FP32 weight and the target format.
WeightQuantizer = Callable[[LayerKey, Tensor, TensorFormat], QuantizedWeight]


def nearest(key: LayerKey, weight: Tensor, fmt: TensorFormat) -> QuantizedWeight:
    """Round to nearest on the min-max grid; needs no calibration data."""
    return quantize_nearest(weight, fmt)


def quantize_model(fp32: ANI, plan: QuantPlan, quantizer: WeightQuantizer = nearest) -> ANI:
    """A copy of ``fp32`` with each layer stored as ``plan`` says; ``fp32`` is left untouched."""

    def make(key: LayerKey, fmt: TensorFormat, linear: torch.nn.Linear) -> torch.nn.Module:
        if fmt.kind in HALF_DTYPES:
            layer = HalfLinear(linear.in_features, linear.out_features, HALF_DTYPES[fmt.kind])
            layer.weight.copy_(linear.weight.detach().to(HALF_DTYPES[fmt.kind]))
        else:
            qw = quantizer(key, linear.weight.detach(), fmt)
            layer = QuantizedLinear(linear.in_features, linear.out_features, qw.scale.shape[0], qw.group_size,
                                    fmt.symmetric)
            layer.qweight.copy_(qw.qweight)
            layer.scale.copy_(qw.scale)
            layer.zero.copy_(qw.zero)
        layer.bias.copy_(linear.bias.detach())
        return layer

    return replace_layers(copy.deepcopy(fp32), plan, make).eval()
