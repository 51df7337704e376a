"""The quantized runtime: a TorchANI model whose Linear layers follow a quantization plan.

The network around the layers (AEV computer, self energies, ensemble averaging) is
TorchANI's own, so the quantized model differs from FP32 only where the plan says.
"""

from __future__ import annotations

from typing import Callable

import torch
from torchani.arch import ANI

from nnpq.models.fp32 import assemble_architecture, hidden_and_final_layers
from nnpq.models.layers import empty_layer
from nnpq.spec.formats import TensorFormat
from nnpq.spec.plan import QuantPlan

LayerKey = tuple[int, str, int]
LayerFactory = Callable[[LayerKey, TensorFormat, torch.nn.Linear], torch.nn.Module]


def replace_layers(model: ANI, plan: QuantPlan, make: LayerFactory, only_layer: int | None = None) -> ANI:
    """Swap every Linear layer that the plan does not keep in FP32 for ``make(key, fmt, linear)``.

    With ``only_layer``, only layers of that depth are swapped (sequential rounding).
    """
    for (member, element, layer), linear in hidden_and_final_layers(model).items():
        fmt = plan.format_for(member, element, layer)
        if fmt.kind == "fp32" or (only_layer is not None and layer != only_layer):
            continue
        net = model.neural_networks.members[member].atomics[element]
        new = make((member, element, layer), fmt, linear)
        if layer < len(net.layers):
            net.layers[layer] = new
        else:
            net.final_layer = new
    return model


def empty_runtime(model_name: str, plan: QuantPlan, neighborlist: str = "all_pairs") -> ANI:
    """The quantized model of ``plan`` with unfilled layers; its state dict is the layout an artifact stores."""
    model = assemble_architecture(model_name, neighborlist)
    return replace_layers(model, plan, lambda key, fmt, lin: empty_layer(
        fmt, lin.in_features, lin.out_features, plan.activation_for(*key), plan.equalize_for(*key)))


def build_runtime(model_name: str, plan: QuantPlan, state: dict[str, torch.Tensor],
                  neighborlist: str = "all_pairs") -> ANI:
    """Rebuild a quantized model from its plan and tensors (as stored in an artifact)."""
    model = empty_runtime(model_name, plan, neighborlist)
    model.load_state_dict(state, strict=True)
    return model.eval()
