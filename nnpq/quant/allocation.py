"""Bit allocation: pick one format per (element, layer) unit from a sensitivity table.

Additive error model: the force MSE of a plan is predicted as the sum of the force MSEs its
units cause alone (likewise the per-atom energy MSE); size is additive exactly. Solved
exactly as a 0-1 integer program with scipy's ``milp`` (one-hot choice per unit), with a
greedy fallback. Predictions are compared with measurements of the assembled plan and the
budget is corrected by their ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnpq.errors import NnpqError
from nnpq.quant.plan import PlanRule, QuantPlan
from nnpq.quant.sensitivity import SensitivityTable, Unit


@dataclass
class Allocation:
    """A choice of format label per unit, with its predicted size (bytes) and errors."""

    choice: dict[Unit, str]
    bytes: float
    predicted_force_mse: float
    predicted_energy_mse: float
    solver: str

    @property
    def predicted_force_rmse(self) -> float:
        return float(np.sqrt(self.predicted_force_mse))

    def to_plan(self, table: SensitivityTable, description: str) -> QuantPlan:
        rules = tuple(PlanRule(weight=table.formats[label], element=e, layer=l, equalize=l in table.equalized_layers)
                      for (e, l), label in sorted(self.choice.items()) if label != "fp32")
        return QuantPlan(rules=rules, rounding="gptq", description=description)


def _matrices(table: SensitivityTable, allowed: list[str] | None = None):
    units = table.units()
    labels = [label for label in table.formats if allowed is None or label in allowed]
    size = np.array([[table.entry(u, c).bytes for c in labels] for u in units])
    force = np.array([[table.entry(u, c).force_mse for c in labels] for u in units])
    energy = np.array([[table.entry(u, c).energy_mse_per_atom for c in labels] for u in units])
    return units, labels, size, force, energy


def _result(table, units, labels, pick, size, force, energy, solver) -> Allocation:
    rows = np.arange(len(units))
    return Allocation({u: labels[j] for u, j in zip(units, pick)}, table.fixed_bytes + float(size[rows, pick].sum()),
                      float(force[rows, pick].sum()), float(energy[rows, pick].sum()), solver)


def allocate(table: SensitivityTable, max_force_mse: float | None = None, max_energy_mse: float | None = None,
             max_bytes: float | None = None, solver: str = "milp", allowed: list[str] | None = None) -> Allocation:
    """Smallest plan within error budgets, or (with ``max_bytes``) the most accurate within a size.

    ``allowed`` restricts the format labels a unit may take (default: all measured, FP32 included).

    Raises:
        NnpqError: no plan meets the budgets; the message names the closest one.
    """
    units, labels, size, force, energy = _matrices(table, allowed)
    if max_bytes is not None:
        cheapest = table.fixed_bytes + size.min(axis=1).sum()
        if max_bytes < cheapest:
            raise NnpqError(f"no plan fits in {max_bytes / 1e6:.2f} MB; the smallest possible is "
                            f"{cheapest / 1e6:.2f} MB (all units at their narrowest format)")
    pick = _milp(size, force, energy, table.fixed_bytes, max_force_mse, max_energy_mse, max_bytes) \
        if solver == "milp" else None
    used = "milp"
    if pick is None:
        pick, used = _greedy(size, force, energy, table.fixed_bytes, max_force_mse, max_energy_mse, max_bytes), "greedy"
    return _result(table, units, labels, pick, size, force, energy, used)


def _milp(size, force, energy, fixed, max_force, max_energy, max_bytes) -> np.ndarray | None:
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_units, n_choices = size.shape
    one_hot = np.kron(np.eye(n_units), np.ones(n_choices))
    constraints = [LinearConstraint(one_hot, 1, 1)]
    if max_bytes is not None:
        constraints.append(LinearConstraint(size.reshape(1, -1), -np.inf, max_bytes - fixed))
        objective = force.reshape(-1) + 1e-12 * size.reshape(-1)  # ties go to the smaller plan
    else:
        objective = size.reshape(-1)
    if max_force is not None:
        constraints.append(LinearConstraint(force.reshape(1, -1), -np.inf, max_force))
    if max_energy is not None:
        constraints.append(LinearConstraint(energy.reshape(1, -1), -np.inf, max_energy))
    res = milp(objective, constraints=constraints, integrality=np.ones(objective.size), bounds=Bounds(0, 1))
    if res.x is None:
        return None
    return np.argmax(res.x.reshape(n_units, n_choices), axis=1)


def _greedy(size, force, energy, fixed, max_force, max_energy, max_bytes) -> np.ndarray:
    """Start from the most accurate choice per unit and take the cheapest error per byte saved."""
    rows = np.arange(size.shape[0])
    pick = np.argmin(force + 1e-12 * size, axis=1)

    def feasible(p):
        ok = max_force is None or force[rows, p].sum() <= max_force
        ok &= max_energy is None or energy[rows, p].sum() <= max_energy
        return ok

    if not feasible(pick):
        raise NnpqError("no plan meets the error budget: the closest, every unit at its most accurate candidate, "
                        f"is predicted at {np.sqrt(force[rows, pick].sum()):.3g} kcal/mol/Å force RMSE and "
                        f"{np.sqrt(energy[rows, pick].sum()):.3g} kcal/mol/atom energy RMSE "
                        f"({(fixed + size[rows, pick].sum()) / 1e6:.2f} MB); loosen the budget or add formats")
    while True:
        best, best_ratio = None, np.inf
        for u in rows:
            for c in range(size.shape[1]):
                saved = size[u, pick[u]] - size[u, c]
                if saved <= 0:
                    continue
                trial = pick.copy()
                trial[u] = c
                within_size = max_bytes is not None and fixed + size[rows, pick].sum() <= max_bytes
                if within_size or not feasible(trial):
                    continue
                ratio = (force[u, c] - force[u, pick[u]]) / saved
                if ratio < best_ratio:
                    best, best_ratio = (u, c), ratio
        if best is None:
            break
        pick[best[0]] = best[1]
    if max_bytes is not None and fixed + size[rows, pick].sum() > max_bytes:
        raise NnpqError(f"greedy allocation found no plan within {max_bytes / 1e6:.2f} MB")
    return pick


def uniform_allocation(table: SensitivityTable, label: str) -> Allocation:
    """Every unit in format ``label`` (the baselines of the frontier)."""
    units, labels, size, force, energy = _matrices(table)
    return _result(table, units, labels, np.full(len(units), labels.index(label)), size, force, energy, "uniform")


def assemble_weights(table: SensitivityTable, allocation: Allocation) -> dict:
    """The rounded weights of every unit as chosen, for `PlanEvaluator.errors`."""
    weights = {}
    for unit, label in allocation.choice.items():
        weights.update(table.weights[(unit, label)])
    return weights
