"""Second-moment statistics of the inputs of each Linear layer, gathered on calibration data.

For layer input x (one row per atom of the layer's element) we accumulate

- ``xx``: sum of x x^T, what the layer output (and so the energy) sees;
- ``tt``: sum of t t^T for tangents t = (dx/dR) v with random unit-variance v over all
  coordinates R, whose expectation is sum over coordinates of (dx/dR)(dx/dR)^T: what the
  forces see. A weight error dW changes forces through dW t, so tr(dW tt dW^T) is the
  force-error proxy the rounding minimizes;
- ``sum``: sum of x, for bias correction; ``count``: rows seen.

Tangents come from forward-mode autodiff through TorchANI's AEV computer and networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torchani.arch import ANI

from nnpq.models.batching import atomic_energies, batches, padded
from nnpq.structures import Configuration

UnitKey = tuple[int, str]  # (member, element)
SAMPLES_PER_CALL = 2048


@dataclass
class LayerStats:
    """Accumulated input statistics of one Linear layer (float64)."""

    xx: Tensor
    tt: Tensor
    sum: Tensor
    count: int = 0
    tangent_count: int = 0
    absmax: float = 0.0
    samples: list[Tensor] = field(default_factory=list)  # a random subset of input values

    def values(self) -> Tensor:
        """The sampled input values (float64), for calibrating static activation ranges."""
        return torch.cat(self.samples) if self.samples else torch.zeros(1, dtype=torch.float64)

    def hessian(self, force_weight: float) -> Tensor:
        """``(1 - a) xx/tr(xx) + a tt/tr(tt)``: a=0 reconstructs outputs, a=1 their coordinate derivatives."""
        def unit(m: Tensor) -> Tensor:
            tr = torch.trace(m)
            return m / tr if tr > 0 else m

        return (1.0 - force_weight) * unit(self.xx) + force_weight * unit(self.tt)

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.count, 1)


def _layer_module(model: ANI, member: int, element: str, layer: int) -> torch.nn.Module:
    net = model.neural_networks.members[member].atomics[element]
    return net.layers[layer] if layer < len(net.layers) else net.final_layer


def collect_layer_stats(model: ANI, layer: int, configs: list[Configuration], tangents: int = 1,
                        seed: int = 0) -> dict[UnitKey, LayerStats]:
    """Input statistics of layer ``layer`` of every (member, element) network over ``configs``.

    Args:
        model: a TorchANI model, possibly with earlier layers already quantized (sequential
            rounding then compensates their errors).
        tangents: random tangent directions per configuration (each costs one forward pass).
    """
    gen = torch.Generator().manual_seed(seed)
    stats: dict[UnitKey, LayerStats] = {}
    mode = {"tangent": False}

    def make_hook(key: UnitKey):
        def hook(module, inputs, output):
            primal, tangent = fwAD.unpack_dual(inputs[0])
            x = primal.detach().to(torch.float64)
            if key not in stats:
                n = x.shape[1]
                z = torch.zeros(n, n, dtype=torch.float64)
                stats[key] = LayerStats(z.clone(), z.clone(), torch.zeros(n, dtype=torch.float64))
            s = stats[key]
            if mode["tangent"]:
                t = tangent.detach().to(torch.float64)
                s.tt += t.T @ t
                s.tangent_count += t.shape[0]
            else:
                s.xx += x.T @ x
                s.sum += x.sum(0)
                s.count += x.shape[0]
                s.absmax = max(s.absmax, float(x.abs().max()))
                flat = x.reshape(-1)
                s.samples.append(flat[torch.randint(0, flat.numel(), (min(SAMPLES_PER_CALL, flat.numel()),),
                                                    generator=gen)])
        return hook

    handles = []
    for m, member in enumerate(model.neural_networks.members):
        for element in member.atomics:
            handles.append(_layer_module(model, m, element, layer).register_forward_hook(make_hook((m, element))))
    try:
        for indices in batches(configs):  # molecules in padded batches, periodic boxes alone
            config = configs[indices[0]]
            species, coords = padded(configs, indices)
            cell = None if config.cell is None else torch.tensor(np.asarray(config.cell), dtype=torch.float32)
            pbc = None if cell is None else torch.ones(3, dtype=torch.bool)
            if cell is not None:
                frac = coords @ torch.linalg.inv(cell)
                coords = coords - torch.floor(frac) @ cell

            def run(x: torch.Tensor) -> None:
                if cell is None:
                    atomic_energies(model, species, x)
                else:
                    model((species, x), cell=cell, pbc=pbc)

            with torch.no_grad():
                mode["tangent"] = False
                run(coords)
            mode["tangent"] = True
            for _ in range(tangents):
                v = torch.randn(coords.shape, generator=gen)
                with fwAD.dual_level(), torch.no_grad():
                    run(fwAD.make_dual(coords, v))
    finally:
        for h in handles:
            h.remove()
    return stats


def activation_scale(stats: LayerStats, method: str, percentile: float = 99.99) -> float:
    """Static INT8 step for a layer input: from the max, a percentile of |x|, or the clipping
    (searched over 60% to 100% of the max) that minimizes the mean squared rounding error."""
    values = stats.values().abs()
    if method == "minmax":
        return max(stats.absmax, 1e-12) / 127.0
    if method == "percentile":
        return max(float(torch.quantile(values.float(), percentile / 100.0)), 1e-12) / 127.0
    best, best_err = stats.absmax / 127.0, float("inf")
    for ratio in torch.linspace(0.6, 1.0, 41).tolist():
        scale = max(stats.absmax * ratio, 1e-12) / 127.0
        err = float(torch.mean((torch.clamp(torch.round(values / scale), 0, 127) * scale - values) ** 2))
        if err < best_err:
            best, best_err = scale, err
    return best
