"""Calibration configurations: short FP32 MD at 300 K and hotter, displaced and compressed copies
of the built-in systems, plus user files; split reproducibly into calibration and held-out sets.

Errors are not uniform over configurations (GUIDE section 3): hot and compressed frames
are where quantization errs most, so they are calibrated on and evaluated on too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import openmm
from openmm import unit

from nnpq.errors import NnpqError
from nnpq.models import ANIPotential
from nnpq.structures import Configuration, read_configurations
from nnpq.systems import get_system

DEFAULT_SYSTEMS = ("ethanol", "aspirin", "alanine-dipeptide", "sfcl-sulfonamide", "water-box")


@dataclass(frozen=True)
class CalibrationSettings:
    """How calibration configurations are made.

    Attributes:
        systems: built-in systems to sample (those with elements the model lacks are skipped).
        temperatures: Langevin MD temperatures, K.
        frames_per_temperature: MD frames kept per system and temperature.
        stride: MD steps (1 fs) between kept frames.
        displaced: copies with Gaussian displacements of ``sigma`` Å per system.
        sigma: displacement width, Å.
        compression: scale factors (< 1 compresses) applied about the centroid (molecules) or
            to positions and cell (periodic systems).
        holdout_fraction: share of each system's frames kept out for evaluation.
        seed: seeds MD, displacements, the split and the held-out functional groups.
        files: user structure files added to the pool.
        topology: PDB topology for DCD ``files``.
        library: add the built-in calibration library (`nnpq.systems.library`): ~200 molecules
            and an organic liquid, subsampled to ``library_kinds`` frames plus
            ``library_displaced`` displaced copies per molecule to keep the run short;
            ``library_limit`` keeps a seeded subset of that many molecules of each split (tests).
        chemistry_holdout: hold out every library molecule carrying one of a seeded choice of
            functional groups (`chemistry_split`): never calibrated on, evaluated and budgeted on.
    """

    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    temperatures: tuple[float, ...] = (300.0, 600.0)
    frames_per_temperature: int = 4
    stride: int = 20
    displaced: int = 2
    sigma: float = 0.08
    compression: tuple[float, ...] = (0.92,)
    holdout_fraction: float = 0.3
    seed: int = 0
    files: tuple[str, ...] = field(default_factory=tuple)
    topology: str | None = None
    library: bool = True
    library_kinds: tuple[str, ...] = ("md300K/0", "md600K/0")
    library_displaced: int = 1
    library_limit: int | None = None
    chemistry_holdout: bool = True


@dataclass
class CalibrationSet:
    """Configurations to calibrate on, held-out frames of the same systems (in distribution), and
    held-out chemistry: molecules whose functional groups calibration never saw."""

    calibration: list[Configuration]
    holdout: list[Configuration]
    chemistry: list[Configuration] = field(default_factory=list)
    heldout_groups: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.calibration)} calibration / {len(self.holdout)} held-out / "
                f"{len(self.chemistry)} held-out-chemistry configurations")


def _md_frames(potential: ANIPotential, name: str, temperature: float, settings: CalibrationSettings,
               seed: int) -> list[Configuration]:
    from nnpq.md.openmm import create_system

    system = get_system(name)
    omm = create_system(system.topology, potential, remove_cm_motion=False)
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 5.0 / unit.picosecond,
                                                 1.0 * unit.femtosecond)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(omm, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(system.positions_nm())
    context.setVelocitiesToTemperature(temperature * unit.kelvin, seed)
    frames = []
    for i in range(settings.frames_per_temperature):
        integrator.step(settings.stride)
        pos = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.angstrom)
        frames.append(Configuration(system.atomic_numbers.copy(), np.array(pos), system.box,
                                    f"{name}/md{temperature:.0f}K/{i}"))
    return frames


def _perturbed(name: str, settings: CalibrationSettings, rng: np.random.Generator) -> list[Configuration]:
    system = get_system(name)
    out = [Configuration(system.atomic_numbers.copy(), system.positions.copy(), system.box, f"{name}/start")]
    for i in range(settings.displaced):
        pos = system.positions + rng.normal(scale=settings.sigma, size=system.positions.shape)
        out.append(Configuration(system.atomic_numbers.copy(), pos, system.box, f"{name}/displaced/{i}"))
    for factor in settings.compression:
        if system.box is not None:
            pos, cell = system.positions * factor, system.box * factor
        else:
            centroid = system.positions.mean(axis=0)
            pos, cell = centroid + (system.positions - centroid) * factor, None
        out.append(Configuration(system.atomic_numbers.copy(), pos, cell, f"{name}/compressed{factor:g}"))
    return out


def check_elements(configs: list[Configuration], potential: ANIPotential) -> None:
    """One clear error for the first configuration with an element the model lacks (or bad values)."""
    for config in configs:
        try:
            potential.check_inputs(config.numbers, config.positions, config.cell)
        except NnpqError as exc:
            raise NnpqError(f"{config.source}: {exc}") from None


def split(configs: list[Configuration], fraction: float, rng: np.random.Generator) -> CalibrationSet:
    """Hold out ``fraction`` of the configurations of each source (system or file), at least one
    each, spread over the kinds (MD temperatures, displaced, compressed) in proportion: members
    are shuffled within each kind, laid out kind after kind, and taken at even spacing from a
    random offset, so neither set is short of the hard (displaced, compressed) configurations."""
    groups: dict[str, list[Configuration]] = {}
    for config in configs:
        groups.setdefault(config.group, []).append(config)
    calibration, holdout = [], []
    for members in groups.values():
        by_kind: dict[str, list[Configuration]] = {}
        for config in members:
            by_kind.setdefault(config.kind, []).append(config)
        ordered = [kind[i] for kind in by_kind.values() for i in rng.permutation(len(kind))]
        n_hold = max(1, int(round(fraction * len(members)))) if len(members) > 1 else 0
        step = len(members) / max(n_hold, 1)
        offset = rng.uniform(0, step)
        held = {int(offset + i * step) for i in range(n_hold)}
        holdout += [c for i, c in enumerate(ordered) if i in held]
        calibration += [c for i, c in enumerate(ordered) if i not in held]
    return CalibrationSet(calibration, holdout)


def library_configs(entries, group: str, kinds: tuple[str, ...], settings: CalibrationSettings,
                     rng: np.random.Generator) -> list[Configuration]:
    """Frames of library entries (``kinds`` of each molecule, every frame of a liquid) plus displaced
    copies of each molecule's start; sources ``group:name/kind``."""
    out = []
    for entry in entries:
        prefix = f"{group}:{entry.name}"
        if entry.cell is not None:  # condensed phase: every frame, and a compressed copy of the last
            out += [Configuration(entry.numbers, f, entry.cell, f"{prefix}/{k}") for k, f in zip(entry.kinds, entry.frames)]
            for factor in settings.compression:
                out.append(Configuration(entry.numbers, entry.frames[-1] * factor, entry.cell * factor,
                                         f"{prefix}/compressed{factor:g}"))
            continue
        frames = dict(zip(entry.kinds, entry.frames))
        out += [Configuration(entry.numbers, frames[k], None, f"{prefix}/{k}") for k in kinds]
        for i in range(settings.library_displaced):
            pos = frames["start"] + rng.normal(scale=settings.sigma, size=frames["start"].shape)
            out.append(Configuration(entry.numbers, pos, None, f"{prefix}/displaced/{i}"))
    return out


def _subset(entries: list, limit: int, rng: np.random.Generator) -> list:
    """A seeded choice of ``limit`` entries, in library order."""
    keep = set(rng.permutation(len(entries))[:limit].tolist())
    return [e for i, e in enumerate(entries) if i in keep]


def build_calibration_set(potential: ANIPotential, settings: CalibrationSettings = CalibrationSettings(),
                          progress: bool = False) -> CalibrationSet:
    """Sample configurations with the FP32 ``potential`` and split them; reproducible from ``settings.seed``."""
    from tqdm import tqdm

    from nnpq.systems.library import chemistry_split, library

    user: list[Configuration] = []
    for path in settings.files:  # read and check user files first: a bad file should not wait for MD
        user += read_configurations(path, settings.topology)
    check_elements(user, potential)
    rng = np.random.default_rng(settings.seed)
    supported = set(potential.supported_numbers.tolist())
    names = [n for n in settings.systems if set(get_system(n).atomic_numbers.tolist()) <= supported]
    configs: list[Configuration] = []
    jobs = [(n, t) for n in names for t in settings.temperatures]
    for k, (name, temperature) in enumerate(tqdm(jobs, desc="calibration MD", unit="run", disable=not progress)):
        configs += _md_frames(potential, name, temperature, settings, settings.seed * 1000 + k + 1)
    for name in names:
        configs += _perturbed(name, settings, rng)
    chemistry, groups = [], []
    if settings.library:
        entries = tuple(e for e in library() if set(e.numbers.tolist()) <= supported)
        if settings.chemistry_holdout:
            kept, held, groups = chemistry_split(entries, settings.seed)
        else:
            kept, held = list(entries), []
        if settings.library_limit is not None:
            kept, held = (_subset(part, settings.library_limit, rng) for part in (kept, held))
        configs += library_configs(kept, "library", settings.library_kinds, settings, rng)
        chemistry = library_configs(held, "heldout-chemistry", settings.library_kinds, settings, rng)
    result = split(configs + user, settings.holdout_fraction, rng)
    result.chemistry, result.heldout_groups = chemistry, groups
    return result
