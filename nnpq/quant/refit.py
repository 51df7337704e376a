"""Refit the FP32 parameters a quantized model keeps, so its energies and forces match FP32's.

After rounding, every layer's bias and the final width-1 layers are still FP32. We fit
them by force and energy matching against the FP32 model on the calibration
configurations (full-batch Adam, forces by double backpropagation), so they absorb the
systematic part of the rounding error. Integer codes, scales and fp16 weights stay as
they are: the file keeps its size and the energy stays a smooth function of positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import torch
from torchani.arch import ANI

from nnpq.models import ANIPotential
from nnpq.models.batching import batches, padded
from nnpq.models.layers import HalfLinear, QuantizedLinear
from nnpq.structures import Configuration
from nnpq.units import HARTREE_TO_KCAL_MOL
from nnpq.validation.evaluate import Outputs


@dataclass(frozen=True)
class RefitSettings:
    """How the FP32 parameters are refit.

    Attributes:
        steps: full passes over the calibration configurations (0 turns refitting off).
        lr: Adam step; parameters are in Hartree units, where 1e-6 is 6e-4 kcal/mol.
        energy_weight: weight of the squared per-atom energy error (kcal/mol)^2 against the
            mean squared force error (kcal/mol/Å)^2; 100 weighs 0.005 kcal/mol/atom like 0.05 kcal/mol/Å.
        anchor: weight of the mean squared change of the refit parameters (in kcal/mol-scaled
            Hartree units) against the mean squared force error: the refit stays near its start.
        max_configurations: a seeded subset of at most this many calibration configurations is
            fitted (double backpropagation costs ~20x a force call; this bounds the run time).
    """

    steps: int = 30
    lr: float = 1e-6
    energy_weight: float = 100.0
    anchor: float = 1.0
    max_configurations: int = 96


def fp32_parameters(model: ANI) -> list[torch.Tensor]:
    """The tensors a refit may change: biases of every layer, weights of FP32 Linear layers."""
    params: list[torch.Tensor] = []
    for module in model.neural_networks.modules():
        if isinstance(module, (QuantizedLinear, HalfLinear)):
            params.append(module.bias)
        elif isinstance(module, torch.nn.Linear):
            params += [module.weight, module.bias]
    return params


def refit(model: ANI, model_name: str, calibration: list[Configuration], reference: Outputs,
          settings: RefitSettings = RefitSettings(), progress: bool = False, seed: int = 0) -> list[float]:
    """Fit ``model``'s FP32 parameters in place to ``reference`` (FP32 energies in Hartree,
    forces in Hartree/Å per configuration); returns the loss before each step."""
    from tqdm import tqdm

    if settings.steps <= 0 or not calibration:
        return []
    potential = ANIPotential(model, "refit", model_name)
    if len(calibration) > settings.max_configurations:
        keep = np.sort(np.random.default_rng(seed).permutation(len(calibration))[:settings.max_configurations])
        calibration, reference = [calibration[i] for i in keep], [reference[i] for i in keep]
    data = []
    for indices in batches(calibration):
        numbers, positions = padded(calibration, indices)
        first = calibration[indices[0]]
        cell = None if first.cell is None else torch.tensor(first.cell, dtype=torch.float32)
        forces_ref = torch.zeros(positions.shape, dtype=torch.float64)
        for row, i in enumerate(indices):
            forces_ref[row, :calibration[i].n_atoms] = torch.as_tensor(reference[i][1])
        energy_ref = torch.tensor([reference[i][0] for i in indices], dtype=torch.float64)
        n_atoms = torch.tensor([calibration[i].n_atoms for i in indices], dtype=torch.float64)
        data.append((numbers, positions, cell, energy_ref, forces_ref, n_atoms))
    params = fp32_parameters(model)
    start = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    history = []
    try:
        for _ in tqdm(range(settings.steps), desc="refit FP32 parameters", unit="step", disable=not progress):
            optimizer.zero_grad()
            total = 0.0
            for numbers, positions, cell, energy_ref, forces_ref, n_atoms in data:
                positions = positions.clone().requires_grad_(True)
                if cell is None:
                    energy = potential.batch_energies(numbers, positions)
                else:
                    energy = potential(numbers[0], positions[0], cell).unsqueeze(0)
                (gradient,) = torch.autograd.grad(energy.sum(), positions, create_graph=True)
                force_mse = (((-gradient - forces_ref) * HARTREE_TO_KCAL_MOL) ** 2).sum((1, 2)) / (3 * n_atoms)
                energy_mse = ((energy - energy_ref) * HARTREE_TO_KCAL_MOL / n_atoms) ** 2
                loss = (force_mse + settings.energy_weight * energy_mse).sum()
                (loss / len(calibration)).backward()
                total += float(loss.detach())
            # a pull towards the starting values keeps the refit from bending the model where
            # calibration has no data: unseen chemistry keeps what rounding gave it
            n_values = sum(p.numel() for p in params)
            anchor = sum(torch.sum((p - p0) ** 2) for p, p0 in zip(params, start)) / n_values * HARTREE_TO_KCAL_MOL**2
            (settings.anchor * anchor).backward()
            history.append(total / len(calibration))
            optimizer.step()
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return history
