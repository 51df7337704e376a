"""Energy and force errors of a test model against a reference model on given configurations."""

from __future__ import annotations

import numpy as np
import torch

from nnpq.models import ANIPotential, energy_and_forces
from nnpq.models.batching import batches, padded
from nnpq.units import HARTREE_TO_KCAL_MOL, HARTREE_TO_KJ_MOL, NM_TO_ANGSTROM
from nnpq.validation.structure import element_symbol, energy_errors, force_errors

# (energy factor from Hartree, force factor from Hartree/Angstrom, energy unit, force unit)
UNITS = {
    "kcal": (HARTREE_TO_KCAL_MOL, HARTREE_TO_KCAL_MOL, "kcal/mol", "kcal/mol/Å"),
    "kj": (HARTREE_TO_KJ_MOL, HARTREE_TO_KJ_MOL * NM_TO_ANGSTROM, "kJ/mol", "kJ/mol/nm"),
}


def perturbed_frames(positions: np.ndarray, n_frames: int, sigma: float = 0.1, seed: int = 0) -> np.ndarray:
    """``(n_frames, N, 3)`` configurations (Angstrom): the input, then Gaussian displacements of ``sigma`` Å."""
    rng = np.random.default_rng(seed)
    base = np.asarray(positions, dtype=np.float64)
    frames = [base] + [base + rng.normal(scale=sigma, size=base.shape) for _ in range(n_frames - 1)]
    return np.stack(frames)


def model_outputs(potential: ANIPotential, numbers: np.ndarray, frames: np.ndarray,
                  cell: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Energies ``(F,)`` in Hartree and forces ``(F, N, 3)`` in Hartree/Angstrom over frames (Angstrom)."""
    energies, forces = [], []
    for frame in frames:
        e, f = energy_and_forces(potential, numbers, frame, cell)
        energies.append(e)
        forces.append(f)
    return np.array(energies), np.stack(forces)


def compare_outputs(ref: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                    numbers: np.ndarray, units: str = "kcal") -> dict:
    """Error dicts (``energy``, ``force``) between two `model_outputs` results, in ``units``."""
    e_factor, f_factor, e_unit, f_unit = UNITS[units]
    return {
        "energy": energy_errors(ref[0] * e_factor, test[0] * e_factor, len(numbers)),
        "force": force_errors(ref[1] * f_factor, test[1] * f_factor, numbers),
        "units": {"energy": e_unit, "force": f_unit},
    }


def compare_models(ref: ANIPotential, test: ANIPotential, numbers: np.ndarray, frames: np.ndarray,
                   cell: np.ndarray | None = None, units: str = "kcal") -> dict:
    """Errors of ``test`` against ``ref`` on ``frames`` (Angstrom), in kcal (default) or kJ units."""
    return compare_outputs(model_outputs(ref, numbers, frames, cell), model_outputs(test, numbers, frames, cell),
                           numbers, units)


Outputs = list[tuple[float, np.ndarray]]  # per configuration: energy (Ha), forces (Ha/Å)


def outputs_on(potential: ANIPotential, configs: list) -> Outputs:
    """Energy and forces of ``potential`` on each `nnpq.structures.Configuration`; molecules are
    evaluated in padded batches when the potential can (`ANIPotential.batch_energies`)."""
    if not hasattr(potential, "batch_energies"):
        return [energy_and_forces(potential, c.numbers, c.positions, c.cell) for c in configs]
    out: Outputs = [(0.0, np.zeros(0))] * len(configs)
    for indices in batches(configs):
        if len(indices) == 1:
            c = configs[indices[0]]
            out[indices[0]] = energy_and_forces(potential, c.numbers, c.positions, c.cell)
            continue
        for i in indices:
            potential.check_inputs(configs[i].numbers, configs[i].positions)
        numbers, positions = padded(configs, indices)
        positions.requires_grad_(True)
        energies = potential.batch_energies(numbers, positions)
        (grad,) = torch.autograd.grad(energies.sum(), positions)
        for row, i in enumerate(indices):
            out[i] = (float(energies[row].detach()), -grad[row, :configs[i].n_atoms].to(torch.float64).numpy())
    return out


def set_errors(reference: Outputs, test: Outputs, configs: list) -> dict:
    """Errors of ``test`` against ``reference`` over a set of configurations, kcal/mol and kcal/mol/Å.

    ``force_rmse`` pools every force component of every configuration; ``energy_mae_per_atom``
    averages |dE|/N over configurations; ``per_source``, ``per_kind``, ``per_molecule`` and
    ``per_element`` break both down.
    """
    e_factor = HARTREE_TO_KCAL_MOL
    sq: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    by_source: dict[str, dict[str, list[float]]] = {}
    by_kind: dict[str, dict[str, list[float]]] = {}
    by_molecule: dict[str, dict[str, list[float]]] = {}
    per_atom_e, all_sq, ref_sq = [], 0.0, 0.0
    n_comp = 0
    for (e_ref, f_ref), (e_test, f_test), config in zip(reference, test, configs):
        d = (f_test - f_ref) * e_factor
        de = abs(e_test - e_ref) * e_factor / config.n_atoms
        per_atom_e.append(de)
        all_sq += float(np.sum(d**2))
        ref_sq += float(np.sum((f_ref * e_factor) ** 2))
        n_comp += d.size
        for z in np.unique(config.numbers):
            sym = element_symbol(int(z))
            sq.setdefault(sym, []).append(float(np.sum(d[config.numbers == z] ** 2)))
            counts[sym] = counts.get(sym, 0) + int(np.sum(config.numbers == z)) * 3
        for groups, name in ((by_source, config.group), (by_kind, config.kind), (by_molecule, config.molecule)):
            group = groups.setdefault(name, {"sq": [], "n": [], "e": []})
            group["sq"].append(float(np.sum(d**2)))
            group["n"].append(d.size)
            group["e"].append(de)
    return {
        "force_rmse": float(np.sqrt(all_sq / max(n_comp, 1))),
        "force_rms_ref": float(np.sqrt(ref_sq / max(n_comp, 1))),
        "energy_mae_per_atom": float(np.mean(per_atom_e)) if per_atom_e else 0.0,
        "energy_max_per_atom": float(np.max(per_atom_e)) if per_atom_e else 0.0,
        "n_configurations": len(configs),
        "per_element": {s: {"force_rmse": float(np.sqrt(sum(v) / counts[s]))} for s, v in sorted(sq.items())},
        "per_source": _summaries(by_source),
        "per_kind": _summaries(by_kind),
        "per_molecule": _summaries(by_molecule),
    }


def _summaries(groups: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {k: {"force_rmse": float(np.sqrt(sum(v["sq"]) / sum(v["n"]))),
                "energy_mae_per_atom": float(np.mean(v["e"])), "n_configurations": len(v["e"])}
            for k, v in groups.items()}
