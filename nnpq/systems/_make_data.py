"""Regenerate the PDB files in ``nnpq/systems/data`` (developer tool).

Not used at run time: the catalogue loads the shipped PDB so that the
geometry never changes with the RDKit version. Run once with::

    python -m nnpq.systems._make_data [FILE.pdb ...]

``alanine-dipeptide.pdb``: ACE-ALA-NME (L-Ala), embedded with RDKit, set to
the C7eq basin (phi = -80 deg, psi = +75 deg, the vacuum minimum), MMFF94
minimised, and written with standard PDB/Amber residue and atom names so that
OpenMM adds residue bonds and mdtraj finds phi/psi.

``water-box.pdb``: TIP3P cube from ``Modeller.addSolvent`` (1.80 nm), energy
minimised, then 50 ps NPT (300 K, 1 bar, rigid water, fixed seeds) so the
density relaxes from ~0.95 to the TIP3P value and the clashes addSolvent leaves
across the periodic faces disappear. Molecules are wrapped whole, each oxygen
inside [0, L). 185 waters keep the PDB under 50 kB.

``alanine-dipeptide-solvated.pdb``: the alanine dipeptide above in a 2.1 nm TIP3P
cube with 0.15 M NaCl (one Na+/Cl- pair at this size), Amber14 (ff14SB) for the
peptide and TIP3P/Joung-Cheatham ions: minimised, then 20 ps NPT as for the water
box, residues wrapped whole. It is the built-in ML/MM system: ANI on the peptide,
Amber/TIP3P on the rest. A drug-like ligand would need GAFF or OpenFF parameters,
i.e. AmberTools' antechamber/sqm or the OpenFF toolkit, which pip cannot install;
the capped amino acid has parameters in OpenMM's own force fields.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openmm as mm
import openmm.app as app
import openmm.unit as unit
from openmm import Vec3

from nnpq.systems.builders import RDKIT_SEED, smiles_to_rdkit

# Heavy-atom order follows this SMILES: 0 CH3, 1 C, 2 O (ACE); 3 N, 4 CA,
# 5 CB, 6 C, 7 O (ALA); 8 N, 9 C (NME).
ALA_DIPEPTIDE_SMILES = "CC(=O)N[C@@H](C)C(=O)NC"
_HEAVY = {
    0: ("ACE", "CH3"), 1: ("ACE", "C"), 2: ("ACE", "O"),
    3: ("ALA", "N"), 4: ("ALA", "CA"), 5: ("ALA", "CB"), 6: ("ALA", "C"), 7: ("ALA", "O"),
    8: ("NME", "N"), 9: ("NME", "C"),
}
# Hydrogen names by parent heavy atom, in the order RDKit attaches them.
_H_NAMES = {0: ["H1", "H2", "H3"], 3: ["H"], 4: ["HA"], 5: ["HB1", "HB2", "HB3"],
            8: ["H"], 9: ["H1", "H2", "H3"]}
_ORDER = {
    "ACE": ["H1", "CH3", "H2", "H3", "C", "O"],
    "ALA": ["N", "H", "CA", "HA", "CB", "HB1", "HB2", "HB3", "C", "O"],
    "NME": ["N", "H", "C", "H1", "H2", "H3"],
}


def _alanine_dipeptide():
    from rdkit.Chem import AllChem, rdMolTransforms

    mol = smiles_to_rdkit(ALA_DIPEPTIDE_SMILES, seed=RDKIT_SEED)
    conf = mol.GetConformer()
    rdMolTransforms.SetDihedralDeg(conf, 1, 3, 4, 6, -80.0)  # phi: C-N-CA-C
    rdMolTransforms.SetDihedralDeg(conf, 3, 4, 6, 8, 75.0)  # psi: N-CA-C-N
    AllChem.MMFFOptimizeMolecule(mol, maxIters=10_000)

    names: dict[int, tuple[str, str]] = dict(_HEAVY)
    used: dict[int, int] = {}
    for atom in mol.GetAtoms():
        if atom.GetAtomicNum() == 1:
            parent = atom.GetNeighbors()[0].GetIdx()
            k = used.get(parent, 0)
            used[parent] = k + 1
            names[atom.GetIdx()] = (_HEAVY[parent][0], _H_NAMES[parent][k])
    by_name = {v: k for k, v in names.items()}
    assert len(by_name) == mol.GetNumAtoms() == 22

    top = app.Topology()
    chain = top.addChain("A")
    positions = []
    pos = conf.GetPositions()
    for resid, resname in enumerate(["ACE", "ALA", "NME"], start=1):
        residue = top.addResidue(resname, chain, id=str(resid))
        for atom_name in _ORDER[resname]:
            idx = by_name[(resname, atom_name)]
            z = mol.GetAtomWithIdx(idx).GetAtomicNum()
            top.addAtom(atom_name, app.element.Element.getByAtomicNumber(z), residue)
            positions.append(Vec3(*pos[idx]))
    return top, positions * unit.angstrom


WATER_BOX_EDGE_NM = 1.80
WATER_NPT_STEPS = 25_000  # 50 ps at 2 fs
WATER_SEED = 2024


def _water_box():
    ff = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
    modeller = app.Modeller(app.Topology(), [])
    edge = WATER_BOX_EDGE_NM
    modeller.addSolvent(ff, model="tip3p", boxSize=Vec3(edge, edge, edge) * unit.nanometer,
                        neutralize=False)
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.PME,
                             nonbondedCutoff=0.8 * unit.nanometer, constraints=app.HBonds,
                             rigidWater=True)
    barostat = mm.MonteCarloBarostat(1.0 * unit.bar, 300 * unit.kelvin)
    barostat.setRandomNumberSeed(WATER_SEED)
    system.addForce(barostat)
    integrator = mm.LangevinMiddleIntegrator(300 * unit.kelvin, 1.0 / unit.picosecond,
                                             2.0 * unit.femtosecond)
    integrator.setRandomNumberSeed(WATER_SEED)
    sim = app.Simulation(modeller.topology, system, integrator,
                         mm.Platform.getPlatformByName("CPU"))
    sim.context.setPositions(modeller.positions)
    sim.minimizeEnergy()
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, WATER_SEED)
    sim.step(WATER_NPT_STEPS)
    state = sim.context.getState(getPositions=True, getEnergy=True)
    box = np.array(state.getPeriodicBoxVectors().value_in_unit(unit.angstrom))
    pos = state.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
    inv = np.linalg.inv(box)
    for residue in modeller.topology.residues():
        idx = [a.index for a in residue.atoms()]
        pos[idx] -= np.floor(pos[idx[0]] @ inv) @ box  # first atom is O
    top = modeller.topology
    top.setPeriodicBoxVectors([Vec3(*row) for row in box] * unit.angstrom)
    n = top.getNumResidues()
    mass_g = n * 18.015 / 6.02214076e23
    print(f"water box: {n} waters, L = {box[0, 0]:.3f} A, "
          f"density = {mass_g / (np.linalg.det(box) * 1e-24):.3f} g/cm^3, "
          f"E_pot/molecule = {state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / n:.1f} kJ/mol")
    return top, [Vec3(*p) for p in pos] * unit.angstrom


SOLVATED_EDGE_NM = 2.1
SOLVATED_NPT_STEPS = 10_000  # 20 ps at 2 fs


def _solvated_dipeptide():
    ff = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
    pdb = app.PDBFile(str(Path(__file__).parent / "data" / "alanine-dipeptide.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    center = np.mean(pdb.positions.value_in_unit(unit.nanometer), axis=0)
    modeller.positions = [Vec3(*(np.asarray(p.value_in_unit(unit.nanometer)) - center
                                 + SOLVATED_EDGE_NM / 2)) for p in modeller.positions] * unit.nanometer
    edge = SOLVATED_EDGE_NM
    modeller.addSolvent(ff, model="tip3p", boxSize=Vec3(edge, edge, edge) * unit.nanometer,
                        ionicStrength=0.15 * unit.molar, positiveIon="Na+", negativeIon="Cl-")
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.PME,
                             nonbondedCutoff=0.9 * unit.nanometer, constraints=app.HBonds, rigidWater=True)
    barostat = mm.MonteCarloBarostat(1.0 * unit.bar, 300 * unit.kelvin)
    barostat.setRandomNumberSeed(WATER_SEED)
    system.addForce(barostat)
    integrator = mm.LangevinMiddleIntegrator(300 * unit.kelvin, 1.0 / unit.picosecond, 2.0 * unit.femtosecond)
    integrator.setRandomNumberSeed(WATER_SEED)
    sim = app.Simulation(modeller.topology, system, integrator, mm.Platform.getPlatformByName("CPU"))
    sim.context.setPositions(modeller.positions)
    sim.minimizeEnergy()
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, WATER_SEED)
    sim.step(SOLVATED_NPT_STEPS)
    state = sim.context.getState(getPositions=True)
    box = np.array(state.getPeriodicBoxVectors().value_in_unit(unit.angstrom))
    pos = state.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
    inv = np.linalg.inv(box)
    peptide = [a.index for a in modeller.topology.atoms() if a.residue.name in ("ACE", "ALA", "NME")]
    shift = np.floor(pos[peptide].mean(axis=0) @ inv) @ box
    pos[peptide] -= shift
    for residue in modeller.topology.residues():
        if residue.name in ("ACE", "ALA", "NME"):
            continue
        idx = [a.index for a in residue.atoms()]
        pos[idx] -= np.floor(pos[idx[0]] @ inv) @ box
    top = modeller.topology
    top.setPeriodicBoxVectors([Vec3(*row) for row in box] * unit.angstrom)
    counts = {}
    for residue in top.residues():
        counts[residue.name] = counts.get(residue.name, 0) + 1
    print(f"solvated dipeptide: {top.getNumAtoms()} atoms, {counts}, L = {box[0, 0]:.3f} A")
    return top, [Vec3(*p) for p in pos] * unit.angstrom


FILES = {"alanine-dipeptide.pdb": _alanine_dipeptide, "water-box.pdb": _water_box,
         "alanine-dipeptide-solvated.pdb": _solvated_dipeptide}


def main(names: list[str] | None = None) -> None:
    """Write the named files (default: all) into ``nnpq/systems/data``."""
    data = Path(__file__).parent / "data"
    data.mkdir(exist_ok=True)
    for filename in names or FILES:
        make = FILES[filename]
        top, positions = make()
        with open(data / filename, "w") as fh:
            app.PDBFile.writeFile(top, positions, fh, keepIds=True)
        print(f"wrote {data / filename} ({(data / filename).stat().st_size} bytes)")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
