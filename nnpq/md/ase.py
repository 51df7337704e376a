"""ASE calculator for FP32 and quantized ANI models (energies in eV, forces in eV/Angstrom)."""

from __future__ import annotations

import os

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from nnpq.errors import NnpqError
from nnpq.models import Potential, energy_and_forces, load_potential
from nnpq.models.domain import check_domain
from nnpq.units import HARTREE_TO_EV_


class NnpqCalculator(Calculator):
    """ASE ``Calculator`` around an ANI potential.

    Args:
        model: path to an ``.nnpq`` file, an FP32 model name (``ani2x``), or a loaded
            `Potential`.
        neighborlist: ``all_pairs`` or ``cell_list``; by default the cell list for periodic
            atoms and all pairs otherwise (chosen at the first calculation).
        mode: runtime mode (``exact``, ``fast``; see `nnpq.models.load_potential`).

    Periodic systems need ``pbc`` on all three axes; partial periodicity is rejected.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model: str | os.PathLike | Potential, neighborlist: str | None = None,
                 mode: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._model = model
        self._neighborlist = neighborlist
        self._mode = mode
        self._potential: Potential | None = model if isinstance(model, Potential) else None
        if self._potential is None and neighborlist is not None:
            self._potential = load_potential(model, neighborlist, mode)

    @property
    def potential(self) -> Potential | None:
        """The loaded potential (``None`` until the first calculation when loaded lazily)."""
        return self._potential

    def _resolve(self, periodic: bool) -> Potential:
        if self._potential is None:
            self._potential = load_potential(self._model, "cell_list" if periodic else "all_pairs", self._mode)
        return self._potential

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        pbc = np.asarray(self.atoms.pbc, dtype=bool)
        if pbc.any() and not pbc.all():
            raise NnpqError(f"partial periodicity pbc={pbc.tolist()} is not supported; use pbc=True or pbc=False")
        cell = np.asarray(self.atoms.cell.array, dtype=np.float64) if pbc.all() else None
        potential = self._resolve(cell is not None)
        if "numbers" in system_changes:  # once per structure: is it inside what calibration covered?
            check_domain(potential, self.atoms.numbers, self.atoms.positions, cell, "ASE calculator")
        energy, forces = energy_and_forces(potential, self.atoms.numbers, self.atoms.positions, cell)
        self.results = {
            "energy": energy * HARTREE_TO_EV_,
            "free_energy": energy * HARTREE_TO_EV_,
            "forces": forces * HARTREE_TO_EV_,
        }
