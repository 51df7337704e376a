"""report.html from a report.json (`nnpq.validation.schema`): tables, verdicts and matplotlib
figures embedded as base64 PNG data URIs, so the page is one self-contained file.

Everything shown comes from the report dict alone, so the page can be rebuilt from the JSON.
Units as in the schema: drift meV/atom/ps (and kJ/mol/ns), forces kJ/mol/nm, energies kJ/mol.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from nnpq.atomic_io import write_text_atomic

OBS_AXES = {"rdf": ("r (nm)", "g(r)"), "phi": ("φ (degrees)", "density"), "psi": ("ψ (degrees)", "density"),
            "bond": ("bond length (Å)", "density")}


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


def fmt(x: Any, spec: str = ".3g") -> str:
    """A number for a table, ``n/a`` for None."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "pass" if x else "FAIL"
    if isinstance(x, int):
        return str(x)
    return format(float(x), spec)


def pm(value: Any, err: Any) -> str:
    return fmt(value) if err is None else f"{fmt(value)} ± {fmt(err, '.2g')}"


def verdict_text(v: bool | None) -> str:
    return "n/a" if v is None else ("pass" if v else "FAIL")


def labels(report: dict) -> dict[str, str]:
    return {m["key"]: m["label"] for m in report["models"]}


# ------------------------------------------------------------------ figures


def png_uri(fig) -> str:
    """A Figure as a data URI (Agg canvas directly: no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_axes(ncols: int, nrows: int = 1, width: float = 4.6, height: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    return fig, axes


def _colors(report: dict) -> dict[str, str]:
    return {m["key"]: f"C{i}" for i, m in enumerate(report["models"])}


def energy_figure(report: dict, system: str) -> str:
    """Total energy (minus its first value) of every NVE run, each seed one line."""
    entry, colors, names = report["systems"][system], _colors(report), labels(report)
    stages = list(next(iter(entry["models"].values()))["drift"])
    fig, axes = figure_axes(len(stages))
    for ax, stage in zip(axes, stages):
        for key, m in entry["models"].items():
            for i, trace in enumerate(m["drift"][stage]["traces"].values()):
                ax.plot(trace["time_ps"], trace["total_kj_mol"], color=colors[key], lw=0.8, alpha=1.0 if i == 0 else 0.45,
                        label=names[key] if i == 0 else None)
        ax.set_title(f"{system}: NVE {stage.removeprefix('nve_')}")
        ax.set_xlabel("time (ps)")
        ax.set_ylabel("E_total − E_total(0) (kJ/mol)")
        ax.legend(fontsize=7)
    return png_uri(fig)


def drift_figure(report: dict, system: str) -> str:
    """Fitted drift per model and time step, with the uncertainty as error bars and each
    quantized model's threshold marked."""
    entry, colors, names = report["systems"][system], _colors(report), labels(report)
    stages = list(next(iter(entry["models"].values()))["drift"])
    thresholds = {(v["model"], v["metric"]): v["threshold"] for v in report["verdicts"] if v["system"] == system}
    fig, axes = figure_axes(len(stages))
    for ax, stage in zip(axes, stages):
        for i, (key, m) in enumerate(entry["models"].items()):
            d = m["drift"][stage]
            for seed_fit in d["per_seed"].values():
                ax.plot(i, seed_fit["slope_mev_atom_ps"], "o", color=colors[key], alpha=0.35, ms=4)
            if d["mean_mev_atom_ps"] is not None:
                ax.errorbar(i, d["mean_mev_atom_ps"], yerr=d["uncertainty_mev_atom_ps"] or 0.0, fmt="s",
                            color=colors[key], capsize=5, ms=7)
            t = thresholds.get((key, f"drift_{stage}"))
            if t is not None:
                ax.hlines([t, -t], i - 0.3, i + 0.3, colors="k", linestyles="--", lw=1)
        ax.axhline(0.0, color="0.6", lw=0.6)
        ax.set_xticks(range(len(entry["models"])), [names[k] for k in entry["models"]], fontsize=7, rotation=15)
        ax.set_ylabel("drift (meV/atom/ps)")
        ax.set_title(f"{system}: drift at {stage.removeprefix('nve_')} (dots: seeds; dashes: ± threshold)", fontsize=9)
    return png_uri(fig)


def force_histogram_figure(report: dict, system: str, key: str) -> str:
    """Per-element histograms of per-atom force-error magnitudes on FP32 frames (log x)."""
    fid = report["systems"][system]["models"][key]["fidelity"]
    edges = np.asarray(fid["histogram_edges_kj_mol_nm"])
    fig, axes = figure_axes(1, width=6.0)
    for el, e in fid["force"]["per_element"].items():
        counts = np.asarray(e["histogram"], dtype=float)
        axes[0].stairs(counts / max(counts.sum(), 1.0), edges, label=f"{el} (RMSE {e['force_rmse']:.3g})")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("|F_quantized − F_FP32| per atom (kJ/mol/nm)")
    axes[0].set_ylabel("fraction of atoms")
    axes[0].set_title(f"{system}: force errors per element, {labels(report)[key]}", fontsize=9)
    axes[0].legend(fontsize=7)
    return png_uri(fig)


def observable_figure(report: dict, system: str, names: Iterable[str]) -> str:
    """Observable overlays: FP32 mean with its seed-to-seed band (the noise floor), each model's mean."""
    entry, colors, model_names = report["systems"][system], _colors(report), labels(report)
    names = list(names)
    fig, axes = figure_axes(len(names))
    for ax, name in zip(axes, names):
        for key, m in entry["models"].items():
            obs = m["observables"].get(name)
            if obs is None:
                continue
            x, y, s = (np.asarray(obs[k]) for k in ("x", "y_mean", "y_std"))
            label = model_names[key]
            if "distance" in obs and obs["distance"]["mean"] is not None:
                label += f" (JS {obs['distance']['mean']:.3f})"
            elif key == "fp32" and entry["noise_floor"].get(name, {}).get("mean") is not None:
                label += f" ± seed spread (noise floor JS {entry['noise_floor'][name]['mean']:.3f})"
            ax.plot(x, y, color=colors[key], lw=1.2, label=label)
            if key == "fp32":
                ax.fill_between(x, y - s, y + s, color=colors[key], alpha=0.25, lw=0)
        xlabel, ylabel = OBS_AXES[name.split("_")[0]]
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{system}: {name}", fontsize=9)
        ax.legend(fontsize=6)
    return png_uri(fig)


def ramachandran_figure(report: dict, system: str) -> str:
    """phi/psi samples of every model's NVT runs (all seeds) side by side."""
    entry, colors, names = report["systems"][system], _colors(report), labels(report)
    models = [k for k, m in entry["models"].items() if "phi" in m["observables"]]
    fig, axes = figure_axes(len(models), width=3.8, height=3.8)
    for ax, key in zip(axes, models):
        obs = entry["models"][key]["observables"]
        ax.scatter(obs["phi"]["samples"], obs["psi"]["samples"], s=4, alpha=0.5, color=colors[key])
        ax.set(xlim=(-180, 180), ylim=(-180, 180), xlabel="φ (degrees)", ylabel="ψ (degrees)")
        ax.set_aspect("equal")
        ax.set_title(names[key], fontsize=9)
    return png_uri(fig)


def distance_figure(report: dict, system: str) -> str:
    """Jensen-Shannon distance of each observable to FP32, beside the FP32 noise floor and the threshold."""
    entry, colors, names = report["systems"][system], _colors(report), labels(report)
    obs_names = sorted(entry["noise_floor"])
    thresholds = {(v["model"], v["metric"]): v["threshold"] for v in report["verdicts"] if v["system"] == system}
    quantized = [k for k in entry["models"] if k != "fp32"]
    fig, axes = figure_axes(1, width=max(5.0, 1.3 * len(obs_names) * (len(quantized) + 1)))
    ax = axes[0]
    width = 0.8 / (len(quantized) + 1)
    for j, name in enumerate(obs_names):
        nf = entry["noise_floor"][name]
        ax.bar(j, nf["mean"] or 0.0, width, yerr=nf["std"] or 0.0, color="0.7", capsize=3,
               label="FP32 vs FP32 (noise floor)" if j == 0 else None)
        for i, key in enumerate(quantized, start=1):
            d = entry["models"][key]["observables"].get(name, {}).get("distance")
            if d is None or d["mean"] is None:
                continue
            ax.bar(j + i * width, d["mean"], width, yerr=d["std"] or 0.0, color=colors[key], capsize=3,
                   label=names[key] if j == 0 else None)
            t = thresholds.get((key, f"js_{name}"))
            if t is not None:
                ax.hlines(t, j + (i - 0.5) * width, j + (i + 0.5) * width, colors="k", linestyles="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(obs_names))], obs_names, fontsize=7)
    ax.set_ylabel("Jensen-Shannon distance to FP32")
    ax.set_title(f"{system}: observables against the noise floor (dashes: thresholds)", fontsize=9)
    ax.legend(fontsize=7)
    return png_uri(fig)


def divergence_figure(report: dict, system: str) -> str:
    """RMSD and potential-energy difference between each quantized run and its FP32 twin (same start)."""
    entry, colors, names = report["systems"][system], _colors(report), labels(report)
    fig, axes = figure_axes(2)
    for key, m in entry["models"].items():
        for stage, d in m.get("divergence", {}).items():
            style = "-" if stage == "nve_0.5fs" else ":"
            axes[0].plot(d["time_ps"], d["rmsd_angstrom_mean"], style, color=colors[key],
                         label=f"{names[key]}, {stage}")
            axes[1].plot(d["time_ps"], d["potential_diff_kj_mol_mean"], style, color=colors[key])
    axes[0].set(xlabel="time (ps)", ylabel="RMSD to FP32 twin (Å)")
    axes[1].set(xlabel="time (ps)", ylabel="E_pot − E_pot,FP32 (kJ/mol)")
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"{system}: divergence of paired runs (mean over seeds)", fontsize=9)
    return png_uri(fig)


def system_figures(report: dict, system: str) -> list[tuple[str, str]]:
    """(caption, data URI) of every figure of one system."""
    entry = report["systems"][system]
    if not entry["models"]:
        return []
    figures = [("NVE total energy", energy_figure(report, system)),
               ("Drift with uncertainties", drift_figure(report, system))]
    for key, m in entry["models"].items():
        if "fidelity" in m:
            figures.append((f"Force errors per element, {labels(report)[key]}", force_histogram_figure(report, system, key)))
    obs = sorted(entry["noise_floor"])
    if obs:
        figures.append(("Observables against the noise floor", distance_figure(report, system)))
    groups = [[n for n in obs if n.startswith("rdf_")], [n for n in obs if n in ("phi", "psi")],
              [n for n in obs if n.startswith("bond_")]]
    for group in groups:
        if group:
            figures.append((f"Overlays: {', '.join(group)}", observable_figure(report, system, group)))
    if "phi" in obs:
        figures.append(("Ramachandran", ramachandran_figure(report, system)))
    if any("divergence" in m for m in entry["models"].values()):
        figures.append(("Divergence", divergence_figure(report, system)))
    return figures


# ------------------------------------------------------------------ tables


def verdict_rows(report: dict) -> list[list[str]]:
    names = labels(report)
    return [[v["system"], names.get(v["model"], v["model"]), v["metric"], fmt(v["value"]), fmt(v["noise_floor"]),
             fmt(v["threshold"]), v["unit"], v["rule"], verdict_text(v["pass"])] for v in report["verdicts"]]


VERDICT_HEADER = ["system", "model", "metric", "value", "noise floor", "threshold", "unit", "rule", "verdict"]


def _system_tables(report: dict, system: str) -> list[tuple[str, list[str], list[list[str]]]]:
    entry, names = report["systems"][system], labels(report)
    rows = []
    for key, m in entry["models"].items():
        for stage, d in m["drift"].items():
            rows.append([names[key], stage, pm(d["mean_mev_atom_ps"], d["uncertainty_mev_atom_ps"]),
                         pm(d["mean_kj_mol_ns"], d["uncertainty_kj_mol_ns"]), fmt(d["seed_sem_mev_atom_ps"], ".2g"),
                         fmt(d["stat_stderr_mev_atom_ps"], ".2g"), fmt(d["drift_to_kinetic_std_mean"]), str(d["n_seeds"])])
    tables = [("Drift (mean over seeds ± uncertainty)",
               ["model", "stage", "meV/atom/ps", "kJ/mol/ns", "seed s.e.m.", "pymbar s.e.", "|drift|/σ(KE)", "seeds"],
               rows)]
    rows = []
    for key, m in entry["models"].items():
        if "fidelity" not in m:
            continue
        f, e = m["fidelity"]["force"], m["fidelity"]["energy"]
        per_el = ", ".join(f"{el} {v['force_rmse']:.3g}" for el, v in f["per_element"].items())
        rows.append([names[key], fmt(f["force_rmse"]), fmt(f["force_max_abs"]), fmt(f["force_rms_ref"]), per_el,
                     fmt(e["relative_energy_rmse_per_atom"]), fmt(e["energy_mean_offset"])])
    if rows:
        tables.append(("Fidelity on FP32 NVT frames (kJ/mol/nm, kJ/mol)",
                       ["model", "force RMSE", "max |ΔF| component", "RMS FP32 force", "RMSE per element",
                        "energy RMSE/atom (offset removed)", "mean energy offset"], rows))
    rows = []
    for key, m in entry["models"].items():
        for stage, s in m["stability"].items():
            stress = m.get("stress", {}).get(stage, {})
            rows.append([names[key], stage, f"{s['runs'] - s['unstable']}/{s['runs']}", fmt(s["max_temperature_k"]),
                         fmt(stress.get("force_max_abs_kj_mol_nm")), "; ".join(s["failures"]) or "-"])
    tables.append(("Stability of every stage (stress: hot and compressed)",
                   ["model", "stage", "stable runs", "max T (K)", "max |ΔF| (kJ/mol/nm)", "failures"], rows))
    rows = []
    for name, nf in sorted(entry["noise_floor"].items()):
        for key, m in entry["models"].items():
            d = m["observables"].get(name, {}).get("distance")
            if d is not None:
                rows.append([name, names[key], pm(d["mean"], d["std"]), pm(nf["mean"], nf["std"]), str(nf["n"])])
    if rows:
        tables.append(("Observables: Jensen-Shannon distance to FP32",
                       ["observable", "model", "distance", "noise floor (FP32 vs FP32)", "seed pairs"], rows))
    return tables


def html_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        cls = ' class="pass"' if text == "pass" else (' class="fail"' if text == "FAIL" else "")
        return f"<td{cls}>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    return f"<h3>{html.escape(title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:right}th{background:#eee}
td:first-child,td:nth-child(2),td:nth-child(3){text-align:left}.pass{background:#cfc}.fail{background:#fcc}
figure{margin:1em 0}img{max-width:100%}.missing{background:#ffd;padding:0.5em;border:1px solid #cc8}"""

HOW_TO_READ = """<h2>How to read this</h2><ul>
<li><b>Drift</b>: slope of a straight-line fit of the NVE total energy, averaged over seeds. Its uncertainty is the
larger of the seed-to-seed standard error and the autocorrelation-corrected fit error (pymbar statistical
inefficiency). Verdict: |quantized drift| &le; max(factor &times; |FP32 drift|, |FP32 drift| + sigmas &times; combined
uncertainty).</li>
<li><b>Noise floor</b>: the Jensen-Shannon distance between FP32 runs with different seeds. A quantized model is
compared with FP32 runs of other seeds in the same way, so the two numbers are alike; a quantized distance
within the noise floor cannot be told apart from FP32 with this much sampling.</li>
<li><b>Fidelity</b>: energies and forces of both models on the same FP32 frames. <b>Divergence</b>: two chaotic
trajectories from one start separate whatever the model; it is shown, not judged.</li>
<li><b>Stress</b>: hot and compressed runs; a run is unstable when its energy stops being finite or a bond stretches
past 1.5&times; its start length.</li></ul>"""


def render_html(report: dict) -> str:
    """The self-contained page for ``report`` (a report.json dict)."""
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(report['title'])}"
             f"</title><style>{CSS}</style></head><body><h1>{html.escape(report['title'])}</h1>"]
    models = "".join(f"<li>{html.escape(m['label'])}: {html.escape(m['source'])} (mode {m['mode']}, tensors sha256 "
                     f"{m['sha256'][:16]}…)</li>" for m in report["models"])
    protocol = ", ".join(f"{k} = {v}" for k, v in report["protocol"].items())
    engine = report.get("engine_label", f"OpenMM on {report['platform']}")
    parts.append(f"<p>Engine {html.escape(str(engine))}; seeds {report['seeds']}; schema version "
                 f"{report['schema_version']}.</p><ul>{models}</ul><p>Protocol: {html.escape(protocol)}</p>")
    if report["missing"]:
        items = "".join(f"<li>{html.escape(m['task'])}: {html.escape(m['reason'])}</li>" for m in report["missing"])
        parts.append(f"<div class=\"missing\"><b>Incomplete campaign</b>: {len(report['missing'])} tasks have no "
                     f"result; rerun the same command to finish them.<ul>{items}</ul></div>")
    parts.append(html_table("Verdicts", VERDICT_HEADER, verdict_rows(report)))
    for system in report["systems"]:
        parts.append(f"<h2>{html.escape(system)}</h2>")
        parts += [html_table(*t) for t in _system_tables(report, system)]
        for caption, uri in system_figures(report, system):
            parts.append(f"<figure><img src=\"{uri}\" alt=\"{html.escape(caption)}\">"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append(HOW_TO_READ + "</body></html>")
    return "\n".join(parts)


def write_html(path: str | Path, report: dict) -> Path:
    return write_text_atomic(path, render_html(report))


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A table on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, no_wrap=True)
    for r in rows:
        table.add_row(*(f"[green]{c}[/]" if c == "pass" else f"[red]{c}[/]" if c == "FAIL" else c for c in r))
    # wide enough for every cell: numbers are never cut (the terminal may wrap the lines instead)
    width = sum(max(len(x) for x in column) + 3 for column in zip(header, *rows)) + 4
    Console(width=max(80, width)).print(table)
