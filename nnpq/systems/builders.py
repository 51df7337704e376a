"""Builders for the catalogue's molecular systems.

Each builder returns a :class:`RawSystem` (atomic numbers, positions in
Angstrom, optional box in Angstrom, OpenMM topology). Builders are pure and
deterministic: they never touch the network and always produce bit-identical
coordinates for a given installation, so cached and fresh builds agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
import openmm.app as app
import openmm.unit as unit

# Fixed seed so ETKDG embedding (stochastic by design) is reproducible.
RDKIT_SEED = 20240607

_DATA = resources.files("nnpq.systems") / "data"


@dataclass(frozen=True, eq=False)
class RawSystem:
    """Builder output, before it is wrapped into a ``MolecularSystem``."""

    atomic_numbers: np.ndarray  # (N,) int64
    positions: np.ndarray  # (N, 3) float64, Angstrom
    box: np.ndarray | None  # (3, 3) float64, Angstrom, rows are box vectors
    topology: app.Topology


def _from_topology(
    topology: app.Topology, positions: unit.Quantity, periodic: bool
) -> RawSystem:
    """Turn an OpenMM topology + positions (any length unit) into a RawSystem in Angstrom."""
    z = np.array([a.element.atomic_number for a in topology.atoms()], dtype=np.int64)
    pos = np.asarray(positions.value_in_unit(unit.angstrom), dtype=np.float64)
    box = None
    if periodic:
        vecs = topology.getPeriodicBoxVectors()
        box = np.array([list(v.value_in_unit(unit.angstrom)) for v in vecs], dtype=np.float64)
    return RawSystem(z, pos.reshape(-1, 3), box, topology)


def smiles_to_rdkit(smiles: str, seed: int = RDKIT_SEED):
    """Embed ``smiles`` in 3D: explicit H, ETKDGv3 (fixed seed), MMFF94 minimum.

    Returns an RDKit ``Mol`` with one conformer (coordinates in Angstrom).
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    # Multithreaded embedding can change which attempt succeeds first.
    params.numThreads = 1
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise RuntimeError(f"RDKit could not embed {smiles!r}")
    # Converge fully so the geometry does not depend on the iteration budget.
    if AllChem.MMFFOptimizeMolecule(mol, maxIters=10_000) != 0:
        raise RuntimeError(f"MMFF did not converge for {smiles!r}")
    return mol


def rdkit_to_topology(mol, residue_name: str = "MOL") -> app.Topology:
    """One chain, one residue; atoms named element + per-element 1-based index."""
    from rdkit import Chem

    bond_types = {
        Chem.BondType.SINGLE: (app.Single, 1),
        Chem.BondType.DOUBLE: (app.Double, 2),
        Chem.BondType.TRIPLE: (app.Triple, 3),
        Chem.BondType.AROMATIC: (app.Aromatic, None),
    }
    top = app.Topology()
    chain = top.addChain()
    residue = top.addResidue(residue_name, chain)
    counts: dict[str, int] = {}
    atoms = []
    for atom in mol.GetAtoms():
        element = app.element.Element.getByAtomicNumber(atom.GetAtomicNum())
        counts[element.symbol] = counts.get(element.symbol, 0) + 1
        atoms.append(top.addAtom(f"{element.symbol}{counts[element.symbol]}", element, residue))
    for bond in mol.GetBonds():
        btype, order = bond_types.get(bond.GetBondType(), (None, None))
        top.addBond(atoms[bond.GetBeginAtomIdx()], atoms[bond.GetEndAtomIdx()], btype, order)
    return top


def build_from_smiles(smiles: str) -> RawSystem:
    """Vacuum system from SMILES (see :func:`smiles_to_rdkit`)."""
    mol = smiles_to_rdkit(smiles)
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    pos = np.array(mol.GetConformer().GetPositions(), dtype=np.float64)
    return RawSystem(z, pos, None, rdkit_to_topology(mol))


def build_from_pdb(filename: str) -> RawSystem:
    """System from a PDB shipped in ``nnpq/systems/data``.

    Periodic iff the file has a CRYST1 record. ``PDBFile`` adds bonds for
    standard residues (ACE/ALA/NME/HOH included) and from CONECT otherwise.
    """
    with resources.as_file(_DATA / filename) as path:
        pdb = app.PDBFile(str(path))
    periodic = pdb.topology.getPeriodicBoxVectors() is not None
    return _from_topology(pdb.topology, pdb.positions, periodic=periodic)


def build_water_box() -> RawSystem:
    """Cubic periodic box of equilibrated TIP3P water (see ``water-box.pdb``).

    The shipped PDB was made once by :mod:`nnpq.systems._make_data`:
    ``Modeller.addSolvent`` (TIP3P, 1.80 nm cube), energy minimisation, then
    NPT at 300 K / 1 bar so the density is liquid-like and there are no
    contacts across the periodic faces (raw addSolvent output has O-O pairs
    at 1.9 A there). Molecules are whole, with each oxygen inside [0, L).
    """
    return build_from_pdb("water-box.pdb")
