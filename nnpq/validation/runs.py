"""Runs of the protocol: one shared start per (system, seed) made by OpenMM, then each stage
with its frames, in OpenMM (`StageContext`) or any other `StageEngine` (ASE: `nnpq.validation.ase_runs`).

Frames are appended as numbered chunk files (``frames-00000.npz`` ...), one per checkpoint,
so a long run never rewrites what it already wrote. Every checkpoint and start file carries
a key (model tensors, system, seed, protocol); a folder whose key differs is set aside
(renamed ``*.stale-N``), never resumed. Units: nm, ps, kJ/mol (OpenMM's, energies in double),
whatever the engine.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol as Protocol_

import numpy as np
import openmm
from openmm import unit

from nnpq.atomic_io import write_bytes_atomic
from nnpq.errors import NnpqError
from nnpq.validation.protocol import Protocol, Stage

#: A run counts as unstable once a bonded distance grows past this factor of its start length.
MAX_BOND_STRETCH = 1.5
_BOLTZMANN_KJ_MOL_K = 0.0083144626


def choose_platform(name: str, threads: int = 1) -> tuple[openmm.Platform, dict[str, str]]:
    """The OpenMM platform and its properties.

    ``auto``: CUDA in ``mixed`` precision (double-precision integration) when present, else
    CPU (whose integrators keep positions and velocities in double, like Reference). The CPU
    platform gets ``threads`` threads: tasks run side by side on Dask workers.
    """
    available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if name == "auto":
        name = "CUDA" if "CUDA" in available else "CPU"
    if name not in available:
        raise NnpqError(f"OpenMM platform '{name}' not available; choose one of auto, {', '.join(available)}")
    properties = {"CUDA": {"Precision": "mixed"}, "OpenCL": {"Precision": "mixed"},
                  "CPU": {"Threads": str(threads)}}.get(name, {})
    return openmm.Platform.getPlatformByName(name), properties


@dataclass
class StartState:
    """Positions (nm) and velocities (nm/ps), ``(N, 3)`` each, shared by every model's runs."""

    positions: np.ndarray
    velocities: np.ndarray


@dataclass
class StageFrames:
    """Recorded frames of one stage (positions unwrapped, nm)."""

    time_ps: np.ndarray
    potential_kj_mol: np.ndarray
    kinetic_kj_mol: np.ndarray
    positions_nm: np.ndarray  # (F, N, 3)
    seconds_per_step: float
    failure: str | None  # why the run stopped early (non-finite energy, broken bond), else None

    @property
    def stable(self) -> bool:
        return self.failure is None

    @property
    def total_kj_mol(self) -> np.ndarray:
        return self.potential_kj_mol + self.kinetic_kj_mol


def set_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to ``path.stale-N`` (first free N) and say so on stderr."""
    n = 0
    while (target := path.with_name(f"{path.name}.stale-{n}")).exists():
        n += 1
    path.rename(target)
    print(f"nnpq: {path} {why}; set aside as {target.name}", file=sys.stderr)
    return target


def _context(system: openmm.System, integrator: openmm.Integrator, protocol: Protocol) -> openmm.Context:
    plat, properties = choose_platform(protocol.platform, protocol.threads)
    return openmm.Context(system, integrator, plat, properties)


def _langevin(temperature: float, protocol: Protocol, timestep_fs: float, seed: int) -> openmm.Integrator:
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, protocol.friction_per_ps / unit.picosecond,
                                                 timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(seed)
    return integrator


def start_state(path: Path, key: str, system: openmm.System, positions_nm: np.ndarray, protocol: Protocol,
                seed: int) -> StartState:
    """The shared start, made once and reused: minimize, Maxwell-Boltzmann velocities at ``seed``,
    equilibrate with Langevin dynamics (0.5 fs). A start file with another key is set aside."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) == key:
                return StartState(data["positions"], data["velocities"])
        set_aside(path, "was made for another model, system or protocol")
    context = _context(system, _langevin(protocol.temperature_k, protocol, 0.5, seed), protocol)
    context.setPositions(positions_nm)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 500)
    context.setVelocitiesToTemperature(protocol.temperature_k * unit.kelvin, seed)
    context.getIntegrator().step(int(round(protocol.equilibration_ps * 2000.0)))
    state = context.getState(getPositions=True, getVelocities=True)
    start = StartState(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                       state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond))
    buffer = io.BytesIO()
    np.savez(buffer, key=key, positions=start.positions, velocities=start.velocities)
    write_bytes_atomic(path, buffer.getvalue())
    return start


_ROWS = ("time_ps", "potential_kj_mol", "kinetic_kj_mol", "positions_nm")


class StageEngine(Protocol_):
    """What `run_stage` needs of an MD engine; every quantity in OpenMM units (nm, ps, kJ/mol).

    ``box`` is the system's uncompressed periodic box (``(3, 3)`` nm, rows are vectors) or
    ``None`` in vacuum. ``save`` returns the engine's dynamic state as arrays that go into the
    stage's checkpoint file; ``restore`` takes them back.
    """

    name: str
    box: np.ndarray | None

    def begin(self, stage: Stage, positions_nm: np.ndarray, velocities_nm_ps: np.ndarray,
              box_nm: np.ndarray | None) -> None:
        """Select ``stage``'s integrator and set the state; the time and step count restart at 0."""

    def step(self, n: int) -> str | None:
        """Advance ``n`` steps; a one-line reason when the engine cannot go on (raised inside it), else None."""

    def frame(self) -> tuple[float, float, float, np.ndarray]:
        """Time (ps), potential and kinetic energy (kJ/mol, float64), positions (``(N, 3)`` nm)."""

    def save(self) -> dict[str, np.ndarray]: ...

    def restore(self, saved: dict[str, np.ndarray]) -> None: ...


def _record(runner: StageEngine, rows: dict[str, list]) -> None:
    for name, value in zip(_ROWS, runner.frame()):
        rows[name].append(value)


def _chunks(folder: Path) -> list[Path]:
    return sorted(folder.glob("frames-*.npz"))


def _read_checkpoint(folder: Path, key: str) -> dict | None:
    """The saved checkpoint if its key matches; a folder made for another key is set aside."""
    path = folder / "checkpoint.npz"
    if not path.is_file():
        for chunk in _chunks(folder):  # chunks of a run killed before its first checkpoint
            chunk.unlink()
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            saved = {k: data[k] for k in data.files}
    except (OSError, ValueError):
        saved = {"key": np.array("damaged")}
    if str(saved["key"]) != key:
        set_aside(folder, "holds a run of another model, system, seed or protocol")
        return None
    for chunk in _chunks(folder)[int(saved["n_chunks"]):]:  # written after the last checkpoint
        chunk.unlink()
    return saved


def _stretch(positions: np.ndarray, bonds: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """Bond lengths (nm) of ``positions`` (N, 3), minimum image in an orthorhombic ``box``."""
    d = positions[bonds[:, 1]] - positions[bonds[:, 0]]
    if box is not None:
        edges = np.diag(box)
        d -= edges * np.round(d / edges)
    return np.linalg.norm(d, axis=1)


def _failure(rows: dict[str, list], bonds: np.ndarray, rest: np.ndarray, box: np.ndarray | None,
             step: int) -> str | None:
    if not (np.isfinite(rows["potential_kj_mol"][-1]) and np.isfinite(rows["kinetic_kj_mol"][-1])):
        return f"energy became non-finite at step {step}"
    if len(bonds):
        ratio = _stretch(rows["positions_nm"][-1], bonds, box) / rest
        if ratio.max() > MAX_BOND_STRETCH:
            i = int(ratio.argmax())
            return f"bond {bonds[i, 0]}-{bonds[i, 1]} stretched to {ratio[i]:.2f}x its start length at step {step}"
    return None


class StageContext:
    """The OpenMM `StageEngine`: one Context for every stage of a model's runs. A
    CompoundIntegrator holds each stage's integrator, so the ANI force (a TorchScript module
    that is slow on its first calls in every new Context) is set up once per task, not once
    per stage."""

    name = "OpenMM"

    def __init__(self, system: openmm.System, protocol: Protocol, seed: int) -> None:
        self.integrator = openmm.CompoundIntegrator()
        self.index: dict[str, int] = {}
        for stage in protocol.stages():
            if stage.integrator == "verlet":
                sub = openmm.VerletIntegrator(stage.timestep_fs * unit.femtosecond)
            else:
                sub = _langevin(stage.temperature_k, protocol, stage.timestep_fs, seed)
            self.index[stage.name] = self.integrator.addIntegrator(sub)
        self.context = _context(system, self.integrator, protocol)
        self.box = None
        if system.usesPeriodicBoundaryConditions():
            self.box = np.array([v.value_in_unit(unit.nanometer) for v in system.getDefaultPeriodicBoxVectors()])

    def begin(self, stage: Stage, positions_nm: np.ndarray, velocities_nm_ps: np.ndarray,
              box_nm: np.ndarray | None) -> None:
        self.integrator.setCurrentIntegrator(self.index[stage.name])
        if box_nm is not None:
            self.context.setPeriodicBoxVectors(*box_nm)
        self.context.setTime(0.0)
        self.context.setStepCount(0)
        self.context.setPositions(positions_nm)
        self.context.setVelocities(velocities_nm_ps)

    def step(self, n: int) -> str | None:
        try:
            self.integrator.step(n)
        except openmm.OpenMMException as exc:  # e.g. a NaN position caught by the platform
            return str(exc).splitlines()[0]
        return None

    def frame(self) -> tuple[float, float, float, np.ndarray]:
        state = self.context.getState(getEnergy=True, getPositions=True)
        return (state.getTime().value_in_unit(unit.picosecond),
                state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole),
                state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))

    def save(self) -> dict[str, np.ndarray]:
        return {"openmm_checkpoint": np.frombuffer(self.context.createCheckpoint(), dtype=np.uint8)}

    def restore(self, saved: dict[str, np.ndarray]) -> None:
        self.context.loadCheckpoint(saved["openmm_checkpoint"].tobytes())


def run_stage(runner: StageEngine, start: StartState, stage: Stage, protocol: Protocol, folder: Path, key: str,
              bonds: np.ndarray) -> StageFrames:
    """Run ``stage`` from ``start`` (resuming ``folder`` when its checkpoint has ``key``).

    Args:
        runner: the model's engine (`StageContext` for OpenMM, `nnpq.validation.ase_runs.AseStages`);
            its ``box`` is the start box.
        bonds: ``(B, 2)`` atom indices; a bond stretched past `MAX_BOND_STRETCH` stops the run.

    The compressed stage scales positions about their centroid, and the box, by
    ``stage.compression``; velocities are scaled to the stage's temperature. A run whose
    energy turns non-finite, whose bonds break or whose engine stops ends there and reports
    why (``failure``); that is a result of the stress stages, not an error.
    """
    report = protocol.report_interval(stage)
    box = None if runner.box is None else runner.box * stage.compression
    centroid = start.positions.mean(axis=0)
    runner.begin(stage, centroid + (start.positions - centroid) * stage.compression,
                 start.velocities * np.sqrt(stage.temperature_k / protocol.temperature_k), box)
    rest = _stretch(start.positions, bonds, runner.box) if len(bonds) else bonds

    folder.mkdir(parents=True, exist_ok=True)
    saved = _read_checkpoint(folder, key)
    rows: dict[str, list] = {k: [] for k in _ROWS}
    step, elapsed, n_chunks, failure = 0, 0.0, 0, None
    if saved is not None:
        runner.restore(saved)
        step, elapsed, n_chunks = int(saved["step"]), float(saved["elapsed"]), int(saved["n_chunks"])
        failure = str(saved["failure"]) or None
    else:
        _record(runner, rows)

    def checkpoint() -> None:
        nonlocal n_chunks, rows
        if rows["time_ps"]:
            chunk = io.BytesIO()
            np.savez(chunk, **{k: np.asarray(v) for k, v in rows.items()})
            write_bytes_atomic(folder / f"frames-{n_chunks:05d}.npz", chunk.getvalue())
            n_chunks += 1
            rows = {k: [] for k in _ROWS}
        state = io.BytesIO()
        np.savez(state, key=key, step=step, elapsed=elapsed, n_chunks=n_chunks, failure=failure or "",
                 **runner.save())
        write_bytes_atomic(folder / "checkpoint.npz", state.getvalue())

    while step < stage.steps and failure is None:
        n = min(report, stage.steps - step)
        t0 = time.perf_counter()
        stopped = runner.step(n)
        elapsed += time.perf_counter() - t0
        if stopped is not None:
            failure = f"{runner.name} stopped at step {step}: {stopped}"
        step += n
        if failure is None:
            _record(runner, rows)
            failure = _failure(rows, bonds, rest, box, step)
        if failure is not None or len(rows["time_ps"]) >= protocol.checkpoint_frames or step >= stage.steps:
            checkpoint()
    return read_frames(folder, elapsed / max(step, 1), failure)


def read_frames(folder: Path, seconds_per_step: float = float("nan"), failure: str | None = None) -> StageFrames:
    """The frames of a stage folder, chunks in order."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _ROWS}
    for chunk in _chunks(folder):
        with np.load(chunk, allow_pickle=False) as data:
            for k in _ROWS:
                parts[k].append(data[k])
    if not parts["time_ps"]:
        raise NnpqError(f"{folder} holds no frames; delete it and rerun")
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return StageFrames(**arrays, seconds_per_step=seconds_per_step, failure=failure)


def temperature_k(kinetic_kj_mol: np.ndarray, n_atoms: int) -> np.ndarray:
    """Instantaneous temperature from the kinetic energy (3N degrees of freedom, no constraints)."""
    return 2.0 * np.asarray(kinetic_kj_mol) / (3 * n_atoms * _BOLTZMANN_KJ_MOL_K)
