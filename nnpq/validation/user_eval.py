"""``nnpq evaluate``: errors of a quantized model against its FP32 reference on the user's own structures.

Before trusting a quantized model in production MD, a user runs it on configurations of their
own system (XYZ, extended XYZ, PDB, or a DCD trajectory with its topology) and compares energies
and forces with the FP32 model it was made from. Units: kcal/mol (energy, per atom) and
kcal/mol/Å (forces).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nnpq.errors import NnpqError
from nnpq.structures import Configuration, read_configurations
from nnpq.validation.evaluate import outputs_on, set_errors

UNITS = {"energy": "kcal/mol", "force": "kcal/mol/Å"}


def _unique_inputs(inputs: list[str]) -> list[str]:
    """The input paths in the given order, each file once (the same file twice would count twice)."""
    seen: set[str] = set()
    out = []
    for item in inputs:
        key = os.path.realpath(os.fspath(item))
        if key not in seen:
            seen.add(key)
            out.append(os.fspath(item))
    return out


def _element_atom_counts(configs: list[Configuration]) -> dict[str, int]:
    from nnpq.validation.structure import element_symbol

    counts: dict[str, int] = {}
    for config in configs:
        zs, n = np.unique(config.numbers, return_counts=True)
        for z, k in zip(zs, n):
            sym = element_symbol(int(z))
            counts[sym] = counts.get(sym, 0) + int(k)
    return counts


def _outputs_with_progress(reference, potential, configs: list[Configuration], progress: bool):
    """Reference and test outputs, one configuration at a time so a progress bar can follow frames."""
    from tqdm import tqdm

    ref_out, test_out = [], []
    for config in tqdm(configs, desc="evaluating", unit="frame", disable=not progress):
        ref_out += outputs_on(reference, [config])
        test_out += outputs_on(potential, [config])
    return ref_out, test_out


def evaluate_files(model: str | os.PathLike, inputs: list[str], topology: str | None = None,
                   reference: str | None = None, progress: bool = False, mode: str | None = None) -> dict:
    """Energy and force errors of ``model`` against its FP32 reference on every frame of ``inputs``.

    Args:
        model: a ``.nnpq`` file or an FP32 model name (``ani2x``).
        inputs: structure files (XYZ, extended XYZ, PDB, DCD); all frames are used.
        topology: the topology (PDB) for DCD inputs; other formats ignore it.
        reference: the model to compare against; default the FP32 model ``model`` was made from.
        progress: show a progress bar over frames.
        mode: runtime mode of ``model`` (``exact``, ``fast``; default exact for ``.nnpq`` files);
            the reference always runs as TorchANI FP32.

    Returns:
        A JSON-able dict: ``overall`` errors (pooled force RMSE and per-atom energy MAE), ``per_file``,
        ``per_element`` (force RMSE; ``n_atoms`` counts that element's atoms summed over frames),
        counts and ``units``.

    Raises:
        NnpqError: no inputs, unreadable or missing files, a DCD without topology, or a configuration
            (named as ``file:frame``) with an element either model lacks.
    """
    from nnpq.models import load_potential
    from nnpq.models.domain import check_domain, warn_outside
    from nnpq.quant.calibration import check_elements

    files = _unique_inputs(list(inputs or []))
    if not files:
        raise NnpqError("no structure files given; pass at least one with --input FILE")
    if topology is not None and not Path(topology).is_file():
        raise NnpqError(f"topology file {topology} not found")

    per_file_configs: dict[str, list[Configuration]] = {}
    for path in files:
        per_file_configs[path] = read_configurations(path, topology)
    configs = [c for group in per_file_configs.values() for c in group]

    # a cell list is linear in atoms for boxes and also handles vacuum frames
    neighborlist = "cell_list" if any(c.cell is not None for c in configs) else "all_pairs"
    potential = load_potential(model, neighborlist, mode)
    check_elements(configs, potential)
    ref_potential = load_potential(reference or potential.model_name, neighborlist)
    check_elements(configs, ref_potential)

    ref_out, test_out = _outputs_with_progress(ref_potential, potential, configs, progress)

    overall = set_errors(ref_out, test_out, configs)
    per_element = overall.pop("per_element")
    for key in ("per_source", "per_molecule"):
        overall.pop(key, None)
    for sym, count in _element_atom_counts(configs).items():
        per_element[sym]["n_atoms"] = count

    per_file: dict[str, dict] = {}
    start = 0
    for path, group in per_file_configs.items():
        stop = start + len(group)
        errs = set_errors(ref_out[start:stop], test_out[start:stop], group)
        outside: dict[int, set[str]] = {}  # atoms outside the calibrated domain in any frame, warned once
        for config in group:
            for atom, blocks in check_domain(potential, config.numbers, config.positions, config.cell, warn=False).items():
                outside.setdefault(atom, set()).update(blocks)
        if outside:
            warn_outside(potential, outside, group[0].numbers, Path(path).name)
        per_file[path] = {
            "force_rmse": errs["force_rmse"],
            "force_rms_ref": errs["force_rms_ref"],
            "energy_mae_per_atom": errs["energy_mae_per_atom"],
            "energy_max_per_atom": errs["energy_max_per_atom"],
            "n_frames": len(group),
            "n_atoms": int(group[0].n_atoms) if len({c.n_atoms for c in group}) == 1 else None,
            "periodic": any(c.cell is not None for c in group),
            "outside_domain": {str(a): sorted(b) for a, b in sorted(outside.items())},
        }
        start = stop

    return {
        "model": potential.label,
        "model_name": potential.model_name,
        "mode": potential.mode,
        "reference": ref_potential.label,
        "neighborlist": neighborlist,
        "n_configurations": len(configs),
        "n_atoms_total": int(sum(c.n_atoms for c in configs)),
        "overall": overall,
        "per_file": per_file,
        "per_element": per_element,
        "units": dict(UNITS),
    }


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def format_evaluation(result: dict) -> str:
    """A fixed-width terminal table: overall, one line per file, one per element (force RMSE)."""
    e_unit = result["units"]["energy"]
    f_unit = result["units"]["force"]
    overall = result["overall"]
    names = list(result["per_file"])
    width = min(max([len("overall"), len("element")] + [len(n) for n in names]) + 2, 42)

    def rel(rmse: float, rms: float) -> str:
        return f"{100.0 * rmse / rms:>8.3f}%" if rms > 0 else f"{'-':>9}"

    lines = [
        f"{result['model']} (mode {result['mode']}) against reference {result['reference']}: "
        f"{result['n_configurations']} configurations, "
        f"{result['n_atoms_total']} atoms in all",
        "",
        f"{'':<{width}}{'frames':>8}  {'force RMSE':>12}  {'E MAE/atom':>13}  {'E max/atom':>13}"
        f"  {'ref RMS F':>12}  {'RMSE/RMS':>9}",
        f"{'':<{width}}{'':>8}  {f'({f_unit})':>12}  {f'({e_unit})':>13}  {f'({e_unit})':>13}"
        f"  {f'({f_unit})':>12}  {'':>9}",
    ]

    def row(label: str, d: dict, frames: int) -> str:
        return (f"{_short(label, width - 2):<{width}}{frames:>8}  {d['force_rmse']:>12.4f}  "
                f"{d['energy_mae_per_atom']:>13.5f}  {d['energy_max_per_atom']:>13.5f}  "
                f"{d['force_rms_ref']:>12.3f}  {rel(d['force_rmse'], d['force_rms_ref'])}")

    lines.append(row("overall", overall, result["n_configurations"]))
    for name in names:
        lines.append(row(name, result["per_file"][name], result["per_file"][name]["n_frames"]))
    # atoms of each element summed over all frames: how many force samples each RMSE rests on
    lines += ["", f"{'element':<{width}}{'atoms':>8}  {'force RMSE':>12}",
              f"{'':<{width}}{'x frames':>8}  {f'({f_unit})':>12}"]
    for sym, d in result["per_element"].items():
        lines.append(f"{sym:<{width}}{d.get('n_atoms', 0):>8}  {d['force_rmse']:>12.4f}")
    return "\n".join(line.rstrip() for line in lines)
