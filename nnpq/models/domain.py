"""The applicability domain of a quantized model: which AEV features (the first layer's inputs)
calibration excited, and how far. A structure whose atoms drive a feature beyond that is outside
what the model was checked on, and the user is told which atoms.

The domain is stored in the artifact's manifest as, per element network, the largest value each
of the 1008 AEV features took over the calibration configurations (0 for features never
excited; the coverage report) and the largest norm of each neighbour block of features (radial H,
angular C-F, ...; the check). The check is done once per structure at set-up (engines, evaluate).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from ase.data import chemical_symbols

from nnpq.errors import NnpqError
from nnpq.models.batching import batches, padded

# A neighbour block is out of domain when its norm exceeds the calibrated maximum by this factor plus
# the floor; the floor ignores the smooth cutoff tails of neighbours at the edge of the cutoff sphere.
DOMAIN_FACTOR = 1.5
DOMAIN_FLOOR = 0.01


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
def aev_model(model_name: str):
    """The published model's architecture (AEV constants; no weights needed), cell-list neighbours."""
    from nnpq.models.fp32 import assemble_architecture

    return assemble_architecture(model_name, "cell_list")


def aevs(model_name: str, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray | None = None) -> np.ndarray:
    """The ``(N, F)`` AEVs of one structure (positions and cell in Å) under ``model_name``'s AEV."""
    ani = aev_model(model_name)
    species = torch.tensor(np.asarray(numbers), dtype=torch.long).unsqueeze(0)
    coords = torch.tensor(np.asarray(positions), dtype=torch.float32).unsqueeze(0)
    box = None if cell is None else torch.tensor(np.asarray(cell), dtype=torch.float32)
    pbc = None if box is None else torch.ones(3, dtype=torch.bool)
    if box is not None:
        coords = coords - torch.floor(coords @ torch.linalg.inv(box)) @ box
    with torch.no_grad():
        return ani.potentials["nnp"].aev_computer(ani.species_converter(species), coords, box, pbc)[0].numpy()


def block_index(symbols: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The neighbour blocks of an AEV (``radial H``, ``angular C-F``) and each feature's block number."""
    blocks: list[str] = []
    index = []
    for name in aev_feature_names(symbols):
        block = feature_block(name)
        if not blocks or blocks[-1] != block:
            blocks.append(block)
        index.append(len(blocks) - 1)
    return blocks, np.asarray(index)


def block_norms(values: np.ndarray, index: np.ndarray, n_blocks: int) -> np.ndarray:
    """``(N, blocks)`` Euclidean norms of each atom's AEV restricted to each neighbour block."""
    out = np.zeros((values.shape[0], n_blocks))
    np.add.at(out.T, index, (values**2).T)
    return np.sqrt(out)


def aev_maxima(model_name: str, configs: Sequence) -> dict[str, np.ndarray]:
    """Per element, the largest value of each AEV feature over ``configs`` (0 where never excited),
    followed by the largest norm of each neighbour block (see `block_index`)."""
    from torchani.neighbors import all_pairs

    ani = aev_model(model_name)
    aev_computer = ani.potentials["nnp"].aev_computer
    blocks, index = block_index(ani.symbols)
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
                rows = values[numbers == z]
                top = np.concatenate([rows.max(axis=0), block_norms(rows, index, len(blocks)).max(axis=0)])
                maxima[symbol] = np.maximum(maxima.get(symbol, 0.0), top)
    return maxima


@dataclass
class Domain:
    """Per element network, the calibrated maxima of each AEV feature (for coverage) and of each
    neighbour block's norm (for the check). An atom is outside when one of its blocks' norms
    exceeds ``DOMAIN_FACTOR`` times the calibrated maximum plus ``DOMAIN_FLOOR``: a neighbour pair
    or angle type calibration never had, or a far denser environment than it had. Single features
    are too sharp (Gaussians in distance and angle) to judge alone."""

    maxima: dict[str, np.ndarray]  # element -> (features + blocks,)
    symbols: tuple[str, ...]

    def __post_init__(self) -> None:
        self.blocks, self.index = block_index(self.symbols)
        self.n_features = len(self.index)

    def to_manifest(self) -> dict[str, Any]:
        # 3 significant digits are plenty for a 1.5x margin, and keep the manifest small
        return {"aev_max": {e: [float(f"{v:.3g}") if v > 0 else 0 for v in m] for e, m in self.maxima.items()},
                "symbols": list(self.symbols), "factor": DOMAIN_FACTOR, "floor": DOMAIN_FLOOR}

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "Domain":
        try:
            domain = cls({str(e): np.asarray(v, dtype=np.float64) for e, v in data["aev_max"].items()},
                         tuple(str(x) for x in data["symbols"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise NnpqError(f"damaged applicability domain in the manifest ({type(exc).__name__}); "
                            "re-create the file with 'nnpq quantize'") from None
        size = domain.n_features + len(domain.blocks)
        if any(m.shape != (size,) or not np.all(np.isfinite(m)) for m in domain.maxima.values()):
            raise NnpqError("damaged applicability domain in the manifest (wrong length or non-finite values); "
                            "re-create the file with 'nnpq quantize'")
        return domain

    def coverage(self) -> dict[str, dict[str, Any]]:
        """Per element: the share of AEV features calibration excited and the blocks it never did."""
        out = {}
        for element, m in sorted(self.maxima.items()):
            features = m[:self.n_features]
            blocks: dict[str, int] = {}
            for k in np.nonzero(features <= 0)[0]:
                blocks[self.blocks[self.index[k]]] = blocks.get(self.blocks[self.index[k]], 0) + 1
            out[element] = {"excited_fraction": float(np.mean(features > 0)), "never_excited_blocks": blocks}
        return out

    def outside(self, symbols_of_atoms: Sequence[str], atom_aevs: np.ndarray) -> dict[int, list[str]]:
        """Atom index -> the neighbour blocks beyond the calibrated range."""
        norms = block_norms(atom_aevs, self.index, len(self.blocks))
        result: dict[int, list[str]] = {}
        for i, symbol in enumerate(symbols_of_atoms):
            limit = self.maxima.get(symbol)
            if limit is None:
                result[i] = ["element never calibrated"]
                continue
            beyond = np.nonzero(norms[i] > DOMAIN_FACTOR * limit[self.n_features:] + DOMAIN_FLOOR)[0]
            if len(beyond):
                result[i] = [self.blocks[b] for b in beyond]
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
