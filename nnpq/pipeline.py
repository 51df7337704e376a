"""`nnpq quantize`: FP32 model -> calibration -> plan -> quantized artifact, with its error tables.

Without a budget the plan is uniform (asymmetric INT8 in groups of 8 inputs, force-aware
GPTQ), except the first layer of element networks whose AEV inputs calibration covers poorly,
which stays fp16 (`coverage_plan`). With
``max_force_rmse``, ``max_energy_rmse`` or ``max_bytes`` the plan is chosen per (element,
layer) from measured sensitivities, and the size/error frontier is reported. Errors are
always reported on held-out configurations, beside simple baselines measured the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchani

from nnpq.artifact import save_artifact, stored_tensor_bytes
from nnpq.atomic_io import write_text_atomic
from nnpq.errors import NnpqError
from nnpq.models import ANIPotential, Potential, load_fp32, model_spec
from nnpq.models.domain import Domain, aev_maxima
from nnpq.models.fp32 import file_sha256, n_layers, weights_path
from nnpq.quant.allocation import Allocation, allocate, assemble_weights
from nnpq.quant.apply import RoundingSettings, quantize_model
from nnpq.quant.calibration import CalibrationSet, CalibrationSettings, build_calibration_set
from nnpq.spec.formats import INT8_CHANNEL, INT8_G8_ASYM, INT8_G32_ASYM, NO_ACTIVATION, ActivationFormat, TensorFormat
from nnpq.spec.plan import PlanRule, QuantPlan, require_known_elements, uniform_plan
from nnpq.quant.refit import RefitSettings, refit
from nnpq.quant.sensitivity import DEFAULT_CANDIDATES
from nnpq.runtime.potential import runtime_from_tensors
from nnpq.validation.evaluate import Outputs, outputs_on, set_errors

# (name, weight format, activation format, rounding): what a user would otherwise reach for
BASELINES: tuple[tuple[str, TensorFormat, ActivationFormat, str], ...] = (
    ("int8/tensor RTN", TensorFormat("int", 8, "tensor"), NO_ACTIVATION, "nearest"),
    ("int8/channel RTN", INT8_CHANNEL, NO_ACTIVATION, "nearest"),
    ("int8/g32/asym RTN", INT8_G32_ASYM, NO_ACTIVATION, "nearest"),
    ("int8/g8/asym RTN", INT8_G8_ASYM, NO_ACTIVATION, "nearest"),
    ("fp16", TensorFormat("fp16"), NO_ACTIVATION, "nearest"),
)
FP16 = TensorFormat("fp16")
CORRECTION_ROUNDS = 3
EQUALIZED_LAYERS = (0,)  # the AEV-fed first layers, where feature ranges differ most


@dataclass(frozen=True)
class QuantizeOptions:
    """What `quantize_to_file` does.

    Attributes:
        weight: the uniform weight format used when no budget is given.
        later: without a budget, the format of the hidden layers after the first (None: ``weight``).
        min_coverage: without a budget, element networks whose calibration excites less than this
            share of their AEV features keep their first layer in fp16 (0 turns this off).
        activation: input-activation rounding of integer layers (uniform plans only).
        rounding: how weights are rounded (force-aware GPTQ by default).
        refit: force/energy matching of the FP32 biases and final layers after rounding.
        max_force_rmse: force RMSE budget, kcal/mol/Å, on the calibration configurations of every
            system and user file.
        max_energy_rmse: per-atom energy RMSE budget, kcal/mol, likewise on every system.
        max_bytes: size budget of the model file, bytes; the worst molecule's force MSE relative to
            int8/channel round-to-nearest on it is minimized.
        candidates: formats the allocation may choose per (element, layer), FP32 always included.
        objective: what a plan under error budgets minimizes: ``size`` (bytes) or ``latency``
            (time per call of the runtime in ``latency_mode``, timed on this machine per unit and
            format by `nnpq.quant.latency`).
        latency_mode: runtime mode the latency objective times, ``exact`` or ``fast``.
        calibration: how calibration configurations are made (seeded).
        baselines: also measure the baseline plans on the held-out set.
        report_dir: where sensitivity and frontier files go (default: beside the output).
    """

    weight: TensorFormat = INT8_G8_ASYM
    later: TensorFormat | None = FP16
    min_coverage: float = 0.9
    activation: ActivationFormat = NO_ACTIVATION
    rounding: RoundingSettings = RoundingSettings()
    refit: RefitSettings = RefitSettings()
    max_force_rmse: float | None = None
    max_energy_rmse: float | None = None
    max_bytes: float | None = None
    candidates: tuple[TensorFormat, ...] = DEFAULT_CANDIDATES
    objective: str = "size"
    latency_mode: str = "exact"
    calibration: CalibrationSettings = CalibrationSettings()
    baselines: bool = True
    report_dir: str | None = None

    @property
    def has_budget(self) -> bool:
        return any(v is not None for v in (self.max_force_rmse, self.max_energy_rmse, self.max_bytes))


@dataclass
class QuantizeResult:
    """What `quantize_to_file` produced: the file, sizes in bytes and held-out errors per plan."""

    output: Path
    model: str
    plan: QuantPlan
    fp32_file_bytes: int
    artifact_bytes: int
    fp32_network_bytes: int
    quantized_network_bytes: int
    calibration: str
    heldout: dict[str, dict[str, Any]] = field(default_factory=dict)  # plan name -> set_errors + size
    budget: dict[str, Any] = field(default_factory=dict)
    frontier_text: str = ""
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    coverage: dict[str, dict[str, Any]] = field(default_factory=dict)  # element -> excited share, unseen blocks
    heldout_groups: list[str] = field(default_factory=list)


def network_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the element networks (weights, scales, biases) of an ANI model in memory."""
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if "neural_networks" in k)


def _fp32_bytes_plus(fp32: torch.nn.Module, layer_change) -> float:
    """FP32 state bytes plus ``layer_change(key, linear)`` bytes summed over every Linear layer."""
    from nnpq.models.fp32 import hidden_and_final_layers

    total = float(sum(t.numel() * t.element_size() for t in fp32.state_dict().values()))
    return total + sum(layer_change(key, lin) for key, lin in hidden_and_final_layers(fp32).items())


def source_info(model_name: str) -> dict[str, Any]:
    """The manifest's description of the FP32 source: name, weights file and its sha256, TorchANI version."""
    spec = model_spec(model_name)
    return {"model": spec.name, "title": spec.title, "state_dict_file": spec.state_dict_file,
            "sha256": file_sha256(weights_path(spec.name)), "torchani_version": torchani.__version__}


def file_overhead_bytes(fp32: torch.nn.Module) -> float:
    """Room for the file's safetensors header and manifest beside the tensor bytes: each tensor's
    JSON entry (name, dtype, shape, offsets), the quantized layers' extra buffers, the manifest.
    Measured on ANI-2x: 150 kB of tensor entries and 24 kB of manifest; this allows 230 kB, plus
    the applicability domain (per element, each AEV feature's and block's maximum as ~7 characters)."""
    keys = fp32.state_dict().keys()
    domain = 7.0 * len(fp32.symbols) * (fp32.aev_computer.out_dim + 64)
    return 2.5 * sum(len(k) + 80 for k in keys) + 64e3 + domain


def smallest_bytes(candidates: tuple[TensorFormat, ...], fp32: torch.nn.Module,
                   equalized: tuple[int, ...] = EQUALIZED_LAYERS) -> float:
    """About the size of the smallest plan the candidates allow: each hidden layer in its
    narrowest candidate, rounded to nearest and stored as a model file stores its codes (GPTQ's
    codes take about as many bytes), with the bfloat16 equalization factors of ``equalized`` layers."""
    from nnpq.quant.quantizers import quantize_nearest
    from nnpq.spec.packing import stored_float_bytes

    final = n_layers(fp32) - 1  # the width-1 final layers stay FP32

    def change(key, lin) -> float:
        if key[2] == final:
            return 0.0
        narrowest = min(candidates, key=lambda f: f.bits_per_weight(lin.in_features))
        if not narrowest.is_integer:
            return (narrowest.bits_per_weight(lin.in_features) / 8 - 4) * lin.weight.numel()
        stored = quantize_nearest(lin.weight.detach(), narrowest).stored_bytes(narrowest)
        factors = stored_float_bytes(torch.ones(lin.in_features)) if key[2] in equalized else 0
        return stored + factors - 4 * lin.weight.numel()

    return _fp32_bytes_plus(fp32, change)


def coverage_plan(weight: TensorFormat, activation: ActivationFormat, method: str,
                  coverage: dict[str, dict[str, Any]], min_coverage: float,
                  later: TensorFormat | None = FP16) -> QuantPlan:
    """The uniform plan, with the hidden layers after the first in ``later`` (None: ``weight``
    too), and the first layer of each element network whose calibration excites less than
    ``min_coverage`` of its AEV features (`Domain.coverage`) kept in fp16.

    GPTQ can neither measure nor compensate rounding on inputs it never saw. The first layers of
    sparsely covered networks (S, F, Cl, N on the built-in calibration) are small, so fp16 there
    costs ~2 MB on ANI-2x. The later layers' inputs (hidden activations) leave the calibrated range
    on unseen chemistry too: on ANI-2x their INT8 rounding was 0.036 of the 0.056 kcal/mol/Å force
    RMSE on held-out chemistry (in quadrature), for ~20% of the weights and none of the time
    (the runtime multiplies them in float either way); in fp16 they add ~2 MB."""
    plan = uniform_plan(weight, activation=activation, rounding=method, equalize=EQUALIZED_LAYERS)
    if not weight.is_integer:
        return plan
    rules, notes, where = plan.rules, [], " on hidden layers"
    if later is not None and later != weight:
        rules = tuple(rule if rule.layer == 0 else PlanRule(later, element=rule.element, layer=rule.layer)
                      for rule in rules)
        notes.append(f"{later.label()} later hidden layers")
        where = " on first layers"
    sparse = [e for e, c in coverage.items() if c["excited_fraction"] < min_coverage]
    if sparse:
        rules += tuple(PlanRule(FP16, element=e, layer=0) for e in sparse)
        notes.append(f"fp16 first layers of {', '.join(sparse)} (calibration coverage < {100 * min_coverage:.0f}%)")
    if not notes:
        return plan
    return dataclasses.replace(plan, rules=rules, description=plan.description.replace(
        " on hidden layers", where + ", " + ", ".join(notes)))


def _heldout_row(model, plan: QuantPlan, nbytes: float, calib: CalibrationSet, reference: dict[str, Outputs],
                 label: str, model_name: str) -> dict:
    """Held-out errors of a quantized ``model`` (TorchANI layers, or a loaded potential such as the
    fused runtime in fast mode) against the FP32 ``reference`` outputs, in distribution (held-out
    frames of calibrated systems) and on held-out chemistry (``chemistry``), with its tensor bytes."""
    potential = model if isinstance(model, Potential) else ANIPotential(model, label, model_name)
    errors = set_errors(reference["holdout"], outputs_on(potential, calib.holdout), calib.holdout)
    if calib.chemistry:
        errors["chemistry"] = set_errors(reference["chemistry"], outputs_on(potential, calib.chemistry), calib.chemistry)
    return {**errors, "bytes": nbytes, "description": plan.description}


def rtn_weights(fp32: torch.nn.Module, fmt: TensorFormat) -> dict:
    """Round-to-nearest ``fmt`` weights of every hidden layer (dequantized), for `PlanEvaluator.errors`."""
    from nnpq.models.fp32 import hidden_and_final_layers
    from nnpq.quant.quantizers import quantize_nearest

    final = n_layers(fp32) - 1
    return {key: quantize_nearest(lin.weight.detach(), fmt).dequantize()
            for key, lin in hidden_and_final_layers(fp32).items() if key[2] < final}


def _choose_plan(fp32, name: str, calib: CalibrationSet, options: QuantizeOptions, out_dir: Path,
                 progress: bool) -> tuple[QuantPlan, dict[str, Any], str, list[Path]]:
    """Sensitivities, frontier and the allocation that meets the budgets, with written reports."""
    from nnpq.quant.figures import frontier_plot, sensitivity_heatmap
    from nnpq.quant.frontier import dominates_uniform, format_frontier, frontier, measure
    from nnpq.quant.sensitivity import PlanEvaluator, measure_sensitivity
    from nnpq.validation.report import to_jsonable

    # budgets hold on held-out chemistry too: measured there, never rounded on. Under a size budget
    # every molecule is its own source, judged against per-channel INT8 round-to-nearest there (the
    # smallest plan a user would otherwise reach for): the allocation minimizes the worst ratio.
    by_molecule = options.max_bytes is not None
    evaluator = PlanEvaluator(fp32, calib.calibration + calib.chemistry, name, by_molecule)
    yardstick = evaluator.errors(rtn_weights(fp32, INT8_CHANNEL))["force_mse_by_source"] if by_molecule else None
    table = measure_sensitivity(fp32, name, calib.calibration, options.candidates, options.rounding, evaluator,
                                seed=options.calibration.seed, progress=progress, equalize=EQUALIZED_LAYERS)
    targets = {"force": options.max_force_rmse, "energy": options.max_energy_rmse}  # RMSE on every source
    budgets = {k: None if v is None else dict.fromkeys(evaluator.sources, v ** 2) for k, v in targets.items()}
    history = []
    allowed = list(table.formats)  # the candidates, their damped variants and FP32 (always a choice)
    cost = None
    if options.objective == "latency":
        from nnpq.quant.latency import latency_table

        labels = {label: fmt for label, fmt in table.formats.items() if label in allowed}
        cost = latency_table(fp32.state_dict(), model_spec(name).symbols, table.units(), labels,
                             table.equalized_layers, options.latency_mode, progress=progress)
    allocation: Allocation | None = None
    best_ratio = float("inf")  # under a size budget: the measured worst ratio to the yardstick
    weights = dict(yardstick) if yardstick is not None else None  # the yardstick as reweighted per round
    for _ in range(CORRECTION_ROUNDS):
        trial = allocate(table, budgets["force"], budgets["energy"], options.max_bytes, allowed=allowed,
                         cost=cost, yardstick=weights)
        measured = evaluator.errors(assemble_weights(table, trial))
        history.append({"predicted_worst_force_rmse": trial.predicted_worst_force_rmse,
                        "measured_worst_force_rmse": measured["worst_force_rmse"],
                        "predicted_force_rmse": trial.predicted_force_rmse,
                        "measured_force_rmse": measured["force_rmse"],
                        "measured_worst_energy_rmse": max(measured["energy_mse_by_source"].values()) ** 0.5,
                        "bytes": trial.bytes})
        if yardstick is not None:
            # the additive model mispredicts interactions between units: molecules measured above their
            # prediction weigh more in the next round, and the plan measured best is kept
            mse = measured["force_mse_by_source"]
            ratio = max(mse[s] / max(yardstick[s], 1e-12) for s in mse)
            history[-1]["measured_worst_ratio_rmse"] = ratio ** 0.5
            if ratio < best_ratio:
                allocation, best_ratio = trial, ratio
            for source, value in mse.items():
                weights[source] /= max(1.0, value / max(trial.predicted_force_mse_by_source[source], 1e-12))
            continue
        allocation = trial
        over = False
        # the additive model mispredicts interactions between units: tighten by the observed ratio
        for kind, target in targets.items():
            for source, mse in measured[f"{kind}_mse_by_source"].items():
                if target is not None and mse > target ** 2:  # with a 5% margin, so few rounds suffice
                    budgets[kind][source] *= 0.95 * target ** 2 / mse
                    over = True
        if not over:
            break
    assert allocation is not None
    last = history[-1]
    if (options.max_force_rmse is not None and last["measured_worst_force_rmse"] > options.max_force_rmse * 1.0001) or \
            (options.max_energy_rmse is not None and last["measured_worst_energy_rmse"] > options.max_energy_rmse * 1.0001):
        raise NnpqError(f"no plan from the candidate formats met the error budget on every calibration system after "
                        f"{CORRECTION_ROUNDS} corrections; the closest measured {last['measured_worst_force_rmse']:.4g} "
                        f"kcal/mol/Å and {last['measured_worst_energy_rmse']:.4g} kcal/mol/atom on its worst system at "
                        f"{last['bytes'] / 1e6:.2f} MB: loosen the budget or allow more precise --candidates")
    points = frontier(table, evaluator, progress=progress)
    chosen = measure(table, evaluator, allocation, "mixed", "chosen")
    files = [
        write_text_atomic(out_dir / "sensitivity.json", json.dumps(to_jsonable(table.to_dict()), indent=2)),
        write_text_atomic(out_dir / "sensitivity.csv", sensitivity_csv(table)),
        sensitivity_heatmap(table, out_dir / "sensitivity.png"),
        write_text_atomic(out_dir / "frontier.json", json.dumps(
            to_jsonable({"points": [p.to_dict() for p in points], "chosen": chosen.to_dict()}), indent=2)),
        frontier_plot(points, out_dir / "frontier.png", chosen, f"{name}: size vs force error (calibration set)"),
    ]
    budget = {"max_force_rmse": options.max_force_rmse, "max_energy_rmse": options.max_energy_rmse,
              "max_bytes": options.max_bytes, "objective": options.objective, "corrections": history,
              "solver": allocation.solver,
              "proxy_spearman": table.proxy_rank_correlation(),
              "frontier_beats_every_uniform_plan": dominates_uniform(points),
              "choice": {f"{e}/{layer}": label for (e, layer), label in sorted(allocation.choice.items())}}
    if cost is not None:
        budget["latency"] = {"mode": options.latency_mode, "atoms_per_element": 200,
                             "predicted_ms": sum(cost[u][label] for u, label in allocation.choice.items()),
                             "table_ms": {f"{e}/{layer}": row for (e, layer), row in sorted(cost.items())}}
    description = "mixed per (element, layer) under " + ", ".join(
        f"{k}={v}" for k, v in (("force RMSE", options.max_force_rmse), ("energy RMSE", options.max_energy_rmse),
                                ("size", options.max_bytes and f"{options.max_bytes / 1e6:.1f} MB")) if v)
    text = format_frontier(points) + "\n" + format_frontier([chosen]).splitlines()[-1]
    return allocation.to_plan(table, description), budget, text, files


def sensitivity_csv(table) -> str:
    fields = ["element", "layer", "format", "bytes", "force_rmse", "force_mse", "energy_rmse_per_atom",
              "energy_mse_per_atom", "proxy"]
    rows = [",".join(fields)] + [",".join(str(getattr(e, f)) for f in fields) for e in table.entries]
    return "\n".join(rows) + "\n"


def quantize_to_file(model_name: str, output: str | os.PathLike, options: QuantizeOptions = QuantizeOptions(),
                     progress: bool = False) -> QuantizeResult:
    """Quantize a published ANI model, measure it against FP32 on held-out data, write the ``.nnpq`` file."""
    start = time.perf_counter()
    spec = model_spec(model_name)
    output = Path(output)
    if output.suffix != ".nnpq":
        raise NnpqError(f"output '{output}' should end in .nnpq, e.g. {spec.name}-w8.nnpq")
    fp32 = load_fp32(spec.name, neighborlist="cell_list")
    overhead = file_overhead_bytes(fp32)
    if options.max_bytes is not None:
        # before calibrating: the estimate's codes are rounded to nearest, and GPTQ's code up to ~5%
        # smaller, so only budgets clearly below it are refused here (the allocation checks exactly)
        smallest = smallest_bytes(options.candidates, fp32) + overhead
        if options.max_bytes < 0.95 * smallest:
            raise NnpqError(f"no plan fits in {options.max_bytes / 1e6:.2f} MB; the smallest possible file with "
                            f"these formats is about {smallest / 1e6:.2f} MB")
    reference_potential = ANIPotential(fp32, spec.name, spec.name)
    calib = build_calibration_set(reference_potential, options.calibration, progress)
    domain = Domain(aev_maxima(spec.name, calib.calibration), tuple(fp32.symbols))
    out_dir = Path(options.report_dir) if options.report_dir else output.with_name(output.stem + "-report")
    budget, frontier_text, files = {}, "", []
    if options.has_budget:
        if options.max_bytes is not None:  # the budget is for the whole file
            options = dataclasses.replace(options, max_bytes=options.max_bytes - overhead)
        plan, budget, frontier_text, files = _choose_plan(fp32, spec.name, calib, options, out_dir, progress)
    else:
        plan = coverage_plan(options.weight, options.activation, options.rounding.method, domain.coverage(),
                             options.min_coverage, options.later)
    require_known_elements(plan, spec.symbols)
    seed = options.calibration.seed
    # a budget holds on the plan as measured: its units rounded alone on FP32 statistics. Rounding them in
    # sequence instead compensates calibration errors but moves unseen molecules (at 10 MB, seed 2: chloral
    # 1.07x int8/channel RTN in sequence, 0.80x as measured; median 0.32 vs 0.31)
    quantized = quantize_model(fp32, plan, options.rounding, calib.calibration, seed, sequential=not options.has_budget)

    reference = {"holdout": outputs_on(reference_potential, calib.holdout),
                 "chemistry": outputs_on(reference_potential, calib.chemistry)}
    heldout = {}
    refit_loss: list[float] = []
    nbytes = stored_tensor_bytes(quantized, plan)
    if options.refit.steps > 0:
        heldout["before refit"] = _heldout_row(quantized, plan, nbytes, calib, reference, output.name, spec.name)
        refit_loss = refit(quantized, spec.name, calib.calibration, outputs_on(reference_potential, calib.calibration),
                           options.refit, progress, seed)
    # the fast runtime mode (INT8 layer 0, bfloat16 later layers) of the same weights, as it will run
    fast = runtime_from_tensors(spec.name, plan, quantized.state_dict(), output.name, mode="fast")
    heldout = {"this plan": _heldout_row(quantized, plan, nbytes, calib, reference, output.name, spec.name),
               "this plan, fast mode": _heldout_row(fast, plan, nbytes, calib, reference, output.name, spec.name),
               **heldout}
    if options.baselines:
        for name, fmt, activation, method in BASELINES:
            rounding = RoundingSettings(method, options.rounding.force_weight, damp=options.rounding.damp)
            baseline = uniform_plan(fmt, activation=activation, rounding=method)
            model = quantize_model(fp32, baseline, rounding, calib.calibration, seed)
            heldout[name] = _heldout_row(model, baseline, stored_tensor_bytes(model, baseline), calib, reference,
                                         name, spec.name)
    # per-molecule breakdowns stay in the printed table: hundreds of entries would crowd the size budget
    stored = {name: {k: ({kk: vv for kk, vv in v.items() if kk != "per_molecule"} if k == "chemistry" else v)
                     for k, v in row.items() if k != "per_molecule"} for name, row in heldout.items()}
    metrics = {"heldout": stored, "calibration": calib.summary(), "seed": seed, "budget": budget,
               "heldout_groups": calib.heldout_groups, "coverage": domain.coverage(),
               "rounding": options.rounding.__dict__,
               "refit": {**dataclasses.asdict(options.refit), "loss_first": refit_loss[:1], "loss_last": refit_loss[-1:]}}
    save_artifact(output, quantized, plan, source_info(spec.name), metrics, domain.to_manifest())
    return QuantizeResult(
        output=output, model=spec.name, plan=plan, fp32_file_bytes=weights_path(spec.name).stat().st_size,
        artifact_bytes=output.stat().st_size, fp32_network_bytes=network_bytes(fp32),
        quantized_network_bytes=network_bytes(quantized), calibration=calib.summary(), heldout=heldout,
        budget=budget, frontier_text=frontier_text, files=files, seconds=time.perf_counter() - start,
        coverage=metrics["coverage"], heldout_groups=calib.heldout_groups)


def format_result(result: QuantizeResult) -> str:
    """The terminal summary: sizes, held-out errors of this plan beside the baselines, the frontier."""
    mb = 1e6
    lines = [
        f"{result.model} -> {result.output}  ({result.plan.description}; {result.seconds:.0f} s; {result.calibration})",
        "",
        f"{'size':<32}{'FP32':>10}{'quantized':>12}{'ratio':>8}",
        f"{'model file (MB)':<32}{result.fp32_file_bytes / mb:>10.2f}{result.artifact_bytes / mb:>12.2f}"
        f"{result.fp32_file_bytes / result.artifact_bytes:>8.2f}",
        f"{'network tensors in memory (MB)':<32}{result.fp32_network_bytes / mb:>10.2f}"
        f"{result.quantized_network_bytes / mb:>12.2f}{result.fp32_network_bytes / result.quantized_network_bytes:>8.2f}",
        "",
        "errors vs FP32: held-out frames of calibrated systems (MD at 300 K and 600 K, displaced, compressed), and",
        "held-out chemistry: molecules with functional groups calibration never saw ("
        + (", ".join(result.heldout_groups) or "none") + ")",
        f"{'':<20}{'':>8}{'---------- in distribution ----------':>45}{'--------- held-out chemistry ----------':>45}",
        f"{'plan':<20}{'size MB':>8}{'F RMSE':>12}{'water-box':>11}{'sfcl-sulf.':>11}{'|dE|/atom':>11}"
        f"{'F RMSE':>12}{'worst mol.':>11}{'|dE|/atom':>11}{'max|dE|/at':>11}",
        f"{'':<20}{'':>8}{'kcal/mol/Å':>12}{'':>11}{'':>11}{'kcal/mol':>11}{'kcal/mol/Å':>12}{'':>11}{'kcal/mol':>11}"
        f"{'kcal/mol':>11}",
    ]
    for name, e in result.heldout.items():
        per = e["per_source"]
        water, sfcl = (f"{per[k]['force_rmse']:>11.4f}" if k in per else f"{'n/a':>11}"
                       for k in ("water-box", "sfcl-sulfonamide"))
        chem = e.get("chemistry")
        chem_text = (f"{chem['force_rmse']:>12.4f}{max(v['force_rmse'] for v in chem['per_molecule'].values()):>11.4f}"
                     f"{chem['energy_mae_per_atom']:>11.5f}{chem['energy_max_per_atom']:>11.5f}") if chem else f"{'n/a':>12}"
        lines.append(f"{name:<20}{e['bytes'] / mb:>8.2f}{e['force_rmse']:>12.4f}{water}{sfcl}"
                     f"{e['energy_mae_per_atom']:>11.5f}{chem_text}")
    ours = result.heldout["this plan"]
    lines.append(f"(RMS FP32 force on these configurations: {ours['force_rms_ref']:.1f} kcal/mol/Å in distribution"
                 + (f", {ours['chemistry']['force_rms_ref']:.1f} on held-out chemistry)" if "chemistry" in ours else ")"))
    lines.append("this plan by kind of held-out configuration: " + "; ".join(
        f"{kind} {v['force_rmse']:.4f} kcal/mol/Å, {v['energy_mae_per_atom']:.5f} kcal/mol/atom (n={v['n_configurations']})"
        for kind, v in sorted(ours["per_kind"].items())))
    # the baselines a plan of its size must beat: int8/g32 by default, per-channel INT8 under a size budget
    for baseline in ("int8/g32/asym RTN",) + (("int8/channel RTN",) if result.budget.get("max_bytes") else ()):
        rtn = result.heldout.get(baseline, {}).get("chemistry")
        if "chemistry" in ours and rtn:
            worse = sorted(m for m, v in ours["chemistry"]["per_molecule"].items()
                           if v["force_rmse"] > rtn["per_molecule"][m]["force_rmse"])
            lines.append(f"held-out chemistry molecules where this plan errs more than {baseline}: "
                         + (", ".join(m.split(":", 1)[-1] for m in worse) if worse else "none"))
    if result.coverage:
        lines.append("calibration coverage of the first layer's inputs (AEV features excited, per element network): "
                     + ", ".join(f"{e} {100 * c['excited_fraction']:.1f}%" for e, c in result.coverage.items()))
        for element, c in result.coverage.items():
            if c["never_excited_blocks"]:
                lines.append(f"  {element} never sees: " + ", ".join(
                    f"{block} ({n})" for block, n in sorted(c["never_excited_blocks"].items())))
    if result.frontier_text:
        lines += ["", "size/force-error frontier on the calibration set (mixed plans vs uniform plans):",
                  result.frontier_text]
    if result.budget:
        lines.append(f"\nbudget: predicted vs measured per correction round: {result.budget['corrections']}")
        lines.append(f"proxy (force-tangent weight error) vs measured sensitivity, Spearman rank correlation: "
                     f"{result.budget['proxy_spearman']:.3f}")
        if "latency" in result.budget:
            lat = result.budget["latency"]
            lines.append(f"latency objective ({lat['mode']} mode, timed here with {lat['atoms_per_element']} atoms of each "
                         f"element): the hidden layers' weight preparation and products predicted at "
                         f"{lat['predicted_ms']:.1f} ms per call; choice: "
                         + ", ".join(f"{u} {c}" for u, c in result.budget["choice"].items()))
    if result.files:
        lines.append("files: " + ", ".join(str(f) for f in result.files))
    return "\n".join(lines)
