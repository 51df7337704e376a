"""Scientific sanity checks for the built-in systems catalogue."""

from __future__ import annotations

import numpy as np
import openmm.unit as unit
import pytest

from nnpq.errors import NnpqError
from nnpq.systems import SYSTEMS, MolecularSystem, clear_cache, get_system, list_systems

AVOGADRO = 6.02214076e23
# Standard atomic masses (g/mol) for the elements ANI-2x covers.
MASS = {1: 1.008, 6: 12.011, 7: 14.007, 8: 15.999, 9: 18.998, 16: 32.06, 17: 35.45}

ALL = list_systems()


def _min_image(d: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """Minimum-image displacement vectors (works for any box shape via fractional coords)."""
    if box is None:
        return d
    frac = d @ np.linalg.inv(box)
    frac -= np.round(frac)
    return frac @ box


def _bond_index(system: MolecularSystem) -> np.ndarray:
    return np.array([(b[0].index, b[1].index) for b in system.topology.bonds()], dtype=int)


def test_catalogue_listing() -> None:
    assert ALL == sorted(ALL)
    assert set(ALL) == set(SYSTEMS)
    for required in ["ethanol", "aspirin", "alanine-dipeptide", "water-box", "sfcl-sulfonamide"]:
        assert required in ALL
    assert all(desc and "\n" not in desc for desc in SYSTEMS.values())


@pytest.mark.parametrize("name", ALL)
def test_builds_consistently(name: str) -> None:
    s = get_system(name)
    n = s.n_atoms
    assert s.name == name and s.description == SYSTEMS[name]
    assert s.atomic_numbers.shape == (n,) and s.atomic_numbers.dtype == np.int64
    assert s.positions.shape == (n, 3) and s.positions.dtype == np.float64
    assert np.all(np.isfinite(s.positions))
    assert s.topology.getNumAtoms() == n
    topo_z = [a.element.atomic_number for a in s.topology.atoms()]
    np.testing.assert_array_equal(topo_z, s.atomic_numbers)
    assert len(s.symbols) == n and set(s.atomic_numbers) <= set(MASS)  # ANI-2x elements only
    # Returned data must not be mutable through the cache.
    assert not s.positions.flags.writeable and not s.atomic_numbers.flags.writeable
    with pytest.raises(ValueError):
        s.positions[0, 0] = 1.0
    # OpenMM view: same coordinates in nm.
    np.testing.assert_allclose(np.array(s.positions_nm().value_in_unit(unit.angstrom)), s.positions)
    vecs = s.topology.getPeriodicBoxVectors()
    if s.box is None:
        assert vecs is None
    else:
        assert s.box.shape == (3, 3)
        np.testing.assert_allclose(
            np.array([v.value_in_unit(unit.nanometer) for v in vecs]) * 10.0, s.box
        )


@pytest.mark.parametrize("name", ALL)
def test_no_clashes(name: str) -> None:
    s = get_system(name)
    d = s.positions[:, None, :] - s.positions[None, :, :]
    r = np.linalg.norm(_min_image(d.reshape(-1, 3), s.box), axis=1).reshape(s.n_atoms, s.n_atoms)
    np.fill_diagonal(r, np.inf)
    assert r.min() > 0.7, f"closest pair at {r.min():.3f} A"


@pytest.mark.parametrize("name", ALL)
def test_bond_lengths(name: str) -> None:
    s = get_system(name)
    bonds = _bond_index(s)
    # A connected molecule has at least N-1 bonds; a water box has 2 per molecule.
    assert len(bonds) >= (s.n_atoms - 1 if s.box is None else 2 * s.n_atoms // 3)
    d = _min_image(s.positions[bonds[:, 0]] - s.positions[bonds[:, 1]], s.box)
    r = np.linalg.norm(d, axis=1)
    z = s.atomic_numbers[bonds]
    is_xh = (z == 1).any(axis=1) & ~(z == 1).all(axis=1)
    assert np.all((r > 0.9) & (r < 1.9)), r[(r <= 0.9) | (r >= 1.9)]
    # X-H (C-H, N-H, O-H) bonds are 0.95-1.10 A in every force field / QM geometry.
    assert np.all((r[is_xh] > 0.94) & (r[is_xh] < 1.12)), r[is_xh]
    # Every hydrogen has exactly one bond to a heavy atom (i.e. the topology is complete).
    heavy_partner = np.zeros(s.n_atoms, dtype=int)
    for (i, j), (zi, zj) in zip(bonds, z):
        if zi == 1 and zj != 1:
            heavy_partner[i] += 1
        if zj == 1 and zi != 1:
            heavy_partner[j] += 1
    assert np.all(heavy_partner[s.atomic_numbers == 1] == 1)


def test_water_box_is_liquid_water() -> None:
    s = get_system("water-box")
    assert 200 <= s.n_atoms <= 800 and s.n_atoms % 3 == 0
    assert np.count_nonzero(s.atomic_numbers == 8) * 2 == np.count_nonzero(s.atomic_numbers == 1)
    # Cubic box.
    np.testing.assert_allclose(s.box, np.diag(np.diag(s.box)))
    assert np.ptp(np.diag(s.box)) == 0.0
    volume_cm3 = abs(np.linalg.det(s.box)) * 1e-24
    mass_g = sum(MASS[int(z)] for z in s.atomic_numbers) / AVOGADRO
    assert 0.9 < mass_g / volume_cm3 < 1.1, mass_g / volume_cm3
    # Whole molecules, oxygens inside the cell; hydrogens may poke out by < one O-H bond.
    frac = s.positions @ np.linalg.inv(s.box)
    assert np.all(frac[s.atomic_numbers == 8] >= -1e-6) and np.all(frac[s.atomic_numbers == 8] < 1 + 1e-6)
    edge = s.box[0, 0]
    assert s.positions.min() > -1.1 and s.positions.max() < edge + 1.1
    # No water-water contacts, also across the periodic faces: in liquid water the
    # O-O radial distribution function is zero below ~2.4 A.
    o = s.positions[s.atomic_numbers == 8]
    d = _min_image((o[:, None, :] - o[None, :, :]).reshape(-1, 3), s.box)
    r_oo = np.linalg.norm(d, axis=1).reshape(len(o), len(o))
    np.fill_diagonal(r_oo, np.inf)
    assert r_oo.min() > 2.35, r_oo.min()
    # HOH angle of rigid TIP3P-like water is ~104.5 deg.
    for res in list(s.topology.residues())[:10]:
        idx = {a.name: a.index for a in res.atoms()}
        v1 = s.positions[idx["H1"]] - s.positions[idx["O"]]
        v2 = s.positions[idx["H2"]] - s.positions[idx["O"]]
        angle = np.degrees(np.arccos(v1 @ v2 / np.linalg.norm(v1) / np.linalg.norm(v2)))
        assert 100 < angle < 110


def test_water_box_tip3p_energy() -> None:
    """Equilibrated TIP3P at 300 K has E_pot ~ -41 kJ/mol per molecule; clashes would wreck it."""
    import openmm as mm
    import openmm.app as app

    s = get_system("water-box")
    ff = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
    system = ff.createSystem(s.topology, nonbondedMethod=app.PME, nonbondedCutoff=0.8 * unit.nanometer)
    context = mm.Context(system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference"))
    context.setPositions(s.positions_nm())
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    per_water = energy / np.count_nonzero(s.atomic_numbers == 8)
    assert -46.0 < per_water < -36.0, per_water


def test_sfcl_sulfonamide_has_all_ani2x_elements() -> None:
    s = get_system("sfcl-sulfonamide")
    assert {"S", "F", "Cl"} <= set(s.symbols)
    assert set(s.symbols) == {"H", "C", "N", "O", "S", "F", "Cl"}
    # C6H5ClFNO2S
    assert sorted(s.symbols) == sorted(["C"] * 6 + ["H"] * 5 + ["Cl", "F", "N", "O", "O", "S"])


def test_small_molecule_formulas() -> None:
    assert sorted(get_system("ethanol").symbols) == sorted("CCOHHHHHH")
    aspirin = get_system("aspirin").symbols
    assert (aspirin.count("C"), aspirin.count("H"), aspirin.count("O")) == (9, 8, 4)


def test_alanine_dipeptide_backbone() -> None:
    md = pytest.importorskip("mdtraj")
    s = get_system("alanine-dipeptide")
    assert s.n_atoms == 22
    assert [r.name for r in s.topology.residues()] == ["ACE", "ALA", "NME"]
    assert s.topology.getNumBonds() == 21  # acyclic: N - 1 bonds
    top = md.Topology.from_openmm(s.topology)
    traj = md.Trajectory(s.positions[None] / 10.0, top)
    phi_idx, phi = md.compute_phi(traj)
    psi_idx, psi = md.compute_psi(traj)
    assert phi_idx.shape == (1, 4) and psi_idx.shape == (1, 4)
    # L-alanine in vacuum: C7eq basin (phi ~ -80 deg, psi ~ +60..+80 deg).
    assert -120 < np.degrees(phi[0, 0]) < -50
    assert 30 < np.degrees(psi[0, 0]) < 110
    # Both peptide bonds are trans (omega ~ 180 deg).
    names = {(a.residue.name, a.name): a.index for a in s.topology.atoms()}
    for quad in [
        (("ACE", "CH3"), ("ACE", "C"), ("ALA", "N"), ("ALA", "CA")),
        (("ALA", "CA"), ("ALA", "C"), ("NME", "N"), ("NME", "C")),
    ]:
        omega = md.compute_dihedrals(traj, [[names[k] for k in quad]])[0, 0]
        assert abs(np.degrees(omega)) > 160


def test_deterministic_rebuild() -> None:
    first = {name: get_system(name) for name in ALL}
    clear_cache()
    for name in ALL:
        again = get_system(name)
        assert again is not first[name]
        np.testing.assert_array_equal(again.atomic_numbers, first[name].atomic_numbers)
        np.testing.assert_array_equal(again.positions, first[name].positions)
        if first[name].box is None:
            assert again.box is None
        else:
            np.testing.assert_array_equal(again.box, first[name].box)


def test_topology_is_a_copy() -> None:
    s = get_system("ethanol")
    s.topology.addChain()
    assert get_system("ethanol").topology.getNumChains() == 1


def test_unknown_name_error() -> None:
    with pytest.raises(NnpqError) as info:
        get_system("foo")
    msg = str(info.value)
    assert "\n" not in msg
    assert "'foo'" in msg and "nnpq systems" in msg
    assert all(name in msg for name in ALL)
    with pytest.raises(NnpqError, match=r"did you mean 'ethanol'\?"):
        get_system("ethanl")


def test_to_ase() -> None:
    water = get_system("water-box").to_ase()
    assert water.pbc.all()
    np.testing.assert_allclose(water.cell[:], get_system("water-box").box)
    ethanol = get_system("ethanol")
    atoms = ethanol.to_ase()
    assert not atoms.pbc.any()
    assert atoms.get_chemical_symbols() == list(ethanol.symbols)
    np.testing.assert_allclose(atoms.positions, ethanol.positions)
    atoms.positions[0] += 1.0  # ASE copy is independent of the cached system
    assert not np.allclose(atoms.positions[0], get_system("ethanol").positions[0])
