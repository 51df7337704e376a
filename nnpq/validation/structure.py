"""Structural and error comparisons between two runs or two models.

All functions are unit-agnostic unless stated: whatever length, energy or force
unit comes in goes out. Arrays are numpy; nothing here runs MD or models.
"""

from __future__ import annotations

import numpy as np

from nnpq.errors import NnpqError

# Index = atomic number. Used for per-element labels in force errors.
_SYMBOLS: tuple[str, ...] = (
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr "
    "Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb "
    "Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf "
    "Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og"
).split()


def element_symbol(z: int) -> str:
    """Chemical symbol for atomic number ``z`` ("Z<n>" if out of range)."""
    z = int(z)
    return _SYMBOLS[z] if 0 < z < len(_SYMBOLS) else f"Z{z}"


def _as_coords(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3:
        raise NnpqError(f"{name} must have shape (N, 3), got {x.shape}")
    return x


def kabsch_rmsd(a: np.ndarray, b: np.ndarray, masses: np.ndarray | None = None) -> float:
    """RMSD between two (N, 3) conformations after optimal superposition.

    Translation and rotation are removed (Kabsch algorithm, proper rotations only,
    no reflection). With ``masses`` both the centring and the RMS are mass-weighted.
    The result is in the input length unit.
    """
    a = _as_coords(a, "a")
    b = _as_coords(b, "b")
    if a.shape != b.shape:
        raise NnpqError(f"kabsch_rmsd needs the same atoms in both structures, got {a.shape} and {b.shape}")
    if masses is None:
        w = np.ones(len(a))
    else:
        w = np.asarray(masses, dtype=np.float64).reshape(-1)
        if w.shape != (len(a),) or np.any(w < 0) or w.sum() <= 0:
            raise NnpqError(f"masses must be {len(a)} non-negative values with a positive sum")
    w = w / w.sum()
    ac = a - w @ a
    bc = b - w @ b
    h = (ac * w[:, None]).T @ bc  # weighted covariance
    u, _, vt = np.linalg.svd(h)
    # Flip the smallest singular direction if the best orthogonal map is a reflection.
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    rot = u @ np.diag([1.0, 1.0, d]) @ vt  # rotates ac onto bc: ac @ rot ~ bc
    diff = ac @ rot - bc
    # Explicit residual rather than the E0 - 2*sum(s) shortcut, which can go slightly
    # negative from round-off for near-identical structures.
    return float(np.sqrt(np.sum(w * np.sum(diff**2, axis=1))))


def rmsd_series(traj_a: np.ndarray, traj_b: np.ndarray, periodic: bool = False) -> np.ndarray:
    """Frame-by-frame RMSD between two trajectories of the same system.

    Args:
        traj_a, traj_b: (F, N, 3) coordinates (a single (N, 3) frame is accepted).
        periodic: for a periodic box, do not superimpose: a global rotation is not
            a symmetry of a box, so the RMSD is the plain RMS displacement after
            removing the mean displacement of all atoms (uniform centre drift).
            Coordinates must be unwrapped, otherwise atoms crossing the box edge
            show up as jumps of one box length.

    Returns:
        (F,) RMSD in the input length unit (unweighted).
    """
    a = np.asarray(traj_a, dtype=np.float64)
    b = np.asarray(traj_b, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if b.ndim == 2:
        b = b[None]
    if a.ndim != 3 or a.shape[-1] != 3 or a.shape != b.shape:
        raise NnpqError(f"rmsd_series needs two (F, N, 3) trajectories of equal shape, got {a.shape} and {b.shape}")
    if periodic:
        disp = b - a
        disp -= disp.mean(axis=1, keepdims=True)
        return np.sqrt(np.mean(np.sum(disp**2, axis=2), axis=1))
    return np.array([kabsch_rmsd(fa, fb) for fa, fb in zip(a, b)])


def force_errors(f_ref: np.ndarray, f_test: np.ndarray, atomic_numbers: np.ndarray) -> dict:
    """Force errors of ``f_test`` against ``f_ref``, overall and per element.

    Args:
        f_ref, f_test: (F, N, 3) or (N, 3) forces, any unit (the result has the same).
        atomic_numbers: (N,) atomic numbers.

    Errors are per Cartesian component, the usual convention for ML potentials:
    ``force_rmse`` = sqrt(mean((f_test - f_ref)**2)) over frames, atoms and
    components, ``force_mae`` the mean absolute component error, ``force_max_abs``
    the largest absolute component error, ``force_rms_ref`` the RMS reference force
    component (divide by it to get a relative error). ``per_element`` maps symbol
    to ``{"force_rmse", "force_mae", "force_max_abs", "n"}`` with ``n`` the number of
    atoms of that element per frame.
    """
    ref = np.asarray(f_ref, dtype=np.float64)
    test = np.asarray(f_test, dtype=np.float64)
    z = np.asarray(atomic_numbers).reshape(-1).astype(int)
    if ref.ndim == 2:
        ref = ref[None]
    if test.ndim == 2:
        test = test[None]
    if ref.shape != test.shape or ref.ndim != 3 or ref.shape[2] != 3 or ref.shape[1] != len(z):
        raise NnpqError(
            f"force_errors needs (F, N, 3) forces of equal shape and N atomic numbers, "
            f"got {np.shape(f_ref)}, {np.shape(f_test)} and {len(z)} atomic numbers"
        )
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(test))):
        raise NnpqError("force_errors got NaN or infinite forces: the model or trajectory blew up")
    err = test - ref
    out: dict = {
        "force_rmse": float(np.sqrt(np.mean(err**2))),
        "force_mae": float(np.mean(np.abs(err))),
        "force_max_abs": float(np.max(np.abs(err))),
        "force_rms_ref": float(np.sqrt(np.mean(ref**2))),
        "per_element": {},
    }
    for zi in sorted(set(z.tolist())):
        e = err[:, z == zi, :]
        out["per_element"][element_symbol(zi)] = {
            "force_rmse": float(np.sqrt(np.mean(e**2))),
            "force_mae": float(np.mean(np.abs(e))),
            "force_max_abs": float(np.max(np.abs(e))),
            "n": int(np.count_nonzero(z == zi)),
        }
    return out


def energy_errors(e_ref: np.ndarray, e_test: np.ndarray, n_atoms: int) -> dict:
    """Energy errors of ``e_test`` against ``e_ref`` (both (F,), same unit, per system).

    Returns per-atom MAE / RMSE / max absolute error, the per-system MAE, the mean
    offset (mean of e_test - e_ref), and ``relative_energy_mae_per_atom`` /
    ``relative_energy_rmse_per_atom`` computed after removing that offset: a
    constant energy shift leaves forces and hence the dynamics unchanged, so the
    relative metric is the one that matters for MD.
    """
    ref = np.asarray(e_ref, dtype=np.float64).reshape(-1)
    test = np.asarray(e_test, dtype=np.float64).reshape(-1)
    if ref.shape != test.shape or ref.size == 0:
        raise NnpqError(f"energy_errors needs two equal, non-empty series, got {ref.size} and {test.size} frames")
    if int(n_atoms) < 1:
        raise NnpqError(f"energy_errors needs n_atoms >= 1, got {n_atoms}")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(test))):
        raise NnpqError("energy_errors got NaN or infinite energies: the model or trajectory blew up")
    n = float(n_atoms)
    d = test - ref
    offset = float(d.mean())
    rel = d - offset
    return {
        "energy_mae": float(np.mean(np.abs(d))),
        "energy_mae_per_atom": float(np.mean(np.abs(d)) / n),
        "energy_rmse_per_atom": float(np.sqrt(np.mean(d**2)) / n),
        "energy_max_abs_per_atom": float(np.max(np.abs(d)) / n),
        "energy_mean_offset": offset,
        "relative_energy_mae_per_atom": float(np.mean(np.abs(rel)) / n),
        "relative_energy_rmse_per_atom": float(np.sqrt(np.mean(rel**2)) / n),
        "n_frames": int(d.size),
    }
