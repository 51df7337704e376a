"""Time per (element, layer, format) unit in the runtime, for ``nnpq quantize --objective latency``.

Each unit is timed as the runtime executes it in one energy+forces call on this machine, with
``atoms`` atoms of its element: in the ``exact`` mode, building the float32 weight from its
storage format (nothing for FP32, a cast for fp16/bf16, dequantization for integer codes) and
the forward and input-gradient products; in the ``fast`` mode, layer 0's INT8 products
(`nnpq.runtime.network.SplitInt8Linear`: two per pass for symmetric per-channel codes without
equalization, three otherwise) and nothing that depends on the format for later layers, which
the fast mode keeps resident in bfloat16/float32. Values are medians in milliseconds.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import Tensor

from nnpq.runtime.network import CELU_ALPHA, DenseWeight, HALF_DTYPES, IntWeight, SplitInt8Linear, StackedLayer
from nnpq.quant.quantizers import quantize_nearest
from nnpq.quant.sensitivity import Unit
from nnpq.spec.formats import TensorFormat



def _stored_layer(weight: Tensor, bias: Tensor, fmt: TensorFormat, members: int, equalized: bool) -> StackedLayer:
    """The runtime layer of ``weight`` ``(members * out, in)`` in ``fmt``, rounded to nearest (values
    like the real ones, so activations, and the time of CELU's exponentials, are realistic)."""
    if not fmt.is_integer:
        return StackedLayer([DenseWeight(weight.to(HALF_DTYPES.get(fmt.kind, torch.float32)))], bias)
    q = quantize_nearest(weight, fmt)
    rows = weight.shape[0]
    zero = None if fmt.symmetric else q.zero.expand(rows, -1).contiguous()
    col = torch.ones(members, weight.shape[1]) if equalized else None
    return StackedLayer([IntWeight(q.qweight, q.scale.expand(rows, -1).contiguous(), zero, col, q.group_size,
                                   members)], bias)


def _interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each call, timed in turn in every round so drifts hit all alike."""
    for call in calls.values():  # first calls: allocation
        call()
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        for label, call in calls.items():
            start = time.perf_counter()
            call()
            times[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(t) for label, t in times.items()}


def unit_call(weight: Tensor, bias: Tensor, fmt: TensorFormat, layer: int, members: int, equalized: bool,
              mode: str, atoms: int) -> Callable[[], object] | None:
    """What the runtime does with one unit per call (see the module docstring); None when nothing
    it does depends on the format."""
    stored = _stored_layer(weight, bias, fmt, members, equalized)
    rows, cols = weight.shape
    gen = torch.Generator().manual_seed(1)
    if mode == "fast":
        if layer > 0:
            return None  # resident bfloat16/float32 whatever the stored format
        split = SplitInt8Linear(stored, CELU_ALPHA)
        x, dz = torch.rand(atoms, cols, generator=gen), torch.randn(atoms, rows, generator=gen)
        return lambda: (split(x), split.input_grad(dz))
    if layer == 0:
        x, dz = torch.rand(atoms, cols, generator=gen), torch.randn(atoms, rows, generator=gen)

        def call():
            w = stored.weight()
            return torch.addmm(stored.bias, x, w.t()), dz.mm(w)
        return call
    out = rows // members
    y, dz = torch.rand(members, atoms, cols, generator=gen), torch.randn(members, atoms, out, generator=gen)
    b = bias.view(members, 1, out)

    def call():
        w = stored.weight().view(members, out, cols)
        return torch.baddbmm(b, y, w.transpose(1, 2)), torch.bmm(dz, w)
    return call


def latency_table(fp32_state: dict[str, Tensor], symbols: tuple[str, ...], units: list[Unit],
                  formats: dict[str, TensorFormat], equalized_layers: tuple[int, ...], mode: str = "exact",
                  atoms: int = 200, repeats: int = 15, progress: bool = False) -> dict[Unit, dict[str, float]]:
    """Milliseconds per call of every unit in every format label, timed here (``atoms`` atoms per element;
    formats of one unit interleaved, medians of ``repeats``)."""
    from tqdm import tqdm

    from nnpq.runtime.network import build_networks
    from nnpq.spec.plan import QuantPlan

    networks = build_networks(symbols, QuantPlan(rules=()), fp32_state)
    table: dict[Unit, dict[str, float]] = {}
    for element, layer in tqdm(units, desc=f"latency ({mode} mode)", unit="unit", disable=not progress):
        net = networks.elements[symbols.index(element)]
        stacked = net.layers[layer]
        weight = stacked.weight()
        calls = {label: unit_call(weight, stacked.bias, fmt, layer, net.members,
                                  fmt.is_integer and layer in equalized_layers, mode, atoms)
                 for label, fmt in formats.items()}
        timed = {label: call for label, call in calls.items() if call is not None}
        table[(element, layer)] = {label: 0.0 for label in formats} | _interleaved_medians(timed, repeats)
    return table
