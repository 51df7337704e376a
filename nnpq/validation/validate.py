"""`nnpq validate`: FP32 and quantized NVE runs from one start, compared side by side."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from nnpq.atomic_io import write_bytes_atomic
from nnpq.md.openmm import create_system
from nnpq.models import load_potential
from nnpq.systems import get_system
from nnpq.units import NM_TO_ANGSTROM
from nnpq.validation.drift import fit_drift
from nnpq.validation.evaluate import compare_models
from nnpq.validation.nve import NVESettings, StartState, prepare_start, run_nve
from nnpq.validation.report import write_report
from nnpq.validation.structure import dihedral_series, rmsd_series

MAX_ERROR_FRAMES = 50  # frames of the FP32 run re-evaluated with both models


def _start_state(path: Path, make, key: str) -> StartState:
    """The shared start, saved so that a resumed validation starts both runs identically."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) == key:
                return StartState(data["positions"], data["velocities"])
    start = make()
    buffer = io.BytesIO()
    np.savez(buffer, key=key, positions=start.positions, velocities=start.velocities)
    write_bytes_atomic(path, buffer.getvalue())
    return start


def validate(model: str | os.PathLike, system_name: str, settings: NVESettings, out_dir: str | os.PathLike,
             progress: bool = False) -> dict[str, Any]:
    """Run FP32 and quantized NVE from the same minimized, thermalized start; write the report.

    The FP32 reference is the published model the quantized one was made from.

    Returns the report dict (also written to ``out_dir/report.json`` with ``report.md`` and PNGs).
    """
    out = Path(out_dir)
    system = get_system(system_name)
    neighborlist = "cell_list" if system.is_periodic else "all_pairs"
    quantized = load_potential(model, neighborlist)
    reference = quantized.model_name
    fp32 = load_potential(reference, neighborlist)
    quantized.check_inputs(system.atomic_numbers, system.positions, system.box)
    fp32_system = create_system(system.topology, fp32, remove_cm_motion=False)
    q_system = create_system(system.topology, quantized, remove_cm_motion=False)

    start = _start_state(out / "start.npz", lambda: prepare_start(fp32_system, system.positions_nm(), settings),
                         settings.key())
    runs = {
        "fp32": run_nve(fp32_system, start, settings, out / "checkpoint-fp32.npz", "FP32 NVE", progress),
        "quantized": run_nve(q_system, start, settings, out / "checkpoint-quantized.npz", "quantized NVE", progress),
    }

    fp32_run = runs["fp32"]
    pick = np.unique(np.linspace(0, len(fp32_run.time_ps) - 1, MAX_ERROR_FRAMES).astype(int))
    frames = fp32_run.positions_nm[pick] * NM_TO_ANGSTROM
    errors = compare_models(fp32, quantized, system.atomic_numbers, frames, system.box, units="kj")

    rmsd_nm = rmsd_series(fp32_run.positions_nm, runs["quantized"].positions_nm, periodic=system.is_periodic)
    comparison: dict[str, np.ndarray] = {"time_ps": fp32_run.time_ps, "rmsd_angstrom": rmsd_nm * NM_TO_ANGSTROM}
    for label, run in runs.items():
        dihedrals = dihedral_series(system.topology, run.positions_nm)
        if dihedrals is not None:
            comparison[f"phi_deg_{label}"] = dihedrals["phi_deg"]
            comparison[f"psi_deg_{label}"] = dihedrals["psi_deg"]

    report: dict[str, Any] = {
        "model": str(model),
        "reference": reference,
        "system": {"name": system.name, "n_atoms": system.n_atoms, "periodic": system.is_periodic},
        "settings": settings.__dict__,
        "errors": {k: errors[k] for k in ("energy", "force")},
        "error_frames": int(len(pick)),
        "rmsd_angstrom_final": float(comparison["rmsd_angstrom"][-1]),
        "rmsd_angstrom_max": float(comparison["rmsd_angstrom"].max()),
        "timing": {label: {"seconds_per_step": run.seconds_per_step} for label, run in runs.items()},
    }
    series: dict[str, dict[str, np.ndarray]] = {"comparison": comparison}
    for label, run in runs.items():
        report[label] = {"drift": fit_drift(run.time_ps, run.total_kj_mol, run.kinetic_kj_mol, system.n_atoms)}
        series[label] = {"time_ps": run.time_ps, "total_kj_mol": run.total_kj_mol,
                         "kinetic_kj_mol": run.kinetic_kj_mol, "potential_kj_mol": run.potential_kj_mol}
    title = f"nnpq validation: {Path(str(model)).name} vs {reference} FP32 on {system.name}"
    report["files"] = write_report(out, report, series, title)
    return report

