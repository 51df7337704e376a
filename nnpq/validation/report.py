"""Validation report: JSON (machine-readable), Markdown (human-readable) and PNG figures.

Units assumed in the ``report`` dict (the names the lead's code fills in):
drift values as produced by :meth:`nnpq.validation.drift.DriftResult.to_dict`
(kJ/mol, kJ/mol/ns, meV/atom/ps, ps); energy errors in kJ/mol (``*_per_atom``
keys per atom) and force errors in kJ/mol/nm, as produced by
:func:`nnpq.validation.structure.energy_errors` / ``force_errors``. Tables show
energies in kcal/mol and kJ/mol, forces in kcal/mol/Å and kJ/mol/nm.

Every file is written atomically, so a crashed run never leaves a half report.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from nnpq.atomic_io import write_bytes_atomic, write_text_atomic
from nnpq.validation.drift import kj_mol_ns_to_mev_atom_ps

# Local copies of nnpq.units' values: importing that module pulls in torchani, which a
# report writer should not need.
KJ_PER_KCAL: float = 4.184
ANGSTROM_PER_NM: float = 10.0

_RUN_ORDER = ("fp32", "quantized")
_RUN_LABELS = {"fp32": "FP32", "quantized": "Quantized"}
_GROUP_KEYS = ("energy", "energies", "force", "forces")

# (key, label, kind): kind decides the unit conversion in the error table.
_ERROR_METRICS: tuple[tuple[str, str, str], ...] = (
    ("energy_mae_per_atom", "Energy MAE per atom", "energy"),
    ("energy_rmse_per_atom", "Energy RMSE per atom", "energy"),
    ("energy_max_abs_per_atom", "Energy max |error| per atom", "energy"),
    ("relative_energy_mae_per_atom", "Energy MAE per atom, offset removed", "energy"),
    ("relative_energy_rmse_per_atom", "Energy RMSE per atom, offset removed", "energy"),
    ("energy_mae", "Energy MAE (whole system)", "energy"),
    ("energy_mean_offset", "Mean energy offset (whole system)", "energy"),
    ("force_rmse", "Force RMSE (per component)", "force"),
    ("force_mae", "Force MAE (per component)", "force"),
    ("force_max_abs", "Force max |error|", "force"),
    ("force_rms_ref", "RMS reference force", "force"),
)
_METRIC_KEYS = frozenset(k for k, _, _ in _ERROR_METRICS)

Table = tuple[str, list[str], list[list[str]]]  # (title, header, rows)


# --------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types.

    numpy scalars/arrays become Python numbers/lists, dataclasses their ``to_dict()``
    (or fields), paths strings, dict keys strings. Non-finite floats become ``None``
    so the file is strict JSON (``NaN`` is not valid JSON). Unknown objects (e.g. an
    OpenMM ``Quantity``) are stored as their ``str``.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=str)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


# ------------------------------------------------------------------ table content


def _num(x: Any, spec: str = ".4g") -> str:
    """Format a number, or "n/a" for missing / non-finite values."""
    if isinstance(x, (bool, np.bool_)) or x is None:
        return "n/a" if x is None else str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return format(v, spec)


def _pm(value: Any, err: Any) -> str:
    """"value ± err", or just the value if the error is unknown."""
    e = _num(err, ".2g")
    return _num(value, ".3g") if e == "n/a" else f"{_num(value, '.3g')} ± {e}"


def _run_keys(report: dict) -> list[str]:
    """Runs that carry a drift result, FP32 first, then quantized, then others."""
    found = [k for k, v in report.items() if isinstance(v, dict) and isinstance(v.get("drift"), dict)]
    return [k for k in _RUN_ORDER if k in found] + sorted(k for k in found if k not in _RUN_ORDER)


def _label(key: str) -> str:
    return _RUN_LABELS.get(key, key.replace("_", " "))


def _stderr_mev(drift: dict) -> Any:
    if "slope_stderr_mev_atom_ps" in drift:
        return drift["slope_stderr_mev_atom_ps"]
    se, n = drift.get("slope_stderr_kj_mol_ns"), drift.get("n_atoms")
    if se is None or not n:
        return None
    return kj_mol_ns_to_mev_atom_ps(float(se), int(n))


def _drift_table(report: dict) -> Table | None:
    runs = _run_keys(report)
    if not runs:
        return None
    drifts = [report[r]["drift"] for r in runs]
    rows_spec: list[tuple[str, Any]] = [
        ("Drift slope (meV/atom/ps)", lambda d: _pm(d.get("slope_mev_atom_ps"), _stderr_mev(d))),
        ("Drift slope (kJ/mol/ns)", lambda d: _pm(d.get("slope_kj_mol_ns"), d.get("slope_stderr_kj_mol_ns"))),
        ("OLS stderr, uncorrelated noise (kJ/mol/ns)", lambda d: _num(d.get("ols_stderr_kj_mol_ns"), ".2g")),
        ("Total drift over run (kJ/mol)", lambda d: _num(d.get("total_drift_kj_mol"))),
        ("Kinetic energy std (kJ/mol)", lambda d: _num(d.get("kinetic_std_kj_mol"))),
        ("|Total drift| / kinetic std", lambda d: _num(d.get("drift_to_kinetic_std"), ".3g")),
        ("Total-energy std about fit (kJ/mol)", lambda d: _num(d.get("total_energy_std_kj_mol"))),
        ("Duration (ps)", lambda d: _num(d.get("duration_ps"))),
        ("Frames", lambda d: _num(d.get("n_frames"))),
    ]
    rows = [[name] + [fmt(d) for d in drifts] for name, fmt in rows_spec]
    return ("Energy conservation (NVE drift)", ["Quantity"] + [_label(r) for r in runs], rows)


def _flatten_metrics(d: dict) -> tuple[dict[str, Any], dict[str, dict]]:
    """Collect known metric keys from a possibly nested errors dict (first hit wins)."""
    metrics: dict[str, Any] = {}
    per_element: dict[str, dict] = {}

    def walk(node: dict) -> None:
        for k, v in node.items():
            if k == "per_element" and isinstance(v, dict):
                for sym, m in v.items():
                    if isinstance(m, dict):
                        per_element.setdefault(str(sym), m)
            elif isinstance(v, dict):
                walk(v)
            elif k in _METRIC_KEYS:
                metrics.setdefault(k, v)

    walk(d)
    return metrics, per_element


def _error_groups(errors: Any) -> list[tuple[str, dict, dict]]:
    """Split ``errors`` into columns: one flat group, or one per named comparison."""
    if not isinstance(errors, dict) or not errors:
        return []
    if any(k in _METRIC_KEYS or k == "per_element" or k in _GROUP_KEYS for k in errors):
        return [("Value", *_flatten_metrics(errors))]
    groups = []
    for k, v in errors.items():
        if isinstance(v, dict):
            metrics, per_el = _flatten_metrics(v)
            if metrics or per_el:
                groups.append((str(k).replace("_", " "), metrics, per_el))
    return groups


def _convert(value: Any, unit: str) -> str:
    """Format an error value given in kJ/mol (energy) or kJ/mol/nm (force) in ``unit``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _num(value)
    if unit in ("kcal/mol", "kcal/mol/Å"):
        v /= KJ_PER_KCAL
    if unit == "kcal/mol/Å":
        v /= ANGSTROM_PER_NM
    return _num(v)


def _error_table(report: dict) -> Table | None:
    groups = _error_groups(report.get("errors"))
    if not groups:
        return None
    units = {"energy": ("kcal/mol", "kJ/mol"), "force": ("kcal/mol/Å", "kJ/mol/nm")}
    rows: list[list[str]] = []
    for key, label, kind in _ERROR_METRICS:
        if not any(key in m for _, m, _ in groups):
            continue
        for unit in units[kind]:
            rows.append([label, unit] + [_convert(m.get(key), unit) if key in m else "n/a" for _, m, _ in groups])
    if any("force_rmse" in m and "force_rms_ref" in m for _, m, _ in groups):
        rel = []
        for _, m, _ in groups:
            try:
                rel.append(_num(100.0 * float(m["force_rmse"]) / float(m["force_rms_ref"]), ".3g"))
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                rel.append("n/a")
        rows.append(["Force RMSE / RMS reference force", "%"] + rel)
    symbols = sorted({s for _, _, pe in groups for s in pe})
    for sym in symbols:
        for unit in units["force"]:
            cells = []
            for _, _, pe in groups:
                m = pe.get(sym, {})
                cells.append(_convert(m["force_rmse"], unit) if "force_rmse" in m else "n/a")
            n = next((pe[sym].get("n") for _, _, pe in groups if sym in pe and "n" in pe[sym]), None)
            name = f"Force RMSE, {sym}" + (f" ({n} atoms)" if n is not None else "")
            rows.append([name, unit] + cells)
    if not rows:
        return None
    # One unnamed group is the usual quantized-vs-reference comparison; named groups say it themselves.
    title = "Errors, quantized vs reference" if groups[0][0] == "Value" else "Errors"
    return (title, ["Metric", "Unit"] + [g for g, _, _ in groups], rows)


def _tables(report: dict) -> list[Table]:
    return [t for t in (_drift_table(report), _error_table(report)) if t is not None]


# ------------------------------------------------------------------ table rendering


def _render_plain(table: Table) -> str:
    title, header, rows = table
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # First column left-aligned (labels), the rest right-aligned (numbers).
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    sep = "-" * len(line(header))
    return "\n".join([title, sep, line(header), sep] + [line(r) for r in rows] + [sep])


def _render_markdown(table: Table) -> str:
    title, header, rows = table
    esc = [[c.replace("|", "\\|") for c in r] for r in [header] + rows]
    align = "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"  # labels left, numbers right
    out = [f"## {title}", "", "| " + " | ".join(esc[0]) + " |", align]
    out += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(out)


def summary_table(report: dict) -> str:
    """Fixed-width plain-text drift and error tables for the terminal.

    Same rows as the tables in report.md (both come from the same row builders).
    Returns an empty string when the report has neither drift nor errors.
    """
    return "\n\n".join(_render_plain(t) for t in _tables(to_jsonable(report)))


# ------------------------------------------------------------------ figures


def _arr(d: dict | None, key: str) -> np.ndarray | None:
    if not isinstance(d, dict) or d.get(key) is None:
        return None
    a = np.asarray(d[key], dtype=np.float64).reshape(-1)
    return a if a.size else None


def _paired(x: np.ndarray | None, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    if y is None:
        return None
    if x is None:
        x = np.arange(len(y), dtype=np.float64)
    n = min(len(x), len(y))
    return x[:n], y[:n]


def _png(fig) -> bytes:
    # Figure + Agg canvas directly: no pyplot global state, no backend switching.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})
    return buf.getvalue()


def _series_runs(series: dict) -> list[str]:
    found = [k for k, v in series.items() if k != "comparison" and isinstance(v, dict)]
    return [k for k in _RUN_ORDER if k in found] + sorted(k for k in found if k not in _RUN_ORDER)


def _energy_png(series: dict, report: dict) -> bytes | None:
    from matplotlib.figure import Figure

    runs = [r for r in _series_runs(series) if _arr(series[r], "total_kj_mol") is not None]
    if not runs:
        return None
    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    ax_e, ax_k = fig.subplots(2, 1, sharex=True)
    for i, run in enumerate(runs):
        color = f"C{i}"
        t, e = _paired(_arr(series[run], "time_ps"), _arr(series[run], "total_kj_mol"))
        ok = np.isfinite(t) & np.isfinite(e)
        if not ok.any():
            continue
        run_report = report.get(run) if isinstance(report.get(run), dict) else {}
        drift = run_report.get("drift") if isinstance(run_report.get("drift"), dict) else {}
        label = _label(run)
        slope = drift.get("slope_kj_mol_ns")
        if slope is not None and math.isfinite(float(slope)):
            slope = float(slope) / 1000.0  # kJ/mol/ps; same slope as the table
        elif ok.sum() >= 2:
            slope = float(np.polyfit(t[ok], e[ok], 1)[0])
        else:
            slope = None
        if slope is None:
            ax_e.plot(t, e - e[ok][0], color=color, lw=0.8, label=label)
        else:
            # The OLS line passes through the means, so this is the fitted line. Subtract
            # its value at the first frame rather than the (noisy) first energy, so both
            # runs' fits start at 0 and their slopes compare directly.
            intercept = e[ok].mean() - slope * t[ok].mean()
            e0 = intercept + slope * t[ok][0]
            ax_e.plot(t, e - e0, color=color, lw=0.8, label=label)
            mev = drift.get("slope_mev_atom_ps")
            fit_label = f"{label} fit" + (f" ({float(mev):.3g} meV/atom/ps)" if mev is not None else "")
            ax_e.plot(t[ok], intercept + slope * t[ok] - e0, color=color, ls="--", lw=2.0, zorder=3, label=fit_label)
        k = _paired(_arr(series[run], "time_ps"), _arr(series[run], "kinetic_kj_mol"))
        if k is not None:
            ax_k.plot(k[0], k[1], color=color, lw=0.8, label=label)
    ax_e.set_ylabel("E_total − E_total(t₀) (kJ/mol)")
    ax_e.set_title("NVE total energy (E_total(t₀) from the linear fit)")
    ax_e.legend(fontsize=8)
    ax_k.set_ylabel("Kinetic energy (kJ/mol)")
    ax_k.set_xlabel("Time (ps)")
    if ax_k.lines:
        ax_k.legend(fontsize=8)
    return _png(fig)


def _rmsd_png(series: dict) -> bytes | None:
    from matplotlib.figure import Figure

    comp = series.get("comparison")
    pair = _paired(_arr(comp, "time_ps"), _arr(comp, "rmsd_angstrom"))
    if pair is None:
        return None
    fig = Figure(figsize=(7.5, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(pair[0], pair[1], color="C2", lw=1.0)
    ax.set_xlabel("Time (ps)" if _arr(comp, "time_ps") is not None else "Frame")
    ax.set_ylabel("RMSD (Å)")
    ax.set_title("RMSD between the FP32 and quantized trajectories")
    return _png(fig)


def _dihedral_data(series: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    comp = series.get("comparison") if isinstance(series.get("comparison"), dict) else {}
    out = []
    for run in _series_runs(series) or list(_RUN_ORDER):
        phi = _arr(comp, f"phi_deg_{run}")
        psi = _arr(comp, f"psi_deg_{run}")
        if phi is None or psi is None:  # also accept the per-run layout
            phi, psi = _arr(series.get(run), "phi_deg"), _arr(series.get(run), "psi_deg")
        if phi is not None and psi is not None:
            n = min(len(phi), len(psi))
            out.append((run, phi[:n], psi[:n]))
    return out


def _dihedral_png(series: dict) -> bytes | None:
    from matplotlib.figure import Figure

    data = _dihedral_data(series)
    if not data:
        return None
    fig = Figure(figsize=(5.0, 5.0), layout="constrained")
    ax = fig.subplots()
    markers = ("o", "x", "s", "^")
    for i, (run, phi, psi) in enumerate(data):
        ax.scatter(phi, psi, s=6, alpha=0.5, marker=markers[i % len(markers)], color=f"C{i}", label=_label(run))
    ax.set_xlim(-180, 180)
    ax.set_ylim(-180, 180)
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-180, 181, 60))
    ax.set_aspect("equal")
    ax.set_xlabel("φ (degrees)")
    ax.set_ylabel("ψ (degrees)")
    ax.set_title("Backbone dihedrals")
    ax.legend(fontsize=8, markerscale=2)
    return _png(fig)


# ------------------------------------------------------------------ markdown


def _inline(value: Any) -> str:
    """Short one-line rendering of a header value (string or dict)."""
    if isinstance(value, dict):
        return "; ".join(f"{k} = {_inline(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, np.ndarray)):
        return json.dumps(to_jsonable(value))
    if isinstance(value, (float, np.floating)):
        return _num(value)
    return str(to_jsonable(value))


def _kv_markdown(title: str, d: dict) -> str:
    """Markdown table of a flat dict, or of a dict of dicts (one column per key)."""
    if all(isinstance(v, dict) for v in d.values()):
        cols = list(d)
        keys = list(dict.fromkeys(k for v in d.values() for k in v))
        header = ["Item"] + [_label(str(c)) for c in cols]
        rows = [[str(k)] + [_num(d[c][k]) if k in d[c] else "n/a" for c in cols] for k in keys]
    else:
        header = ["Item", "Value"]
        rows = [[str(k), _inline(v)] for k, v in d.items()]
    return _render_markdown((title, header, rows))


def _rmsd_summary(series: dict) -> str | None:
    comp = series.get("comparison")
    pair = _paired(_arr(comp, "time_ps"), _arr(comp, "rmsd_angstrom"))
    if pair is None:
        return None
    t, r = pair
    ok = np.isfinite(r)
    if not ok.any():
        return "RMSD between runs: n/a (no finite values)."
    last = int(np.flatnonzero(ok)[-1])
    imax = int(np.nanargmax(np.where(ok, r, np.nan)))
    return (
        f"RMSD between the FP32 and quantized trajectories: final {r[last]:.3g} Å "
        f"(t = {t[last]:.4g} ps), maximum {r[imax]:.3g} Å (t = {t[imax]:.4g} ps)."
    )


_HOW_TO_READ = """\
## How to read this

- **Drift.** In NVE the total energy should stay constant; the slope of a straight-line fit
  to it is the drift. The ± is a block-averaged standard error (slopes of 5 contiguous
  blocks), which allows for the strong autocorrelation of MD energies and is conservative;
  the OLS stderr assumes independent frames and is usually too small. A drift whose
  magnitude is within about 2 standard errors of zero is not distinguishable from zero.
- **Drift / kinetic std.** The total drift over the run divided by the kinetic-energy
  fluctuation. Well below 1 means the integration error is small next to the thermal
  motion the simulation samples; near or above 1 means the run is heating or cooling
  noticeably (try a smaller time step).
- **Quantized vs FP32.** Weight-only quantization changes the network's weights once,
  then evaluates a smooth function whose forces are still the exact gradient of its
  (quantized) energy. The dynamics therefore stays conservative, and its drift should be
  comparable to FP32. A much larger drift points to a non-conservative force path (forces
  not obtained by differentiating the quantized energy) or a time step that is too large.
- **Errors.** Per-atom energy errors and per-component force errors of the quantized model
  against the reference on the same frames. The offset-removed energy error ignores a
  constant shift, which does not change forces or dynamics. Judge them against the
  model's own error versus its reference method (quoted in the model's paper): a
  quantization error well below that is harmless.
- **RMSD.** Two chaotic trajectories from the same start diverge exponentially whatever
  the model, so a growing RMSD is expected; compare sampled distributions (e.g. the
  dihedral plot) rather than frame-by-frame positions.
"""


def _markdown(title: str, report: dict, series: dict, figures: list[Path]) -> str:
    parts = [f"# {title}", ""]
    for key in ("model", "system", "settings"):
        if report.get(key) not in (None, {}, ""):
            parts.append(f"**{key.capitalize()}:** {_inline(report[key])}  ")
    parts.append("")
    parts += [_render_markdown(t) + "\n" for t in _tables(report)]
    rmsd = _rmsd_summary(series)
    if rmsd:
        parts += ["## Structural divergence", "", rmsd, ""]
    if isinstance(report.get("timing"), dict) and report["timing"]:
        parts += [_kv_markdown("Timing", report["timing"]), ""]
    if figures:
        parts += ["## Figures", ""]
        parts += [f"![{p.stem}]({p.name})" for p in figures]
        parts.append("")
    parts.append(_HOW_TO_READ)
    return "\n".join(parts)


# ------------------------------------------------------------------ entry point


def write_report(
    out_dir: str | Path,
    report: dict,
    series: dict[str, dict[str, np.ndarray]],
    title: str,
) -> dict[str, Path]:
    """Write report.json, report.md and PNG figures into ``out_dir``.

    Args:
        out_dir: folder to write into (created if missing).
        report: nested results dict (see module docstring for units). Written to
            report.json as-is after :func:`to_jsonable` (indent 2, sorted keys).
        series: per-run time series for the figures, e.g. ``{"fp32": {"time_ps",
            "total_kj_mol", "kinetic_kj_mol", ...}, "quantized": {...},
            "comparison": {"time_ps", "rmsd_angstrom", "phi_deg_fp32", ...}}``.
            Missing runs or keys just drop the corresponding curve or figure.
        title: heading of report.md.

    Returns:
        ``{"json": Path, "markdown": Path, "figures": [Path, ...]}``; figures are
        energy.png, rmsd.png and dihedrals.png, each only when its data is present.
    """
    out = Path(out_dir)
    series = series or {}
    # Plain types from here on: DriftResult objects become dicts, NaN becomes None (n/a).
    report = to_jsonable(report)
    figures: list[Path] = []
    for name, render in (
        ("energy.png", lambda: _energy_png(series, report)),
        ("rmsd.png", lambda: _rmsd_png(series)),
        ("dihedrals.png", lambda: _dihedral_png(series)),
    ):
        data = render()
        if data is not None:
            figures.append(write_bytes_atomic(out / name, data))

    json_path = write_text_atomic(
        out / "report.json",
        json.dumps(report, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n",
    )
    md_path = write_text_atomic(out / "report.md", _markdown(title, report, series, figures))
    return {"json": json_path, "markdown": md_path, "figures": figures}
