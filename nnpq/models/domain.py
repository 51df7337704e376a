"""The applicability domain of a quantized model: which AEV features (the first layer's inputs)
calibration excited, and how far. A structure whose atoms drive a feature beyond that is outside
what the model was checked on, and the user is told which atoms.

The domain is stored in the artifact's manifest as, per element network, the largest value each
of the 1008 AEV features took over the calibration configurations (0 for features never
excited). The check is done once per structure at set-up (engines, evaluate, validate).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from ase.data import chemical_symbols

from nnpq.models.batching import batches, padded

# A feature is out of domain when it exceeds its calibrated maximum by this factor plus the floor;
# the floor ignores the smooth cutoff tails of neighbours at the edge of the cutoff sphere.
DOMAIN_FACTOR = 1.5
DOMAIN_FLOOR = 1e-3


def aev_feature_names(symbols: Sequence[str], radial_shifts: int = 16, angular_shifts: int = 8,
                      sections: int = 4) -> list[str]:
    """Names of an ANI AEV's features in TorchANI's order: ``radial H r3``, ``angular C-F r2 a1``."""
    names = [f"radial {s} r{k}" for s in symbols for k in range(radial_shifts)]
    pairs = [(symbols[i], symbols[j]) for i in range(len(symbols)) for j in range(i, len(symbols))]
    names += [f"angular {a}-{b} r{k} a{t}" for a, b in pairs for k in range(angular_shifts) for t in range(sections)]
    return names


def feature_block(name: str) -> str:
    """The neighbour block a feature belongs to: ``radial H`` or ``angular C-F``."""
    return " ".join(name.split()[:2])


@functools.lru_cache(maxsize=None)
def _aev_model(model_name: str):
    """The published model's architecture (AEV constants; no weights needed), cell-list neighbours."""
    from nnpq.models.fp32 import assemble_architecture

    return assemble_architecture(model_name, "cell_list")


def aevs(model_name: str, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray | None = None) -> np.ndarray:
    """The ``(N, F)`` AEVs of one structure (positions and cell in Å) under ``model_name``'s AEV."""
    ani = _aev_model(model_name)
    species = torch.as_tensor(np.asarray(numbers), dtype=torch.long).unsqueeze(0)
    coords = torch.as_tensor(np.asarray(positions), dtype=torch.float32).unsqueeze(0)
    box = None if cell is None else torch.as_tensor(np.asarray(cell), dtype=torch.float32)
    pbc = None if box is None else torch.ones(3, dtype=torch.bool)
    if box is not None:
        coords = coords - torch.floor(coords @ torch.linalg.inv(box)) @ box
    with torch.no_grad():
        return ani.potentials["nnp"].aev_computer(ani.species_converter(species), coords, box, pbc)[0].numpy()


def aev_maxima(model_name: str, configs: Sequence) -> dict[str, np.ndarray]:
    """Per element, the largest value of each AEV feature over ``configs`` (0 where never excited)."""
    from torchani.neighbors import all_pairs

    ani = _aev_model(model_name)
    aev_computer = ani.potentials["nnp"].aev_computer
    maxima: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for indices in batches(configs):
            first = configs[indices[0]]
            if first.cell is not None:
                values, numbers = aevs(model_name, first.numbers, first.positions, first.cell), np.asarray(first.numbers)
            else:
                species, coords = padded(configs, indices)
                elem = ani.species_converter(species)
                neighbors = all_pairs(aev_computer.radial.cutoff, elem, coords)
                values = aev_computer.compute_from_neighbors(elem, coords, neighbors).reshape(-1, aev_computer.out_dim).numpy()
                numbers = species.reshape(-1).numpy()
            for z in np.unique(numbers[numbers >= 0]):
                symbol = chemical_symbols[int(z)]
                maxima[symbol] = np.maximum(maxima.get(symbol, 0.0), values[numbers == z].max(axis=0))
    return maxima


@dataclass
class Domain:
    """Calibrated AEV maxima per element network; `outside` names the atoms beyond them."""

    maxima: dict[str, np.ndarray]
    feature_names: list[str]

    def to_manifest(self) -> dict[str, Any]:
        return {"aev_max": {e: [float(f"{v:.4g}") for v in m] for e, m in self.maxima.items()},
                "factor": DOMAIN_FACTOR, "floor": DOMAIN_FLOOR}

    @classmethod
    def from_manifest(cls, data: dict[str, Any], symbols: Sequence[str]) -> "Domain":
        return cls({e: np.asarray(v, dtype=np.float64) for e, v in data["aev_max"].items()}, aev_feature_names(symbols))

    def coverage(self) -> dict[str, dict[str, Any]]:
        """Per element: the share of AEV features calibration excited and the blocks it never did."""
        out = {}
        for element, m in sorted(self.maxima.items()):
            blocks: dict[str, int] = {}
            for name, value in zip(self.feature_names, m):
                if value <= 0:
                    blocks[feature_block(name)] = blocks.get(feature_block(name), 0) + 1
            out[element] = {"excited_fraction": float(np.mean(m > 0)), "never_excited_blocks": blocks}
        return out

    def outside(self, symbols_of_atoms: Sequence[str], atom_aevs: np.ndarray) -> dict[int, list[str]]:
        """Atom index -> the neighbour blocks whose features exceed the calibrated range."""
        result: dict[int, list[str]] = {}
        for i, (symbol, aev) in enumerate(zip(symbols_of_atoms, atom_aevs)):
            limit = self.maxima.get(symbol)
            if limit is None:
                result[i] = ["element never calibrated"]
                continue
            beyond = np.nonzero(aev > DOMAIN_FACTOR * limit + DOMAIN_FLOOR)[0]
            if len(beyond):
                result[i] = sorted({feature_block(self.feature_names[k]) for k in beyond})
        return result


def check_domain(potential, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray | None = None,
                 where: str = "", warn: bool = True) -> dict[int, list[str]]:
    """Atoms of a structure (positions and cell in Å) that drive ``potential`` outside its calibrated
    domain, with the neighbour blocks beyond range; warned about (`warn_outside`) unless ``warn`` is
    False. Potentials without a domain (FP32) pass."""
    domain: Domain | None = getattr(potential, "domain", None)
    if domain is None:
        return {}
    found = domain.outside([chemical_symbols[int(z)] for z in numbers],
                           aevs(potential.model_name, numbers, positions, cell))
    if found and warn:
        warn_outside(potential, found, numbers, where)
    return found


def warn_outside(potential, found: dict[int, Sequence[str]], numbers: np.ndarray, where: str = "") -> None:
    """One `UserWarning` naming the first atoms outside the domain and the blocks beyond range."""
    shown = ", ".join(f"{i} ({chemical_symbols[int(numbers[i])]}: {', '.join(sorted(b))})"
                      for i, b in list(found.items())[:8])
    more = f" and {len(found) - 8} more" if len(found) > 8 else ""
    warnings.warn(f"{where + ': ' if where else ''}{potential.label} is outside its calibrated domain at "
                  f"{len(found)} atom(s): {shown}{more}; its quantization errors there were never measured, "
                  "so compare with the FP32 model (nnpq evaluate) before trusting them", stacklevel=3)
