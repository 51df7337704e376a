"""`ANIPotential`: one TorchScript-able energy function for FP32 and quantized ANI alike.

It takes one configuration (atomic numbers, positions in Angstrom, optional periodic
cell) and returns the energy in Hartree as float64. The per-atom network outputs are
summed in float64 and the large per-element self energies are added in float64 outside
the network: a float32 total would carry ~4 kJ/mol rounding noise on a water box, which
would swamp any drift measurement.
"""


import numpy as np
import torch
from torch import Tensor
from torchani.arch import ANI

from nnpq.errors import NnpqError


class ANIPotential(torch.nn.Module):
    """Energy of one configuration, Hartree (float64), from an ANI ensemble.

    Args:
        ani: a TorchANI ``ANI`` model (FP32 or with quantized layers); its self-energy
            shifter is switched off here and applied in float64 instead.
        label: a name for reports (``ani2x`` or the artifact's file name).
        model_name: the published FP32 model it is, or was quantized from (``ani2x``).
    """

    label: str
    model_name: str

    def __init__(self, ani: ANI, label: str, model_name: str) -> None:
        super().__init__()
        ani.set_enabled("energy_shifter", False)
        self.ani = ani
        self.label = label
        self.model_name = model_name
        numbers = ani.atomic_numbers.to(torch.long)
        z_to_index = torch.full((int(numbers.max()) + 1,), -1, dtype=torch.long)
        z_to_index[numbers] = torch.arange(len(numbers))
        self.register_buffer("z_to_index", z_to_index)
        self.register_buffer("self_energies", ani.energy_shifter.self_energies.detach().to(torch.float64))
        self.register_buffer("supported_numbers", numbers)

    def forward(self, numbers: Tensor, positions: Tensor, cell: Tensor | None = None) -> Tensor:
        """Energy in Hartree (float64 scalar).

        Args:
            numbers: ``(N,)`` atomic numbers (int64).
            positions: ``(N, 3)`` Angstrom; any float dtype, evaluated in float32.
            cell: ``(3, 3)`` periodic box vectors as rows, Angstrom, or ``None`` for vacuum.
        """
        coords = positions.to(torch.float32).unsqueeze(0)
        species = numbers.unsqueeze(0)
        pbc: Tensor | None = None
        cell32: Tensor | None = None
        if cell is not None:
            cell32 = cell.to(torch.float32)
            # the neighbour lists expect atoms inside the central cell
            frac = torch.matmul(coords, torch.linalg.inv(cell32))
            coords = coords - torch.matmul(torch.floor(frac.detach()), cell32)
            pbc = torch.ones(3, dtype=torch.bool, device=positions.device)
        atomic = self.ani((species, coords), cell=cell32, pbc=pbc, atomic=True).energies
        shift = self.self_energies[self.z_to_index[numbers]].sum()
        return atomic.to(torch.float64).sum() + shift

    @torch.jit.unused
    def batch_energies(self, numbers: Tensor, positions: Tensor) -> Tensor:
        """Energies (Hartree, float64, ``(B,)``) of a padded batch of non-periodic molecules.

        Args:
            numbers: ``(B, N)`` atomic numbers, -1 where a molecule has fewer than N atoms.
            positions: ``(B, N, 3)`` Angstrom.
        """
        from nnpq.models.batching import atomic_energies

        atomic = atomic_energies(self.ani, numbers, positions.to(torch.float32))
        real = numbers >= 0
        shift = torch.where(real, self.self_energies[self.z_to_index[numbers.clamp(min=0)]], 0.0).sum(-1)
        return torch.where(real, atomic.to(torch.float64), 0.0).sum(-1) + shift

    @torch.jit.unused
    def symbols(self) -> tuple[str, ...]:
        return self.ani.symbols

    @torch.jit.unused
    def check_inputs(self, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray | None = None) -> None:
        """Raise `NnpqError` for elements the model lacks, bad shapes or non-finite values."""
        numbers = np.asarray(numbers)
        positions = np.asarray(positions)
        if numbers.ndim != 1 or numbers.size == 0 or not np.issubdtype(numbers.dtype, np.integer):
            raise NnpqError(f"atomic numbers must be a non-empty 1-D integer array, got shape {numbers.shape} "
                            f"of {numbers.dtype}")
        supported = set(self.supported_numbers.tolist())
        bad = sorted(set(int(z) for z in numbers) - supported)
        if bad:
            from ase.data import chemical_symbols

            names = ", ".join(chemical_symbols[z] if 0 < z < len(chemical_symbols) else str(z) for z in bad)
            raise NnpqError(
                f"element(s) {names} not supported by {self.label}, which covers only "
                f"{', '.join(self.symbols())}; remove those atoms or choose a model that has them"
            )
        if positions.shape != (len(numbers), 3):
            raise NnpqError(f"positions have shape {positions.shape}; expected ({len(numbers)}, 3) in Angstrom")
        if not np.all(np.isfinite(positions)):
            raise NnpqError("positions contain NaN or infinite values; check the input structure")
        if cell is not None and (np.asarray(cell).shape != (3, 3) or not np.all(np.isfinite(cell))
                                 or abs(np.linalg.det(cell)) < 1e-6):
            raise NnpqError("periodic cell must be a finite, non-degenerate 3x3 matrix in Angstrom")


def energy_and_forces(potential: ANIPotential, numbers: np.ndarray, positions: np.ndarray,
                      cell: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Energy (Hartree) and forces (Hartree/Angstrom, ``(N, 3)`` float64) of one configuration."""
    potential.check_inputs(numbers, positions, cell)
    pos = torch.tensor(np.asarray(positions), dtype=torch.float64, requires_grad=True)
    z = torch.tensor(np.asarray(numbers), dtype=torch.long)
    box = None if cell is None else torch.tensor(np.asarray(cell), dtype=torch.float64)
    energy = potential(z, pos, box)
    (grad,) = torch.autograd.grad(energy, pos)
    return float(energy.detach()), -grad.numpy()
