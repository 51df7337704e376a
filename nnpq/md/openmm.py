"""OpenMM integration: an ANI potential (FP32 or quantized) as a force in an OpenMM System.

Two backends with the same numbers: openmm-torch's ``TorchForce`` around the TorchScript
module (runs inside OpenMM's C++ platforms; needs a TorchScript-able model), and OpenMM's
``PythonForce`` (any model, e.g. runtime paths TorchScript cannot express). ``auto`` picks
``TorchForce`` when the model scripts and openmm-torch loads, ``PythonForce`` otherwise.
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
from nnpq.models import ANIPotential, load_potential
from nnpq.models.domain import check_domain, warn_outside
from nnpq.units import HARTREE_TO_KJ_MOL, NM_TO_ANGSTROM

BACKENDS = ("auto", "torchforce", "pythonforce")


class OpenMMEnergy(torch.nn.Module):
    """TorchForce module: positions (nm) and box vectors (nm) in, energy (kJ/mol) out.

    Only the atoms in ``atoms`` are seen by the potential (all when ``None``), so the ANI
    region can be part of a larger system.
    """

    def __init__(self, potential: ANIPotential, numbers: Iterable[int], atoms: Iterable[int] | None = None) -> None:
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
    """The callable behind a ``PythonForce``: state in, (kJ/mol, kJ/mol/nm array) out.

    The force is restricted to the potential's atoms with ``setParticles``, so the state
    holds only those atoms. The model runs on whatever device its buffers are on (a GPU
    when OpenMM runs on CUDA); positions go there in float64, forces come back to the host.
    """

    def __init__(self, module: OpenMMEnergy, periodic: bool) -> None:
        self.module = module
        self.periodic = periodic
        self.checked = False

    def __call__(self, state: openmm.State) -> tuple[float, np.ndarray]:
        device = self.module.numbers.device
        positions = torch.tensor(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                                 dtype=torch.float64, device=device, requires_grad=True)
        box = None
        if self.periodic:
            box = torch.tensor(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer),
                               dtype=torch.float64, device=device)
        if not self.checked:  # the starting structure gets its one-line messages (OpenMM passes them on);
            # later calls are left alone: a minimizer's line search may probe close contacts on purpose
            self.module.potential.check_inputs(self.module.numbers.cpu().numpy(),
                                               positions.detach().cpu().numpy() * NM_TO_ANGSTROM,
                                               None if box is None else box.cpu().numpy() * NM_TO_ANGSTROM)
            self.checked = True
        energy = self.module(positions, box)
        (grad,) = torch.autograd.grad(energy, positions)
        return float(energy.detach()), -grad.cpu().numpy()


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


def _torchforce(module: OpenMMEnergy, required: bool) -> openmm.Force | None:
    """A ``TorchForce`` around ``module``; ``None`` when ``required`` is false and it cannot be made."""
    try:
        force_class = _torchforce_class()
    except (ImportError, OSError) as exc:  # e.g. openmm-torch built against another CUDA
        if required:
            raise NnpqError(f"openmm-torch cannot be loaded here ({exc}); use backend='pythonforce'") from None
        return None
    try:
        scripted = torch.jit.script(module)
    except Exception as exc:  # TorchScript raises several types; any of them means "not scriptable"
        if required:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NnpqError(f"{module.potential.label} cannot be compiled to TorchScript ({first[:160]}); "
                            "use backend='pythonforce'") from None
        return None
    return force_class(scripted)


def topology_numbers(topology: app.Topology) -> list[int]:
    """Atomic numbers of a topology's atoms; a clear error for atoms without an element."""
    numbers = []
    for atom in topology.atoms():
        if atom.element is None:
            raise NnpqError(f"atom {atom.name} of residue {atom.residue.name} has no element; "
                            "fix the topology (PDB element column) before building an ANI system")
        numbers.append(atom.element.atomic_number)
    return numbers


def check_elements(potential: ANIPotential, numbers: Iterable[int], atoms: Iterable[int] | None = None) -> None:
    """Raise `NnpqError` naming the atoms (index and symbol) whose elements ``potential`` lacks.

    Each distinct element is put to the potential's own ``check_inputs`` alone, so this
    needs nothing of the potential beyond its public interface.

    Args:
        numbers: atomic numbers of the atoms the potential acts on.
        atoms: their indices in the user's system (default ``0..N-1``), used in the message.
    """
    from ase.data import chemical_symbols

    numbers = [int(z) for z in numbers]
    index = list(range(len(numbers))) if atoms is None else [int(i) for i in atoms]
    rejected: dict[int, str] = {}
    for z in sorted(set(numbers)):
        try:
            potential.check_inputs(np.array([z]), np.zeros((1, 3)))
        except NnpqError as exc:
            rejected[z] = str(exc)
    if rejected:
        bad = [(i, z) for i, z in zip(index, numbers) if z in rejected]
        named = ", ".join(f"{i} {chemical_symbols[z] if 0 < z < len(chemical_symbols) else z}" for i, z in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise NnpqError(f"{len(bad)} atom(s) the model cannot treat (index symbol: {named}{more}): "
                        f"{next(iter(rejected.values()))}; or model them with MM in a mixed ML/MM system")


def check_start(potential, topology: app.Topology, positions, atoms: list[int],
                periodic: bool) -> dict[int, list[str]]:
    """Warn once (`check_domain`) when the starting ``positions`` (Å, or an OpenMM quantity) of the
    ``atoms`` the potential acts on lie outside its calibrated domain; returns topology index ->
    neighbour blocks beyond range."""
    if unit.is_quantity(positions):
        positions = positions.value_in_unit(unit.angstrom)
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape != (topology.getNumAtoms(), 3):
        raise NnpqError(f"positions have shape {positions.shape}; the topology needs ({topology.getNumAtoms()}, 3) in Å")
    numbers = np.array(topology_numbers(topology))[atoms]
    cell = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.angstrom)) if periodic else None
    found = check_domain(potential, numbers, positions[atoms], cell, warn=False)
    found = {atoms[i]: blocks for i, blocks in found.items()}  # name atoms by their topology index
    if found:
        warn_outside(potential, found, np.array(topology_numbers(topology)), "OpenMM starting structure")
    return found


def make_force(topology: app.Topology, model: str | os.PathLike | ANIPotential, *,
               atoms: Iterable[int] | None = None, backend: str = "auto", neighborlist: str | None = None,
               periodic: bool | None = None, device: str | torch.device | None = None,
               mode: str | None = None, positions=None) -> openmm.Force:
    """The ANI force for the ``atoms`` of ``topology``.

    Args:
        model: FP32 name (``ani2x``), path to an ``.nnpq`` file, or a loaded `ANIPotential`.
        atoms: indices of the atoms the potential acts on (default: all).
        backend: ``auto`` (``TorchForce`` when the model scripts, else ``PythonForce``),
            ``torchforce`` or ``pythonforce``.
        neighborlist: ``all_pairs`` or ``cell_list``; default cell list for periodic systems.
        periodic: use the periodic box; default: iff the topology has box vectors.
        device: where a ``PythonForce`` runs the model (``TorchForce`` follows OpenMM's platform).
        mode: runtime mode passed to the model loader (where the runtime has modes).
        positions: the starting structure, every topology atom, Å (or an OpenMM quantity): when
            given, one warning names the atoms that lie outside the model's calibrated domain.
    """
    if backend not in BACKENDS:
        raise NnpqError(f"unknown OpenMM backend '{backend}'; use one of {', '.join(BACKENDS)}")
    if periodic is None:
        periodic = topology.getPeriodicBoxVectors() is not None
    # a model that may run in a PythonForce is built for its device (on CUDA: the Triton runtime backend)
    potential = load_potential(model, neighborlist or ("cell_list" if periodic else "all_pairs"), mode=mode,
                               device="cpu" if backend == "torchforce" or device is None else device)
    numbers = topology_numbers(topology)
    selected = list(range(len(numbers))) if atoms is None else [int(i) for i in atoms]
    chosen = [numbers[i] for i in selected]
    check_elements(potential, chosen, selected)
    if periodic:
        potential.check_cell(np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.angstrom)))
    if positions is not None:
        check_start(potential, topology, positions, selected, periodic)
    if backend == "torchforce" and getattr(potential, "mode", None) == "fast":
        raise NnpqError("the fast mode's INT8 kernels run in Python only; use backend='pythonforce' (or 'auto')")
    if backend == "auto" and not isinstance(potential, ANIPotential):
        backend = "pythonforce"  # the fused runtime scripts, but runs far slower under TorchScript for now
    force = None
    if backend != "pythonforce":
        # scripted on the CPU: the TorchForce moves it to OpenMM's device
        force = _torchforce(OpenMMEnergy(potential.to("cpu"), chosen, selected), required=backend == "torchforce")
    if force is None:
        module = OpenMMEnergy(potential, chosen)
        if device is not None:
            module.to(device)
        force = openmm.PythonForce(PythonForceComputation(module, periodic))
        if atoms is not None:
            force.setParticles(selected)
    force.setUsesPeriodicBoundaryConditions(periodic)
    return force


def system_backend(system: openmm.System) -> str:
    """``pythonforce`` when the system's ANI force is a ``PythonForce``, ``torchforce`` otherwise."""
    return "pythonforce" if any(isinstance(f, openmm.PythonForce) for f in system.getForces()) else "torchforce"


def create_system(topology: app.Topology, model: str | os.PathLike | ANIPotential, *,
                  atoms: Iterable[int] | None = None, backend: str = "auto",
                  neighborlist: str | None = None, remove_cm_motion: bool = True,
                  device: str | torch.device | None = None, mode: str | None = None,
                  positions=None) -> openmm.System:
    """An OpenMM System whose only force is the ANI potential of ``model``.

    Masses come from the topology's elements; box vectors from the topology when it has
    them. Mirrors ``openmmml.MLPotential.createSystem``; arguments as in `make_force`.
    """
    system = openmm.System()
    for atom in topology.atoms():
        if atom.element is None:
            topology_numbers(topology)  # raises the one-line error
        system.addParticle(atom.element.mass)
    box = topology.getPeriodicBoxVectors()
    if box is not None:
        system.setDefaultPeriodicBoxVectors(*box)
    system.addForce(make_force(topology, model, atoms=atoms, backend=backend, neighborlist=neighborlist,
                               device=device, mode=mode, positions=positions))
    if remove_cm_motion:
        system.addForce(openmm.CMMotionRemover())
    return system
