"""Configurations (atomic numbers, positions in Angstrom, optional cell) and reading them from files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnpq.errors import NnpqError


@dataclass(frozen=True, eq=False)
class Configuration:
    """One structure: ``numbers`` (N,), ``positions`` (N, 3) in Å, ``cell`` (3, 3) in Å or ``None``."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray | None = None
    source: str = ""

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @property
    def group(self) -> str:
        """The system or file a configuration came from: ``source`` up to its first ``/`` or ``:``."""
        return self.source.split("/")[0].split(":")[0]

    @property
    def molecule(self) -> str:
        """The molecule a configuration is of: ``source`` up to its first ``/`` (``library:ethanol``)."""
        return self.source.split("/")[0]

    @property
    def kind(self) -> str:
        """How a calibration configuration was made (``md300K``, ``displaced``, ...); ``file`` otherwise."""
        parts = self.source.split("/")
        return parts[1] if len(parts) >= 2 else "file"


def _from_atoms(atoms, source: str) -> Configuration:
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any() and not pbc.all():
        raise NnpqError(f"{source}: partial periodicity pbc={pbc.tolist()} is not supported; use full or no PBC")
    cell = np.array(atoms.cell.array, dtype=np.float64) if pbc.all() else None
    return Configuration(np.array(atoms.numbers, dtype=np.int64), np.array(atoms.positions, dtype=np.float64),
                         cell, source)


def read_configurations(path: str | os.PathLike, topology: str | os.PathLike | None = None) -> list[Configuration]:
    """All frames of a structure file: XYZ, extended XYZ, PDB (ASE), or DCD with a topology (mdtraj).

    Raises:
        NnpqError: missing or empty file, unreadable format, DCD without ``topology``, no frames, a frame
            without atoms, or two identical frames (named by their indices).
    """
    path = Path(path)
    if not path.is_file():
        raise NnpqError(f"structure file {path} not found")
    if path.stat().st_size == 0:
        raise NnpqError(f"{path.name} is empty; give a file with at least one structure")
    configs = _read_dcd(path, topology) if path.suffix.lower() == ".dcd" else _read_ase(path)
    _check_frames(configs, path.name)
    return configs


def _check_frames(configs: list[Configuration], name: str) -> None:
    """Frames without atoms, or the same frame twice (it would count twice in every error), are refused."""
    empty = [i for i, c in enumerate(configs) if c.n_atoms == 0]
    if empty:
        raise NnpqError(f"{name}: frame(s) {', '.join(map(str, empty[:10]))}{' ...' if len(empty) > 10 else ''} "
                        "hold no atoms; remove them from the file")
    seen: dict[bytes, int] = {}
    for i, c in enumerate(configs):
        key = b"|".join(np.ascontiguousarray(a).tobytes() for a in (c.numbers, c.positions, c.cell) if a is not None)
        if key in seen:
            raise NnpqError(f"{name}: frames {seen[key]} and {i} are identical (same atoms at the same positions); "
                            "remove the duplicate so that it is not counted twice")
        seen[key] = i


def _read_ase(path: Path) -> list[Configuration]:
    import ase.io

    try:
        frames = ase.io.read(str(path), index=":")
    except Exception as exc:
        raise NnpqError(f"cannot read {path.name} as a structure file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); use XYZ, extended XYZ, PDB or DCD")
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise NnpqError(f"{path.name} holds no structures; give a file with at least one structure")
    return [_from_atoms(a, f"{path.name}:{i}") for i, a in enumerate(frames)]


def _read_dcd(path: Path, topology: str | os.PathLike | None) -> list[Configuration]:
    if topology is None:
        raise NnpqError(f"{path.name} is a DCD trajectory: give its topology too, a PDB with the same atoms "
                        "(--topology for nnpq evaluate, --calibration-topology for nnpq quantize)")
    import mdtraj as md

    try:
        traj = md.load(str(path), top=str(topology))
    except Exception as exc:
        raise NnpqError(f"cannot read {path.name} with topology {Path(topology).name} ({type(exc).__name__})") from None
    numbers = np.array([a.element.atomic_number for a in traj.topology.atoms], dtype=np.int64)
    out = []
    for i in range(traj.n_frames):
        cell = None if traj.unitcell_vectors is None else np.array(traj.unitcell_vectors[i], dtype=np.float64) * 10.0
        out.append(Configuration(numbers, np.array(traj.xyz[i], dtype=np.float64) * 10.0, cell, f"{path.name}:{i}"))
    return out
