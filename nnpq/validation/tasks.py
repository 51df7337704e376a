"""The independent tasks of a validation campaign, each writing one result file atomically.

- ``start/SYSTEM/seed-S``: the shared minimized, equilibrated start (FP32 reference);
- ``run/SYSTEM/seed-S/MODEL``: every protocol stage of one model, and the NVT observables;
- ``fidelity/SYSTEM/seed-S/MODEL``: a quantized model against FP32 on FP32 frames (energy and
  force errors), divergence of paired NVE runs, force errors along its stress runs.

A task whose result file exists with the same key returns at once: a killed campaign
redoes only what is missing. Keys hash the model tensors, system, seed, protocol and
platform, and those of runs and fidelity the engine (``openmm`` or ``ase``), so results of
another model under the same file name, or of the other engine, are never reused. The start
is OpenMM's for both engines.
Tasks take and return plain data, so Dask can ship them to any worker that sees ``out``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from nnpq.atomic_io import write_text_atomic
from nnpq.errors import NnpqError
from nnpq.validation.identity import ModelRef, load
from nnpq.validation.protocol import Protocol
from nnpq.validation.runs import (StageContext, StageEngine, choose_platform, read_frames, run_stage, set_aside,
                                  start_state)

#: Fixed log-spaced bins (kJ/mol/nm) of per-atom force-error magnitudes, so histograms add up
#: over seeds and compare across reports.
FORCE_ERROR_EDGES = np.logspace(-2, 4, 61)
STRESS_STAGES = ("hot", "compressed")


@dataclass(frozen=True)
class Campaign:
    """Everything a task needs (plain data). ``models[0]`` is the FP32 reference."""

    out: str
    protocol: Protocol
    models: tuple[ModelRef, ...]
    systems: tuple[str, ...]
    seeds: tuple[int, ...]

    @property
    def reference(self) -> ModelRef:
        return self.models[0]

    def platform_name(self) -> str:
        return choose_platform(self.protocol.platform, self.protocol.threads)[0].getName()

    def engine_label(self) -> str:
        """What integrated the stages, for the report: engine, version, platform of the starts."""
        if self.protocol.engine == "ase":
            import ase

            return (f"ASE {ase.__version__} (VelocityVerlet NVE, Langevin NVT; shared starts made by OpenMM "
                    f"on {self.platform_name()})")
        import openmm

        return f"OpenMM {openmm.__version__} on {self.platform_name()}"

    def task_names(self) -> list[str]:
        """Every task of the campaign, in dependency order."""
        names = [start_name(s, seed) for s in self.systems for seed in self.seeds]
        names += [run_name(s, seed, m) for s in self.systems for seed in self.seeds for m in self.models]
        names += [fidelity_name(s, seed, m) for s in self.systems for seed in self.seeds for m in self.models[1:]]
        return names


def start_name(system: str, seed: int) -> str:
    return f"start/{system}/seed-{seed}"


def run_name(system: str, seed: int, model: ModelRef) -> str:
    return f"run/{system}/seed-{seed}/{model.key}"


def fidelity_name(system: str, seed: int, model: ModelRef) -> str:
    return f"fidelity/{system}/seed-{seed}/{model.key}"


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _start_key(c: Campaign, system: str, seed: int) -> str:
    return _hash("start", c.reference.sha256, system, seed, c.protocol.key(), c.platform_name())


def _run_key(c: Campaign, system: str, seed: int, model: ModelRef) -> str:
    return _hash("run", _start_key(c, system, seed), model.sha256, model.mode, c.protocol.engine)


def _fidelity_key(c: Campaign, system: str, seed: int, model: ModelRef) -> str:
    return _hash("fidelity", _run_key(c, system, seed, c.reference), _run_key(c, system, seed, model))


def result_path(out: str | Path, name: str) -> Path:
    return Path(out) / "tasks" / f"{name}.json"


def read_result(out: str | Path, name: str, key: str | None = None) -> dict | None:
    """A task's stored result, or None when absent (or, with ``key``, made for another key)."""
    path = result_path(out, name)
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged result is only lost time: redo the task
    if key is not None and stored.get("key") != key:
        set_aside(path, "is a result of another model, system, seed or protocol")
        return None
    return stored["result"]


def stored(c: Campaign, name: str) -> dict | None:
    """The result of task ``name`` of campaign ``c``; None when absent or made for another key."""
    kind, system, seed_text, *model_key = name.split("/")
    seed = int(seed_text.removeprefix("seed-"))
    if kind == "start":
        return read_result(c.out, name, _start_key(c, system, seed))
    model = next(m for m in c.models if m.key == model_key[0])
    key_of = _run_key if kind == "run" else _fidelity_key
    return read_result(c.out, name, key_of(c, system, seed, model))


def _task(name_of: Callable[..., str], key_of: Callable[..., str]):
    """Wrap a task body: reuse a stored result, refuse to run after a failed dependency, store
    the result atomically, and turn a run that cannot go on into a status the report lists."""

    def wrap(body):
        @functools.wraps(body)
        def task(c: Campaign, system: str, seed: int, model: ModelRef | None, *deps: dict) -> dict:
            args = (system, seed) if model is None else (system, seed, model)
            name, key = name_of(*args), key_of(c, *args)
            if read_result(c.out, name, key) is not None:
                return {"task": name, "status": "reused"}
            failed = [d["task"] for d in deps if d["status"] == "failed"]
            if failed:
                return {"task": name, "status": "failed", "error": f"needs {failed[0]}, which failed"}
            try:
                with _torch_threads(c.protocol.threads):
                    result = body(c, *args)
            except NnpqError as exc:
                return {"task": name, "status": "failed", "error": str(exc)}
            payload = json.dumps({"task": name, "key": key, "result": result}, sort_keys=True, allow_nan=False)
            write_text_atomic(result_path(c.out, name), payload + "\n")
            return {"task": name, "status": "done"}

        return task

    return wrap


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _neighborlist(system) -> str:
    return "cell_list" if system.is_periodic else "all_pairs"


@functools.lru_cache(maxsize=8)
def _openmm_system(model: ModelRef, system_name: str):
    from nnpq.md.openmm import create_system
    from nnpq.systems import get_system

    system = get_system(system_name)
    return create_system(system.topology, load(model, _neighborlist(system)), remove_cm_motion=False)


def _engine(c: Campaign, model: ModelRef, system_name: str, seed: int) -> StageEngine:
    """The engine the campaign's protocol names, holding ``model`` on ``system_name``."""
    if c.protocol.engine == "ase":
        from nnpq.systems import get_system
        from nnpq.validation.ase_runs import AseStages

        system = get_system(system_name)
        return AseStages(load(model, _neighborlist(system)), system.topology, _box_nm(system), c.protocol, seed)
    return StageContext(_openmm_system(model, system_name), c.protocol, seed)


def _bonds(system) -> np.ndarray:
    return np.array([(a.index, b.index) for a, b in system.topology.bonds()], dtype=int).reshape(-1, 2)


def _box_nm(system) -> np.ndarray | None:
    return None if system.box is None else np.asarray(system.box) / 10.0


def _stage_folder(c: Campaign, system: str, seed: int, model: ModelRef, stage: str) -> Path:
    return Path(c.out) / "runs" / system / f"seed-{seed}" / model.key / stage


@_task(start_name, _start_key)
def start_task(c: Campaign, system_name: str, seed: int) -> dict:
    """Minimize and equilibrate with the FP32 reference; the start file is what the runs read."""
    from nnpq.systems import get_system

    system = get_system(system_name)
    path = Path(c.out) / "starts" / f"{system_name}-seed-{seed}.npz"
    start_state(path, _start_key(c, system_name, seed), _openmm_system(c.reference, system_name),
                system.positions_nm(), c.protocol, seed)
    return {"file": str(path.relative_to(c.out))}


def _load_start(c: Campaign, system: str, seed: int):
    from nnpq.validation.runs import StartState

    path = Path(c.out) / "starts" / f"{system}-seed-{seed}.npz"
    with np.load(path, allow_pickle=False) as data:
        if str(data["key"]) != _start_key(c, system, seed):
            raise NnpqError(f"{path} belongs to another campaign; rerun to remake it")
        return StartState(data["positions"], data["velocities"])


@_task(run_name, _run_key)
def run_task(c: Campaign, system_name: str, seed: int, model: ModelRef) -> dict:
    """Every stage of the protocol for one model; observables on the NVT frames."""
    from nnpq.systems import get_system
    from nnpq.validation.observables import measure
    from nnpq.validation.runs import temperature_k

    system = get_system(system_name)
    runner = _engine(c, model, system_name, seed)
    start, run_key = _load_start(c, system_name, seed), _run_key(c, system_name, seed, model)
    stages, nvt = {}, None
    for stage in c.protocol.stages():
        frames = run_stage(runner, start, stage, c.protocol, _stage_folder(c, system_name, seed, model, stage.name),
                           _hash("stage", run_key, stage.name), _bonds(system))
        stages[stage.name] = {
            "time_ps": frames.time_ps.tolist(), "potential_kj_mol": frames.potential_kj_mol.tolist(),
            "kinetic_kj_mol": frames.kinetic_kj_mol.tolist(), "failure": frames.failure,
            "seconds_per_step": frames.seconds_per_step,
            "max_temperature_k": float(temperature_k(frames.kinetic_kj_mol, system.n_atoms).max()),
        }
        if stage.name == "nvt":
            nvt = frames
    observables = measure(system.topology, np.asarray(system.positions) / 10.0, nvt.positions_nm, _box_nm(system))
    return {"stages": stages, "observables": observables}


def _pick(n_frames: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n_frames - 1, min(k, n_frames)).astype(int))


def _errors_on(c: Campaign, system, model: ModelRef, positions_nm: np.ndarray, compression: float = 1.0) -> dict:
    """Energies (kJ/mol) and force errors (kJ/mol/nm) of ``model`` against FP32 on frames (nm)
    in the system's box scaled by ``compression``."""
    from nnpq.units import HARTREE_TO_KJ_MOL, NM_TO_ANGSTROM
    from nnpq.validation.evaluate import model_outputs
    from nnpq.validation.structure import element_symbol

    frames = positions_nm * NM_TO_ANGSTROM
    cell = None if system.box is None else np.asarray(system.box) * compression
    e_ref, f_ref = model_outputs(load(c.reference, _neighborlist(system)), system.atomic_numbers, frames, cell)
    e_test, f_test = model_outputs(load(model, _neighborlist(system)), system.atomic_numbers, frames, cell)
    f_factor = HARTREE_TO_KJ_MOL * NM_TO_ANGSTROM
    diff = (f_test - f_ref) * f_factor
    norms = np.linalg.norm(diff, axis=2)  # (F, N) per-atom error magnitude
    per_element = {}
    for z in sorted(set(system.atomic_numbers.tolist())):
        mask = system.atomic_numbers == z
        per_element[element_symbol(z)] = {
            "sq_sum": float(np.sum(diff[:, mask] ** 2)), "n_components": int(diff[:, mask].size),
            "max_abs": float(np.abs(diff[:, mask]).max()),
            "histogram": np.histogram(np.clip(norms[:, mask], FORCE_ERROR_EDGES[0], FORCE_ERROR_EDGES[-1]),
                                      bins=FORCE_ERROR_EDGES)[0].tolist(),
        }
    return {
        "energy_ref_kj_mol": (e_ref * HARTREE_TO_KJ_MOL).tolist(),
        "energy_test_kj_mol": (e_test * HARTREE_TO_KJ_MOL).tolist(),
        "force_rmse_per_frame": np.sqrt(np.mean(diff**2, axis=(1, 2))).tolist(),
        "force_max_abs": float(np.abs(diff).max()),
        "force_ref_max_abs": float(np.abs(f_ref * f_factor).max()),
        "force_ref_sq_sum": float(np.sum((f_ref * f_factor) ** 2)),
        "per_element": per_element,
    }


@_task(fidelity_name, _fidelity_key)
def fidelity_task(c: Campaign, system_name: str, seed: int, model: ModelRef) -> dict:
    """Errors of ``model`` on FP32 NVT frames; divergence of the paired NVE runs (same start);
    the largest force error along its own stress runs."""
    from nnpq.systems import get_system
    from nnpq.units import NM_TO_ANGSTROM
    from nnpq.validation.structure import rmsd_series

    system = get_system(system_name)
    folder = functools.partial(_stage_folder, c, system_name, seed)
    nvt = read_frames(folder(c.reference, "nvt")).positions_nm
    result: dict[str, Any] = {"fidelity": _errors_on(c, system, model, nvt[_pick(len(nvt), c.protocol.fidelity_frames)])}
    result["divergence"] = {}
    for stage in ("nve_0.5fs", "nve_1fs"):
        ref, test = read_frames(folder(c.reference, stage)), read_frames(folder(model, stage))
        n = min(len(ref.time_ps), len(test.time_ps))
        result["divergence"][stage] = {
            "time_ps": ref.time_ps[:n].tolist(),
            "rmsd_angstrom": (rmsd_series(ref.positions_nm[:n], test.positions_nm[:n], periodic=system.is_periodic)
                              * NM_TO_ANGSTROM).tolist(),
            "potential_diff_kj_mol": (test.potential_kj_mol[:n] - ref.potential_kj_mol[:n]).tolist(),
        }
    result["stress"] = {}
    for stage in STRESS_STAGES:
        frames = read_frames(folder(model, stage)).positions_nm
        errors = _errors_on(c, system, model, frames[_pick(len(frames), c.protocol.fidelity_frames)],
                            c.protocol.stage(stage).compression)
        result["stress"][stage] = {"force_max_abs": errors["force_max_abs"],
                                   "force_ref_max_abs": errors["force_ref_max_abs"]}
    return result
