"""NVE trajectories in OpenMM from a shared start, checkpointed so long runs can resume.

Energies come from OpenMM's State (kJ/mol, double); positions are stored unwrapped in nm.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import openmm
from openmm import unit
from tqdm import tqdm

from nnpq.atomic_io import write_bytes_atomic
from nnpq.errors import NnpqError


@dataclass(frozen=True)
class NVESettings:
    """Settings shared by the FP32 and quantized runs.

    Attributes:
        steps: NVE steps per run.
        timestep_fs: Verlet time step, fs.
        temperature_k: temperature of the Langevin equilibration, K.
        equilibration_steps: Langevin steps (FP32) before NVE starts.
        report_interval: steps between recorded frames.
        platform: OpenMM platform (``Reference`` integrates in double precision).
        seed: seed of the initial velocities and the Langevin thermostat.
        checkpoint_interval: steps between checkpoints of a run.
    """

    steps: int = 2000
    timestep_fs: float = 0.5
    temperature_k: float = 300.0
    equilibration_steps: int = 200
    report_interval: int = 10
    platform: str = "Reference"
    seed: int = 1
    checkpoint_interval: int = 500

    def __post_init__(self) -> None:
        if self.steps < 3 * self.report_interval:
            raise NnpqError(f"--steps {self.steps} gives fewer than 3 frames at --report-interval "
                            f"{self.report_interval}; run more steps")
        if not 0 < self.timestep_fs <= 2.0:
            raise NnpqError(f"time step {self.timestep_fs} fs is outside (0, 2]; NVE with ANI needs 0.5-1 fs")
        if self.report_interval < 1 or self.checkpoint_interval < 1:
            raise NnpqError("report and checkpoint intervals must be at least 1 step")

    def key(self) -> str:
        """Short hash of the settings that shape a trajectory, to refuse resuming a run made with others.

        ``steps`` is left out, so a finished run can be extended by asking for more steps.
        """
        shape = {k: v for k, v in asdict(self).items() if k != "steps"}
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StartState:
    """Positions (nm) and velocities (nm/ps) shared by both runs, ``(N, 3)`` each."""

    positions: np.ndarray
    velocities: np.ndarray


@dataclass
class Trajectory:
    """Recorded frames of one NVE run."""

    time_ps: np.ndarray
    potential_kj_mol: np.ndarray
    kinetic_kj_mol: np.ndarray
    positions_nm: np.ndarray  # (F, N, 3), unwrapped
    seconds_per_step: float

    @property
    def total_kj_mol(self) -> np.ndarray:
        return self.potential_kj_mol + self.kinetic_kj_mol


def _platform(name: str) -> openmm.Platform:
    try:
        return openmm.Platform.getPlatformByName(name)
    except Exception:
        names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        raise NnpqError(f"OpenMM platform '{name}' not available; choose one of {', '.join(names)}") from None


def prepare_start(system: openmm.System, positions_nm: np.ndarray, settings: NVESettings) -> StartState:
    """Minimize, draw Maxwell-Boltzmann velocities and equilibrate with Langevin dynamics."""
    integrator = openmm.LangevinMiddleIntegrator(settings.temperature_k * unit.kelvin, 1.0 / unit.picosecond,
                                                 settings.timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(settings.seed)
    context = openmm.Context(system, integrator, _platform(settings.platform))
    context.setPositions(positions_nm)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 500)
    context.setVelocitiesToTemperature(settings.temperature_k * unit.kelvin, settings.seed)
    integrator.step(settings.equilibration_steps)
    state = context.getState(getPositions=True, getVelocities=True)
    return StartState(
        positions=state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
        velocities=state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond),
    )


def _record(context: openmm.Context, rows: dict[str, list]) -> None:
    state = context.getState(getEnergy=True, getPositions=True)
    rows["time_ps"].append(state.getTime().value_in_unit(unit.picosecond))
    rows["potential_kj_mol"].append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    rows["kinetic_kj_mol"].append(state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
    rows["positions_nm"].append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))


def _save_checkpoint(path: Path, context: openmm.Context, rows: dict[str, list], step: int,
                     elapsed: float, key: str) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, step=step, elapsed=elapsed, key=key,
             openmm_checkpoint=np.frombuffer(context.createCheckpoint(), dtype=np.uint8),
             **{k: np.asarray(v) for k, v in rows.items()})
    write_bytes_atomic(path, buffer.getvalue())


def _load_checkpoint(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError):
        return None  # a damaged checkpoint is only lost time: start over


def run_nve(system: openmm.System, start: StartState, settings: NVESettings, checkpoint: Path | None = None,
            label: str = "nve", progress: bool = False) -> Trajectory:
    """Run NVE (Verlet) from ``start``, recording every ``report_interval`` steps.

    With ``checkpoint``, progress is saved every ``checkpoint_interval`` steps and an
    interrupted run with the same settings resumes where it stopped.
    """
    integrator = openmm.VerletIntegrator(settings.timestep_fs * unit.femtosecond)
    context = openmm.Context(system, integrator, _platform(settings.platform))
    context.setPositions(start.positions)
    context.setVelocities(start.velocities)
    rows: dict[str, list] = {k: [] for k in ("time_ps", "potential_kj_mol", "kinetic_kj_mol", "positions_nm")}
    step, elapsed = 0, 0.0
    saved = _load_checkpoint(checkpoint, settings.key()) if checkpoint else None
    if saved is not None and int(saved["step"]) <= settings.steps:
        context.loadCheckpoint(saved["openmm_checkpoint"].tobytes())
        step, elapsed = int(saved["step"]), float(saved["elapsed"])
        rows = {k: list(saved[k]) for k in rows}
    else:
        _record(context, rows)
    with tqdm(total=settings.steps, initial=step, desc=label, unit="step", disable=not progress) as bar:
        while step < settings.steps:
            n = min(settings.report_interval, settings.steps - step)
            t0 = time.perf_counter()
            integrator.step(n)
            elapsed += time.perf_counter() - t0
            step += n
            _record(context, rows)
            if not np.isfinite(rows["potential_kj_mol"][-1]):
                raise NnpqError(f"{label}: energy became NaN at step {step}; the trajectory blew up, "
                                "use a smaller --timestep")
            bar.update(n)
            if checkpoint and (step % settings.checkpoint_interval < settings.report_interval
                               or step == settings.steps):
                _save_checkpoint(checkpoint, context, rows, step, elapsed, settings.key())
    return Trajectory(
        time_ps=np.asarray(rows["time_ps"]), potential_kj_mol=np.asarray(rows["potential_kj_mol"]),
        kinetic_kj_mol=np.asarray(rows["kinetic_kj_mol"]), positions_nm=np.asarray(rows["positions_nm"]),
        seconds_per_step=elapsed / max(step, 1),
    )
