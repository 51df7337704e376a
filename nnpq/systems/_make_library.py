"""Regenerate ``nnpq/systems/data/library-frames.npz``, the calibration library's frames (developer tool).

Not used at run time. Run once with::

    python -m nnpq.systems._make_library

For every molecule of ``library.csv``: an RDKit ETKDG + MMFF94 conformer, then Langevin MD with
FP32 ANI-2x at 300 K and 600 K (all molecules in one padded TorchANI batch, BAOAB, 0.5 fs),
keeping frames after 100, 125 and 150 fs. A condensed organic liquid (methanol, acetonitrile and
dichloromethane, 9 molecules each, in a cubic box) is relaxed and run the same way at 300 K.
Molecules whose MD breaks a bond (any bonded distance above 1.6x its start) are left out with a
message: ANI-2x was trained on neutral molecules and may not hold a charged one together.
"""

from __future__ import annotations

import csv
import io
from importlib import resources
from pathlib import Path

import numpy as np
import torch

SEED = 20261126
TEMPERATURES = (300.0, 600.0)
TIMESTEP_FS = 0.5
FRICTION_PER_FS = 0.01
SAVE_STEPS = (200, 250, 300)
BUCKET = 40  # molecules per padded batch, in size order, so padding costs little
LIQUID = (("CO", 9), ("CC#N", 9), ("ClCCl", 9))
LIQUID_EDGE = 13.3  # Å: ~liquid density for these 27 molecules, above twice the 5.1 Å cutoff
LIQUID_STEPS = 1200
LIQUID_SAVE = (800, 1000, 1200)


def read_library() -> list[tuple[str, str]]:
    """(name, SMILES) rows of the shipped ``library.csv``."""
    text = (resources.files("nnpq.systems") / "data" / "library.csv").read_text()
    return [(row["name"], row["smiles"]) for row in csv.DictReader(io.StringIO(text))]


def _masses(numbers: torch.Tensor) -> torch.Tensor:
    from ase.data import atomic_masses

    return torch.tensor(atomic_masses, dtype=torch.float64)[numbers.clamp(min=1)]


def langevin(model, species: torch.Tensor, coords: torch.Tensor, temperature: float, steps: int,
             save: tuple[int, ...], seed: int, cell=None) -> list[np.ndarray]:
    """BAOAB Langevin MD of a padded batch (species -1 = padding) with an ANI model; ASE units.

    Returns the coordinates (Å) at the ``save`` steps.
    """
    from ase import units

    gen = torch.Generator().manual_seed(seed)
    real = (species >= 0).unsqueeze(-1).to(torch.float64)
    mass = _masses(species).unsqueeze(-1) * real + (1.0 - real)  # padding: unit mass, zero force
    kt = units.kB * temperature
    dt = TIMESTEP_FS * units.fs
    c1 = float(np.exp(-FRICTION_PER_FS * TIMESTEP_FS))
    c2 = float(np.sqrt(1 - c1**2))
    x = coords.to(torch.float64).clone()
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64) * torch.sqrt(kt / mass) * real
    pbc = None if cell is None else torch.ones(3, dtype=torch.bool)

    def forces(x):
        xr = x.to(torch.float32).requires_grad_(True)
        e = model((species, xr), cell=cell, pbc=pbc).energies.sum() * units.Hartree
        (g,) = torch.autograd.grad(e, xr)
        return -g.to(torch.float64) * real

    f = forces(x)
    out = []
    for step in range(1, steps + 1):
        v = v + 0.5 * dt * f / mass
        x = x + 0.5 * dt * v
        v = c1 * v + c2 * torch.sqrt(kt / mass) * torch.randn(x.shape, generator=gen, dtype=torch.float64) * real
        x = x + 0.5 * dt * v
        f = forces(x)
        v = v + 0.5 * dt * f / mass
        if step in save:
            out.append(x.numpy().copy())
    return out


def _bonds_intact(mol, start: np.ndarray, frames: list[np.ndarray]) -> bool:
    pairs = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]).reshape(-1, 2)
    d0 = np.linalg.norm(start[pairs[:, 0]] - start[pairs[:, 1]], axis=1)
    return all(np.all(np.linalg.norm(f[pairs[:, 0]] - f[pairs[:, 1]], axis=1) < 1.6 * d0) for f in frames)


def molecules(model) -> dict[str, np.ndarray]:
    from nnpq.systems.builders import smiles_to_rdkit

    rows = read_library()
    mols = [smiles_to_rdkit(smiles) for _, smiles in rows]
    order = sorted(range(len(mols)), key=lambda i: mols[i].GetNumAtoms())
    starts: dict[int, np.ndarray] = {}
    trajectories: dict[int, list[np.ndarray]] = {i: [] for i in order}
    for b0 in range(0, len(order), BUCKET):
        bucket = order[b0:b0 + BUCKET]
        n_max = max(mols[i].GetNumAtoms() for i in bucket)
        species = torch.full((len(bucket), n_max), -1, dtype=torch.long)
        coords = torch.zeros(len(bucket), n_max, 3)
        for row, i in enumerate(bucket):
            n = mols[i].GetNumAtoms()
            species[row, :n] = torch.tensor([a.GetAtomicNum() for a in mols[i].GetAtoms()])
            coords[row, :n] = torch.tensor(mols[i].GetConformer().GetPositions(), dtype=torch.float32)
            starts[i] = coords[row, :n].numpy().astype(np.float64)
        for k, t in enumerate(TEMPERATURES):
            frames = langevin(model, species, coords, t, max(SAVE_STEPS), SAVE_STEPS, SEED + 100 * b0 + k)
            for row, i in enumerate(bucket):
                trajectories[i] += [f[row, :mols[i].GetNumAtoms()] for f in frames]
        print(f"MD done for {b0 + len(bucket)} of {len(mols)} molecules", flush=True)
    data: dict[str, np.ndarray] = {}
    for i, ((name, _), mol) in enumerate(zip(rows, mols)):
        start, frames = starts[i], trajectories[i]
        if not _bonds_intact(mol, start, frames):
            print(f"left out {name}: a bond broke in ANI-2x MD")
            continue
        data[f"{name}/numbers"] = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int8)
        data[f"{name}/frames"] = np.stack([start] + frames).astype(np.float32)  # start, md300K x3, md600K x3
    return data


def liquid(model) -> dict[str, np.ndarray]:
    """A cubic box of the LIQUID mixture: molecules on a 3x3x3 grid, random orientations, relaxed, MD at 300 K."""
    from scipy.spatial.transform import Rotation

    from nnpq.systems.builders import smiles_to_rdkit

    rng = np.random.default_rng(SEED)
    kinds = [smiles for smiles, count in LIQUID for _ in range(count)]
    rng.shuffle(kinds)
    spacing = LIQUID_EDGE / 3
    numbers, positions = [], []
    for k, smiles in enumerate(kinds):
        mol = smiles_to_rdkit(smiles)
        xyz = mol.GetConformer().GetPositions()
        xyz = (xyz - xyz.mean(0)) @ Rotation.random(random_state=rng.integers(1 << 31)).as_matrix().T
        site = (np.array(np.unravel_index(k, (3, 3, 3))) + 0.5) * spacing
        numbers += [a.GetAtomicNum() for a in mol.GetAtoms()]
        positions.append(xyz + site)
    species = torch.tensor([numbers])
    coords = torch.tensor(np.concatenate(positions)[None], dtype=torch.float32)
    cell = torch.eye(3) * LIQUID_EDGE
    # relax the grid's close contacts before dynamics: a few hundred capped steepest-descent steps
    x = coords.clone()
    for _ in range(300):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model((species, xr), cell=cell, pbc=torch.ones(3, dtype=torch.bool)).energies.sum(), xr)
        step = -0.02 * g / g.norm(dim=-1, keepdim=True).clamp(min=1.0)
        x = x + step.clamp(-0.05, 0.05)
    frames = langevin(model, species, x, 300.0, LIQUID_STEPS, LIQUID_SAVE, SEED + 7, cell)
    return {"organic-liquid/numbers": species[0].numpy().astype(np.int8),
            "organic-liquid/frames": np.stack([f[0] for f in frames]).astype(np.float32),
            "organic-liquid/cell": cell.numpy().astype(np.float32)}


def main() -> None:
    import torchani

    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # many small batched calls: threads only add synchronisation
    model = torchani.models.ANI2x(periodic_table_index=True).eval()
    data = molecules(model)
    model_pbc = torchani.models.ANI2x(periodic_table_index=True, neighborlist="cell_list").eval()
    data.update(liquid(model_pbc))
    path = Path(__file__).parent / "data" / "library-frames.npz"
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **data)
    path.write_bytes(buffer.getvalue())
    print(f"wrote {path} ({path.stat().st_size} bytes, {sum(1 for k in data if k.endswith('/frames'))} systems)")


if __name__ == "__main__":
    main()
