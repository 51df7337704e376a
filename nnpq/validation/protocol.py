"""The validation protocol: which MD stages every (system, model, seed) runs, and for how long.

Every model of a campaign starts each stage from the same state: the FP32 reference,
minimized and equilibrated with Langevin dynamics at the seed's velocities. Stages:

- ``nve_0.5fs``, ``nve_1fs``: velocity Verlet, energy conservation (drift);
- ``nvt``: Langevin at ``temperature_k``, the frames observables are measured on;
- ``hot``: Langevin at ``hot_temperature_k`` (stress);
- ``compressed``: Langevin at ``temperature_k`` with all coordinates (and the periodic box)
  scaled by ``compression`` about the centroid (stress).

Durations are in ps and converted to steps of each stage's time step; frames are recorded
every ``frame_interval_fs``. The stages run in one of `ENGINES`: OpenMM (default) or ASE
(``VelocityVerlet`` and ``ase.md.langevin.Langevin``); the shared start is made by OpenMM
for both, so the two engines' runs of one seed start from the same state and velocities.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from nnpq.errors import NnpqError

#: MD engines the stages run in (`Protocol.engine`).
ENGINES = ("openmm", "ase")


@dataclass(frozen=True)
class Stage:
    """One MD run of the protocol. ``integrator`` is ``verlet`` (NVE) or ``langevin`` (NVT)."""

    name: str
    integrator: str
    timestep_fs: float
    duration_ps: float
    temperature_k: float
    compression: float = 1.0

    @property
    def steps(self) -> int:
        return int(round(self.duration_ps * 1000.0 / self.timestep_fs))


@dataclass(frozen=True)
class Protocol:
    """Settings shared by every run of a campaign (times in ps, temperatures in K).

    Attributes:
        equilibration_ps: Langevin (FP32, 0.5 fs) after minimization, before any stage.
        nve_ps: length of each NVE run (at 0.5 fs and at 1 fs).
        nvt_ps: Langevin run the observables are measured on (0.5 fs).
        stress_ps: length of each stress run (0.5 fs).
        temperature_k: thermostat and initial-velocity temperature.
        hot_temperature_k: thermostat temperature of the hot stress run.
        compression: linear scale factor of the compressed stress run.
        friction_per_ps: Langevin friction.
        frame_interval_fs: time between recorded frames.
        fidelity_frames: FP32 NVT frames re-evaluated with both models (energy/force errors).
        checkpoint_frames: frames between checkpoints (each appends one chunk file).
        platform: OpenMM platform name, or ``auto`` (CUDA in mixed precision, else CPU); with
            the ASE engine it makes the shared starts only.
        engine: ``openmm`` or ``ase``: what integrates the stages (see `ENGINES`).
        threads: torch threads per task (tasks run in parallel on workers; 1 also makes
            CPU results bitwise independent of where a task runs).
    """

    equilibration_ps: float = 2.0
    nve_ps: float = 20.0
    nvt_ps: float = 20.0
    stress_ps: float = 1.0
    temperature_k: float = 300.0
    hot_temperature_k: float = 600.0
    compression: float = 0.95
    friction_per_ps: float = 1.0
    frame_interval_fs: float = 5.0
    fidelity_frames: int = 50
    checkpoint_frames: int = 200
    platform: str = "auto"
    threads: int = 1
    engine: str = "openmm"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise NnpqError(f"unknown engine '{self.engine}'; use one of {', '.join(ENGINES)}")
        for name in ("equilibration_ps", "nve_ps", "nvt_ps", "stress_ps", "frame_interval_fs"):
            if not getattr(self, name) > 0:
                raise NnpqError(f"protocol {name} must be positive, got {getattr(self, name)}")
        if not 0.5 <= self.compression <= 1.0:
            raise NnpqError(f"compression {self.compression} is outside [0.5, 1]; 0.95 squeezes by 5%")
        for stage in self.stages():
            if self.frames(stage) < 3:
                raise NnpqError(f"stage {stage.name} records fewer than 3 frames ({stage.duration_ps} ps every "
                                f"{self.frame_interval_fs} fs); lengthen it or record frames more often")
        if self.fidelity_frames < 1 or self.checkpoint_frames < 1 or self.threads < 1:
            raise NnpqError("fidelity_frames, checkpoint_frames and threads must be at least 1")

    def stages(self) -> tuple[Stage, ...]:
        t, hot = self.temperature_k, self.hot_temperature_k
        return (
            Stage("nve_0.5fs", "verlet", 0.5, self.nve_ps, t),
            Stage("nve_1fs", "verlet", 1.0, self.nve_ps, t),
            Stage("nvt", "langevin", 0.5, self.nvt_ps, t),
            Stage("hot", "langevin", 0.5, self.stress_ps, hot),
            Stage("compressed", "langevin", 0.5, self.stress_ps, t, self.compression),
        )

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages() if s.name == name)

    def report_interval(self, stage: Stage) -> int:
        """Steps between recorded frames of ``stage``."""
        return max(1, int(round(self.frame_interval_fs / stage.timestep_fs)))

    def frames(self, stage: Stage) -> int:
        """Frames a stage records after its first one."""
        return stage.steps // self.report_interval(stage)

    def key(self) -> str:
        """Hash of every setting that shapes a trajectory (not ``threads`` or ``checkpoint_frames``;
        the platform enters task keys by the name it resolves to, not as asked, and the engine
        enters the keys of the runs, not of the shared start, which OpenMM makes for both)."""
        ignored = ("threads", "checkpoint_frames", "platform", "engine")
        shape = {k: v for k, v in asdict(self).items() if k not in ignored}
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


#: The default, documented protocol (``nnpq validate`` without ``--short``): 20 ps per NVE
#: time step and for observables, as drift needs (GUIDE: a 2 ps slope scatters by hundreds
#: of kJ/mol/ns between seeds).
FULL = Protocol()

#: ``--short``: a smoke test of the whole pipeline in minutes; its drift and observable
#: verdicts are dominated by noise, which the noise floor makes visible.
SHORT = Protocol(equilibration_ps=0.05, nve_ps=0.1, nvt_ps=0.1, stress_ps=0.02, fidelity_frames=10,
                 checkpoint_frames=20)
