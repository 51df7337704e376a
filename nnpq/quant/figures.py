"""PNG figures of the quantization analysis: sensitivity heatmap and size/error frontier."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from nnpq.atomic_io import write_bytes_atomic
from nnpq.quant.frontier import FrontierPoint
from nnpq.quant.sensitivity import SensitivityTable


def _save(fig, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return write_bytes_atomic(path, buffer.getvalue())


def sensitivity_heatmap(table: SensitivityTable, path: str | os.PathLike) -> Path:
    """log10 force RMSE (kcal/mol/Å) when each unit alone is rounded to each format."""
    from matplotlib.figure import Figure

    units = table.units()
    labels = [label for label in table.formats if label != "fp32"]
    grid = np.array([[table.entry(u, c).force_rmse for c in labels] for u in units])
    fig = Figure(figsize=(1.1 * len(labels) + 2.5, 0.38 * len(units) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(np.log10(np.maximum(grid, 1e-6)), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(units)), [f"{e} layer {layer}" for e, layer in units])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2g}", ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(image, ax=ax, label="log10 force RMSE (kcal/mol/Å)")
    ax.set_title(f"{table.model}: force error when one unit alone is quantized")
    return _save(fig, path)


def frontier_plot(points: list[FrontierPoint], path: str | os.PathLike, chosen: FrontierPoint | None = None,
                  title: str = "") -> Path:
    """Measured worst-source force RMSE against size for uniform and mixed plans (log scale)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    mixed = sorted((p for p in points if p.kind == "mixed"), key=lambda p: p.bytes)
    ax.plot([p.bytes / 1e6 for p in mixed], [p.worst_force_rmse for p in mixed], "o-", label="mixed (measured)")
    ax.plot([p.bytes / 1e6 for p in mixed], [p.predicted_worst_force_rmse for p in mixed], "x--", alpha=0.6,
            label="mixed (additive prediction)")
    for p in (p for p in points if p.kind == "uniform"):
        ax.plot(p.bytes / 1e6, p.worst_force_rmse, "s", color="tab:red")
        ax.annotate(p.label, (p.bytes / 1e6, p.worst_force_rmse), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([], [], "s", color="tab:red", label="uniform plans")
    if chosen is not None:
        ax.plot(chosen.bytes / 1e6, chosen.worst_force_rmse, "*", markersize=14, color="gold", markeredgecolor="k",
                label="chosen plan")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("worst system's force RMSE vs FP32 (kcal/mol/Å)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "size vs force error")
    return _save(fig, path)
