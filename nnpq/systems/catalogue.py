"""Registry of the built-in molecular systems (``nnpq systems``).

Units: positions and box are in Angstrom (ASE / ANI convention); the OpenMM
topology and :meth:`MolecularSystem.positions_nm` use nanometres (OpenMM
convention).
"""

from __future__ import annotations

import copy
import difflib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import openmm.app as app
import openmm.unit as unit
from openmm import Vec3

from nnpq.errors import NnpqError
from nnpq.systems import builders
from nnpq.systems.builders import RawSystem

if TYPE_CHECKING:
    import ase

__all__ = ["MIXED_SYSTEMS", "MolecularSystem", "SYSTEMS", "get_system", "list_systems", "clear_cache"]


# eq=False: array fields make the generated __eq__/__hash__ ill-defined, so
# systems compare and hash by identity.
@dataclass(frozen=True, eq=False)
class MolecularSystem:
    """A ready-to-simulate molecular system.

    Attributes:
        name: catalogue (CLI) name.
        description: one-line description.
        atomic_numbers: (N,) int64, read-only.
        positions: (N, 3) float64 in Angstrom, read-only.
        box: (3, 3) float64 box vectors (rows) in Angstrom, read-only, or
            ``None`` for a vacuum (non-periodic) system.
        topology: OpenMM topology in the same atom order, with bonds; its
            periodic box vectors (nm) are set iff ``box`` is not ``None``.
        ml_atoms: for an ML/MM system, the indices of the atoms the ANI model
            treats; ``None`` when the model treats every atom.
        mm_force_field: OpenMM force-field files for the rest of an ML/MM
            system (``app.ForceField(*mm_force_field)``); empty otherwise.
    """

    name: str
    description: str
    atomic_numbers: np.ndarray
    positions: np.ndarray
    box: np.ndarray | None
    topology: app.Topology
    ml_atoms: tuple[int, ...] | None = None
    mm_force_field: tuple[str, ...] = ()

    @property
    def symbols(self) -> tuple[str, ...]:
        """Chemical symbols, one per atom."""
        return tuple(app.element.Element.getByAtomicNumber(int(z)).symbol for z in self.atomic_numbers)

    @property
    def n_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @property
    def is_periodic(self) -> bool:
        return self.box is not None

    def positions_nm(self) -> unit.Quantity:
        """Positions as an OpenMM ``Quantity`` (list of ``Vec3``) in nanometres."""
        return [Vec3(*(float(c) * 0.1 for c in xyz)) for xyz in self.positions] * unit.nanometer

    def to_ase(self) -> "ase.Atoms":
        """A fresh ``ase.Atoms`` (Angstrom); cell and pbc set when periodic."""
        import ase

        if self.box is None:
            return ase.Atoms(numbers=self.atomic_numbers.copy(), positions=self.positions.copy())
        return ase.Atoms(
            numbers=self.atomic_numbers.copy(),
            positions=self.positions.copy(),
            cell=self.box.copy(),
            pbc=True,
        )


@dataclass(frozen=True)
class _Entry:
    description: str
    build: Callable[[], RawSystem]
    ml_residues: tuple[str, ...] = ()  # ML/MM systems: residues the model treats
    mm_force_field: tuple[str, ...] = ()


_REGISTRY: dict[str, _Entry] = {
    "alanine-dipeptide": _Entry(
        "Ace-Ala-NMe (22 atoms, vacuum, C7eq), residue topology for phi/psi analysis",
        functools.partial(builders.build_from_pdb, "alanine-dipeptide.pdb"),
    ),
    "aspirin": _Entry(
        "Aspirin, acetylsalicylic acid C9H8O4 (21 atoms, vacuum), RDKit ETKDG + MMFF",
        functools.partial(builders.build_from_smiles, "CC(=O)Oc1ccccc1C(=O)O"),
    ),
    "ethanol": _Entry(
        "Ethanol C2H5OH (9 atoms, vacuum), RDKit ETKDG + MMFF",
        functools.partial(builders.build_from_smiles, "CCO"),
    ),
    "paracetamol": _Entry(
        "Paracetamol (acetaminophen) C8H9NO2 (20 atoms, vacuum), RDKit ETKDG + MMFF",
        functools.partial(builders.build_from_smiles, "CC(=O)Nc1ccc(O)cc1"),
    ),
    "sfcl-sulfonamide": _Entry(
        "4-Chloro-2-fluorobenzenesulfonamide (17 atoms, vacuum): all 7 ANI-2x elements H C N O S F Cl",
        functools.partial(builders.build_from_smiles, "NS(=O)(=O)c1ccc(Cl)cc1F"),
    ),
    "water-box": _Entry(
        "Periodic cubic box of NPT-equilibrated TIP3P water, 185 waters (555 atoms), 1.76 nm edge",
        builders.build_water_box,
    ),
}

# ML/MM systems: atoms the model cannot treat (ions) are in the MM part, so they are kept
# apart from the ANI-only catalogue that calibration and validation iterate over.
_MIXED_REGISTRY: dict[str, _Entry] = {
    "alanine-dipeptide-solvated": _Entry(
        "ML/MM: Ace-Ala-NMe (ANI) in 266 TIP3P waters with one Na+/Cl- pair (Amber14), 822 atoms, 2.03 nm box",
        functools.partial(builders.build_from_pdb, "alanine-dipeptide-solvated.pdb"),
        ml_residues=("ACE", "ALA", "NME"), mm_force_field=("amber14-all.xml", "amber14/tip3p.xml"),
    ),
}

#: Catalogue name -> one-line description (systems the model treats whole).
SYSTEMS: dict[str, str] = {name: entry.description for name, entry in sorted(_REGISTRY.items())}
#: ML/MM systems: name -> one-line description.
MIXED_SYSTEMS: dict[str, str] = {name: entry.description for name, entry in sorted(_MIXED_REGISTRY.items())}


def list_systems() -> list[str]:
    """Sorted catalogue names."""
    return sorted(_REGISTRY)


def _readonly(a: np.ndarray, dtype: type) -> np.ndarray:
    out = np.array(a, dtype=dtype, copy=True)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=None)
def _build(name: str) -> MolecularSystem:
    entry = _REGISTRY.get(name) or _MIXED_REGISTRY[name]
    raw = entry.build()
    n = raw.atomic_numbers.shape[0]
    if raw.positions.shape != (n, 3) or raw.topology.getNumAtoms() != n:
        raise RuntimeError(f"builder for {name!r} returned inconsistent atom counts")
    return MolecularSystem(
        name=name,
        description=entry.description,
        atomic_numbers=_readonly(raw.atomic_numbers, np.int64),
        positions=_readonly(raw.positions, np.float64),
        box=None if raw.box is None else _readonly(raw.box, np.float64),
        topology=raw.topology,
        ml_atoms=tuple(a.index for a in raw.topology.atoms() if a.residue.name in entry.ml_residues) or None,
        mm_force_field=entry.mm_force_field,
    )


def get_system(name: str) -> MolecularSystem:
    """Build (or fetch from cache) the catalogue system ``name``.

    Arrays are shared read-only views of the cached build; the topology is a
    fresh deep copy on every call, so callers may modify it freely.

    Raises:
        NnpqError: ``name`` is not in the catalogue.
    """
    if name not in _REGISTRY and name not in _MIXED_REGISTRY:
        raise NnpqError(_unknown_message(name))
    cached = _build(name)
    return MolecularSystem(
        name=cached.name,
        description=cached.description,
        atomic_numbers=cached.atomic_numbers,
        positions=cached.positions,
        box=cached.box,
        topology=copy.deepcopy(cached.topology),
        ml_atoms=cached.ml_atoms,
        mm_force_field=cached.mm_force_field,
    )


def clear_cache() -> None:
    """Forget cached builds (the next :func:`get_system` rebuilds from scratch)."""
    _build.cache_clear()


def _unknown_message(name: str) -> str:
    names = list_systems() + sorted(_MIXED_REGISTRY)
    msg = f"unknown system {name!r}"
    close = difflib.get_close_matches(str(name), names, n=1)
    if close:
        msg += f" (did you mean {close[0]!r}?)"
    return msg + f"; available: {', '.join(names)}; run 'nnpq systems' to list them"
