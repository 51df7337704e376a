"""`nnpq quantize`: FP32 model -> plan -> quantized artifact, with its error table.

Errors are measured against FP32 on every built-in system the model covers, on the
system's own configuration and on randomly displaced copies (0.1 Å), so the table is
not only about one minimum-energy geometry.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchani

from nnpq.artifact import save_artifact
from nnpq.errors import NnpqError
from nnpq.models import ANIPotential, load_fp32, model_spec
from nnpq.models.fp32 import file_sha256, weights_path
from nnpq.quant.apply import quantize_model
from nnpq.quant.plan import QuantPlan, default_plan, require_known_elements
from nnpq.systems import get_system, list_systems
from nnpq.validation.evaluate import compare_models, perturbed_frames

N_FRAMES = 4


@dataclass
class QuantizeResult:
    """What `quantize_to_file` produced: the file, sizes in bytes and per-system errors."""

    output: Path
    model: str
    plan: QuantPlan
    fp32_file_bytes: int
    artifact_bytes: int
    fp32_network_bytes: int
    quantized_network_bytes: int
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def network_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the element networks (weights, scales, biases) of an ANI model."""
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if "neural_networks" in k)


def evaluate_on_systems(fp32: ANIPotential, quantized: ANIPotential, systems: list[str] | None = None,
                        progress: bool = False) -> dict[str, dict[str, Any]]:
    """Energy error per atom (kcal/mol) and force RMSE (kcal/mol/Å) on the built-in systems."""
    from tqdm import tqdm

    supported = set(fp32.supported_numbers.tolist())
    names = systems or list_systems()
    results: dict[str, dict[str, Any]] = {}
    for name in tqdm(names, desc="evaluating", unit="system", disable=not progress):
        system = get_system(name)
        if not set(system.atomic_numbers.tolist()) <= supported:
            continue  # e.g. the S/F/Cl molecule under ANI-1x
        frames = perturbed_frames(system.positions, N_FRAMES, sigma=0.1, seed=0)
        errors = compare_models(fp32, quantized, system.atomic_numbers, frames, system.box, units="kcal")
        results[name] = {
            "n_atoms": system.n_atoms,
            "n_frames": N_FRAMES,
            "energy_mae_per_atom_kcal_mol": errors["energy"]["energy_mae_per_atom"],
            "force_rmse_kcal_mol_A": errors["force"]["force_rmse"],
            "force_rms_ref_kcal_mol_A": errors["force"]["force_rms_ref"],
            "force_max_abs_kcal_mol_A": errors["force"]["force_max_abs"],
        }
    return results


def quantize_to_file(model_name: str, output: str | os.PathLike, plan: QuantPlan | None = None,
                     systems: list[str] | None = None, progress: bool = False) -> QuantizeResult:
    """Quantize a published ANI model, measure it against FP32, and write the ``.nnpq`` file."""
    start = time.perf_counter()
    spec = model_spec(model_name)
    plan = plan or default_plan()
    require_known_elements(plan, spec.symbols)
    output = Path(output)
    if output.suffix != ".nnpq":
        raise NnpqError(f"output '{output}' should end in .nnpq, e.g. {spec.name}-w8.nnpq")
    fp32 = load_fp32(spec.name, neighborlist="cell_list")
    quantized = quantize_model(fp32, plan)
    errors = evaluate_on_systems(ANIPotential(fp32, spec.name, spec.name),
                                 ANIPotential(quantized, output.name, spec.name),
                                 systems, progress)
    source = {
        "model": spec.name,
        "title": spec.title,
        "state_dict_file": spec.state_dict_file,
        "sha256": file_sha256(weights_path(spec.name)),
        "torchani_version": torchani.__version__,
    }
    save_artifact(output, quantized, plan, source, metrics={"errors_vs_fp32": errors})
    return QuantizeResult(
        output=output, model=spec.name, plan=plan,
        fp32_file_bytes=weights_path(spec.name).stat().st_size,
        artifact_bytes=output.stat().st_size,
        fp32_network_bytes=network_bytes(fp32),
        quantized_network_bytes=network_bytes(quantized),
        errors=errors, seconds=time.perf_counter() - start,
    )


def format_result(result: QuantizeResult) -> str:
    """The terminal summary of `quantize_to_file`: sizes, then errors per system."""
    mb = 1e6
    lines = [
        f"{result.model} -> {result.output}  ({result.plan.description}; {result.seconds:.1f} s)",
        "",
        f"{'size':<28}{'FP32':>12}{'quantized':>12}{'ratio':>8}",
        f"{'model file (MB)':<28}{result.fp32_file_bytes / mb:>12.2f}{result.artifact_bytes / mb:>12.2f}"
        f"{result.fp32_file_bytes / result.artifact_bytes:>8.2f}",
        f"{'network tensors (MB)':<28}{result.fp32_network_bytes / mb:>12.2f}"
        f"{result.quantized_network_bytes / mb:>12.2f}{result.fp32_network_bytes / result.quantized_network_bytes:>8.2f}",
        "",
        f"{'system':<20}{'atoms':>6}{'|dE|/atom':>12}{'F RMSE':>12}{'F max':>12}{'F RMS FP32':>12}",
        f"{'':<20}{'':>6}{'kcal/mol':>12}{'kcal/mol/Å':>12}{'kcal/mol/Å':>12}{'kcal/mol/Å':>12}",
    ]
    for name, e in result.errors.items():
        lines.append(f"{name:<20}{e['n_atoms']:>6}{e['energy_mae_per_atom_kcal_mol']:>12.5f}"
                     f"{e['force_rmse_kcal_mol_A']:>12.4f}{e['force_max_abs_kcal_mol_A']:>12.4f}"
                     f"{e['force_rms_ref_kcal_mol_A']:>12.2f}")
    lines.append(f"(errors vs FP32 on each system's configuration and {N_FRAMES - 1} copies displaced by 0.1 Å)")
    return "\n".join(lines)
