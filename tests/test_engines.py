"""OpenMM (TorchForce and PythonForce, Reference and CPU), ASE and openmm-ml give the model's
energy and forces to float tolerance, for FP32 and quantized ANI-2x, in vacuum and periodic."""

from __future__ import annotations

import numpy as np
import openmm
import pytest
from openmm import unit

from nnpq.errors import NnpqError
from nnpq.md.openmm import create_system
from nnpq.models import energy_and_forces
from nnpq.systems import get_system
from nnpq.units import HARTREE_TO_EV_, HARTREE_TO_KJ_MOL, NM_TO_ANGSTROM

# The model runs in float32; energies are summed in float64. Engines hand positions over in
# nm (float64 or float32) and the model converts to Angstrom in float32, so forces can differ
# by float32 rounding of the coordinates: ~1e-6 relative of the largest force.
ENERGY_ATOL_KJ = 1e-3
FORCE_RTOL = 1e-4


def _openmm_energy_forces(system: openmm.System, positions_nm: np.ndarray, platform: str):
    context = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions_nm)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return energy, np.asarray(forces)


def _assert_matches(potential, system, energy_kj, forces_kj_nm):
    e_ref, f_ref = energy_and_forces(potential, system.atomic_numbers, system.positions, system.box)
    f_ref_kj_nm = f_ref * HARTREE_TO_KJ_MOL * NM_TO_ANGSTROM
    assert energy_kj == pytest.approx(e_ref * HARTREE_TO_KJ_MOL, abs=ENERGY_ATOL_KJ)
    scale = np.abs(f_ref_kj_nm).max()
    assert np.abs(forces_kj_nm - f_ref_kj_nm).max() <= FORCE_RTOL * scale


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_openmm_matches_quantized_model_in_vacuum(w8_ani2x, backend, platform):
    system = get_system("aspirin")
    omm = create_system(system.topology, w8_ani2x, backend=backend)
    energy, forces = _openmm_energy_forces(omm, system.positions / NM_TO_ANGSTROM, platform)
    _assert_matches(w8_ani2x, system, energy, forces)


def test_openmm_periodic_water_box_matches_model(w8_path):
    from nnpq.models import load_potential

    system = get_system("water-box")
    potential = load_potential(w8_path, "cell_list")
    omm = create_system(system.topology, potential)
    assert omm.usesPeriodicBoundaryConditions()
    box = omm.getDefaultPeriodicBoxVectors()
    assert box[0][0].value_in_unit(unit.angstrom) == pytest.approx(system.box[0, 0])
    energy, forces = _openmm_energy_forces(omm, system.positions / NM_TO_ANGSTROM, "CPU")
    _assert_matches(potential, system, energy, forces)
    # shifting every atom by a box vector must not change anything (PBC really applied)
    shifted = system.positions.copy()
    shifted[::3] += system.box[0]
    energy2, forces2 = _openmm_energy_forces(omm, shifted / NM_TO_ANGSTROM, "CPU")
    assert energy2 == pytest.approx(energy, abs=ENERGY_ATOL_KJ)
    assert np.abs(forces2 - forces).max() <= FORCE_RTOL * np.abs(forces).max()


def test_openmm_fp32_by_name_matches_torchani(fp32_ani2x):
    system = get_system("ethanol")
    omm = create_system(system.topology, "ani2x")
    energy, forces = _openmm_energy_forces(omm, system.positions / NM_TO_ANGSTROM, "Reference")
    _assert_matches(fp32_ani2x, system, energy, forces)


def test_openmm_subset_of_atoms(w8_ani2x):
    """Only the selected atoms feel the potential; the others get no force."""
    system = get_system("ethanol")
    atoms = list(range(5))
    omm = create_system(system.topology, w8_ani2x, atoms=atoms)
    _, forces = _openmm_energy_forces(omm, system.positions / NM_TO_ANGSTROM, "Reference")
    _, f_sub = energy_and_forces(w8_ani2x, system.atomic_numbers[atoms], system.positions[atoms])
    assert np.allclose(forces[atoms], f_sub * HARTREE_TO_KJ_MOL * NM_TO_ANGSTROM, rtol=0,
                       atol=FORCE_RTOL * np.abs(forces).max())
    assert np.all(forces[5:] == 0.0)


def test_openmmml_plugin(w8_path, w8_ani2x):
    from openmmml import MLPotential

    system = get_system("ethanol")
    omm = MLPotential("nnpq", model=str(w8_path)).createSystem(system.topology)
    energy, forces = _openmm_energy_forces(omm, system.positions / NM_TO_ANGSTROM, "CPU")
    _assert_matches(w8_ani2x, system, energy, forces)


def test_openmmml_plugin_needs_a_model():
    from openmmml import MLPotential

    with pytest.raises(NnpqError, match="model=PATH"):
        MLPotential("nnpq")


def test_ase_calculator_contract(w8_path, w8_ani2x):
    from nnpq.md.ase import NnpqCalculator

    system = get_system("sfcl-sulfonamide")
    atoms = system.to_ase()
    atoms.calc = NnpqCalculator(w8_path)
    e_ref, f_ref = energy_and_forces(w8_ani2x, system.atomic_numbers, system.positions)
    assert atoms.get_potential_energy() == pytest.approx(e_ref * HARTREE_TO_EV_, abs=1e-6)
    assert atoms.get_potential_energy(force_consistent=True) == pytest.approx(e_ref * HARTREE_TO_EV_, abs=1e-6)
    assert np.allclose(atoms.get_forces(), f_ref * HARTREE_TO_EV_, atol=1e-6)
    # ASE caches results and recomputes when atoms move
    atoms.positions[0, 0] += 0.05
    assert atoms.get_potential_energy() != pytest.approx(e_ref * HARTREE_TO_EV_, abs=1e-6)


def test_ase_periodic_and_loaded_model(w8_ani2x):
    from nnpq.md.ase import NnpqCalculator

    system = get_system("water-box")
    atoms = system.to_ase()
    atoms.calc = NnpqCalculator(w8_ani2x)
    e_ref, _ = energy_and_forces(w8_ani2x, system.atomic_numbers, system.positions, system.box)
    assert atoms.get_potential_energy() == pytest.approx(e_ref * HARTREE_TO_EV_, abs=1e-5)
    atoms.pbc = [True, True, False]
    with pytest.raises(NnpqError, match="partial periodicity"):
        atoms.get_potential_energy()


def test_ase_rejects_unsupported_element(w8_ani2x):
    from ase import Atoms

    from nnpq.md.ase import NnpqCalculator

    atoms = Atoms("NaCl", positions=[[0, 0, 0], [2.4, 0, 0]])
    atoms.calc = NnpqCalculator(w8_ani2x)
    with pytest.raises(NnpqError, match="Na"):
        atoms.get_potential_energy()


def test_openmm_rejects_unsupported_element(w8_ani2x):
    import openmm.app as app

    topology = app.Topology()
    residue = topology.addResidue("ION", topology.addChain())
    topology.addAtom("NA", app.element.sodium, residue)
    with pytest.raises(NnpqError, match="Na"):
        create_system(topology, w8_ani2x)


def test_openmm_unknown_backend(w8_ani2x):
    with pytest.raises(NnpqError, match="backend"):
        create_system(get_system("ethanol").topology, w8_ani2x, backend="cuda-graphs")
