"""Bit allocation: pick one format per (element, layer) unit from a sensitivity table.

Additive error model: the force MSE of a plan on each calibration source (built-in system
or user file) is predicted as the sum of the force MSEs its units cause alone there
(likewise the per-atom energy MSE); size is additive exactly. Under a size budget the plan is
then refined on superposed errors: a plan's force error vector is the sum of its units' error
vectors (measured alone), which keeps the cross terms that summing MSEs drops (on ANI-2x the
superposed MSE of a molecule is within 0.92-1.12 of the measured one for 90% of molecules, the
summed MSE within 0.64-2.2). Error budgets hold on every
source, and under a size budget the worst source's error is minimized, so that rare
elements (S, F, Cl appear in one molecule) are not sacrificed to the common ones. Solved
exactly as a mixed 0-1 program with scipy's ``milp`` (one-hot choice per unit), with a
greedy fallback. Predictions are compared with measurements of the assembled plan and the
budgets are corrected by their ratio (`nnpq.pipeline`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from nnpq.errors import NnpqError
from nnpq.spec.plan import PlanRule, QuantPlan
from nnpq.quant.sensitivity import SensitivityTable, Unit

MEAN_WEIGHT = 1e-3  # under a size budget: among plans with the same worst source, prefer the lower mean
LINEAR_ROUNDS = 8  # re-solves on the superposed errors under a size budget
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
        plain = set(table.damped) | set(table.nearest)  # variants rounded without equalization
        rules = tuple(PlanRule(weight=table.formats[label], element=e, layer=l,
                               equalize=l in table.equalized_layers and label not in plain,
                               damp=table.damped.get(label),
                               rounding="nearest" if label in table.nearest else None)
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
    """The allocation with its predicted errors: superposed where the table has error vectors, else summed."""
    rows = np.arange(len(p.units))
    choice = {u: p.labels[j] for u, j in zip(p.units, pick)}
    nbytes = table.fixed_bytes + float(p.size[rows, pick].sum())
    if table.vectors:
        _, _, force, energy = _superposed(table, p, pick)
        return Allocation(choice, nbytes, table.layout.mean(force), table.layout.mean(energy), solver,
                          dict(zip(p.sources, force.tolist())))
    return Allocation(choice, nbytes, float(p.mean_force[rows, pick].sum()), float(p.mean_energy[rows, pick].sum()),
                      solver, {s: float(p.force[k][rows, pick].sum()) for k, s in enumerate(p.sources)})


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
    if max_bytes is not None and solver == "milp" and table.vectors:
        pick = _refine(table, p, pick, max_force, max_energy, max_bytes, weight)
        used += "+superposed"
    return _result(table, p, pick, used)


def _superposed(table: SensitivityTable, p: _Problem, pick: np.ndarray) -> tuple[np.ndarray, ...]:
    """The plan's error vectors as the sums of its units', and their MSE per source."""
    force = sum(table.vectors[(u, p.labels[j])][0].astype(np.float64) for u, j in zip(p.units, pick))
    energy = sum(table.vectors[(u, p.labels[j])][1].astype(np.float64) for u, j in zip(p.units, pick))
    return (force, energy) + table.layout.mse(force, energy)


def _refine(table: SensitivityTable, p: _Problem, pick: np.ndarray, max_force, max_energy, max_bytes,
            weight: np.ndarray) -> np.ndarray:
    """Re-solve on the superposed errors: each (unit, format) costs the change in every source's
    MSE that changing that unit alone makes (exact under superposition); combined changes interact,
    so a plan is kept only if its superposed worst source improves, and otherwise fewer units may
    change in the next round."""
    layout = table.layout
    n_units = len(p.units)

    def objective(mse: np.ndarray) -> float:
        return float((weight * mse).max() + MEAN_WEIGHT * (weight * mse).mean())

    force, energy, force_mse, energy_mse = _superposed(table, p, pick)
    best = objective(force_mse)
    changes = n_units
    for _ in range(LINEAR_ROUNDS):
        linear_force, linear_energy = np.empty_like(p.force), np.empty_like(p.energy)
        for i, u in enumerate(p.units):
            now_force, now_energy = table.vectors[(u, p.labels[pick[i]])]
            for c, label in enumerate(p.labels):
                d_force = table.vectors[(u, label)][0].astype(np.float64) - now_force
                d_energy = table.vectors[(u, label)][1].astype(np.float64) - now_energy
                # |e + d|^2 - |e|^2 per source; the current MSE is split evenly over the units, so that
                # a plan's sum over units is its MSE
                linear_force[:, i, c] = force_mse / n_units + np.bincount(
                    layout.force_source, layout.force_weight * (2 * force + d_force) * d_force, len(p.sources))
                linear_energy[:, i, c] = energy_mse / n_units + np.bincount(
                    layout.energy_source, layout.energy_weight * (2 * energy + d_energy) * d_energy, len(p.sources))
        trial = _milp(replace(p, force=linear_force, energy=linear_energy), table.fixed_bytes, max_force, max_energy,
                      max_bytes, weight, stay=(pick, changes))
        if trial is None:
            break
        trial_force, trial_energy, trial_force_mse, trial_energy_mse = _superposed(table, p, trial)
        feasible = (max_force is None or bool(np.all(trial_force_mse <= max_force))) and \
            (max_energy is None or bool(np.all(trial_energy_mse <= max_energy)))
        if feasible and objective(trial_force_mse) < best - 1e-12 * abs(best):
            pick, force, energy, force_mse, energy_mse = trial, trial_force, trial_energy, trial_force_mse, trial_energy_mse
            best = objective(force_mse)
            continue
        changes = int(np.sum(trial != pick)) // 2
        if changes == 0:
            break
    return pick


def _milp(p: _Problem, fixed, max_force, max_energy, max_bytes, weight: np.ndarray,
          stay: tuple[np.ndarray, int] | None = None) -> np.ndarray | None:
    """The one-hot choice as a mixed 0-1 program; ``stay`` (a choice, a count) lets at most that
    many units leave that choice."""
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
    if stay is not None:
        kept = np.zeros(n_x + 1)
        kept[np.arange(n_units) * n_choices + stay[0]] = 1.0
        constraints.append(LinearConstraint(kept[None, :], n_units - stay[1], np.inf))
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
