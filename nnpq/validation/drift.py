"""Energy drift of an NVE trajectory.

Convention (ml-peg, MLIPAudit): the drift is the slope of a linear least-squares
fit of total energy against time. It is reported per atom (meV/atom/ps, the unit
used to compare potentials across system sizes) and per system (kJ/mol/ns, the
unit OpenMM users think in), together with the ratio of the total drift over the
run to the standard deviation of the kinetic energy: a ratio well below 1 means
the drift is small next to the thermal fluctuations the dynamics samples.

Inputs are energies in kJ/mol (per system, not per atom) and times in ps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from nnpq.errors import NnpqError

#: kJ/mol per eV (CODATA 2018: e * N_A / 1000).
KJ_MOL_PER_EV: float = 96.48533212331



def statistical_inefficiency(series: np.ndarray) -> float:
    """pymbar's statistical inefficiency g >= 1 of a time series (1 + 2 * integrated autocorrelation).

    ``len(series) / g`` is the number of effectively independent samples. pymbar logs a
    caveat and a missing-JAX note on import; both go to its logger, silenced here.
    """
    logging.getLogger("pymbar").setLevel(logging.ERROR)
    from pymbar import timeseries

    x = np.asarray(series, dtype=np.float64)
    if np.ptp(x) == 0.0:
        return 1.0  # constant series: pymbar divides by its zero variance
    return max(1.0, float(timeseries.statistical_inefficiency(x)))


@dataclass(frozen=True)
class DriftResult:
    """Linear drift of total energy in an NVE run. Units are in the field names."""

    slope_kj_mol_ns: float  # fitted slope of total energy, kJ/mol/ns
    slope_mev_atom_ps: float  # same slope, meV/atom/ps
    slope_stderr_kj_mol_ns: float  # OLS standard error inflated by sqrt(statistical inefficiency)
    ols_stderr_kj_mol_ns: float  # textbook OLS standard error (assumes uncorrelated noise)
    statistical_inefficiency: float  # pymbar's g of the residuals about the fit
    total_drift_kj_mol: float  # slope * duration
    kinetic_std_kj_mol: float  # standard deviation of the kinetic energy
    drift_to_kinetic_std: float  # |total_drift| / kinetic_std (nan if kinetic_std == 0)
    total_energy_std_kj_mol: float  # RMS of total energy about the fitted line
    duration_ps: float  # last time minus first time
    n_atoms: int
    n_frames: int

    @property
    def slope_stderr_mev_atom_ps(self) -> float:
        """Autocorrelation-corrected standard error of the slope in meV/atom/ps."""
        return kj_mol_ns_to_mev_atom_ps(self.slope_stderr_kj_mol_ns, self.n_atoms)

    def to_dict(self) -> dict:
        """Plain-Python dict (floats and ints only) for JSON reports.

        Includes the derived ``slope_stderr_mev_atom_ps`` so report readers need not
        redo the unit conversion.
        """
        d = {k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in asdict(self).items()}
        d["slope_stderr_mev_atom_ps"] = float(self.slope_stderr_mev_atom_ps)
        return d


def kj_mol_ns_to_mev_atom_ps(value_kj_mol_ns: float, n_atoms: int) -> float:
    """Convert a per-system rate in kJ/mol/ns to meV/atom/ps."""
    per_ps = value_kj_mol_ns / 1000.0
    return per_ps / KJ_MOL_PER_EV * 1000.0 / n_atoms


def _ols(t: np.ndarray, y: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """Least-squares line y = a + b t. Returns (slope, intercept, slope stderr, residuals)."""
    tm = t.mean()
    dt = t - tm
    sxx = float(np.dot(dt, dt))
    slope = float(np.dot(dt, y - y.mean()) / sxx)
    intercept = float(y.mean() - slope * tm)
    resid = y - (intercept + slope * t)
    dof = len(t) - 2
    stderr = math.sqrt(float(np.dot(resid, resid)) / dof / sxx) if dof > 0 else math.nan
    return slope, intercept, stderr, resid


def _check_finite(name: str, values: np.ndarray, time_ps: np.ndarray | None) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size == 0:
        return
    k = int(bad[0])
    what = "NaN" if np.isnan(values[k]) else "infinite"
    when = ""
    if time_ps is not None and np.isfinite(time_ps[k]):
        when = f" (t = {time_ps[k]:.4g} ps)"
    if name == "time":
        raise NnpqError(f"time became {what} at frame {k}: the time series is corrupt; check the reporter output")
    raise NnpqError(
        f"{name} energy became {what} at frame {k}{when}: the trajectory blew up; use a smaller --timestep"
    )


def fit_drift(
    time_ps: np.ndarray,
    total_kj_mol: np.ndarray,
    kinetic_kj_mol: np.ndarray,
    n_atoms: int,
) -> DriftResult:
    """Fit the NVE energy drift.

    Args:
        time_ps: (F,) frame times in ps, strictly increasing.
        total_kj_mol: (F,) total energy (potential + kinetic) of the system in kJ/mol.
        kinetic_kj_mol: (F,) kinetic energy of the system in kJ/mol.
        n_atoms: number of atoms, for the per-atom unit.

    The slope comes from one OLS fit over the whole series. Energy noise in MD is
    strongly autocorrelated, which makes the plain OLS stderr (also returned) far too
    optimistic: F frames carry only F / g independent samples, with g pymbar's
    statistical inefficiency of the residuals, so the reported stderr is the OLS one
    times sqrt(g).

    Raises:
        NnpqError: fewer than 3 frames, mismatched lengths, non-finite values,
            non-increasing times or ``n_atoms < 1``.
    """
    t = np.asarray(time_ps, dtype=np.float64).reshape(-1)
    etot = np.asarray(total_kj_mol, dtype=np.float64).reshape(-1)
    ekin = np.asarray(kinetic_kj_mol, dtype=np.float64).reshape(-1)
    n = len(t)
    if len(etot) != n or len(ekin) != n:
        raise NnpqError(
            f"drift fit needs equal-length series, got time {n}, total {len(etot)}, kinetic {len(ekin)} frames"
        )
    if n < 3:
        raise NnpqError(f"drift fit needs at least 3 frames, got {n}: run longer or report energies more often")
    if int(n_atoms) < 1:
        raise NnpqError(f"drift fit needs n_atoms >= 1, got {n_atoms}")
    n_atoms = int(n_atoms)
    _check_finite("time", t, None)
    _check_finite("total", etot, t)
    _check_finite("kinetic", ekin, t)
    if np.any(np.diff(t) <= 0):
        k = int(np.flatnonzero(np.diff(t) <= 0)[0]) + 1
        raise NnpqError(f"drift fit needs strictly increasing times, but frame {k} is not later than frame {k - 1}")

    slope, _, ols_se, resid = _ols(t, etot)  # kJ/mol/ps

    g = statistical_inefficiency(resid)
    stderr = ols_se * math.sqrt(g)

    duration = float(t[-1] - t[0])
    total_drift = slope * duration
    kin_std = float(np.std(ekin))
    ratio = abs(total_drift) / kin_std if kin_std > 0 else math.nan

    return DriftResult(
        slope_kj_mol_ns=slope * 1000.0,
        slope_mev_atom_ps=kj_mol_ns_to_mev_atom_ps(slope * 1000.0, n_atoms),
        slope_stderr_kj_mol_ns=stderr * 1000.0,
        ols_stderr_kj_mol_ns=ols_se * 1000.0,
        statistical_inefficiency=g,
        total_drift_kj_mol=total_drift,
        kinetic_std_kj_mol=kin_std,
        drift_to_kinetic_std=ratio,
        total_energy_std_kj_mol=float(np.sqrt(np.mean(resid**2))),
        duration_ps=duration,
        n_atoms=n_atoms,
        n_frames=n,
    )
