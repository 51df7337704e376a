"""Merge a campaign's task results into the report: drift with uncertainties, fidelity,
divergence, observables against the FP32 noise floor, stability, and a verdict per metric.

Noise floor: for every observable, the Jensen-Shannon distance between FP32 runs of two
different seeds. A quantized model is measured the same way, against FP32 runs of the other
seeds (never its own paired run, which shares its start and would look closer than chance),
so the two distances compare like with like. Default verdict: pass iff

    distance <= max(noise_factor * floor, floor + noise_sigmas * sigma)

with sigma the spread of the floor over seed pairs (for drift: the combined uncertainty of
both drifts). Fidelity and stress thresholds have fixed defaults (FP32 against FP32 is zero);
every threshold can be set by name.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nnpq.errors import NnpqError
from nnpq.validation.drift import fit_drift
from nnpq.validation.identity import ModelRef
from nnpq.validation.observables import js_distance
from nnpq.validation.structure import energy_errors
from nnpq.validation.tasks import FORCE_ERROR_EDGES, STRESS_STAGES, Campaign, fidelity_name, run_name, stored

NVE_STAGES = ("nve_0.5fs", "nve_1fs")
KCAL = 4.184  # kJ per kcal
#: Fixed default thresholds (report units): force RMSE 1 kcal/mol/Å, about half of ANI-2x's
#: own force error against its DFT reference; energy RMSE 0.05 kcal/mol per atom.
DEFAULT_ABSOLUTE = {"force_rmse": 1.0 * KCAL * 10.0, "energy_rmse_per_atom": 0.05 * KCAL}
#: Stress default: largest force-component error at most this fraction of FP32's largest component.
STRESS_FRACTION = 0.1
MAX_SERIES_POINTS = 400


@dataclass(frozen=True)
class Thresholds:
    """Verdict thresholds: the noise-floor rule, and absolute values by metric name (report units)."""

    noise_factor: float = 1.5
    noise_sigmas: float = 2.0
    absolute: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        stages = ("nve_0.5fs", "nve_1fs", "nvt", *STRESS_STAGES)
        fixed = {*(f"drift_{s}" for s in NVE_STAGES), *(f"unstable_{s}" for s in stages),
                 *(f"stress_force_max_{s}" for s in STRESS_STAGES), *DEFAULT_ABSOLUTE}
        for name in self.absolute:
            if name not in fixed and not name.startswith(("js_rdf_", "js_bond_", "js_phi", "js_psi")):
                raise NnpqError(f"unknown threshold metric '{name}'; use one of {', '.join(sorted(fixed))} "
                                "or js_OBSERVABLE (e.g. js_rdf_O-O, js_phi, js_bond_C-H)")
        if not (self.noise_factor >= 1.0 and self.noise_sigmas >= 0.0):
            raise NnpqError("--noise-factor must be at least 1 and --noise-sigmas at least 0")

    def to_dict(self) -> dict:
        return {"noise_factor": self.noise_factor, "noise_sigmas": self.noise_sigmas, "absolute": dict(self.absolute)}


def _mean_std(values: list[float]) -> dict[str, Any]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else None, "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "n": int(v.size)}


def _subsample(x: list[float]) -> list[float]:
    step = max(1, math.ceil(len(x) / MAX_SERIES_POINTS))
    return list(x[::step])


def _drift(runs: dict[int, dict], stage: str, n_atoms: int) -> dict:
    per_seed, traces = {}, {}
    for seed, run in runs.items():
        s = run["stages"][stage]
        traces[str(seed)] = {"time_ps": _subsample(s["time_ps"]),
                             "total_kj_mol": _subsample([p + k - s["potential_kj_mol"][0] - s["kinetic_kj_mol"][0]
                                                        for p, k in zip(s["potential_kj_mol"], s["kinetic_kj_mol"])])}
        if s["failure"] is None:
            total = np.add(s["potential_kj_mol"], s["kinetic_kj_mol"])
            per_seed[str(seed)] = fit_drift(s["time_ps"], total, s["kinetic_kj_mol"], n_atoms).to_dict()
    fits = list(per_seed.values())
    out: dict[str, Any] = {"per_seed": per_seed, "traces": traces, "n_seeds": len(fits)}
    for unit, se_key in (("mev_atom_ps", "slope_stderr_mev_atom_ps"), ("kj_mol_ns", "slope_stderr_kj_mol_ns")):
        slopes = [f[f"slope_{unit}"] for f in fits]
        stats = _mean_std(slopes)
        sem = stats["std"] / math.sqrt(len(fits)) if stats["std"] is not None else None
        stat = math.sqrt(sum(f[se_key] ** 2 for f in fits)) / len(fits) if fits else None
        out[f"mean_{unit}"] = stats["mean"]
        out[f"seed_sem_{unit}"] = sem  # spread over seeds
        out[f"stat_stderr_{unit}"] = stat  # pymbar-corrected stderr of the mean
        out[f"uncertainty_{unit}"] = max(x for x in (sem, stat, 0.0) if x is not None) if fits else None
    out["drift_to_kinetic_std_mean"] = _mean_std([f["drift_to_kinetic_std"] for f in fits])["mean"]
    return out


def _fidelity(results: list[dict], n_atoms: int) -> dict:
    fid = [r["fidelity"] for r in results]
    e_ref = np.concatenate([f["energy_ref_kj_mol"] for f in fid])
    e_test = np.concatenate([f["energy_test_kj_mol"] for f in fid])
    elements = sorted({e for f in fid for e in f["per_element"]})
    per_element, sq, n = {}, 0.0, 0
    for el in elements:
        parts = [f["per_element"][el] for f in fid if el in f["per_element"]]
        el_sq, el_n = sum(p["sq_sum"] for p in parts), sum(p["n_components"] for p in parts)
        sq, n = sq + el_sq, n + el_n
        per_element[el] = {"force_rmse": math.sqrt(el_sq / el_n), "force_max_abs": max(p["max_abs"] for p in parts),
                           "histogram": np.sum([p["histogram"] for p in parts], axis=0).tolist()}
    offset = float(np.mean(e_test - e_ref))
    return {
        "energy": energy_errors(e_ref, e_test, n_atoms),
        "force": {"force_rmse": math.sqrt(sq / n), "force_max_abs": max(f["force_max_abs"] for f in fid),
                  "force_rms_ref": math.sqrt(sum(f["force_ref_sq_sum"] for f in fid) / n),
                  "per_element": per_element},
        "histogram_edges_kj_mol_nm": FORCE_ERROR_EDGES.tolist(),
        "per_frame": {"energy_error_kj_mol": (e_test - e_ref - offset).tolist(),
                      "force_rmse_kj_mol_nm": [x for f in fid for x in f["force_rmse_per_frame"]]},
    }


def _divergence(results: list[dict]) -> dict:
    out = {}
    for stage in NVE_STAGES:
        series = [r["divergence"][stage] for r in results]
        n = min(len(s["time_ps"]) for s in series)
        rmsd = np.array([s["rmsd_angstrom"][:n] for s in series])
        de = np.array([s["potential_diff_kj_mol"][:n] for s in series])
        out[stage] = {"time_ps": _subsample(series[0]["time_ps"][:n]),
                      "rmsd_angstrom_mean": _subsample(rmsd.mean(axis=0).tolist()),
                      "rmsd_angstrom_max": _subsample(rmsd.max(axis=0).tolist()),
                      "potential_diff_kj_mol_mean": _subsample(de.mean(axis=0).tolist()),
                      "potential_diff_kj_mol_std": _subsample(de.std(axis=0).tolist())}
    return out


def _observables(runs: dict[int, dict]) -> dict:
    names = sorted({name for run in runs.values() for name in run["observables"]})
    out = {}
    for name in names:
        curves = [run["observables"][name] for run in runs.values() if name in run["observables"]]
        y = np.array([c["y"] for c in curves])
        entry = {"x": curves[0]["x"], "y_mean": y.mean(axis=0).tolist(),
                 "y_std": (y.std(axis=0, ddof=1) if len(y) > 1 else np.zeros(y.shape[1])).tolist()}
        if "samples" in curves[0]:
            entry["samples"] = _subsample([s for c in curves for s in c["samples"]])
        out[name] = entry
    return out


def _noise_pairs(ref_runs: dict[int, dict], name: str) -> list[float]:
    seeds = sorted(ref_runs)
    return [js_distance(name, ref_runs[a]["observables"][name], ref_runs[b]["observables"][name])
            for a, b in itertools.combinations(seeds, 2)]


def _model_pairs(runs: dict[int, dict], ref_runs: dict[int, dict], name: str) -> list[float]:
    return [js_distance(name, runs[a]["observables"][name], ref_runs[b]["observables"][name])
            for a in sorted(runs) for b in sorted(ref_runs) if a != b]


def _stability(runs: dict[int, dict]) -> dict:
    out = {}
    for stage in next(iter(runs.values()))["stages"]:
        stages = [run["stages"][stage] for run in runs.values()]
        out[stage] = {"runs": len(stages), "unstable": sum(s["failure"] is not None for s in stages),
                      "failures": [s["failure"] for s in stages if s["failure"] is not None],
                      "max_temperature_k": max(s["max_temperature_k"] for s in stages)}
    return out


class _Verdicts:
    def __init__(self, thresholds: Thresholds) -> None:
        self.t = thresholds
        self.rows: list[dict] = []

    def add(self, system: str, model: str, metric: str, unit: str, value: float | None,
            floor: float | None = None, sigma: float | None = None, default: float | None = None,
            ceiling: float | None = None) -> None:
        """One verdict; the threshold is the user's, else the noise-floor rule, else ``default``.

        A threshold at or above ``ceiling`` (the largest value the metric can take) could never
        fail: the verdict is then None, inconclusive, and says so.
        """
        if metric in self.t.absolute:
            threshold, rule = self.t.absolute[metric], "user"
        elif floor is not None:
            threshold = max(self.t.noise_factor * floor, floor + self.t.noise_sigmas * (sigma or 0.0))
            rule = "noise floor"
        else:
            threshold, rule = default, "default"
        verdict = None if value is None or threshold is None else bool(value <= threshold)
        if ceiling is not None and threshold is not None and threshold >= ceiling and rule != "user":
            verdict, rule = None, "inconclusive: noise floor too high, sample longer"
        self.rows.append({"system": system, "model": model, "metric": metric, "unit": unit, "value": value,
                          "noise_floor": floor, "noise_sigma": sigma, "threshold": threshold, "rule": rule,
                          "pass": verdict})


def merge(c: Campaign, thresholds: Thresholds, statuses: dict[str, dict] | None = None) -> dict[str, Any]:
    """The report body (everything but ``schema_version`` and timing) from the result files.

    Args:
        statuses: task statuses of this execution, for the reason a task is missing.
    """
    from nnpq.systems import get_system

    statuses = statuses or {}
    missing = []
    for name in c.task_names():
        if not name.startswith("start/") and stored(c, name) is None:
            reason = statuses.get(name, {}).get("error", "not run yet")
            missing.append({"task": name, "reason": reason})
    verdicts = _Verdicts(thresholds)
    systems: dict[str, Any] = {}
    for system_name in c.systems:
        system = get_system(system_name)
        runs_of = {m.key: {seed: r for seed in c.seeds
                           if (r := stored(c, run_name(system_name, seed, m))) is not None}
                   for m in c.models}
        ref_runs = runs_of[c.reference.key]
        entry: dict[str, Any] = {"n_atoms": system.n_atoms, "periodic": system.is_periodic, "models": {},
                                 "noise_floor": {}}
        names = sorted({n for r in ref_runs.values() for n in r["observables"]})
        for name in names:
            entry["noise_floor"][name] = _mean_std(_noise_pairs(ref_runs, name))
        for model in c.models:
            runs = runs_of[model.key]
            if not runs:
                continue
            m: dict[str, Any] = {
                "seeds": sorted(runs),
                "drift": {stage: _drift(runs, stage, system.n_atoms) for stage in NVE_STAGES},
                "stability": _stability(runs),
                "observables": _observables(runs),
                "timing": {stage: _mean_std([r["stages"][stage]["seconds_per_step"] for r in runs.values()])["mean"]
                           for stage in next(iter(runs.values()))["stages"]},
            }
            entry["models"][model.key] = m
            if model.is_reference:
                continue
            _judge(verdicts, system_name, model, m, entry, ref_runs, runs)
            fids = [r for seed in c.seeds if (r := stored(c, fidelity_name(system_name, seed, model)))]
            if fids:
                m["fidelity"] = _fidelity(fids, system.n_atoms)
                m["divergence"] = _divergence(fids)
                m["stress"] = {stage: {"force_max_abs_kj_mol_nm": max(f["stress"][stage]["force_max_abs"] for f in fids),
                                       "force_ref_max_abs_kj_mol_nm": max(f["stress"][stage]["force_ref_max_abs"]
                                                                          for f in fids)}
                               for stage in STRESS_STAGES}
            verdicts.add(system_name, model.key, "force_rmse", "kJ/mol/nm",
                         m["fidelity"]["force"]["force_rmse"] if fids else None,
                         default=DEFAULT_ABSOLUTE["force_rmse"])
            verdicts.add(system_name, model.key, "energy_rmse_per_atom", "kJ/mol",
                         m["fidelity"]["energy"]["relative_energy_rmse_per_atom"] if fids else None,
                         default=DEFAULT_ABSOLUTE["energy_rmse_per_atom"])
            for stage in STRESS_STAGES:
                s = m.get("stress", {}).get(stage)
                verdicts.add(system_name, model.key, f"stress_force_max_{stage}", "kJ/mol/nm",
                             s["force_max_abs_kj_mol_nm"] if s else None,
                             default=STRESS_FRACTION * s["force_ref_max_abs_kj_mol_nm"] if s else None)
        systems[system_name] = entry
    _check_overrides(thresholds, verdicts.rows)
    return {"systems": systems, "verdicts": verdicts.rows, "missing": missing, "complete": not missing}


def _judge(verdicts: _Verdicts, system: str, model: ModelRef, m: dict, entry: dict, ref_runs: dict,
           runs: dict) -> None:
    """Verdicts of the metrics that have an FP32 noise floor: drift, stability, observables."""
    ref = entry["models"].get("fp32")
    for stage in NVE_STAGES:
        q = m["drift"][stage]
        f = ref["drift"][stage] if ref else {}
        value = abs(q["mean_mev_atom_ps"]) if q["mean_mev_atom_ps"] is not None else None
        floor = abs(f["mean_mev_atom_ps"]) if f.get("mean_mev_atom_ps") is not None else None
        sigma = math.hypot(q["uncertainty_mev_atom_ps"] or 0.0, f.get("uncertainty_mev_atom_ps") or 0.0)
        verdicts.add(system, model.key, f"drift_{stage}", "meV/atom/ps", value, floor, sigma)
    for stage, s in m["stability"].items():
        floor = ref["stability"][stage]["unstable"] if ref else None
        verdicts.add(system, model.key, f"unstable_{stage}", "runs", s["unstable"], floor, 0.0)
    for name, obs in m["observables"].items():
        if name not in entry["noise_floor"] or not ref_runs:
            continue
        d = _mean_std(_model_pairs(runs, ref_runs, name))
        obs["distance"] = d
        nf = entry["noise_floor"][name]
        verdicts.add(system, model.key, f"js_{name}", "JS distance", d["mean"], nf["mean"], nf["std"], ceiling=1.0)


def _check_overrides(thresholds: Thresholds, rows: list[dict]) -> None:
    known = sorted({r["metric"] for r in rows})
    unknown = sorted(set(thresholds.absolute) - set(known))
    if unknown and rows:
        raise NnpqError(f"unknown threshold metric '{unknown[0]}'; this report's metrics are {', '.join(known)}")
