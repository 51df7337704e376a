"""Turn an FP32 ANI model into its quantized runtime form according to a plan.

Two roundings: ``nearest`` (min-max grid, no data needed) and ``gptq`` (error-compensating,
layer by layer in network order, each layer's statistics gathered on the model whose
earlier layers are already rounded, so later layers compensate earlier errors).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torchani.arch import ANI

from nnpq.errors import NnpqError
from nnpq.models.layers import HALF_DTYPES, HalfLinear, QuantizedLinear
from nnpq.models.fp32 import n_layers
from nnpq.models.runtime import LayerKey, replace_layers
from nnpq.spec.formats import TensorFormat
from nnpq.quant.equalize import equalized_quantize
from nnpq.quant.gptq import gptq_quantize
from nnpq.spec.plan import QuantPlan
from nnpq.quant.quantizers import QuantizedWeight, quantize_nearest
from nnpq.quant.stats import LayerStats, activation_scale, collect_layer_stats
from nnpq.structures import Configuration

ROUNDINGS = ("nearest", "gptq")

# A weight quantizer sees the layer's key, its FP32 weight and the target format.
WeightQuantizer = Callable[[LayerKey, Tensor, TensorFormat], QuantizedWeight]


@dataclass(frozen=True)
class RoundingSettings:
    """How weights are rounded.

    Attributes:
        method: ``nearest`` or ``gptq``.
        force_weight: GPTQ Hessian mix, 0 = layer outputs only, 1 = force tangents only.
        bias_correction: add ``(W - W_q) E[x]`` to the bias so the mean output is unbiased.
        tangents: random tangent directions per calibration configuration.
        damp: GPTQ damping, relative to the mean Hessian diagonal.
    """

    method: str = "gptq"
    force_weight: float = 0.5
    bias_correction: bool = False
    tangents: int = 1
    damp: float = 1e-2

    def __post_init__(self) -> None:
        if self.method not in ROUNDINGS:
            raise NnpqError(f"unknown rounding '{self.method}'; use one of {', '.join(ROUNDINGS)}")


def nearest(key: LayerKey, weight: Tensor, fmt: TensorFormat) -> QuantizedWeight:
    """Round to nearest on the min-max grid; needs no calibration data."""
    return quantize_nearest(weight, fmt)


def round_weight(weight: Tensor, fmt: TensorFormat, stats: LayerStats | None, rounding: RoundingSettings,
                 equalize: bool, damp: float) -> QuantizedWeight:
    """``weight`` (out, in) rounded to the integer ``fmt`` as a plan says: with input equalization,
    by GPTQ at damping ``damp``, or to nearest (the method says so, or there are no ``stats``: the
    element is absent from the calibration data)."""
    if stats is None or (rounding.method == "nearest" and not equalize):
        return quantize_nearest(weight, fmt)
    if equalize:
        return equalized_quantize(weight, fmt, stats, rounding.force_weight, damp, rounding.method)
    return gptq_quantize(weight, stats.hessian(rounding.force_weight), fmt, damp)


def _layer_maker(plan: QuantPlan, quantizer: WeightQuantizer,
                 stats: dict[tuple[int, str], LayerStats] | None = None, bias_correction: bool = False):
    def make(key: LayerKey, fmt: TensorFormat, linear: torch.nn.Linear) -> torch.nn.Module:
        bias = linear.bias.detach().clone()
        if fmt.kind in HALF_DTYPES:
            layer = HalfLinear(linear.in_features, linear.out_features, HALF_DTYPES[fmt.kind])
            layer.weight.copy_(linear.weight.detach().to(HALF_DTYPES[fmt.kind]))
            layer.bias.copy_(bias)
            return layer
        qw = quantizer(key, linear.weight.detach(), fmt)
        if bias_correction and stats is not None and key[:2] in stats:
            shift = (linear.weight.detach().to(torch.float64) - qw.dequantize().to(torch.float64)) @ stats[key[:2]].mean
            bias = bias + shift.to(bias.dtype)
        activation = plan.activation_for(*key)
        layer = QuantizedLinear(linear.in_features, linear.out_features, qw.scale.shape[0], qw.group_size,
                                fmt.symmetric, activation, equalized=qw.col_scale is not None)
        if qw.col_scale is not None:
            layer.col_scale.copy_(qw.col_scale)
        if activation.mode == "static":
            if stats is None or key[:2] not in stats:
                raise NnpqError("static activation ranges need calibration data with every element of the model")
            layer.act_scale.fill_(activation_scale(stats[key[:2]], activation.range, activation.percentile))
        layer.qweight.copy_(qw.qweight)
        layer.scale.copy_(qw.scale)
        layer.zero.copy_(qw.zero)
        layer.bias.copy_(bias)
        return layer

    return make


def quantize_model(fp32: ANI, plan: QuantPlan, rounding: RoundingSettings = RoundingSettings("nearest"),
                   calibration: list[Configuration] | None = None, seed: int = 0, sequential: bool = True) -> ANI:
    """A copy of ``fp32`` with each layer stored as ``plan`` says; ``fp32`` is left untouched.

    ``sequential``: each layer's statistics are gathered on the model whose earlier layers are
    already rounded, so that it compensates their errors; otherwise on ``fp32``, so that every
    layer is rounded exactly as `nnpq.quant.sensitivity` rounded it alone (the model is the plan
    that was measured)."""
    model = copy.deepcopy(fp32)
    keys = [(m, e) for m, member in enumerate(model.neural_networks.members) for e in member.atomics]
    needs_data = any(plan.activation_for(m, e, layer).mode == "static" or plan.equalize_for(m, e, layer)
                     for m, e in keys for layer in range(n_layers(model)))
    if rounding.method == "nearest" and not needs_data:
        return replace_layers(model, plan, _layer_maker(plan, nearest)).eval()
    if not calibration:
        raise NnpqError("GPTQ rounding, input equalization and static activation ranges need calibration "
                        "configurations")
    for layer in range(n_layers(model)):
        if all(not plan.format_for(m, e, layer).is_integer for m, e in keys):
            replace_layers(model, plan, _layer_maker(plan, nearest), only_layer=layer)  # fp16/bf16 need no data
            continue
        stats = collect_layer_stats(model if sequential else fp32, layer, calibration, rounding.tangents, seed + layer)

        def quantizer(key: LayerKey, weight: Tensor, fmt: TensorFormat) -> QuantizedWeight:
            layer_rounding = RoundingSettings("nearest") if plan.rounds_to_nearest(*key) else rounding
            return round_weight(weight, fmt, stats.get(key[:2]), layer_rounding, plan.equalize_for(*key),
                                plan.damp_for(*key) or rounding.damp)

        replace_layers(model, plan, _layer_maker(plan, quantizer, stats, rounding.bias_correction), only_layer=layer)
    return model.eval()
