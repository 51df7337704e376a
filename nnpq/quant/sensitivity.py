"""Sensitivity of the energy and forces to the precision of each (element, layer) unit.

A unit is one hidden layer of one element's network across all ensemble members. For each
unit and candidate format we round that unit alone (GPTQ on FP32 layer statistics, or
round-to-nearest), put the dequantized weights into an FP32 copy, and measure the force
and energy errors against FP32 on the calibration configurations. We also compute a cheap
proxy, the force-tangent-weighted weight error sum_m tr(dW_m T_m dW_m^T), and report how
well it ranks units against the measurement.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor
from torchani.arch import ANI

from nnpq.models import ANIPotential
from nnpq.models.fp32 import hidden_and_final_layers, n_layers
from nnpq.quant.apply import RoundingSettings, round_weight
from nnpq.spec.formats import TensorFormat
from nnpq.quant.stats import LayerStats, collect_layer_stats
from nnpq.structures import Configuration
from nnpq.units import HARTREE_TO_KCAL_MOL
from nnpq.validation.evaluate import outputs_on

Unit = tuple[str, int]  # (element, hidden layer)
LayerKey = tuple[int, str, int]

DEFAULT_CANDIDATES: tuple[TensorFormat, ...] = (
    TensorFormat("fp16"),
    TensorFormat("int", 8, "group", 32, False),
    TensorFormat("int", 8, "group", 32),
    TensorFormat("int", 6, "group", 32, False),
    # per-channel codes: a model file entropy-codes them to ~5.6 bits at INT8 (`nnpq.spec.packing`), so
    # per byte they beat every group format below 8 bits; each also comes in a damped variant
    TensorFormat("int", 8, "channel"),
    TensorFormat("int", 7, "channel"),
    TensorFormat("int", 6, "channel"),
    # wide groups for the smallest budgets: one scale per 126 AEV inputs costs 0.3 bit a weight
    TensorFormat("int", 5, "group", 128, False),
    TensorFormat("int", 4, "group", 128, False),
)
# GPTQ on a per-channel layer may move rounding error anywhere along a 1008-input row, into
# features that calibration barely excites but other molecules do: the damped variant of each
# per-channel candidate rounds without equalization (which shrinks such features' columns) and
# with 10x the damping, closer to round-to-nearest where calibration says little. The allocation
# takes it where it errs less on the worst molecule (ANI-2x at 10 MB: 1.04 vs 1.24 of int8/channel
# round-to-nearest's error, predicted).
DAMPED = 0.1
DAMPED_SUFFIX = "/damped"
# and in a round-to-nearest variant, which cannot fit calibration at all: where calibration misses
# a molecule's chemistry, any data-driven rounding can err more there than plain rounding
NEAREST_SUFFIX = "/nearest"


@dataclass(frozen=True)
class ErrorLayout:
    """Where each configuration's errors sit in the flat error vectors of `PlanEvaluator.errors`:
    force components (kcal/mol/Å) and one per-atom energy (kcal/mol/atom) per configuration, each
    with its source's index and a weight such that a source's weighted sum of squares is its MSE."""

    sources: tuple[str, ...]
    force_source: np.ndarray
    force_weight: np.ndarray
    energy_source: np.ndarray
    energy_weight: np.ndarray

    def mse(self, force: np.ndarray, energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Force and energy MSE per source (in ``sources`` order) of error vectors."""
        n = len(self.sources)
        return (np.bincount(self.force_source, self.force_weight * np.square(force, dtype=np.float64), n),
                np.bincount(self.energy_source, self.energy_weight * np.square(energy, dtype=np.float64), n))

    def mean(self, by_source: np.ndarray) -> float:
        """The mean over configurations of a per-source MSE (each configuration weighs the same)."""
        counts = np.bincount(self.energy_source, minlength=len(self.sources))
        return float(counts @ by_source / counts.sum())


class PlanEvaluator:
    """Errors of substituted weights against FP32 on a fixed configuration set, in kcal/mol(/Å).

    Holds a working FP32 copy whose Linear weights are swapped in and restored per call, so
    any combination of (already rounded) unit weights is measured without rebuilding a model.
    Each configuration weighs the same (its own mean squared force error), and errors are also
    kept per source (built-in system or user file, or with ``by_molecule`` each molecule), so
    that a 17-atom molecule with the only S, F and Cl atoms is not drowned by a 555-atom water box.
    """

    def __init__(self, fp32: ANI, configs: list[Configuration], model_name: str, by_molecule: bool = False) -> None:
        self.work = copy.deepcopy(fp32)
        self.layers = hidden_and_final_layers(self.work)
        self.originals = {k: lin.weight.detach().clone() for k, lin in self.layers.items()}
        self.potential = ANIPotential(self.work, "evaluator", model_name)
        self.configs = configs
        self.reference = outputs_on(self.potential, configs)
        source_of = [c.molecule if by_molecule else c.group for c in configs]
        self.sources = sorted(set(source_of))
        self.elements = [set(self.potential.ani.symbols[i] for i in
                             self.potential.z_to_index[torch.as_tensor(c.numbers)].tolist()) for c in configs]
        index = np.array([self.sources.index(s) for s in source_of])
        per_source = np.bincount(index, minlength=len(self.sources))
        sizes = np.array([3 * c.n_atoms for c in configs])
        self.layout = ErrorLayout(tuple(self.sources), np.repeat(index, sizes),
                                  np.repeat(1.0 / (sizes * per_source[index]), sizes), index, 1.0 / per_source[index])

    def errors(self, weights: dict[LayerKey, Tensor], elements: set[str] | None = None) -> dict:
        """Force and per-atom energy MSE/RMSE with ``weights`` in place (others FP32), overall
        (mean over configurations) and per source (``force_mse_by_source``, ``energy_mse_by_source``),
        and the errors themselves as flat float32 vectors laid out as `layout` says
        (``force_vector``, ``energy_vector``).

        Only configurations containing one of ``elements`` are recomputed (none when ``weights``
        is empty); the others are unchanged by construction.
        """
        if not weights:  # nothing substituted: zero error by construction
            elements = set()
        force_vector, energy_vector = [], []
        try:
            for key, w in weights.items():
                self.layers[key].weight.copy_(w)
            changed = [i for i, present in enumerate(self.elements) if elements is None or present & elements]
            tests = dict(zip(changed, outputs_on(self.potential, [self.configs[i] for i in changed])))
            for i, (config, ref) in enumerate(zip(self.configs, self.reference)):
                if i not in tests:
                    force_vector.append(np.zeros(3 * config.n_atoms))
                    energy_vector.append(0.0)
                    continue
                test = tests[i]
                force_vector.append(((test[1] - ref[1]) * HARTREE_TO_KCAL_MOL).reshape(-1))
                energy_vector.append((test[0] - ref[0]) * HARTREE_TO_KCAL_MOL / config.n_atoms)
        finally:
            for key in weights:
                self.layers[key].weight.copy_(self.originals[key])
        force, energy = np.concatenate(force_vector), np.array(energy_vector)
        force_by_source, energy_by_source = self.layout.mse(force, energy)
        force_mse, energy_mse = self.layout.mean(force_by_source), self.layout.mean(energy_by_source)
        by_source = dict(zip(self.sources, force_by_source.tolist()))
        return {"force_mse": force_mse, "force_rmse": float(np.sqrt(force_mse)),
                "energy_mse_per_atom": energy_mse, "energy_rmse_per_atom": float(np.sqrt(energy_mse)),
                "force_mse_by_source": by_source,
                "energy_mse_by_source": dict(zip(self.sources, energy_by_source.tolist())),
                "worst_force_rmse": float(np.sqrt(max(by_source.values()))),
                "force_vector": force.astype(np.float32), "energy_vector": energy.astype(np.float32)}


@dataclass
class SensitivityEntry:
    """One (unit, format) measurement. Sizes in bytes; errors in kcal/mol/Å and kcal/mol per atom."""

    element: str
    layer: int
    format: str
    bytes: float
    force_mse: float
    force_rmse: float
    energy_mse_per_atom: float
    energy_rmse_per_atom: float
    proxy: float
    force_mse_by_source: dict[str, float] = field(default_factory=dict)
    energy_mse_by_source: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SensitivityTable:
    """All measurements plus what is needed to assemble and measure whole plans quickly."""

    model: str
    entries: list[SensitivityEntry]
    formats: dict[str, TensorFormat]
    fixed_bytes: float  # everything outside the hidden-layer weights (biases, AEV, final layers)
    fp32_bytes: float
    equalized_layers: tuple[int, ...] = ()
    damped: dict[str, float] = field(default_factory=dict)  # label -> GPTQ damping, rounded without equalization
    nearest: tuple[str, ...] = ()  # labels rounded to nearest, without equalization
    weights: dict[tuple[Unit, str], dict[LayerKey, Tensor]] = field(default_factory=dict, repr=False)
    # each entry's force and energy error vectors (`PlanEvaluator.errors`): errors of units superpose
    vectors: dict[tuple[Unit, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    layout: ErrorLayout | None = field(default=None, repr=False)

    def units(self) -> list[Unit]:
        return sorted({(e.element, e.layer) for e in self.entries})

    def sources(self) -> list[str]:
        return sorted({s for e in self.entries for s in e.force_mse_by_source})

    def entry(self, unit: Unit, label: str) -> SensitivityEntry:
        return next(e for e in self.entries if (e.element, e.layer) == unit and e.format == label)

    def proxy_rank_correlation(self) -> float:
        """Spearman rank correlation of the proxy with measured force MSE over rounded entries."""
        rows = [(e.proxy, e.force_mse) for e in self.entries if e.format not in ("fp32",)]
        if len(rows) < 3:
            return float("nan")
        return float(spearmanr([r[0] for r in rows], [r[1] for r in rows]).statistic)

    def to_dict(self) -> dict:
        return {"model": self.model, "fixed_bytes": self.fixed_bytes, "fp32_bytes": self.fp32_bytes,
                "proxy_spearman": self.proxy_rank_correlation(),
                "formats": {k: f.to_dict() for k, f in self.formats.items()}, "damped": self.damped,
                "nearest": list(self.nearest), "entries": [e.to_dict() for e in self.entries]}


def _round_unit(weights: dict[LayerKey, Tensor], fmt: TensorFormat, stats: dict[tuple[int, str], LayerStats],
                rounding: RoundingSettings, equalize: bool, damp: float) -> tuple[dict[LayerKey, Tensor], float]:
    """The unit's weights rounded to ``fmt`` (dequantized), and the bytes a model file spends on them."""
    out, nbytes = {}, 0.0
    for key, w in weights.items():
        if not fmt.is_integer:
            out[key] = w.clone() if fmt.kind == "fp32" else \
                w.to({"fp16": torch.float16, "bf16": torch.bfloat16}[fmt.kind]).to(torch.float32)
            nbytes += fmt.bits_per_weight(w.shape[1]) / 8 * w.numel()
            continue
        qw = round_weight(w, fmt, stats.get(key[:2]), rounding, equalize, damp)
        out[key] = qw.dequantize()
        nbytes += qw.stored_bytes(fmt)
    return out, nbytes


def measure_sensitivity(fp32: ANI, model_name: str, calibration: list[Configuration],
                        candidates: tuple[TensorFormat, ...] = DEFAULT_CANDIDATES,
                        rounding: RoundingSettings = RoundingSettings(), evaluator: PlanEvaluator | None = None,
                        seed: int = 0, progress: bool = False, equalize: tuple[int, ...] = (0,)) -> SensitivityTable:
    """Measure every (element, hidden layer) unit in every candidate format on ``calibration``;
    layers in ``equalize`` are rounded with input equalization, as the plan will do. With GPTQ,
    per-channel integer candidates are also measured in their damped variant (`DAMPED`) and rounded
    to nearest."""
    from tqdm import tqdm

    evaluator = evaluator or PlanEvaluator(fp32, calibration, model_name)
    layers = hidden_and_final_layers(fp32)
    n_hidden = n_layers(fp32) - 1  # the last index is the width-1 final layer, kept FP32
    units = sorted({(e, l) for (_, e, l) in layers if l < n_hidden})
    formats = {f.label(): f for f in (TensorFormat("fp32"),) + tuple(candidates)}
    per_channel = [f for f in candidates if f.is_integer and f.granularity == "channel"] \
        if rounding.method == "gptq" else []
    damped = {f.label() + DAMPED_SUFFIX: f for f in per_channel}
    nearest = {f.label() + NEAREST_SUFFIX: f for f in per_channel}
    formats.update(damped)
    formats.update(nearest)
    fp32_bytes = float(sum(t.numel() * t.element_size() for t in fp32.state_dict().values()))
    hidden_bytes = float(sum(lin.weight.numel() * 4 for k, lin in layers.items() if k[2] < n_hidden))
    table = SensitivityTable(model_name, [], formats, fp32_bytes - hidden_bytes, fp32_bytes, tuple(equalize),
                             dict.fromkeys(damped, DAMPED), tuple(nearest), layout=evaluator.layout)
    stats_by_layer: dict[int, dict] = {}
    bar = tqdm(total=len(units) * len(formats), desc="sensitivity", unit="case", disable=not progress)
    for element, layer in units:
        if layer not in stats_by_layer:  # GPTQ and the proxy both need them
            stats_by_layer[layer] = collect_layer_stats(fp32, layer, calibration, rounding.tangents, seed + layer)
        stats = stats_by_layer[layer]
        keys = [k for k in layers if k[1] == element and k[2] == layer]
        originals = {k: layers[k].weight.detach() for k in keys}
        for label, fmt in formats.items():
            variant = table.damped.get(label)
            plain = variant is not None or label in nearest  # rounded without equalization
            rounded, nbytes = _round_unit(originals, fmt, stats,
                                          RoundingSettings("nearest") if label in nearest else rounding,
                                          layer in equalize and not plain, variant or rounding.damp)
            err = evaluator.errors(rounded if fmt.kind != "fp32" else {}, {element})
            proxy = 0.0
            for k in keys:
                if k[:2] in stats:
                    d = (rounded[k] - originals[k]).to(torch.float64)
                    proxy += float(torch.sum((d @ stats[k[:2]].tt) * d)) / max(stats[k[:2]].tangent_count, 1)
            table.entries.append(SensitivityEntry(element, layer, label, nbytes,
                                                  err["force_mse"],
                                                  err["force_rmse"], err["energy_mse_per_atom"],
                                                  err["energy_rmse_per_atom"], proxy,
                                                  err["force_mse_by_source"], err["energy_mse_by_source"]))
            table.weights[((element, layer), label)] = rounded
            table.vectors[((element, layer), label)] = (err["force_vector"], err["energy_vector"])
            bar.update(1)
    bar.close()
    return table
