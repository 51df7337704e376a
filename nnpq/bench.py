"""`nnpq bench`: energy+forces time per call and per OpenMM MD step, quantized runtimes beside
FP32 TorchANI measured in the same run.

Every runtime is called in turn inside each repeat (interleaved), so machine noise hits all of
them alike; medians are reported, with ratios against stock FP32 TorchANI on the same system and
device. Peak memory is the model's resident tensors plus the largest transient allocation of one
call (CUDA: the allocator's peak; CPU: the profiler's memory events).
"""

from __future__ import annotations

import statistics
from pathlib import Path
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from nnpq.errors import NnpqError
from nnpq.systems import get_system

DEFAULT_SYSTEMS = ("alanine-dipeptide", "water-box", "water-box-2x")
SCHEMA_VERSION = 1


@dataclass
class BenchRow:
    """One runtime on one system: median milliseconds per energy+forces call (or per MD step)."""

    system: str
    atoms: int
    device: str
    runtime: str  # torchani-fp32, torchani-fp32-infer, openmm-ml-ani2x, nnpq
    mode: str | None  # fp32, exact, fast for nnpq; None for peers
    what: str  # "call" (energy+forces) or "md-step" (one OpenMM step)
    ms_per_call: float
    speedup_vs_torchani_fp32: float | None
    peak_memory_mb: float | None
    repeats: int
    speedup_vs_openmm_ml: float | None = None  # md-step rows: openmm-ml's step time over this one
    model: str | None = None  # nnpq rows: the .nnpq file's name (or the FP32 model's); None for peers
    backend: str | None = None  # nnpq call rows: the runtime's networks, torch (CPU) or triton (CUDA)


def replicated(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Atomic numbers, positions (Å) and cell (Å) of a built-in system, or of the water box
    replicated ``k`` times per axis for ``water-box-{k}x`` (k = 2: 4,440 atoms, 3: 14,985)."""
    if name.startswith("water-box-") and name.endswith("x"):
        try:
            k = int(name[len("water-box-"):-1])
        except ValueError:
            raise NnpqError(f"cannot read replication in '{name}'; write e.g. water-box-2x") from None
        base = get_system("water-box")
        shifts = np.array([[i, j, l] for i in range(k) for j in range(k) for l in range(k)], dtype=np.float64) @ base.box
        positions = (base.positions[None] + shifts[:, None]).reshape(-1, 3)
        return np.tile(base.atomic_numbers, k**3), positions, base.box * k
    system = get_system(name)
    return system.atomic_numbers, system.positions, system.box


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_transient_mb(call: Callable[[], None], device: str) -> float:
    """Largest memory held at once by one call beyond what existed before it, MB."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 1e6
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    # self memory: an op's nested calls (to -> _to_copy -> empty_strided) would count one allocation thrice
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak / 1e6


def _resident_mb(module: torch.nn.Module) -> float:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6


def _torchani_call(model, numbers, positions, cell, device: str) -> Callable[[], None]:
    species = torch.as_tensor(numbers, device=device).unsqueeze(0)
    coords = torch.as_tensor(positions, dtype=torch.float32, device=device).unsqueeze(0)
    box = None if cell is None else torch.as_tensor(cell, dtype=torch.float32, device=device)
    pbc = None if box is None else torch.ones(3, dtype=torch.bool, device=device)
    if box is not None:
        coords = coords - torch.floor(coords @ torch.linalg.inv(box)) @ box

    def call() -> None:
        x = coords.clone().requires_grad_(True)
        energy = model((species, x), cell=box, pbc=pbc).energies.sum()
        torch.autograd.grad(energy, x)

    return call


def _potential_call(potential, numbers, positions, cell, device: str) -> Callable[[], None]:
    z = torch.as_tensor(numbers, device=device)
    pos = torch.as_tensor(positions, dtype=torch.float64, device=device)
    box = None if cell is None else torch.as_tensor(cell, dtype=torch.float64, device=device)

    def call() -> None:
        x = pos.clone().requires_grad_(True)
        torch.autograd.grad(potential(z, x, box), x)

    return call


def _md_step_timer(system_name: str, make_system: Callable, device: str, steps: int) -> Callable[[], None]:
    """One OpenMM step of a Verlet integrator on ``system_name``, through ``make_system(topology)``."""
    import openmm
    from openmm import unit

    system = get_system(system_name)
    omm = make_system(system.topology)
    integrator = openmm.VerletIntegrator(0.5 * unit.femtosecond)
    platform = openmm.Platform.getPlatformByName("CUDA" if device == "cuda" else "CPU")
    context = openmm.Context(omm, integrator, platform)
    context.setPositions(system.positions_nm())
    context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    integrator.step(1)

    def call() -> None:
        integrator.step(steps)
        context.getState(getPositions=True)  # makes the platform finish the steps (energy would be a second evaluation)

    call.context = context  # keep it alive
    return call


def run_bench(model: str | list[str], device: str = "cpu", systems: tuple[str, ...] = DEFAULT_SYSTEMS,
              modes: tuple[str, ...] = ("exact", "fast"), repeats: int = 5, md_steps: bool = True,
              progress: bool = False) -> list[BenchRow]:
    """Time every runtime on every system, interleaved; see the module docstring. Several ``.nnpq``
    files of one FP32 model (plans to compare) are timed in the same interleaved rounds."""
    from tqdm import tqdm

    from nnpq.artifact import read_artifact
    from nnpq.models import load_potential, model_spec

    if device == "cuda" and not torch.cuda.is_available():
        raise NnpqError("--device cuda needs a CUDA GPU, and none is visible to torch here; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise NnpqError(f"unknown device '{device}'; use cpu or cuda")
    if repeats < 1:
        raise NnpqError("--repeats must be at least 1")
    models = [model] if isinstance(model, str) else list(model)
    files = [m for m in models if m.endswith(".nnpq")]
    names = {read_artifact(m).model_name for m in files} or {model_spec(models[0]).name}
    if len(names) > 1 or len(files) < len(models) > 1:
        raise NnpqError(f"bench compares .nnpq files of one FP32 model; got {', '.join(models)}")
    fp32_name = names.pop()
    spec = model_spec(fp32_name)
    rows: list[BenchRow] = []
    for name in tqdm(systems, desc="bench systems", disable=not progress):
        numbers, positions, cell = replicated(name)
        neighborlist = "cell_list" if cell is not None else "all_pairs"
        stock = spec.loader(neighborlist=neighborlist).to(device).eval()
        infer = spec.loader(neighborlist=neighborlist).to(device).eval().to_infer_model()
        Key = tuple[str, str | None, str | None]  # runtime, mode, model
        runtimes: dict[Key, tuple[Callable[[], None], float]] = {
            ("torchani-fp32", None, None): (_torchani_call(stock, numbers, positions, cell, device), _resident_mb(stock)),
            ("torchani-fp32-infer", None, None): (_torchani_call(infer, numbers, positions, cell, device),
                                                  _resident_mb(infer)),
        }
        # nnpq fp32: the fused runtime on the published weights (exact mode, labelled fp32)
        loads = [("fp32", fp32_name, "exact")] + [(m, f, m) for f in files for m in modes]
        backends: dict[Key, str] = {}
        for label, source, mode in loads:
            potential = load_potential(source, neighborlist, mode=mode, device=device)  # CUDA: the Triton backend
            runtimes[("nnpq", label, Path(source).name)] = (
                _potential_call(potential, numbers, positions, cell, device), _resident_mb(potential))
            backends[("nnpq", label, Path(source).name)] = potential.backend
        times: dict[Key, list[float]] = {k: [] for k in runtimes}
        for call, _ in runtimes.values():  # warm-up: first calls compile, allocate, tune
            call()
            call()
        for _ in range(repeats):
            for key, (call, _) in runtimes.items():
                _sync(device)
                start = time.perf_counter()
                call()
                _sync(device)
                times[key].append((time.perf_counter() - start) * 1e3)
        base = statistics.median(times[("torchani-fp32", None, None)])
        for (runtime, mode, source), (call, resident) in runtimes.items():
            ms = statistics.median(times[(runtime, mode, source)])
            rows.append(BenchRow(name, len(numbers), device, runtime, mode, "call", ms, base / ms,
                                 resident + _peak_transient_mb(call, device), repeats, model=source,
                                 backend=backends.get((runtime, mode, source))))
        if md_steps and name in ("alanine-dipeptide", "water-box"):
            rows += _md_rows(name, files, fp32_name, modes, device, repeats)
    return rows


def _md_rows(name: str, files: list[str], fp32_name: str, modes: tuple[str, ...], device: str,
             repeats: int) -> list[BenchRow]:
    """Per-step time of openmm-ml's MLPotential(fp32 name) and of nnpq's OpenMM force for each file and mode."""
    from openmmml import MLPotential

    from nnpq.md.openmm import create_system

    n_atoms = get_system(name).n_atoms
    peer = ("openmm-ml-" + fp32_name, None, None)
    timers: dict[tuple[str, str | None, str | None], Callable[[], None]] = {
        peer: _md_step_timer(name, MLPotential(fp32_name).createSystem, device, 1)}
    for file in files:
        for mode in modes:
            timers[("nnpq", mode, Path(file).name)] = _md_step_timer(
                name, lambda top, file=file, mode=mode: create_system(top, file, mode=mode), device, 1)
    times: dict[tuple[str, str | None, str | None], list[float]] = {k: [] for k in timers}
    for _ in range(repeats):
        for key, call in timers.items():
            start = time.perf_counter()
            call()
            times[key].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times[peer])
    return [BenchRow(name, n_atoms, device, runtime, mode, "md-step", statistics.median(t), None, None, repeats,
                     base / statistics.median(t), model) for (runtime, mode, model), t in times.items()]


def format_rows(rows: list[BenchRow]) -> str:
    """The terminal table: one line per system, runtime and mode."""
    lines = [f"{'system':<18}{'atoms':>7}{'device':>7}  {'runtime':<22}{'model':<16}{'mode':<7}{'what':<8}{'ms':>10}"
             f"{'x TorchANI':>11}{'x openmm-ml':>12}{'peak MB':>9}"]
    for r in rows:
        ratio = f"{r.speedup_vs_torchani_fp32:>11.2f}" if r.speedup_vs_torchani_fp32 is not None else f"{'':>11}"
        step = f"{r.speedup_vs_openmm_ml:>12.2f}" if r.speedup_vs_openmm_ml is not None else f"{'':>12}"
        peak = f"{r.peak_memory_mb:>9.1f}" if r.peak_memory_mb is not None else f"{'':>9}"
        lines.append(f"{r.system:<18}{r.atoms:>7}{r.device:>7}  {r.runtime:<22}{(r.model or '-')[:15]:<16}"
                     f"{r.mode or '-':<7}{r.what:<8}"
                     f"{r.ms_per_call:>10.2f}{ratio}{step}{peak}")
    return "\n".join(lines)


def rows_to_json(rows: list[BenchRow]) -> list[dict]:
    return [{"schema_version": SCHEMA_VERSION, **asdict(r)} for r in rows]
