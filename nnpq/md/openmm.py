"""OpenMM integration: an ANI potential (FP32 or quantized) as a force in an OpenMM System.

Two backends: openmm-torch's ``TorchForce`` around the TorchScript module (default; runs
inside OpenMM's C++ platforms), and OpenMM's ``PythonForce`` (no openmm-torch needed).
At this boundary everything is in OpenMM units: nm, kJ/mol, kJ/mol/nm.
"""

from __future__ import annotations

import functools
import os
from typing import Iterable

import numpy as np
import openmm
import openmm.app as app
import torch
from openmm import unit
from torch import Tensor

from nnpq.errors import NnpqError
from nnpq.models import ANIPotential, Potential, load_potential
from nnpq.units import HARTREE_TO_KJ_MOL, NM_TO_ANGSTROM

BACKENDS = ("torchforce", "pythonforce")


class OpenMMEnergy(torch.nn.Module):
    """TorchForce module: positions (nm) and box vectors (nm) in, energy (kJ/mol) out.

    Only the atoms in ``atoms`` are seen by the potential (all when ``None``), so the ANI
    region can be part of a larger system.
    """

    def __init__(self, potential: Potential, numbers: Iterable[int], atoms: Iterable[int] | None = None) -> None:
        super().__init__()
        self.potential = potential
        numbers = torch.as_tensor(list(numbers), dtype=torch.long)
        index = torch.arange(len(numbers)) if atoms is None else torch.as_tensor(list(atoms), dtype=torch.long)
        self.register_buffer("numbers", numbers)
        self.register_buffer("atoms", index)
        # TorchScript cannot read module-level floats, so the unit factors live on the module
        self.nm_to_angstrom = NM_TO_ANGSTROM
        self.hartree_to_kj_mol = HARTREE_TO_KJ_MOL

    def forward(self, positions: Tensor, boxvectors: Tensor | None = None) -> Tensor:
        pos = positions[self.atoms] * self.nm_to_angstrom
        cell: Tensor | None = None
        if boxvectors is not None:
            cell = boxvectors * self.nm_to_angstrom
        return self.potential(self.numbers, pos, cell) * self.hartree_to_kj_mol


class PythonForceComputation:
    """The callable behind a ``PythonForce``: state in, (kJ/mol, kJ/mol/nm array) out."""

    def __init__(self, module: OpenMMEnergy, periodic: bool, n_particles: int) -> None:
        self.module = module
        self.periodic = periodic
        self.n_particles = n_particles

    def __call__(self, state: openmm.State) -> tuple[float, np.ndarray]:
        positions = torch.tensor(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                                 dtype=torch.float64, requires_grad=True)
        box = None
        if self.periodic:
            box = torch.tensor(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer),
                               dtype=torch.float64)
        # in Python anyway, so overlapping atoms get their one-line message (OpenMM passes it on)
        self.module.potential.check_inputs(self.module.numbers.numpy(),
                                           positions.detach()[self.module.atoms].numpy() * NM_TO_ANGSTROM,
                                           None if box is None else box.numpy() * NM_TO_ANGSTROM)
        energy = self.module(positions, box)
        (grad,) = torch.autograd.grad(energy, positions)
        return float(energy.detach()), -grad.numpy()


@functools.lru_cache(maxsize=None)
def _torchforce_class() -> type:
    """openmm-torch's ``TorchForce``, with its platform plugins loaded.

    OpenMM loads its plugins when first imported; openmm-torch's need libraries that only
    ``import torch`` puts in place, so when OpenMM came first they failed and are loaded here.
    """
    import openmmtorch

    for failure in openmm.Platform.getPluginLoadFailures():
        library = failure.removeprefix("Error loading library ").split(":")[0]
        if "OpenMMTorch" in library and "OpenCL" not in library and os.path.isfile(library):
            openmm.Platform.loadPluginLibrary(library)
    return openmmtorch.TorchForce


def topology_numbers(topology: app.Topology) -> list[int]:
    """Atomic numbers of a topology's atoms; a clear error for atoms without an element."""
    numbers = []
    for atom in topology.atoms():
        if atom.element is None:
            raise NnpqError(f"atom {atom.name} of residue {atom.residue.name} has no element; "
                            "fix the topology (PDB element column) before building an ANI system")
        numbers.append(atom.element.atomic_number)
    return numbers


def make_force(topology: app.Topology, model: str | os.PathLike | Potential, *,
               atoms: Iterable[int] | None = None, backend: str | None = None,
               neighborlist: str | None = None, mode: str | None = None) -> openmm.Force:
    """The ANI force for ``topology`` (periodic iff the topology has a box).

    Args:
        model: FP32 name (``ani2x``), path to an ``.nnpq`` file, or a loaded `Potential`.
        atoms: indices of the atoms the potential acts on (default: all).
        backend: ``torchforce`` (openmm-torch) or ``pythonforce``; by default TorchForce for
            TorchANI models and PythonForce for the fused runtime (``exact`` also runs in
            TorchForce, slowly for now; ``fast`` only in PythonForce).
        neighborlist: ``all_pairs`` or ``cell_list``; default cell list for periodic systems.
        mode: runtime mode (``exact``, ``fast``; see `nnpq.models.load_potential`).
    """
    if backend is not None and backend not in BACKENDS:
        raise NnpqError(f"unknown OpenMM backend '{backend}'; use one of {', '.join(BACKENDS)}")
    periodic = topology.getPeriodicBoxVectors() is not None
    potential = load_potential(model, neighborlist or ("cell_list" if periodic else "all_pairs"), mode)
    if backend is None:
        # the fused runtime runs eagerly in PythonForce: under TorchScript (TorchForce) its first
        # steps took ~50 s and later ones ~4x the TorchANI reference's (measured on ethanol)
        backend = "torchforce" if isinstance(potential, ANIPotential) else "pythonforce"
    if backend == "torchforce" and potential.mode == "fast":
        raise NnpqError("the fast mode runs in Python only (its INT8 kernels are not TorchScript); "
                        "use backend='pythonforce' or mode='exact'")
    numbers = topology_numbers(topology)
    selected = list(range(len(numbers))) if atoms is None else [int(i) for i in atoms]
    chosen = [numbers[i] for i in selected]
    potential.check_elements(np.array(chosen))
    if periodic:  # positions come later, with the context; the box is known now
        potential.check_cell(np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.angstrom)))
    module = OpenMMEnergy(potential, chosen, selected)
    if backend == "pythonforce":
        force = openmm.PythonForce(PythonForceComputation(module, periodic, len(numbers)))
    else:
        force = _torchforce_class()(torch.jit.script(module))
    force.setUsesPeriodicBoundaryConditions(periodic)
    return force


def create_system(topology: app.Topology, model: str | os.PathLike | Potential, *,
                  atoms: Iterable[int] | None = None, backend: str | None = None,
                  neighborlist: str | None = None, remove_cm_motion: bool = True,
                  mode: str | None = None) -> openmm.System:
    """An OpenMM System whose only force is the ANI potential of ``model``.

    Masses come from the topology's elements; box vectors from the topology when it has
    them. Mirrors ``openmmml.MLPotential.createSystem``.
    """
    system = openmm.System()
    for atom in topology.atoms():
        if atom.element is None:
            topology_numbers(topology)  # raises the one-line error
        system.addParticle(atom.element.mass)
    box = topology.getPeriodicBoxVectors()
    if box is not None:
        system.setDefaultPeriodicBoxVectors(*box)
    system.addForce(make_force(topology, model, atoms=atoms, backend=backend, neighborlist=neighborlist, mode=mode))
    if remove_cm_motion:
        system.addForce(openmm.CMMotionRemover())
    return system
