"""`nnpq compare`: several validation reports side by side, one row per (model, system):
drift against FP32, force and energy errors, observables against the noise floor, verdicts.
Prints one table and writes compare.html with one figure."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np

from nnpq.errors import NnpqError
from nnpq.validation.report import CSS, figure_axes, html_table, png_uri, fmt, pm, print_table
from nnpq.validation.schema import read_report

HEADER = ["report", "model", "system", "drift 0.5 fs (meV/atom/ps)", "FP32 drift 0.5 fs", "drift 1 fs",
          "FP32 drift 1 fs", "force RMSE (kJ/mol/nm)", "energy RMSE/atom (kJ/mol)", "worst JS / noise floor",
          "verdicts passed", "failed metrics"]


def rows(paths: list[str | os.PathLike]) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """Table rows and the numbers the figure draws, one per (report, quantized model, system)."""
    table, points = [], []
    for i, path in enumerate(paths):
        report = read_report(path)
        folder = Path(path) if Path(path).is_dir() else Path(path).resolve().parent
        name = f"#{i + 1} {folder.name}" + (" (ASE)" if report.get("engine") == "ase" else "")
        for model in report["models"][1:]:
            for system, entry in report["systems"].items():
                m, ref = entry["models"].get(model["key"]), entry["models"].get("fp32")
                if m is None:
                    continue
                verdicts = [v for v in report["verdicts"] if v["model"] == model["key"] and v["system"] == system]
                judged = [v for v in verdicts if v["pass"] is not None]
                failed = [v["metric"] for v in judged if not v["pass"]]
                ratios = [v["value"] / v["noise_floor"] for v in verdicts
                          if v["metric"].startswith("js_") and v["value"] is not None and v["noise_floor"]]
                drift = {s: m["drift"][s] for s in ("nve_0.5fs", "nve_1fs")}
                fp32 = {s: ref["drift"][s] if ref else {} for s in drift}
                fid = m.get("fidelity", {})
                table.append([
                    name, model["label"], system,
                    pm(drift["nve_0.5fs"]["mean_mev_atom_ps"], drift["nve_0.5fs"]["uncertainty_mev_atom_ps"]),
                    pm(fp32["nve_0.5fs"].get("mean_mev_atom_ps"), fp32["nve_0.5fs"].get("uncertainty_mev_atom_ps")),
                    pm(drift["nve_1fs"]["mean_mev_atom_ps"], drift["nve_1fs"]["uncertainty_mev_atom_ps"]),
                    pm(fp32["nve_1fs"].get("mean_mev_atom_ps"), fp32["nve_1fs"].get("uncertainty_mev_atom_ps")),
                    fmt(fid.get("force", {}).get("force_rmse")),
                    fmt(fid.get("energy", {}).get("relative_energy_rmse_per_atom")),
                    fmt(max(ratios)) if ratios else "n/a",
                    f"{len(judged) - len(failed)}/{len(judged)}" + ("" if report["complete"] else " (incomplete)"),
                    ", ".join(failed) or "-",
                ])
                points.append({"label": f"{name} {model['label']}\n{system}", "drift": drift, "fp32": fp32,
                               "force_rmse": fid.get("force", {}).get("force_rmse"),
                               "passed": (len(judged) - len(failed)) / len(judged) if judged else None})
    if not table:
        raise NnpqError("the reports hold no quantized model results; run 'nnpq validate' to completion first")
    return table, points


def figure(points: list[dict[str, Any]]) -> str:
    """Drift (both time steps, with FP32 beside), force RMSE and the share of verdicts passed."""
    fig, axes = figure_axes(3, width=max(4.5, 1.1 * len(points)), height=3.8)
    x = np.arange(len(points))
    for k, stage in enumerate(("nve_0.5fs", "nve_1fs")):
        for offset, source, hatch in ((-0.3, "fp32", "//"), (-0.1, "drift", None)):
            vals = [p[source][stage].get("mean_mev_atom_ps") for p in points]
            errs = [p[source][stage].get("uncertainty_mev_atom_ps") or 0.0 for p in points]
            axes[0].bar(x + offset + 0.4 * k, [v if v is not None else np.nan for v in vals], 0.2, yerr=errs,
                        capsize=3, color=f"C{k}", hatch=hatch, alpha=0.6 if source == "fp32" else 1.0,
                        label=f"{'FP32' if source == 'fp32' else 'quantized'} {stage}")
    axes[0].set_ylabel("drift (meV/atom/ps)")
    axes[0].legend(fontsize=6)
    axes[1].bar(x, [p["force_rmse"] if p["force_rmse"] is not None else np.nan for p in points], color="C2")
    axes[1].set_ylabel("force RMSE vs FP32 (kJ/mol/nm)")
    axes[2].bar(x, [p["passed"] if p["passed"] is not None else np.nan for p in points], color="C3")
    axes[2].set_ylim(0, 1)
    axes[2].set_ylabel("share of verdicts passed")
    for ax in axes:
        ax.set_xticks(x, [p["label"] for p in points], fontsize=6, rotation=20)
    return png_uri(fig)


def compare(paths: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Print the comparison table and write ``out`` (HTML with the figure embedded)."""
    from nnpq.atomic_io import write_text_atomic

    table, points = rows(paths)
    print_table("nnpq compare", HEADER, table)
    sources = "".join(f"<li>#{i + 1}: {html.escape(str(p))}</li>" for i, p in enumerate(paths))
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>nnpq compare</title>"
            f"<style>{CSS}</style></head><body><h1>nnpq compare</h1><ul>{sources}</ul>"
            + html_table("Drift, errors, observables and verdicts", HEADER, table)
            + f"<figure><img src=\"{figure(points)}\" alt=\"comparison figure\"></figure></body></html>")
    return write_text_atomic(out, page)
