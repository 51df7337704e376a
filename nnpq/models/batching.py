"""Evaluate many configurations at once: non-periodic molecules go through TorchANI in padded
batches (one call for hundreds of small molecules instead of one each), periodic ones alone."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from nnpq.structures import Configuration

MAX_PADDED_ATOMS = 8192  # rows of a padded batch (molecules x largest molecule)


def batches(configs: Sequence[Configuration], max_padded_atoms: int = MAX_PADDED_ATOMS) -> Iterator[list[int]]:
    """Indices of ``configs`` in evaluation groups: each periodic configuration alone, the
    non-periodic ones in size order, packed while molecules x largest stays within the limit."""
    order = sorted(range(len(configs)), key=lambda i: configs[i].n_atoms)
    group: list[int] = []
    for i in order:
        if configs[i].cell is not None:
            yield [i]
            continue
        if group and (len(group) + 1) * configs[i].n_atoms > max_padded_atoms:
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def padded(configs: Sequence[Configuration], indices: list[int], dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, N)`` atomic numbers (-1 padding) and ``(B, N, 3)`` positions (Å) of non-periodic configurations."""
    n = max(configs[i].n_atoms for i in indices)
    numbers = torch.full((len(indices), n), -1, dtype=torch.long)
    positions = torch.zeros(len(indices), n, 3, dtype=dtype)
    for row, i in enumerate(indices):
        c = configs[i]
        numbers[row, :c.n_atoms] = torch.as_tensor(np.asarray(c.numbers), dtype=torch.long)
        positions[row, :c.n_atoms] = torch.as_tensor(np.asarray(c.positions), dtype=dtype)
    return numbers, positions


def atomic_energies(ani, numbers: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` atomic network energies (Hartree, self energies excluded, 0 at padding) of a padded
    batch of non-periodic molecules through a TorchANI model. TorchANI's cell list takes one
    structure at a time, so pairs come from its all-pairs search, which is per molecule."""
    from torchani.neighbors import all_pairs

    nnp = ani.potentials["nnp"]
    elem = ani.species_converter(numbers)
    neighbors = all_pairs(nnp.aev_computer.radial.cutoff, elem, positions)
    return nnp.neural_networks(elem, nnp.aev_computer.compute_from_neighbors(elem, positions, neighbors), atomic=True)
