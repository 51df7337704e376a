"""The files a simulation writes: the trajectory (DCD or XTC, appendable) and the CSV of state data.

Positions and boxes in nm, time in ps, energies in kJ/mol, volume in nm^3, density in g/mL.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from nnpq.atomic_io import write_text_atomic
from nnpq.errors import NnpqError

CSV_NAME = "state.csv"
#: the columns OpenMM's StateDataReporter writes; the ASE engine writes the same
CSV_HEADER = ['#"Step"', '"Time (ps)"', '"Potential Energy (kJ/mole)"', '"Kinetic Energy (kJ/mole)"',
               '"Total Energy (kJ/mole)"', '"Temperature (K)"', '"Box Volume (nm^3)"', '"Density (g/mL)"']


def csv_row(step: int, time_ps: float, potential: float, kinetic: float, temperature: float,
             volume: float, density: float) -> str:
    return ",".join(str(v) for v in (step, time_ps, potential, kinetic, potential + kinetic, temperature,
                                     volume, density)) + "\n"


def cut_outputs(out: Path, trajectory_format: str, topology: app.Topology, frames: int) -> None:
    """Cut the trajectory and CSV back to their first ``frames`` frames (what the checkpoint saw), atomically."""
    import mdtraj

    csv_path = out / CSV_NAME
    if csv_path.is_file():
        lines = csv_path.read_text().splitlines(keepends=True)
        write_text_atomic(csv_path, "".join(lines[: 1 + frames]))
    traj_path = out / f"trajectory.{trajectory_format}"
    if traj_path.is_file():
        with mdtraj.open(str(traj_path)) as fh:
            kept = fh.read_as_traj(mdtraj.Topology.from_openmm(topology), n_frames=frames)
        if len(kept) != frames:
            raise NnpqError(f"{traj_path} holds {len(kept)} frames, fewer than the {frames} its checkpoint saw; "
                            "start a fresh run in another --out folder")
        tmp = traj_path.with_name(f".{traj_path.stem}.tmp{traj_path.suffix}")
        kept.save(str(tmp))
        os.replace(tmp, traj_path)


class TrajectoryFile:
    """Appendable trajectory: OpenMM's DCD file, or XTC frames that mdtraj writes and `flush` appends.

    mdtraj 1.11 opens DCD and XTC files only to read or to write anew (its XTCReporter
    "appends" by rewriting the whole file in place), so DCD goes through OpenMM's writer, which
    appends in place, and XTC frames, self-contained records, are appended as bytes.
    """

    def __init__(self, path: Path, topology: app.Topology, timestep_fs: float, interval: int, append: bool) -> None:
        self.path = path
        self.format = path.suffix[1:]
        self.frames: list[tuple[np.ndarray, np.ndarray | None, float, int]] = []
        if self.format == "dcd":
            self.handle = open(path, "r+b" if append else "wb")
            self.file = app.DCDFile(self.handle, topology, timestep_fs * unit.femtosecond, interval, interval,
                                    append=append)
        elif not append:
            path.write_bytes(b"")

    def write(self, positions_nm: np.ndarray, box_nm: np.ndarray | None, time_ps: float, step: int) -> None:
        if self.format == "dcd":
            vectors = None if box_nm is None else [openmm.Vec3(*row) for row in box_nm] * unit.nanometer
            self.file.writeModel(np.asarray(positions_nm) * unit.nanometer, periodicBoxVectors=vectors)
        else:
            self.frames.append((np.asarray(positions_nm, np.float32), box_nm, time_ps, step))

    def flush(self) -> None:
        """Put every frame written so far on disk."""
        if self.format == "dcd":
            self.handle.flush()
            os.fsync(self.handle.fileno())
        elif self.frames:
            import mdtraj.formats

            tmp = self.path.with_name(f".{self.path.name}.part.xtc")
            boxes = None if self.frames[0][1] is None else np.array([f[1] for f in self.frames], np.float32)
            with mdtraj.formats.XTCTrajectoryFile(str(tmp), "w") as fh:
                fh.write(np.array([f[0] for f in self.frames]), time=np.array([f[2] for f in self.frames], np.float32),
                         step=np.array([f[3] for f in self.frames], np.int32), box=boxes)
            with open(self.path, "ab") as fh:
                fh.write(tmp.read_bytes())
                fh.flush()
                os.fsync(fh.fileno())
            tmp.unlink()
            self.frames = []

    def close(self) -> None:
        self.flush()
        if self.format == "dcd":
            self.handle.close()


class FrameReporter:
    """OpenMM reporter that writes positions (unwrapped) and box to a `TrajectoryFile`."""

    def __init__(self, trajectory: TrajectoryFile, interval: int) -> None:
        self.trajectory = trajectory
        self.interval = interval

    def describeNextReport(self, simulation: app.Simulation) -> dict:
        return {"steps": self.interval - simulation.currentStep % self.interval, "periodic": False,
                "include": ["positions"]}

    def report(self, simulation: app.Simulation, state: openmm.State) -> None:
        box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
        self.trajectory.write(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                              None if simulation.topology.getPeriodicBoxVectors() is None else np.asarray(box),
                              state.getTime().value_in_unit(unit.picosecond), simulation.currentStep)


def read_csv(path: Path) -> dict[str, np.ndarray]:
    """Step, time (ps), energies (kJ/mol), temperature (K), volume (nm^3), density (g/mL) columns of ``state.csv``."""
    names = ["step", "time_ps", "potential", "kinetic", "total", "temperature", "volume", "density"]
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and not r[0].startswith("#")]
    data = np.array(rows, dtype=np.float64).reshape(-1, len(names))
    return {name: data[:, i] for i, name in enumerate(names)}
