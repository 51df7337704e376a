"""Structures, model names and missing weights: one clear line from every entry point.

Each bad structure (a periodic cell narrower than twice the cutoff, overlapping atoms, empty or
duplicate frames) is tried through the CLI (`nnpq evaluate`), `evaluate_files`, the ASE
calculator and OpenMM; each message names what is wrong (width and minimum, atom indices and
distance, frame indices).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import pytest
from ase import Atoms

from nnpq.cli import main as cli_main
from nnpq.errors import NnpqError
from nnpq.md.ase import NnpqCalculator
from nnpq.md.openmm import create_system
from nnpq.models import load_potential
from nnpq.models.fp32 import weights_path
from nnpq.models.potential import closest_pair
from nnpq.structures import read_configurations
from nnpq.validation.user_eval import evaluate_files

pytestmark = pytest.mark.skipif(not weights_path("ani2x").is_file(),
                                reason="ANI-2x weights not found: set TORCHANI_DATA_DIR")

WATER = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])  # Å
NARROW = "periodic cell is 8.00 Å wide along cell vector a, less than twice the 5.1 Å cutoff"
NARROW_MINIMUM = "(10.20 Å)"


def _xyz(path: Path, frames: list[np.ndarray], symbols: str = "OHH", cell: float | None = None) -> Path:
    """An (extended) XYZ file of ``frames``; with ``cell``, a periodic cube of that edge in Å."""
    lines = []
    for positions in frames:
        lines.append(str(len(positions)))
        lines.append(f'Lattice="{cell} 0 0 0 {cell} 0 0 0 {cell}" pbc="T T T"' if cell else "")
        lines += [f"{s} {x:.6f} {y:.6f} {z:.6f}" for s, (x, y, z) in zip(symbols, positions)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _overlapping() -> np.ndarray:
    """Two waters, the second's hydrogen 0.2 Å from the first's oxygen (minimum image in a 12 Å box)."""
    second = WATER + np.array([11.8, 0.0, 0.0]) - np.array([0.96, 0.0, 0.0])
    return np.concatenate([WATER + 0.0, second])


def _cli_error(args: list[str], capsys) -> str:
    assert cli_main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnpq: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def _all_file_entry_points(path: Path, phrase: str, capsys) -> None:
    """``nnpq evaluate`` and `evaluate_files` both refuse ``path`` with ``phrase`` in one line."""
    line = _cli_error(["evaluate", "ani2x", "--input", str(path), "-q"], capsys)
    assert phrase in line, line
    with pytest.raises(NnpqError) as info:
        evaluate_files("ani2x", [str(path)])
    assert phrase in str(info.value) and "\n" not in str(info.value)


# --- geometry -------------------------------------------------------------------------------

def test_closest_pair_uses_minimum_images_in_any_cell():
    cubic = np.diag([12.0, 12.0, 12.0])
    assert closest_pair(np.array([[0.1, 5, 5], [11.9, 5, 5], [6, 6, 6]]), cubic, 0.5) == pytest.approx((0, 1, 0.2))
    assert closest_pair(np.array([[0.1, 5, 5], [11.9, 5, 5]]), None, 0.5) is None  # 11.8 Å apart in vacuum
    # triclinic: the image across the tilted face, found although the Cartesian gap is large
    tilted = np.array([[12.0, 0, 0], [6.0, 11.0, 0], [0, 0, 12.0]])
    pair = closest_pair(np.array([[0.2, 0.2, 5.0], [6.1, 11.1, 5.0]]), tilted, 0.5)
    assert pair[:2] == (0, 1) and pair[2] == pytest.approx(np.hypot(0.1, 0.1))
    # agrees with brute force over the 27 images on random dense points
    rng = np.random.default_rng(3)
    points = rng.uniform(0, 12, (400, 3))
    shifts = np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1])).reshape(3, -1).T @ tilted
    frac = points @ np.linalg.inv(tilted)
    wrapped = (frac - np.floor(frac)) @ tilted
    diff = wrapped[:, None, None, :] - wrapped[None, :, None, :] - shifts[None, None, :, :]
    dist = np.linalg.norm(diff, axis=-1).min(axis=-1)
    np.fill_diagonal(dist, np.inf)
    i, j = np.unravel_index(np.argmin(dist), dist.shape)
    found = closest_pair(points, tilted, 0.5)
    assert found == pytest.approx((min(i, j), max(i, j), dist[i, j]))


def test_narrow_cell_from_every_entry_point(tmp_path, capsys, fp32_ani2x):
    path = _xyz(tmp_path / "narrow.extxyz", [WATER + 2.0], cell=8.0)
    _all_file_entry_points(path, NARROW, capsys)
    atoms = Atoms("OH2", positions=WATER + 2.0, cell=[8.0, 8.0, 8.0], pbc=True)
    atoms.calc = NnpqCalculator(fp32_ani2x)
    with pytest.raises(NnpqError, match=NARROW) as info:
        atoms.get_potential_energy()
    assert NARROW_MINIMUM in str(info.value)
    topology = _topology("OHH", box_angstrom=8.0)
    for backend in ("torchforce", "pythonforce"):
        with pytest.raises(NnpqError, match=NARROW):
            create_system(topology, fp32_ani2x, backend=backend)


def test_overlapping_atoms_from_every_entry_point(tmp_path, capsys, fp32_ani2x):
    message = "atoms 0 and 4 are 0.200 Å apart, closer than the 0.5 Å"
    path = _xyz(tmp_path / "overlap.extxyz", [_overlapping()], symbols="OHHOHH", cell=12.0)
    _all_file_entry_points(path, message, capsys)
    vacuum = _xyz(tmp_path / "overlap.xyz", [np.concatenate([WATER, WATER[:1] + [0.0, 0.0, 0.3]])], "OHHH")
    _all_file_entry_points(vacuum, "atoms 0 and 3 are 0.300 Å apart", capsys)

    atoms = Atoms("OH2OH2", positions=_overlapping(), cell=[12.0] * 3, pbc=True)
    atoms.calc = NnpqCalculator(fp32_ani2x)
    with pytest.raises(NnpqError, match=message):
        atoms.get_potential_energy()

    # OpenMM learns positions from the context: the PythonForce checks them at the first evaluation
    system = create_system(_topology("OHHOHH", box_angstrom=12.0), fp32_ani2x, backend="pythonforce")
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(_overlapping() * 0.1)
    with pytest.raises(openmm.OpenMMException, match=message):
        context.getState(getEnergy=True)
    context.setPositions(np.concatenate([WATER, WATER + 6.0]) * 0.1)  # the same system, sane positions: runs
    assert np.isfinite(context.getState(getEnergy=True).getPotentialEnergy()._value)


def test_system_creation_does_not_check_placeholder_positions(fp32_ani2x):
    """`make_force` knows no positions yet: it checks elements and the box, not overlaps."""
    system = create_system(_topology("OHH", box_angstrom=None), fp32_ani2x, backend="pythonforce")
    assert system.getNumParticles() == 3
    with pytest.raises(NnpqError, match="element\\(s\\) Na not supported"):
        create_system(_topology("ONa", box_angstrom=None), fp32_ani2x, backend="pythonforce")


def _topology(symbols: str | list[str], box_angstrom: float | None) -> app.Topology:
    topology = app.Topology()
    chain = topology.addChain()
    residue = topology.addResidue("MOL", chain)
    for symbol in ([symbols[0], "Na"] if symbols == "ONa" else list(symbols)):
        topology.addAtom(symbol, app.Element.getBySymbol(symbol), residue)
    if box_angstrom is not None:
        topology.setPeriodicBoxVectors(np.eye(3) * box_angstrom * 0.1)
    return topology


# --- frames in user files --------------------------------------------------------------------

def test_empty_file_and_empty_frames(tmp_path, capsys):
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    _all_file_entry_points(empty, "empty.xyz is empty; give a file with at least one structure", capsys)
    holes = tmp_path / "holes.xyz"
    holes.write_text("3\n\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n0\n\n")
    _all_file_entry_points(holes, "holes.xyz: frame(s) 1 hold no atoms", capsys)


def test_duplicate_frames(tmp_path, capsys):
    path = _xyz(tmp_path / "dup.xyz", [WATER, WATER + 0.01, WATER])
    _all_file_entry_points(path, "dup.xyz: frames 0 and 2 are identical", capsys)
    assert len(read_configurations(_xyz(tmp_path / "fine.xyz", [WATER, WATER + 0.01]))) == 2


# --- model names and paths -------------------------------------------------------------------

def test_a_file_named_like_a_model_is_loaded_as_a_file(w8_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp32 = load_potential("ani2x")  # no such file: the FP32 model, silently
    assert fp32.mode == "fp32"

    shutil.copy(w8_path, tmp_path / "ani2x")
    with pytest.warns(UserWarning, match="'ani2x' is both an existing file and the name of an FP32 model; "
                                         "loading the file .*ani2x as an .nnpq model"):
        loaded = load_potential("ani2x")
    assert loaded.mode == "exact" and loaded.label == "ani2x"

    (tmp_path / "ani2x").write_bytes(b"not a model")  # the file still wins: its own error, no FP32 fallback
    with pytest.warns(UserWarning), pytest.raises(NnpqError, match="ani2x is not a valid nnpq model file"):
        load_potential("ani2x")


# --- missing weights -------------------------------------------------------------------------

def test_missing_weights_give_one_message_from_every_command(w8_path, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    monkeypatch.setenv("TORCHANI_DATA_DIR", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    structure = _xyz(tmp_path / "water.xyz", [WATER])
    lines = {
        "quantize": _cli_error(["quantize", "ani2x", "-o", "out.nnpq", "-q"], capsys),
        "evaluate": _cli_error(["evaluate", str(w8_path), "--input", str(structure), "-q"], capsys),
        "validate": _cli_error(["validate", str(w8_path), "--systems", "ethanol", "--short", "--serial"], capsys),
        "evaluate fp32": _cli_error(["evaluate", "ani2x", "--input", str(structure), "-q"], capsys),
    }
    expected = (f"nnpq: error: ANI-2x weights not found at {empty}/StateDicts/ani2x_state_dict.pt "
                f"(TORCHANI_DATA_DIR={empty}); point TORCHANI_DATA_DIR at a folder holding "
                "StateDicts/ani2x_state_dict.pt, or allow one download from the model hub")
    assert lines == dict.fromkeys(lines, expected)
    atoms = Atoms("OH2", positions=WATER)
    atoms.calc = NnpqCalculator("ani2x")
    with pytest.raises(NnpqError) as info:
        atoms.get_potential_energy()
    assert "nnpq: error: " + str(info.value) == expected
    # a quantized model needs no FP32 weights: reading and running it works offline
    assert cli_main(["info", str(w8_path)]) == 0
    capsys.readouterr()
    atoms.calc = NnpqCalculator(str(w8_path))
    assert np.isfinite(atoms.get_potential_energy())
