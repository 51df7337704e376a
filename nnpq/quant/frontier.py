"""The size/force-error Pareto frontier: allocated mixed plans against uniform plans, all measured.

A plan's error here is its worst calibration source's force RMSE, which is what a size
budget minimizes (`nnpq.quant.allocation`); the mean over configurations is reported beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from nnpq.errors import NnpqError
from nnpq.quant.allocation import Allocation, allocate, assemble_weights, uniform_allocation
from nnpq.quant.sensitivity import PlanEvaluator, SensitivityTable


@dataclass
class FrontierPoint:
    """One plan: size (bytes), predicted (additive) and measured errors on the evaluator's set,
    kcal/mol/Å and kcal/mol per atom; ``worst_*`` on the source where the plan errs most."""

    kind: str  # "mixed" or "uniform"
    label: str
    bytes: float
    predicted_worst_force_rmse: float
    worst_force_rmse: float
    worst_source: str
    force_rmse: float
    energy_rmse_per_atom: float

    def to_dict(self) -> dict:
        return asdict(self)


def measure(table: SensitivityTable, evaluator: PlanEvaluator, allocation: Allocation, kind: str,
            label: str) -> FrontierPoint:
    errors = evaluator.errors(assemble_weights(table, allocation))
    by_source = errors["force_mse_by_source"]
    return FrontierPoint(kind, label, allocation.bytes, allocation.predicted_worst_force_rmse,
                         errors["worst_force_rmse"], max(by_source, key=by_source.get), errors["force_rmse"],
                         errors["energy_rmse_per_atom"])


def frontier(table: SensitivityTable, evaluator: PlanEvaluator, n_points: int = 8,
             progress: bool = False) -> list[FrontierPoint]:
    """Uniform plans for every candidate format, and the most accurate mixed plan at each
    uniform plan's size and at sizes spread between the smallest plan and the all-fp16 one."""
    from tqdm import tqdm

    points = [measure(table, evaluator, uniform_allocation(table, label), "uniform", label)
              for label in tqdm(table.formats, desc="uniform plans", disable=not progress) if label != "fp32"]
    smallest = min(p.bytes for p in points)
    largest = max(p.bytes for p in points if p.label != "fp32")
    sizes = sorted(set(np.geomspace(smallest * 1.02, largest, n_points).tolist()) | {p.bytes for p in points})
    for size in tqdm(sizes, desc="mixed plans", disable=not progress):
        try:
            allocation = allocate(table, max_bytes=float(size))
        except NnpqError:
            continue
        points.append(measure(table, evaluator, allocation, "mixed", f"<= {size / 1e6:.1f} MB"))
    return points


def dominates_uniform(points: list[FrontierPoint], rtol: float = 0.02) -> bool:
    """True when every uniform plan is beaten by a mixed plan no larger than it, or matched within
    ``rtol`` (where the additive model cannot tell plans apart, measurement picks either)."""
    mixed = [p for p in points if p.kind == "mixed"]
    return all(any(m.bytes <= u.bytes and m.worst_force_rmse <= u.worst_force_rmse * (1 + rtol) for m in mixed)
               for u in points if u.kind == "uniform")


def format_frontier(points: list[FrontierPoint]) -> str:
    """Terminal table of the frontier, smallest plans first."""
    lines = [f"{'plan':<22}{'kind':<9}{'size MB':>9}{'worst F RMSE':>13}{'predicted':>11}{'worst source':>18}"
             f"{'mean F RMSE':>12}{'E RMSE/atom':>13}",
             f"{'':<22}{'':<9}{'':>9}{'kcal/mol/Å':>13}{'kcal/mol/Å':>11}{'':>18}{'kcal/mol/Å':>12}{'kcal/mol':>13}"]
    for p in sorted(points, key=lambda p: p.bytes):
        lines.append(f"{p.label:<22}{p.kind:<9}{p.bytes / 1e6:>9.2f}{p.worst_force_rmse:>13.4f}"
                     f"{p.predicted_worst_force_rmse:>11.4f}{p.worst_source:>18}{p.force_rmse:>12.4f}"
                     f"{p.energy_rmse_per_atom:>13.5f}")
    return "\n".join(lines)
