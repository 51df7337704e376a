"""The calibration library: ~200 molecules covering every ANI-2x element in its common bonding
situations, plus condensed phases, and a split by functional group for measuring generalization.

``library.csv`` (shipped) lists the molecules by SMILES; ``library-frames.npz`` (shipped, made
offline by `nnpq.systems._make_library`) holds, per molecule, the RDKit/MMFF start and FP32 ANI-2x
Langevin frames at 300 K and 600 K, and an organic-liquid box. Functional groups are found by
SMARTS (RDKit); `chemistry_split` holds out every molecule carrying one of a seeded choice of
groups, so the held-out molecules have chemistry that calibration never saw.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from importlib import resources

import numpy as np

_DATA = resources.files("nnpq.systems") / "data"
FRAME_KINDS = ("start", "md300K/0", "md300K/1", "md300K/2", "md600K/0", "md600K/1", "md600K/2")
LIQUID_KINDS = ("md300K/0", "md300K/1", "md300K/2")

# Functional groups by SMARTS. A held-out group takes every molecule that has it out of calibration.
GROUPS: dict[str, str] = {
    "alkene": "[CX3]=[CX3]",
    "alkyne": "[CX2]#[CX2]",
    "alcohol": "[CX4][OX2H]",
    "phenol": "c[OX2H]",
    "ether": "[OD2]([#6])[#6]",
    "carbonyl-aldehyde-ketone": "[#6][CX3](=O)[#1,#6]",
    "carboxylic-acid": "[CX3](=O)[OX2H]",
    "carboxylate": "[CX3](=O)[O-]",
    "ester-lactone-carbonate": "[#6,#8][CX3](=O)[OX2][#6]",
    "amine": "[NX3;H2,H1,H0;!$(N[C,S]=[O,S,N]);!$(N-a);!$(N[N,O])]([#6])",
    "aniline": "c[NX3;!$(N[C,S]=[O,S,N])]",
    "amide-urea-carbamate": "[NX3][CX3]=O",
    "nitrile-isocyanide": "[C,N]#[N,C]",
    "nitro-nitrate": "[N+](=O)[O-]",
    "imine-amidine-oxime": "[CX3]=[NX2]",
    "azine-n": "[nX2]",
    "pyrrole-n": "[nX3]",
    "cation-n": "[#7+;!$([N+](=O)[O-]);!$([n+][O-])]",
    "thiol-thiolate": "[SX2H1,SX1-]",
    "thioether": "[#6][SX2][#6]",
    "disulfide": "[SX2][SX2]",
    "thiophene-thiazole": "[sX2]",
    "sulfoxide": "[SX3]=O",
    "sulfonyl": "[SX4](=O)(=O)",
    "sulfonamide": "[SX4](=O)(=O)[NX3]",
    "thiocarbonyl-heterocumulene": "[#6]=[SX1]",
    "monofluoroalkyl": "[CX4;!$(C(F)(F))]F",
    "trifluoromethyl": "[CX4](F)(F)F",
    "fluoroaryl": "cF",
    "fluoroalkenyl-acyl-sulfonyl": "[CX3,SX4]F",
    "chloroalkyl": "[CX4;!$(C(Cl)(Cl)Cl)]Cl",
    "trichloromethyl": "[CX4](Cl)(Cl)Cl",
    "chloroaryl": "cCl",
    "chloroalkenyl-acyl-sulfonyl": "[CX3,SX4]Cl",
}


@dataclass(frozen=True, eq=False)
class LibraryEntry:
    """One library system: ``frames`` (F, N, 3) Å in ``kinds`` order, ``cell`` (3, 3) Å or ``None``."""

    name: str
    smiles: str
    numbers: np.ndarray
    frames: np.ndarray
    kinds: tuple[str, ...]
    cell: np.ndarray | None = None


@functools.lru_cache(maxsize=None)
def library() -> tuple[LibraryEntry, ...]:
    """Every shipped library system (molecules, then the organic liquid)."""
    rows = list(csv.DictReader(io.StringIO((_DATA / "library.csv").read_text())))
    with resources.as_file(_DATA / "library-frames.npz") as path, np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    entries = [LibraryEntry(r["name"], r["smiles"], arrays[f"{r['name']}/numbers"].astype(np.int64),
                            arrays[f"{r['name']}/frames"].astype(np.float64), FRAME_KINDS)
               for r in rows if f"{r['name']}/frames" in arrays]
    entries.append(LibraryEntry("organic-liquid", "CO.CC#N.ClCCl", arrays["organic-liquid/numbers"].astype(np.int64),
                                arrays["organic-liquid/frames"].astype(np.float64), LIQUID_KINDS,
                                arrays["organic-liquid/cell"].astype(np.float64)))
    return tuple(entries)


@functools.lru_cache(maxsize=None)
def functional_groups(smiles: str) -> frozenset[str]:
    """The `GROUPS` present in a molecule (a dot-separated mixture counts all its components)."""
    from rdkit import Chem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    return frozenset(name for name, smarts in GROUPS.items() if mol.HasSubstructMatch(_pattern(smarts)))


@functools.lru_cache(maxsize=None)
def _pattern(smarts: str):
    from rdkit import Chem

    return Chem.MolFromSmarts(smarts)


def chemistry_split(entries: tuple[LibraryEntry, ...], seed: int, fraction: tuple[float, float] = (0.15, 0.25),
                    min_per_element: int = 6) -> tuple[list[LibraryEntry], list[LibraryEntry], list[str]]:
    """Split the library by functional group: ``(calibration, held_out, held_out_groups)``.

    Groups are drawn in a seeded order and held out while the held-out share of molecules stays
    within ``fraction`` and every element keeps ``min_per_element`` calibration molecules;
    every molecule carrying a held-out group is held out, so no held-out group is in calibration.
    Condensed phases (periodic entries) always stay in calibration.
    """
    rng = np.random.default_rng(seed)
    molecules = [e for e in entries if e.cell is None]
    groups = {e.name: functional_groups(e.smiles) for e in molecules}
    chosen: list[str] = []
    held: set[str] = set()
    for name in rng.permutation(sorted(GROUPS)).tolist():
        trial = held | {e.name for e in molecules if name in groups[e.name]}
        if trial == held or len(trial) > fraction[1] * len(molecules):
            continue
        kept = [e for e in molecules if e.name not in trial]
        counts = {int(z): sum(1 for e in kept if z in e.numbers) for z in {int(z) for e in molecules for z in e.numbers}}
        if min(counts.values()) < min_per_element:
            continue
        chosen.append(name)
        held = trial
        if len(held) >= fraction[0] * len(molecules):
            break
    calibration = [e for e in entries if e.name not in held]
    return calibration, [e for e in entries if e.name in held], sorted(chosen)
