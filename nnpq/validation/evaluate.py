"""Energy and force errors of a test model against a reference model on given configurations."""

from __future__ import annotations

import numpy as np

from nnpq.models import ANIPotential, energy_and_forces
from nnpq.units import HARTREE_TO_KCAL_MOL, HARTREE_TO_KJ_MOL, NM_TO_ANGSTROM
from nnpq.validation.structure import energy_errors, force_errors

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
