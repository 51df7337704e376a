"""ASE calculator for FP32 and quantized ANI models: energy (eV), forces (eV/Å), stress (eV/Å³)."""

from __future__ import annotations

import os

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from nnpq.errors import NnpqError
from nnpq.models import ANIPotential, Potential, energy_and_forces, load_potential
from nnpq.models.domain import check_domain
from nnpq.units import HARTREE_TO_EV_

STRESS_KINDS = ("scaling", "numerical")


class NnpqCalculator(Calculator):
    """ASE ``Calculator`` around an ANI potential; arguments mirror ``torchani.ase.Calculator``.

    Args:
        model: path to an ``.nnpq`` file, an FP32 model name (``ani2x``), or a loaded
            `Potential`.
        overwrite: as in TorchANI: after a periodic calculation, replace the positions in
            the ``Atoms`` with the ones wrapped into the central cell.
        stress_kind: ``scaling`` (default, as TorchANI): the virial by autograd through a
            strain applied to positions and cell, ``E(R(1+eps), cell(1+eps))``; or
            ``numerical``: central finite differences of the energy in the strain.
        neighborlist: ``all_pairs`` or ``cell_list``; by default the cell list for periodic
            atoms and all pairs otherwise (chosen at the first calculation).
        mode: runtime mode of the quantized model, where the runtime has modes.

    Stress follows ASE: ``(1/V) dE/d(strain)`` in eV/Å³, Voigt order xx, yy, zz, yz, xz, xy.
    Periodic systems need ``pbc`` on all three axes; partial periodicity is rejected.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: str | os.PathLike | Potential, overwrite: bool = False,
                 stress_kind: str = "scaling", neighborlist: str | None = None, mode: str | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if stress_kind not in STRESS_KINDS:
            raise NnpqError(f"unsupported stress_kind '{stress_kind}'; use one of {', '.join(STRESS_KINDS)}")
        self._model = model
        self._mode = mode
        self._overwrite = overwrite
        self._stress_kind = stress_kind
        self._potential: Potential | None = model if isinstance(model, Potential) else None
        if self._potential is None and neighborlist is not None:
            self._potential = load_potential(model, neighborlist, mode=mode)

    @property
    def potential(self) -> Potential | None:
        """The loaded potential (``None`` until the first calculation when loaded lazily)."""
        return self._potential

    def _resolve(self, periodic: bool) -> Potential:
        if self._potential is None:
            self._potential = load_potential(self._model, "cell_list" if periodic else "all_pairs", mode=self._mode)
        return self._potential

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        pbc = np.asarray(self.atoms.pbc, dtype=bool)
        if pbc.any() and not pbc.all():
            raise NnpqError(f"partial periodicity pbc={pbc.tolist()} is not supported; use pbc=True or pbc=False")
        cell = np.asarray(self.atoms.cell.array, dtype=np.float64) if pbc.all() else None
        if "stress" in properties and cell is None:
            raise NnpqError("stress needs a periodic cell (atoms.pbc = True and a cell); this system is in vacuum")
        potential = self._resolve(cell is not None)
        potential.check_inputs(self.atoms.numbers, self.atoms.positions, cell)
        if "numbers" in system_changes:  # once per structure: is it inside what calibration covered?
            check_domain(potential, self.atoms.numbers, self.atoms.positions, cell, "ASE calculator")
        if self._overwrite and cell is not None:
            self.atoms.wrap()  # same central-cell image the potential computes with
        energy, forces, virial = _energy_forces_virial(
            potential, self.atoms.numbers, self.atoms.positions, cell, "stress" in properties, self._stress_kind)
        self.results = {
            "energy": energy * HARTREE_TO_EV_,
            "free_energy": energy * HARTREE_TO_EV_,
            "forces": forces * HARTREE_TO_EV_,
        }
        if virial is not None:
            volume = abs(np.linalg.det(cell))
            self.results["stress"] = full_3x3_to_voigt_6_stress(virial * HARTREE_TO_EV_ / volume)


def _energy_forces_virial(potential: Potential, numbers: np.ndarray, positions: np.ndarray,
                          cell: np.ndarray | None, stress: bool, stress_kind: str
                          ) -> tuple[float, np.ndarray, np.ndarray | None]:
    """Energy (Ha), forces (Ha/Å) and, with ``stress``, the strain derivative dE/deps (Ha, 3x3).

    The strain ``eps`` (symmetrized) deforms positions and cell alike: ``x -> x (1 + eps)``.
    """
    # the fused runtime's fast AEV differentiates positions, not the cell: its stress is numerical
    if not stress or stress_kind == "numerical" or not isinstance(potential, ANIPotential):
        energy, forces = energy_and_forces(potential, numbers, positions, cell)
        return energy, forces, _numerical_virial(potential, numbers, positions, cell) if stress else None
    z = torch.as_tensor(np.asarray(numbers), dtype=torch.long)
    pos = torch.tensor(np.asarray(positions), dtype=torch.float64, requires_grad=True)
    box = torch.tensor(cell, dtype=torch.float64)
    strain = torch.zeros((3, 3), dtype=torch.float64, requires_grad=True)
    deformation = torch.eye(3, dtype=torch.float64) + 0.5 * (strain + strain.T)
    energy = potential(z, pos @ deformation, box @ deformation)
    grad, virial = torch.autograd.grad(energy, (pos, strain))
    return float(energy.detach()), -grad.numpy(), virial.numpy()


def _numerical_virial(potential: Potential, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray,
                      eps: float = 1e-3) -> np.ndarray:
    """dE/deps (Ha, 3x3) by central differences of symmetric strains, as ASE's numerical stress.

    ``eps`` is far above ASE's 1e-6: the network sees float32 coordinates (1e-3 agrees with the
    autograd virial to ~1e-4 relative on the water box).
    """
    z = torch.as_tensor(np.asarray(numbers), dtype=torch.long)
    pos = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
    box = torch.as_tensor(cell, dtype=torch.float64)
    virial = np.zeros((3, 3))
    with torch.no_grad():
        for i in range(3):
            for j in range(i, 3):
                energies = []
                for sign in (1.0, -1.0):
                    deformation = torch.eye(3, dtype=torch.float64)
                    deformation[i, j] += 0.5 * sign * eps
                    deformation[j, i] += 0.5 * sign * eps
                    energies.append(float(potential(z, pos @ deformation, box @ deformation)))
                virial[i, j] = virial[j, i] = (energies[0] - energies[1]) / (2 * eps)
    return virial
