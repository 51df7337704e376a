"""Bit allocation: pick one format per (element, layer) unit from a sensitivity table.

Additive error model: the force MSE of a plan on each calibration source (built-in system
or user file) is predicted as the sum of the force MSEs its units cause alone there
(likewise the per-atom energy MSE); size is additive exactly. Error budgets hold on every
source, and under a size budget the worst source's error is minimized, so that rare
elements (S, F, Cl appear in one molecule) are not sacrificed to the common ones. Solved
exactly as a mixed 0-1 program with scipy's ``milp`` (one-hot choice per unit), with a
greedy fallback. Predictions are compared with measurements of the assembled plan and the
budgets are corrected by their ratio (`nnpq.pipeline`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nnpq.errors import NnpqError
from nnpq.spec.plan import PlanRule, QuantPlan
from nnpq.quant.sensitivity import SensitivityTable, Unit

MEAN_WEIGHT = 1e-3  # under a size budget: among plans with the same worst source, prefer the lower mean
Budget = float | dict[str, float] | None  # MSE for every source, or per source


@dataclass
class Allocation:
    """A choice of format label per unit, with its predicted size (bytes) and errors (MSE)."""

    choice: dict[Unit, str]
    bytes: float
    predicted_force_mse: float  # mean over calibration configurations
    predicted_energy_mse: float
    solver: str
    predicted_force_mse_by_source: dict[str, float] = field(default_factory=dict)

    @property
    def predicted_force_rmse(self) -> float:
        return float(np.sqrt(self.predicted_force_mse))

    @property
    def predicted_worst_force_rmse(self) -> float:
        return float(np.sqrt(max(self.predicted_force_mse_by_source.values(), default=self.predicted_force_mse)))

    def to_plan(self, table: SensitivityTable, description: str) -> QuantPlan:
        rules = tuple(PlanRule(weight=table.formats[label], element=e, layer=l,
                               equalize=l in table.equalized_layers and label not in table.damped,
                               damp=table.damped.get(label))
                      for (e, l), label in sorted(self.choice.items()) if label != "fp32")
        return QuantPlan(rules=rules, rounding="gptq", description=description)


@dataclass
class _Problem:
    """The table as arrays: ``size[u, c]``; ``force``/``energy[s, u, c]`` per source; overall means."""

    units: list[Unit]
    labels: list[str]
    sources: list[str]
    size: np.ndarray
    cost: np.ndarray  # what an error-budget plan minimizes: ``size`` by default, or time per call
    force: np.ndarray
    energy: np.ndarray
    mean_force: np.ndarray
    mean_energy: np.ndarray

    def budgets(self, budget: Budget) -> np.ndarray | None:
        if budget is None:
            return None
        if isinstance(budget, dict):
            return np.array([budget[s] for s in self.sources])
        return np.full(len(self.sources), float(budget))


def _problem(table: SensitivityTable, allowed: list[str] | None = None,
             cost: dict[Unit, dict[str, float]] | None = None) -> _Problem:
    units = table.units()
    labels = [label for label in table.formats if allowed is None or label in allowed]
    entries = [[table.entry(u, c) for c in labels] for u in units]
    sources = table.sources()
    if sources:
        force = np.array([[[e.force_mse_by_source[s] for e in row] for row in entries] for s in sources])
        energy = np.array([[[e.energy_mse_by_source[s] for e in row] for row in entries] for s in sources])
    else:  # a table without per-source measurements: one source, the whole set
        sources = ["all"]
        force = np.array([[[e.force_mse for e in row] for row in entries]])
        energy = np.array([[[e.energy_mse_per_atom for e in row] for row in entries]])
    size = np.array([[e.bytes for e in row] for row in entries])
    # time first, bytes to break ties between formats of equal time
    cost_matrix = size if cost is None else np.array([[cost[u][c] for c in labels] for u in units]) + 1e-12 * size
    return _Problem(units, labels, sources, size, cost_matrix, force, energy,
                    np.array([[e.force_mse for e in row] for row in entries]),
                    np.array([[e.energy_mse_per_atom for e in row] for row in entries]))


def _result(table: SensitivityTable, p: _Problem, pick: np.ndarray, solver: str) -> Allocation:
    rows = np.arange(len(p.units))
    return Allocation({u: p.labels[j] for u, j in zip(p.units, pick)}, table.fixed_bytes + float(p.size[rows, pick].sum()),
                      float(p.mean_force[rows, pick].sum()), float(p.mean_energy[rows, pick].sum()), solver,
                      {s: float(p.force[k][rows, pick].sum()) for k, s in enumerate(p.sources)})


def allocate(table: SensitivityTable, max_force_mse: Budget = None, max_energy_mse: Budget = None,
             max_bytes: float | None = None, solver: str = "milp", allowed: list[str] | None = None,
             cost: dict[Unit, dict[str, float]] | None = None, yardstick: dict[str, float] | None = None) -> Allocation:
    """Smallest plan whose predicted errors are within budget on every source, or (with
    ``max_bytes``) the plan within that size whose worst source has the smallest force error.

    Budgets are MSEs (kcal/mol/Å squared, kcal/mol/atom squared), one for all sources or a
    dict per source. ``allowed`` restricts the format labels a unit may take. ``cost`` (per
    unit and label, e.g. milliseconds per call from `nnpq.quant.latency`) replaces the size as
    what an error-budget plan minimizes. ``yardstick`` (force MSE per source, e.g. of a baseline
    plan) makes the size-budget objective the worst ratio of a source's force MSE to its
    yardstick, so each source is judged on its own scale.

    Raises:
        NnpqError: no plan meets the budgets; the message names the closest one.
    """
    if cost is not None and max_bytes is not None:
        raise NnpqError("a latency objective takes error budgets (--max-force-rmse, --max-energy-rmse), not --max-size")
    p = _problem(table, allowed, cost)
    max_force, max_energy = p.budgets(max_force_mse), p.budgets(max_energy_mse)
    if max_bytes is not None:
        cheapest = table.fixed_bytes + p.size.min(axis=1).sum()
        if max_bytes < cheapest:
            raise NnpqError(f"no plan fits in {max_bytes / 1e6:.2f} MB; the smallest possible is "
                            f"{cheapest / 1e6:.2f} MB (all units at their narrowest format)")
    weight = np.ones(len(p.sources)) if yardstick is None else 1.0 / np.maximum(p.budgets(yardstick), 1e-12)
    pick = _milp(p, table.fixed_bytes, max_force, max_energy, max_bytes, weight) if solver == "milp" else None
    used = "milp"
    if pick is None:
        pick, used = _greedy(p, table.fixed_bytes, max_force, max_energy, max_bytes, weight), "greedy"
    return _result(table, p, pick, used)


def _milp(p: _Problem, fixed, max_force, max_energy, max_bytes, weight: np.ndarray) -> np.ndarray | None:
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_units, n_choices = p.size.shape
    n_x, n_sources = n_units * n_choices, len(p.sources)
    # variables: the one-hot choices x, then t (the worst source's force MSE; used under a size budget)
    pad = np.zeros((1, 1))
    one_hot = np.hstack([np.kron(np.eye(n_units), np.ones(n_choices)), np.zeros((n_units, 1))])
    constraints = [LinearConstraint(one_hot, 1, 1)]
    force = p.force.reshape(n_sources, -1)
    if max_bytes is not None:
        constraints.append(LinearConstraint(np.hstack([p.size.reshape(1, -1), pad]), -np.inf, max_bytes - fixed))
        constraints.append(LinearConstraint(np.hstack([force * weight[:, None], -np.ones((n_sources, 1))]), -np.inf, 0))
        objective = np.append(MEAN_WEIGHT * (force * weight[:, None]).mean(axis=0) + 1e-12 * p.size.reshape(-1), 1.0)
    else:
        objective = np.append(p.cost.reshape(-1), 0.0)
    for matrix, budget in ((force, max_force), (p.energy.reshape(n_sources, -1), max_energy)):
        if budget is not None:
            constraints.append(LinearConstraint(np.hstack([matrix, np.zeros((n_sources, 1))]), -np.inf, budget))
    integrality = np.append(np.ones(n_x), 0)
    res = milp(objective, constraints=constraints, integrality=integrality,
               bounds=Bounds(np.zeros(n_x + 1), np.append(np.ones(n_x), np.inf)))
    if res.x is None:
        return None
    return np.argmax(res.x[:n_x].reshape(n_units, n_choices), axis=1)


def _greedy(p: _Problem, fixed, max_force, max_energy, max_bytes, weight: np.ndarray) -> np.ndarray:
    """Start from the most accurate choice per unit and take the cheapest error per byte (or cost) saved."""
    rows = np.arange(p.size.shape[0])

    def by_source(matrix, pick):
        return matrix[:, rows, pick].sum(axis=1)

    def error(pick):  # the size-budget objective: worst (weighted) source, then the mean
        f = by_source(p.force, pick)
        return (weight * f).max() + MEAN_WEIGHT * (weight * f).mean()

    def feasible(pick):
        ok = max_force is None or bool(np.all(by_source(p.force, pick) <= max_force))
        return ok and (max_energy is None or bool(np.all(by_source(p.energy, pick) <= max_energy)))

    pick = np.argmin(p.mean_force + 1e-12 * p.size, axis=1)
    if not feasible(pick):
        worst = int(np.argmax(by_source(p.force, pick) / (1.0 if max_force is None else max_force)))
        raise NnpqError("no plan meets the error budget: the closest, every unit at its most accurate candidate, "
                        f"is predicted at {np.sqrt(by_source(p.force, pick).max()):.3g} kcal/mol/Å force RMSE on "
                        f"{p.sources[worst]} and {np.sqrt(by_source(p.energy, pick).max()):.3g} kcal/mol/atom energy "
                        f"RMSE ({(fixed + p.size[rows, pick].sum()) / 1e6:.2f} MB); loosen the budget or add formats")
    while max_bytes is None or fixed + p.size[rows, pick].sum() > max_bytes:
        best, best_ratio = None, np.inf
        for u in rows:
            for c in range(p.size.shape[1]):
                saved = (p.size if max_bytes is not None else p.cost)[u, pick[u]] - (
                    p.size if max_bytes is not None else p.cost)[u, c]
                if saved <= 0:
                    continue
                trial = pick.copy()
                trial[u] = c
                if not feasible(trial):
                    continue
                ratio = (error(trial) - error(pick)) / saved
                if ratio < best_ratio:
                    best, best_ratio = (u, c), ratio
        if best is None:
            break
        pick[best[0]] = best[1]
    if max_bytes is not None and fixed + p.size[rows, pick].sum() > max_bytes:
        raise NnpqError(f"greedy allocation found no plan within {max_bytes / 1e6:.2f} MB")
    return pick


def uniform_allocation(table: SensitivityTable, label: str) -> Allocation:
    """Every unit in format ``label`` (the baselines of the frontier)."""
    p = _problem(table)
    return _result(table, p, np.full(len(p.units), p.labels.index(label)), "uniform")


def assemble_weights(table: SensitivityTable, allocation: Allocation) -> dict:
    """The rounded weights of every unit as chosen, for `PlanEvaluator.errors`."""
    weights = {}
    for unit, label in allocation.choice.items():
        weights.update(table.weights[(unit, label)])
    return weights
