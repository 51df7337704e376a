"""Structural observables of a trajectory, on bins fixed by the system so runs compare bin by bin.

- ``rdf_O-O``, ``rdf_O-H``: water radial distribution functions (``mdtraj.compute_rdf``,
  intermolecular pairs only), x in nm;
- ``phi``, ``psi``: backbone dihedral distributions (``mdtraj.compute_phi/psi``), degrees;
- ``bond_X-Y``: bond-length distribution of each bonded element pair, Å.

Each observable is a curve ``{"x": bin centres, "y": values}`` (g(r) for RDFs, a normalized
histogram otherwise). `distribution` turns it into probabilities for the Jensen-Shannon
distance (an RDF becomes the pair-distance distribution, proportional to g(r) r^2).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

RDF_BIN_NM = 0.01
ANGLE_BINS = 36
BOND_BINS = 30


def _md_trajectory(topology, positions_nm: np.ndarray, box_nm: np.ndarray | None):
    import mdtraj as md

    top = md.Topology.from_openmm(topology)
    traj = md.Trajectory(np.asarray(positions_nm, dtype=np.float32), top)
    if box_nm is not None:
        traj.unitcell_vectors = np.repeat(np.asarray(box_nm, dtype=np.float32)[None], len(positions_nm), axis=0)
    return traj


def _rdf_pairs(top) -> dict[str, np.ndarray]:
    oxygens = [a for a in top.atoms if a.element.symbol == "O"]
    hydrogens = [a for a in top.atoms if a.element.symbol == "H"]
    if len(oxygens) < 2:
        return {}
    oo = [(a.index, b.index) for i, a in enumerate(oxygens) for b in oxygens[i + 1:]]
    oh = [(a.index, b.index) for a in oxygens for b in hydrogens if a.residue.index != b.residue.index]
    return {"rdf_O-O": np.array(oo), "rdf_O-H": np.array(oh)}


def _backbone(top, traj) -> dict[str, np.ndarray]:
    """phi/psi (degrees) of the first residue that has both."""
    import mdtraj as md

    phi_idx, phi = md.compute_phi(traj)
    psi_idx, psi = md.compute_psi(traj)
    # pair by the residue owning N: in an uncapped peptide the first psi has no phi
    phi_res = [top.atom(int(i[1])).residue.index for i in phi_idx]
    psi_res = [top.atom(int(i[0])).residue.index for i in psi_idx]
    common = sorted(set(phi_res) & set(psi_res))
    if not common:
        return {}
    r = common[0]
    return {"phi": np.degrees(phi[:, phi_res.index(r)]), "psi": np.degrees(psi[:, psi_res.index(r)])}


def _bond_types(topology, reference_nm: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Bond index pairs per element pair (heavier element first) and bin edges (Å) around the
    lengths in ``reference_nm``: 0.8x the shortest to 1.25x the longest."""
    groups: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for a, b in topology.bonds():
        if b.element.atomic_number > a.element.atomic_number:
            a, b = b, a
        groups[f"bond_{a.element.symbol}-{b.element.symbol}"].append((a.index, b.index))
    out = {}
    for name, pairs in sorted(groups.items()):
        index = np.array(pairs)
        lengths = np.linalg.norm(reference_nm[index[:, 0]] - reference_nm[index[:, 1]], axis=1) * 10.0
        out[name] = (index, np.linspace(0.8 * lengths.min(), 1.25 * lengths.max(), BOND_BINS + 1))
    return out


def measure(topology, reference_nm: np.ndarray, positions_nm: np.ndarray,
            box_nm: np.ndarray | None) -> dict[str, dict[str, list[float]]]:
    """Every observable the system has, on ``positions_nm`` (F, N, 3) (unwrapped, nm).

    Args:
        topology: the system's ``openmm.app.Topology`` (bonds, residues, elements).
        reference_nm: (N, 3) catalogue positions, which fix the bond-length bins.
        box_nm: (3, 3) periodic box or None.
    """
    import mdtraj as md

    traj = _md_trajectory(topology, positions_nm, box_nm)
    out: dict[str, dict[str, list[float]]] = {}
    if box_nm is not None:
        r_max = min(0.8, 0.5 * float(np.min(np.diag(box_nm))) - RDF_BIN_NM)
        for name, pairs in _rdf_pairs(traj.topology).items():
            r, g = md.compute_rdf(traj, pairs, r_range=(0.2, r_max), bin_width=RDF_BIN_NM)
            out[name] = {"x": r.astype(float).tolist(), "y": g.astype(float).tolist()}
    edges = np.linspace(-180.0, 180.0, ANGLE_BINS + 1)
    for name, angles in _backbone(traj.topology, traj).items():
        hist, _ = np.histogram(angles, bins=edges, density=True)
        out[name] = {"x": (0.5 * (edges[1:] + edges[:-1])).tolist(), "y": hist.tolist(),
                     "samples": angles.astype(float).tolist()}
    for name, (pairs, bond_edges) in _bond_types(topology, reference_nm).items():
        lengths = md.compute_distances(traj, pairs, periodic=box_nm is not None).reshape(-1) * 10.0
        hist, _ = np.histogram(lengths, bins=bond_edges)
        density = hist / max(hist.sum(), 1) / np.diff(bond_edges)
        out[name] = {"x": (0.5 * (bond_edges[1:] + bond_edges[:-1])).tolist(), "y": density.tolist()}
    return out


def distribution(name: str, curve: dict[str, list[float]]) -> np.ndarray:
    """Probabilities over the bins of an observable (sums to 1; uniform if empty)."""
    x = np.asarray(curve["x"], dtype=np.float64)
    y = np.clip(np.asarray(curve["y"], dtype=np.float64), 0.0, None)
    if name.startswith("rdf_"):
        y = y * x**2
    total = y.sum()
    return y / total if total > 0 else np.full(len(y), 1.0 / len(y))


def js_distance(name: str, a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two curves of observable ``name``."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(distribution(name, a), distribution(name, b), base=2))
