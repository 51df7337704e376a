"""``nnpq simulate``: molecular dynamics with an FP32 or quantized ANI model, in OpenMM or ASE.

A run minimizes, draws velocities and integrates NVE (Verlet), NVT (Langevin) or NPT (Langevin
plus a barostat), writing into one folder: ``trajectory.dcd|xtc`` (appended at checkpoints), ``state.csv`` (step,
time, potential/kinetic/total energy, temperature, volume, density), ``checkpoint.npz`` every
``checkpoint_interval`` steps and ``checkpoint.json`` beside it, the key that ties the checkpoint
to its model (file sha256 or FP32 name), input structure and settings. ``resume`` continues from
the checkpoint, cutting the trajectory and CSV back to the checkpoint's frame first, so a killed
run ends with the frames of an uninterrupted one. Units: OpenMM nm, ps, kJ/mol; ASE Å, eV;
inputs and the summary in Å, fs, K, bar, g/mL.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
from openmm import unit
from tqdm import tqdm

from nnpq.atomic_io import write_bytes_atomic, write_text_atomic
from nnpq.errors import NnpqError
from nnpq.md.openmm import check_elements, create_system, system_backend
from nnpq.md.outputs import (CSV_HEADER, CSV_NAME, FrameReporter, TrajectoryFile, csv_row, cut_outputs,
                              read_csv)
from nnpq.models import ANIPotential, load_potential

ENSEMBLES = ("nve", "nvt", "npt")
ENGINES = ("openmm", "ase")
TRAJECTORY_FORMATS = ("dcd", "xtc")
CHECKPOINT_NAME, KEY_NAME = "checkpoint.npz", "checkpoint.json"


@dataclass(frozen=True)
class SimulationSettings:
    """How to run.

    Attributes:
        ensemble: ``nve``, ``nvt`` (Langevin) or ``npt`` (Langevin + barostat; needs a box).
        steps: total steps of the run (a resumed run continues up to this many).
        timestep_fs: integration time step, fs.
        temperature_k: thermostat temperature and that of the initial velocities, K.
        pressure_bar: NPT pressure, bar.
        friction_per_ps: Langevin friction, 1/ps.
        barostat_interval: steps between Monte Carlo volume moves (OpenMM).
        report_interval: steps between trajectory frames and CSV rows.
        checkpoint_interval: steps between checkpoints.
        minimize_steps: at most this many minimizer iterations before the run (0: none).
        seed: seed of velocities, thermostat and barostat.
        trajectory: ``dcd`` or ``xtc``.
        engine: ``openmm`` or ``ase``.
        platform: OpenMM platform; ``None`` picks the fastest available (CUDA, then CPU).
        backend: OpenMM force backend (``auto``, ``torchforce``, ``pythonforce``).
        mode: runtime mode of a quantized model, where the runtime has modes.
    """

    ensemble: str = "nvt"
    steps: int = 1000
    timestep_fs: float = 0.5
    temperature_k: float = 300.0
    pressure_bar: float = 1.0
    friction_per_ps: float = 1.0
    barostat_interval: int = 25
    report_interval: int = 10
    checkpoint_interval: int = 100
    minimize_steps: int = 200
    seed: int = 1
    trajectory: str = "dcd"
    engine: str = "openmm"
    platform: str | None = None
    backend: str = "auto"
    mode: str | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("ensemble", self.ensemble, ENSEMBLES), ("engine", self.engine, ENGINES),
                                     ("trajectory format", self.trajectory, TRAJECTORY_FORMATS)):
            if value not in allowed:
                raise NnpqError(f"unknown {name} '{value}'; use one of {', '.join(allowed)}")
        if self.steps < 1 or self.report_interval < 1 or self.checkpoint_interval < 1 or self.barostat_interval < 1:
            raise NnpqError("--steps and the report, checkpoint and barostat intervals must be at least 1")
        if not 0 < self.timestep_fs <= 2.0:
            raise NnpqError(f"time step {self.timestep_fs} fs is outside (0, 2]; ANI with hydrogens needs 0.5-1 fs")
        if not self.temperature_k > 0 or not self.friction_per_ps > 0 or self.minimize_steps < 0:
            raise NnpqError("temperature and friction must be positive and --minimize-steps not negative")

    def key(self) -> dict:
        """The settings that shape the continued trajectory.

        Left out: ``steps`` (a finished run can be extended), and what does not change the dynamics
        after a checkpoint (checkpoint interval, minimization, platform, force backend).
        """
        return {k: v for k, v in asdict(self).items()
                if k not in ("steps", "checkpoint_interval", "platform", "backend", "minimize_steps")}


@dataclass(frozen=True, eq=False)
class SimulationInput:
    """A structure to simulate.

    Attributes:
        name: the built-in system's name or the file's path.
        topology: OpenMM topology (box set iff ``box`` is not ``None``).
        positions: ``(N, 3)`` Å.
        box: ``(3, 3)`` box vectors as rows, Å, or ``None`` in vacuum.
        ml_atoms: atoms the model treats in an ML/MM system; ``None``: all.
        mm_force_field: OpenMM force-field files for the other atoms of an ML/MM system.
    """

    name: str
    topology: app.Topology
    positions: np.ndarray
    box: np.ndarray | None
    ml_atoms: tuple[int, ...] | None = None
    mm_force_field: tuple[str, ...] = ()

    @property
    def numbers(self) -> np.ndarray:
        return np.array([a.element.atomic_number if a.element else 0 for a in self.topology.atoms()], dtype=np.int64)

    @property
    def ml_indices(self) -> list[int]:
        return list(range(self.topology.getNumAtoms())) if self.ml_atoms is None else list(self.ml_atoms)

    def key(self) -> str:
        """sha256 of what defines the system: elements, starting positions, box and the ML/MM split."""
        digest = hashlib.sha256()
        for part in (self.numbers, np.asarray(self.positions, np.float64),
                     np.zeros(0) if self.box is None else np.asarray(self.box, np.float64)):
            digest.update(np.ascontiguousarray(part).tobytes())
        digest.update(json.dumps([self.ml_atoms, list(self.mm_force_field)]).encode())
        return digest.hexdigest()


def load_input(system: str | None = None, path: str | os.PathLike | None = None) -> SimulationInput:
    """A built-in system by name, or the first frame of a PDB, XYZ or extended XYZ file (cell from the file)."""
    if (system is None) == (path is None):
        raise NnpqError("give either a built-in system (--system NAME) or a structure file (--input FILE)")
    if system is not None:
        from nnpq.systems import get_system

        s = get_system(system)
        return SimulationInput(s.name, s.topology, np.array(s.positions), None if s.box is None else np.array(s.box),
                               s.ml_atoms, s.mm_force_field)
    path = Path(path)
    if not path.is_file():
        raise NnpqError(f"input file {path} not found")
    if path.suffix.lower() == ".pdb":
        try:
            pdb = app.PDBFile(str(path))
        except Exception as exc:  # OpenMM's parser raises plain Exception/ValueError subclasses
            raise NnpqError(f"cannot read {path} as PDB ({exc})") from None
        topology = pdb.topology
        positions = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.angstrom), dtype=np.float64)
        vectors = topology.getPeriodicBoxVectors()
        box = None if vectors is None else np.array([list(v.value_in_unit(unit.angstrom)) for v in vectors])
        return SimulationInput(str(path), topology, positions, box)
    from nnpq.structures import read_configurations

    conf = read_configurations(path)[0]
    topology = app.Topology()
    residue = topology.addResidue("MOL", topology.addChain())
    for i, z in enumerate(conf.numbers):
        element = app.element.Element.getByAtomicNumber(int(z))
        topology.addAtom(f"{element.symbol}{i + 1}", element, residue)
    if conf.cell is not None:
        topology.setPeriodicBoxVectors([openmm.Vec3(*row) for row in conf.cell * 0.1] * unit.nanometer)
    return SimulationInput(str(path), topology, conf.positions, conf.cell)


def check_input(inp: SimulationInput, potential: ANIPotential, settings: SimulationSettings) -> None:
    """One `NnpqError` for the first problem: elements (naming atoms), NPT without a box, the model's own checks."""
    for atom in inp.topology.atoms():
        if atom.element is None:
            raise NnpqError(f"atom {atom.index} ({atom.name} of residue {atom.residue.name}) has no element; "
                            "fix the element column of the input")
    ml = inp.ml_indices
    numbers = inp.numbers[ml]
    check_elements(potential, numbers, ml)
    if settings.ensemble == "npt" and inp.box is None:
        raise NnpqError(f"NPT needs a periodic box but {inp.name} has none; add a CRYST1 record (PDB) or "
                        "Lattice=\"...\" with pbc (extended XYZ), or use --ensemble nvt")
    if inp.ml_atoms is not None and settings.engine == "ase":
        raise NnpqError(f"{inp.name} is an ML/MM system; run it with --engine openmm")
    # NaN positions, degenerate cells and (where the model checks them) boxes and close contacts
    potential.check_inputs(numbers, np.asarray(inp.positions)[ml], inp.box)


def model_identity(model: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a model file, or the FP32 model's name."""
    text = os.fspath(model)
    if Path(text).is_file():
        digest = hashlib.sha256()
        with open(text, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return f"sha256:{digest.hexdigest()}"
    from nnpq.models import model_spec

    return model_spec(text).name


def choose_platform(name: str | None) -> openmm.Platform:
    """The named OpenMM platform, or the fastest available (CUDA, then CPU, then Reference)."""
    available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if name is None:
        name = next(p for p in ("CUDA", "CPU", "Reference") if p in available)
    if name not in available:
        raise NnpqError(f"OpenMM platform '{name}' not available here; choose one of {', '.join(available)}")
    return openmm.Platform.getPlatformByName(name)


# ----------------------------------------------------------------------------- engines


class _OpenMMRun:
    """One OpenMM simulation with a trajectory reporter and OpenMM's StateDataReporter in ``out``."""

    def __init__(self, inp: SimulationInput, potential: ANIPotential, settings: SimulationSettings) -> None:
        self.settings = settings
        self.platform = choose_platform(settings.platform)
        device = None
        if self.platform.getName() == "CUDA":
            import torch

            device = "cuda" if torch.cuda.is_available() else None
        system = self._system(inp, potential, device)
        self.backend = system_backend(system)
        dt = settings.timestep_fs * unit.femtosecond
        temperature = settings.temperature_k * unit.kelvin
        if settings.ensemble == "nve":
            integrator = openmm.VerletIntegrator(dt)
        else:
            integrator = openmm.LangevinMiddleIntegrator(temperature, settings.friction_per_ps / unit.picosecond, dt)
            integrator.setRandomNumberSeed(settings.seed)
        if settings.ensemble == "npt":
            barostat = openmm.MonteCarloBarostat(settings.pressure_bar * unit.bar, temperature,
                                                 settings.barostat_interval)
            barostat.setRandomNumberSeed(settings.seed)
            system.addForce(barostat)
        self.simulation = app.Simulation(inp.topology, system, integrator, self.platform)
        self.inp = inp
        self.trajectory: TrajectoryFile | None = None
        self.csv_file = None

    def _system(self, inp: SimulationInput, potential: ANIPotential, device: str | None) -> openmm.System:
        if inp.ml_atoms is None:
            return create_system(inp.topology, potential, backend=self.settings.backend, device=device,
                                 positions=inp.positions)
        from openmmml import MLPotential

        force_field = app.ForceField(*inp.mm_force_field)
        method = app.PME if inp.box is not None else app.NoCutoff
        mm_system = force_field.createSystem(inp.topology, nonbondedMethod=method, nonbondedCutoff=0.9 * unit.nanometer,
                                             constraints=app.HBonds, rigidWater=True)
        return MLPotential("nnpq", model=potential, backend=self.settings.backend).createMixedSystem(
            inp.topology, mm_system, list(inp.ml_atoms), device=device, positions=inp.positions)

    @property
    def label(self) -> str:
        return f"OpenMM {self.platform.getName()} ({self.backend})"

    def start(self) -> None:
        """Minimize, then Maxwell-Boltzmann velocities at the temperature."""
        context = self.simulation.context
        context.setPositions(self.inp.positions * 0.1)
        if self.settings.minimize_steps:
            self.simulation.minimizeEnergy(maxIterations=self.settings.minimize_steps)
        context.setVelocitiesToTemperature(self.settings.temperature_k * unit.kelvin, self.settings.seed)

    def open_outputs(self, out: Path, append: bool) -> None:
        interval = self.settings.report_interval
        self.trajectory = TrajectoryFile(out / f"trajectory.{self.settings.trajectory}", self.inp.topology,
                                         self.settings.timestep_fs, self.settings.report_interval, append)
        self.csv_file = open(out / CSV_NAME, "a" if append else "w")
        state = app.StateDataReporter(self.csv_file, interval, step=True, time=True, potentialEnergy=True,
                                      kineticEnergy=True, totalEnergy=True, temperature=True, volume=True,
                                      density=True, append=append)
        self.simulation.reporters[:] = [FrameReporter(self.trajectory, interval), state]

    def flush_outputs(self) -> None:
        self.trajectory.flush()
        self.csv_file.flush()
        os.fsync(self.csv_file.fileno())

    def close_outputs(self) -> None:
        if self.csv_file is not None:
            self.trajectory.close()
            self.csv_file.close()
        self.csv_file = None
        self.simulation.reporters[:] = []

    def step(self, n: int) -> None:
        self.simulation.step(n)

    @property
    def current_step(self) -> int:
        return self.simulation.context.getStepCount()

    def state_bytes(self) -> dict[str, np.ndarray]:
        return {"openmm_checkpoint": np.frombuffer(self.simulation.context.createCheckpoint(), dtype=np.uint8)}

    def restore(self, saved: dict[str, np.ndarray]) -> None:
        self.simulation.context.loadCheckpoint(saved["openmm_checkpoint"].tobytes())


class _ASERun:
    """One ASE simulation: Verlet (NVE) or Langevin BAOAB (NVT; NPT with a hydrostatic Langevin-Hoover cell)."""

    def __init__(self, inp: SimulationInput, potential: ANIPotential, settings: SimulationSettings) -> None:
        from ase import Atoms

        from nnpq.md.ase import NnpqCalculator

        self.settings = settings
        self.topology = inp.topology
        self.atoms = Atoms(numbers=inp.numbers, positions=inp.positions, cell=inp.box, pbc=inp.box is not None)
        self.atoms.calc = NnpqCalculator(potential)
        self.rng = np.random.default_rng(settings.seed)
        self.dynamics = None
        self.step_count = 0
        self.out: Path | None = None
        self.traj: TrajectoryFile | None = None

    def _make_dynamics(self) -> None:
        """The integrator, made once positions, momenta and cell are final: it caches forces (and stress) at creation."""
        from ase import units
        from ase.md.langevinbaoab import LangevinBAOAB
        from ase.md.verlet import VelocityVerlet

        settings = self.settings
        dt = settings.timestep_fs * units.fs
        if settings.ensemble == "nve":
            self.dynamics = VelocityVerlet(self.atoms, dt)
        else:
            npt = settings.ensemble == "npt"
            self.dynamics = LangevinBAOAB(
                self.atoms, dt, temperature_K=settings.temperature_k, T_tau=1000.0 / settings.friction_per_ps * units.fs,
                externalstress=settings.pressure_bar * units.bar if npt else None, hydrostatic=npt,
                P_tau=1000.0 * units.fs if npt else None, rng=self.rng)

    label = "ASE"

    def start(self) -> None:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
        from ase.optimize import BFGS

        if self.settings.minimize_steps:
            BFGS(self.atoms, logfile=None).run(fmax=0.05, steps=self.settings.minimize_steps)
        MaxwellBoltzmannDistribution(self.atoms, temperature_K=self.settings.temperature_k, rng=self.rng)
        Stationary(self.atoms)
        self._make_dynamics()

    def open_outputs(self, out: Path, append: bool) -> None:
        self.out = out
        self.traj = TrajectoryFile(out / f"trajectory.{self.settings.trajectory}", self.topology,
                                   self.settings.timestep_fs, self.settings.report_interval, append)
        if not append:
            write_text_atomic(out / CSV_NAME, ",".join(CSV_HEADER) + "\n")

    def flush_outputs(self) -> None:
        self.traj.flush()

    def close_outputs(self) -> None:
        if self.traj is not None:
            self.traj.close()
        self.traj = None

    def step(self, n: int) -> None:
        from ase import units

        rows = []
        for _ in range(n):
            self.dynamics.run(1)
            self.step_count += 1
            if self.step_count % self.settings.report_interval == 0:
                atoms = self.atoms
                time_ps = self.step_count * self.settings.timestep_fs * 1e-3
                cell = atoms.cell.array if atoms.pbc.all() else None
                self.traj.write(atoms.positions * 0.1, None if cell is None else cell * 0.1, time_ps, self.step_count)
                volume = atoms.get_volume() * 1e-3 if cell is not None else 0.0
                density = atoms.get_masses().sum() / units.mol / (atoms.get_volume() * 1e-24) if cell is not None else 0.0
                kj = units.mol / units.kJ
                rows.append(csv_row(self.step_count, time_ps, atoms.get_potential_energy() * kj,
                                     atoms.get_kinetic_energy() * kj, atoms.get_temperature(), volume, density))
        with open(self.out / CSV_NAME, "a") as fh:
            fh.writelines(rows)

    @property
    def current_step(self) -> int:
        return self.step_count

    def state_bytes(self) -> dict[str, np.ndarray]:
        state = {"positions": self.atoms.positions, "momenta": self.atoms.get_momenta(),
                 "cell": self.atoms.cell.array, "step_count": np.array(self.step_count),
                 "rng": np.array(json.dumps(self.rng.bit_generator.state))}
        if hasattr(self.dynamics, "p_eps"):  # the barostat's cell momentum
            state["p_eps"] = np.asarray(self.dynamics.p_eps)
        return state

    def restore(self, saved: dict[str, np.ndarray]) -> None:
        self.atoms.set_cell(saved["cell"])
        self.atoms.positions = saved["positions"]
        self.atoms.set_momenta(saved["momenta"])
        self.step_count = int(saved["step_count"])
        self.rng.bit_generator.state = json.loads(str(saved["rng"]))
        self._make_dynamics()
        if "p_eps" in saved:
            self.dynamics.p_eps = saved["p_eps"] if saved["p_eps"].ndim else float(saved["p_eps"])


# ----------------------------------------------------------------------------- the run


def _load_checkpoint(out: Path, key: dict) -> dict[str, np.ndarray]:
    """The saved state in ``out``; `NnpqError` when there is none or it belongs to another model/system/settings."""
    key_path, state_path = out / KEY_NAME, out / CHECKPOINT_NAME
    if not key_path.is_file() or not state_path.is_file():
        raise NnpqError(f"no checkpoint in {out} to resume from; run without --resume")
    saved_key = json.loads(key_path.read_text())
    for field, what in (("model", "model"), ("system", "input structure"), ("settings", "settings")):
        if saved_key.get(field) != key[field]:
            hint = ", ".join(f"{k}={v}" for k, v in saved_key.get("settings", {}).items()
                             if key["settings"].get(k) != v) if field == "settings" else saved_key.get(field)
            raise NnpqError(f"the checkpoint in {out} was written with a different {what} ({hint}); "
                            "resume with the same model, input and settings, or use a fresh --out folder")
    with np.load(state_path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def run_simulation(model: str | os.PathLike, inp: SimulationInput, settings: SimulationSettings,
                   out: str | os.PathLike, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a simulation into ``out``; returns the summary (see `format_summary`)."""
    out = Path(out)
    periodic = inp.box is not None
    potential = load_potential(model, "cell_list" if periodic else "all_pairs", mode=settings.mode)
    check_input(inp, potential, settings)
    key = {"model": model_identity(model), "system": inp.key(), "settings": settings.key()}
    if resume:
        saved = _load_checkpoint(out, key)
    elif (out / CHECKPOINT_NAME).exists():
        raise NnpqError(f"{out} already holds a run; continue it with --resume or choose another --out folder")
    out.mkdir(parents=True, exist_ok=True)
    run = _OpenMMRun(inp, potential, settings) if settings.engine == "openmm" else _ASERun(inp, potential, settings)
    elapsed = 0.0
    if resume:
        run.restore(saved)
        elapsed = float(saved["elapsed"])
        cut_outputs(out, settings.trajectory, inp.topology, run.current_step // settings.report_interval)
    else:
        write_text_atomic(out / KEY_NAME, json.dumps(key, indent=2, sort_keys=True) + "\n")
        run.start()
    run.open_outputs(out, append=resume)
    start_step = run.current_step
    run_seconds = 0.0
    try:
        with tqdm(total=settings.steps, initial=min(start_step, settings.steps), unit="step",
                  desc=f"{settings.ensemble.upper()} {Path(inp.name).name}", disable=not progress) as bar:
            while run.current_step < settings.steps:
                step = run.current_step
                n = min(settings.report_interval - step % settings.report_interval,
                        settings.checkpoint_interval - step % settings.checkpoint_interval, settings.steps - step)
                t0 = time.perf_counter()
                run.step(n)
                run_seconds += time.perf_counter() - t0
                bar.update(n)
                bar.set_postfix_str(f"{_ns_per_day(run.current_step - start_step, settings, run_seconds):.3g} ns/day")
                if run.current_step % settings.checkpoint_interval == 0 or run.current_step == settings.steps:
                    run.flush_outputs()  # every frame up to the checkpoint is on disk before it is saved
                    _save_checkpoint(out, run, elapsed + run_seconds)
    finally:
        run.close_outputs()
    rows = read_csv(out / CSV_NAME)
    return {
        "input": inp.name, "model": potential.label, "engine": run.label,
        "ensemble": settings.ensemble, "steps": run.current_step, "timestep_fs": settings.timestep_fs,
        "frames": len(rows["step"]),
        "mean_temperature_k": float(np.mean(rows["temperature"])) if len(rows["step"]) else float("nan"),
        "mean_density_g_ml": float(np.mean(rows["density"])) if periodic and len(rows["step"]) else None,
        "ns_per_day": _ns_per_day(run.current_step - start_step, settings, run_seconds),
        "files": {"trajectory": str(out / f"trajectory.{settings.trajectory}"), "csv": str(out / CSV_NAME),
                  "checkpoint": str(out / CHECKPOINT_NAME)},
    }


def _save_checkpoint(out: Path, run, elapsed: float) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, step=run.current_step, elapsed=elapsed, **run.state_bytes())
    write_bytes_atomic(out / CHECKPOINT_NAME, buffer.getvalue())


def _ns_per_day(steps: int, settings: SimulationSettings, seconds: float) -> float:
    return steps * settings.timestep_fs * 1e-6 / (seconds / 86400.0) if seconds > 0 else 0.0


def format_summary(summary: dict) -> str:
    """Plain-text table of a run's summary."""
    rows = [("input", summary["input"]), ("model", summary["model"]), ("engine", summary["engine"]),
            ("ensemble", summary["ensemble"].upper()),
            ("steps", f"{summary['steps']} x {summary['timestep_fs']:g} fs"), ("frames", str(summary["frames"])),
            ("mean temperature", f"{summary['mean_temperature_k']:.1f} K")]
    if summary["mean_density_g_ml"] is not None:
        rows.append(("mean density", f"{summary['mean_density_g_ml']:.4f} g/mL"))
    rows.append(("speed", f"{summary['ns_per_day']:.3g} ns/day"))
    rows += [(name, path) for name, path in summary["files"].items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
