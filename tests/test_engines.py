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


# ------------------------------------------------------------------ backends, openmm-ml, mixed ML/MM, ASE stress


def _state(system: openmm.System, positions_nm: np.ndarray, platform: str = "Reference", groups: int | set = -1,
           parameters: dict | None = None) -> tuple[float, np.ndarray]:
    """Energy (kJ/mol) and forces (kJ/mol/nm) of the force ``groups``, after setting global ``parameters``."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions_nm)
    for name, value in (parameters or {}).items():
        context.setParameter(name, value)
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            np.asarray(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)))


def _eager_potential(potential):
    """The same model behind a forward that calls ``super()``, which TorchScript rejects: a stand-in
    for runtime paths written for eager mode only."""
    from nnpq.models import ANIPotential

    class EagerANIPotential(ANIPotential):
        def forward(self, numbers, positions, cell=None):
            return super().forward(numbers, positions, cell)

    eager = EagerANIPotential.__new__(EagerANIPotential)
    eager.__dict__.update(potential.__dict__)
    return eager


def test_backend_auto_picks_torchforce_or_pythonforce_with_the_same_numbers(w8_reference, w8_ani2x):
    """auto: TorchForce when a TorchANI-layer model scripts, PythonForce otherwise (and for the fused
    runtime, which scripts but runs far slower under TorchScript), with the model's numbers."""
    from nnpq.md.openmm import system_backend

    system = get_system("ethanol")
    eager = _eager_potential(w8_reference)
    auto = create_system(system.topology, eager)
    assert system_backend(auto) == "pythonforce"
    assert system_backend(create_system(system.topology, w8_reference)) == "torchforce"
    assert system_backend(create_system(system.topology, w8_ani2x)) == "pythonforce"
    with pytest.raises(NnpqError, match="TorchScript"):
        create_system(system.topology, eager, backend="torchforce")
    energy, forces = _state(auto, system.positions / NM_TO_ANGSTROM)
    _assert_matches(w8_reference, system, energy, forces)


def test_pythonforce_and_openmmml_periodic_water_box_match_model(w8_path):
    """PythonForce and MLPotential('nnpq') on the periodic water box (CPU platform) give the model's numbers."""
    from openmmml import MLPotential

    from nnpq.models import load_potential

    system = get_system("water-box")
    potential = load_potential(w8_path, "cell_list")
    pos = system.positions / NM_TO_ANGSTROM
    for omm in (create_system(system.topology, potential, backend="pythonforce"),
                MLPotential("nnpq", model=potential, backend="pythonforce").createSystem(system.topology)):
        assert omm.usesPeriodicBoundaryConditions()
        energy, forces = _state(omm, pos, "CPU")
        _assert_matches(potential, system, energy, forces)


def test_openmmml_create_system_without_cm_motion_remover(w8_ani2x):
    """As for 'ani2x': createSystem puts the potential in group 0 and honours removeCMMotion."""
    from openmmml import MLPotential

    system = get_system("ethanol")
    omm = MLPotential("nnpq", model=w8_ani2x, backend="pythonforce").createSystem(system.topology, removeCMMotion=False)
    assert omm.getNumForces() == 1 and omm.getForce(0).getForceGroup() == 0
    energy, forces = _state(omm, system.positions / NM_TO_ANGSTROM)
    _assert_matches(w8_ani2x, system, energy, forces)


@pytest.fixture(scope="module")
def solvated():
    """The built-in ML/MM system and its all-MM (Amber14/TIP3P, PME, HBonds) System."""
    import openmm.app as app

    s = get_system("alanine-dipeptide-solvated")
    mm = app.ForceField(*s.mm_force_field).createSystem(s.topology, nonbondedMethod=app.PME,
                                                        nonbondedCutoff=0.9 * unit.nanometer,
                                                        constraints=app.HBonds, rigidWater=True)
    return s, mm


def test_solvated_system_splits_peptide_from_solvent_and_ions(solvated):
    s, _ = solvated
    assert s.ml_atoms == tuple(range(22)) and s.is_periodic
    symbols = set(np.asarray(s.symbols)[list(s.ml_atoms)])
    assert symbols == {"H", "C", "N", "O"}
    assert {"Na", "Cl"} <= set(s.symbols) and s.symbols.count("Na") == s.symbols.count("Cl")


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_mixed_system_ml_energy_equals_model_on_ligand(solvated, w8_path, backend):
    """createMixedSystem: the ML group's energy and forces are the standalone model's on the peptide alone."""
    from openmmml import MLPotential

    from nnpq.models import load_potential

    s, mm = solvated
    potential = load_potential(w8_path, "cell_list")
    ml = list(s.ml_atoms)
    mixed = MLPotential("nnpq", model=potential, backend=backend).createMixedSystem(s.topology, mm, ml, forceGroup=1)
    for force in mixed.getForces():
        if force.getForceGroup() != 1:
            force.setForceGroup(0)
    energy, forces = _state(mixed, s.positions / NM_TO_ANGSTROM, "CPU", groups={1})
    e_ref, f_ref = energy_and_forces(potential, s.atomic_numbers[ml], s.positions[ml])  # alone, in vacuum
    assert energy == pytest.approx(e_ref * HARTREE_TO_KJ_MOL, abs=ENERGY_ATOL_KJ)
    f_ref = f_ref * HARTREE_TO_KJ_MOL * NM_TO_ANGSTROM
    assert np.abs(forces[ml] - f_ref).max() <= FORCE_RTOL * np.abs(f_ref).max()
    assert np.all(forces[len(ml):] == 0.0)


def test_mixed_system_interpolate_and_remove_constraints(solvated, w8_ani2x):
    """lambda_interpolate=0 is the MM system, 1 the mixed one; ML-internal constraints go unless asked to stay."""
    from openmmml import MLPotential

    s, mm = solvated
    ml = list(s.ml_atoms)
    potential = MLPotential("nnpq", model=w8_ani2x, backend="pythonforce")
    pos = s.positions / NM_TO_ANGSTROM
    mixed = potential.createMixedSystem(s.topology, mm, ml)
    interp = potential.createMixedSystem(s.topology, mm, ml, interpolate=True)
    e_mm, _ = _state(mm, pos, "CPU")
    e_mixed, f_mixed = _state(mixed, pos, "CPU")
    e0, _ = _state(interp, pos, "CPU", parameters={"lambda_interpolate": 0.0})
    e1, f1 = _state(interp, pos, "CPU", parameters={"lambda_interpolate": 1.0})
    # MM energies are float32 sums on the CPU platform: ~1e-6 relative of the ~1e4 kJ/mol PME energy
    assert e0 == pytest.approx(e_mm, abs=0.05)
    assert e1 == pytest.approx(e_mixed, abs=0.05)
    assert np.abs(f1 - f_mixed).max() <= 1e-3 * np.abs(f_mixed).max()

    def internal(system):
        inside = set(ml)
        return sum(1 for i in range(system.getNumConstraints())
                   if set(system.getConstraintParameters(i)[:2]) <= inside)

    assert internal(mm) > 0 and internal(mixed) == 0
    kept = potential.createMixedSystem(s.topology, mm, ml, removeConstraints=False)
    assert internal(kept) == internal(mm)


def test_ase_periodic_forces_and_stress_match_finite_differences(w8_path):
    """Forces are the model's; stress (autograd through a strain) matches a central difference in the strain."""
    from nnpq.md.ase import NnpqCalculator
    from nnpq.models import load_potential

    system = get_system("water-box")
    potential = load_potential(w8_path, "cell_list")
    atoms = system.to_ase()
    atoms.calc = NnpqCalculator(potential)
    _, f_ref = energy_and_forces(potential, system.atomic_numbers, system.positions, system.box)
    assert np.allclose(atoms.get_forces(), f_ref * HARTREE_TO_EV_, atol=1e-6)
    stress = atoms.get_stress()
    assert stress.shape == (6,)
    # ASE's own central difference, E(R(1+eps), cell(1+eps)) / V, for xx and the shear xy (Voigt 0 and 5)
    eps = 1e-3
    energies = {}
    for i, j in ((0, 0), (0, 1)):
        for sign in (1, -1):
            strained = atoms.copy()
            strained.calc = atoms.calc
            deformation = np.eye(3)
            deformation[i, j] += 0.5 * sign * eps
            deformation[j, i] += 0.5 * sign * eps
            strained.set_cell(atoms.cell.array @ deformation, scale_atoms=True)
            energies[(i, j, sign)] = strained.get_potential_energy()
    volume = atoms.get_volume()
    numeric_xx = (energies[(0, 0, 1)] - energies[(0, 0, -1)]) / (2 * eps * volume)
    numeric_xy = (energies[(0, 1, 1)] - energies[(0, 1, -1)]) / (2 * eps * volume)
    scale = np.abs(stress).max()
    assert abs(stress[0] - numeric_xx) <= 2e-3 * scale
    assert abs(stress[5] - numeric_xy) <= 2e-3 * scale
    with pytest.raises(NnpqError, match="periodic"):
        vacuum = get_system("ethanol").to_ase()
        vacuum.calc = NnpqCalculator(potential)
        vacuum.get_stress()


def test_ase_dynamics_optimizer_and_cell_filter_on_water_box(w8_path):
    """Steps of ASE's Verlet and Langevin MD, BFGS, and BFGS on a FrechetCellFilter (the cell moves)."""
    from ase.filters import FrechetCellFilter
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from ase.optimize import BFGS
    from ase import units

    from nnpq.md.ase import NnpqCalculator
    from nnpq.models import load_potential

    atoms = get_system("water-box").to_ase()
    atoms.calc = NnpqCalculator(load_potential(w8_path, "cell_list"))
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    start = atoms.get_total_energy()
    VelocityVerlet(atoms, 0.5 * units.fs).run(2)
    # energy is conserved over 2 steps to a small fraction of the kinetic energy (~70 eV here)
    assert abs(atoms.get_total_energy() - start) < 0.05 * atoms.get_kinetic_energy()
    Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01, rng=np.random.default_rng(1)).run(1)
    fmax0 = np.linalg.norm(atoms.get_forces(), axis=1).max()
    e0 = atoms.get_potential_energy()
    BFGS(atoms, logfile=None).run(fmax=1e-3, steps=2)
    assert atoms.get_potential_energy() < e0 and np.linalg.norm(atoms.get_forces(), axis=1).max() < fmax0
    cell0 = atoms.cell.array.copy()
    e1 = atoms.get_potential_energy()
    BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-3, steps=2)
    assert atoms.get_potential_energy() < e1
    assert not np.allclose(atoms.cell.array, cell0)
