"""The ASE `StageEngine`: the protocol's stages in ASE, into the same frames and checkpoints as OpenMM's.

NVE stages integrate with ``ase.md.verlet.VelocityVerlet``, NVT stages (``nvt``, ``hot``,
``compressed``) with ``ase.md.langevin.Langevin`` at the protocol's friction and
``fixcm=False`` (OpenMM's Langevin runs without a CMMotionRemover either). Forces come from
`NnpqCalculator`. The atoms carry OpenMM's element masses, so for the same velocities both
engines report the same kinetic energy and integrate the same equations of motion.

`run_stage` sees OpenMM units only; the conversions happen here:

- positions: nm -> Å (x10), back by /10;
- velocities: nm/ps -> Å/fs (x0.01) -> ASE's Å per ASE time unit (/ ``ase.units.fs``);
- energies: eV -> kJ/mol (x ``ase.units.mol / ase.units.kJ``, equal to TorchANI's
  Hartree->kJ/mol over Hartree->eV to the last digit), in float64;
- time: the step count times the time step (float64), in ps.

OpenMM's Verlet is a leapfrog whose velocities lag half a step, ASE's is velocity Verlet:
from one start the two engines' trajectories agree at the first frame and separate after.
"""

from __future__ import annotations

import json

import numpy as np
from ase import Atoms, units
from openmm import app

from nnpq.errors import NnpqError
from nnpq.md.ase import NnpqCalculator
from nnpq.md.openmm import topology_numbers
from nnpq.models import Potential
from nnpq.units import NM_TO_ANGSTROM
from nnpq.validation.protocol import Protocol, Stage

#: eV -> kJ/mol.
EV_TO_KJ_MOL: float = units.mol / units.kJ
#: nm/ps -> Å per ASE time unit.
NM_PS_TO_ASE_VELOCITY: float = NM_TO_ANGSTROM / 1000.0 / units.fs


class AseStages:
    """The stages of one model's runs in ASE (a `nnpq.validation.runs.StageEngine`).

    Args:
        potential: the model (loaded with the neighbour list its system needs).
        topology: elements (atomic numbers and OpenMM's masses, amu) of the system.
        box_nm: periodic box (``(3, 3)`` nm, rows are vectors), or ``None`` in vacuum.
        protocol: friction (1/ps) and the stages.
        seed: Langevin noise; each stage draws from its own stream of ``(seed, stage index)``.
    """

    name = "ASE"

    def __init__(self, potential: Potential, topology: app.Topology, box_nm: np.ndarray | None,
                 protocol: Protocol, seed: int) -> None:
        self.box = None if box_nm is None else np.asarray(box_nm, dtype=np.float64)
        masses = [atom.element.mass.value_in_unit(atom.element.mass.unit) for atom in topology.atoms()]
        self.atoms = Atoms(numbers=topology_numbers(topology), pbc=self.box is not None,
                           cell=None if self.box is None else self.box * NM_TO_ANGSTROM)
        self.atoms.set_masses(masses)
        self.atoms.calc = NnpqCalculator(potential)
        self.protocol, self.seed = protocol, seed
        self.rng = np.random.default_rng(seed)
        self.stage: Stage | None = None
        self.dynamics = None
        self.steps = 0

    def begin(self, stage: Stage, positions_nm: np.ndarray, velocities_nm_ps: np.ndarray,
              box_nm: np.ndarray | None) -> None:
        """Set the state (OpenMM units) and make ``stage``'s integrator; time restarts at 0."""
        from ase.md.langevin import Langevin
        from ase.md.verlet import VelocityVerlet

        if box_nm is not None:
            self.atoms.set_cell(np.asarray(box_nm) * NM_TO_ANGSTROM, scale_atoms=False)
        self.atoms.set_positions(np.asarray(positions_nm, dtype=np.float64) * NM_TO_ANGSTROM)
        self.atoms.set_velocities(np.asarray(velocities_nm_ps, dtype=np.float64) * NM_PS_TO_ASE_VELOCITY)
        index = [s.name for s in self.protocol.stages()].index(stage.name)
        self.rng = np.random.default_rng([self.seed, index])
        self.stage, self.steps = stage, 0
        dt = stage.timestep_fs * units.fs
        if stage.integrator == "verlet":
            self.dynamics = VelocityVerlet(self.atoms, dt)
        else:
            friction = self.protocol.friction_per_ps / (1000.0 * units.fs)  # 1/ps -> 1/(ASE time)
            self.dynamics = Langevin(self.atoms, dt, temperature_K=stage.temperature_k, friction=friction,
                                     fixcm=False, rng=self.rng)

    def step(self, n: int) -> str | None:
        """``n`` steps; the calculator's one-line reason when it refuses a structure (atoms
        closer than 0.5 Å, non-finite positions), else None."""
        try:
            self.dynamics.run(n)
        except NnpqError as exc:
            return str(exc)
        self.steps += n
        return None

    def frame(self) -> tuple[float, float, float, np.ndarray]:
        """Time (ps), potential and kinetic energy (kJ/mol), positions (nm, unwrapped)."""
        return (self.steps * self.stage.timestep_fs / 1000.0,
                float(self.atoms.get_potential_energy()) * EV_TO_KJ_MOL,
                float(self.atoms.get_kinetic_energy()) * EV_TO_KJ_MOL,
                self.atoms.get_positions() / NM_TO_ANGSTROM)

    def save(self) -> dict[str, np.ndarray]:
        """Positions (Å), momenta (ASE units), step count and the Langevin noise stream."""
        return {"ase_positions": self.atoms.get_positions(), "ase_momenta": self.atoms.get_momenta(),
                "ase_steps": np.array(self.steps), "ase_rng": np.array(json.dumps(self.rng.bit_generator.state))}

    def restore(self, saved: dict[str, np.ndarray]) -> None:
        """Continue from `save`'s arrays (after `begin` made the stage's integrator)."""
        self.atoms.set_positions(saved["ase_positions"])
        self.atoms.set_momenta(saved["ase_momenta"])
        self.steps = int(saved["ase_steps"])
        self.rng.bit_generator.state = json.loads(str(saved["ase_rng"]))  # the integrator holds this generator
