"""`Potential`: one TorchScript-able energy function for FP32 and quantized ANI alike.

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


class Potential(torch.nn.Module):
    """What every nnpq potential shares: element lookup, float64 self energies, input checks.

    Subclasses implement ``forward(numbers (N,) int64, positions (N, 3) Å, cell (3, 3) Å | None)``
    returning the energy in Hartree (float64 scalar).

    Attributes:
        label: a name for reports (``ani2x`` or the artifact's file name).
        model_name: the published FP32 model it is, or was quantized from (``ani2x``).
        mode: how the network is evaluated: ``fp32``, ``exact`` or ``fast`` (see `nnpq.runtime`),
            ``reference`` for a quantized model run through TorchANI's per-member layers.
    """

    label: str
    model_name: str
    mode: str

    def __init__(self, numbers: Tensor, self_energies: Tensor, symbols: tuple[str, ...] | list[str],
                 label: str, model_name: str, mode: str) -> None:
        super().__init__()
        self.label = label
        self.model_name = model_name
        self.mode = mode
        self.symbol_names = list(symbols)
        numbers = numbers.to(torch.long)
        z_to_index = torch.full((int(numbers.max()) + 1,), -1, dtype=torch.long)
        z_to_index[numbers] = torch.arange(len(numbers))
        self.register_buffer("z_to_index", z_to_index)
        self.register_buffer("self_energies", self_energies.detach().to(torch.float64))
        self.register_buffer("supported_numbers", numbers)

    def self_energy(self, numbers: Tensor) -> Tensor:
        """Sum of the per-element self energies, Hartree, float64."""
        return self.self_energies[self.z_to_index[numbers]].sum()

    def wrapped_coordinates(self, positions: Tensor, cell: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Float32 positions (Å), moved into the central cell when periodic, and the float32 cell."""
        coords = positions.to(torch.float32)
        if cell is None:
            return coords, None
        cell32 = cell.to(torch.float32)
        # the neighbour lists expect atoms inside the central cell
        frac = torch.matmul(coords, torch.linalg.inv(cell32))
        return coords - torch.matmul(torch.floor(frac.detach()), cell32), cell32

    @torch.jit.unused
    def symbols(self) -> tuple[str, ...]:
        return tuple(self.symbol_names)

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


class ANIPotential(Potential):
    """Energy of one configuration, Hartree (float64), from a TorchANI ensemble.

    Args:
        ani: a TorchANI ``ANI`` model (FP32 or with quantized layers); its self-energy
            shifter is switched off here and applied in float64 instead.
        label: a name for reports (``ani2x`` or the artifact's file name).
        model_name: the published FP32 model it is, or was quantized from (``ani2x``).
        mode: ``fp32`` for a published model, ``reference`` for quantized layers.
    """

    def __init__(self, ani: ANI, label: str, model_name: str, mode: str = "reference") -> None:
        ani.set_enabled("energy_shifter", False)
        super().__init__(ani.atomic_numbers, ani.energy_shifter.self_energies, ani.symbols, label, model_name, mode)
        self.ani = ani

    def forward(self, numbers: Tensor, positions: Tensor, cell: Tensor | None = None) -> Tensor:
        """Energy in Hartree (float64 scalar).

        Args:
            numbers: ``(N,)`` atomic numbers (int64).
            positions: ``(N, 3)`` Angstrom; any float dtype, evaluated in float32.
            cell: ``(3, 3)`` periodic box vectors as rows, Angstrom, or ``None`` for vacuum.
        """
        coords, cell32 = self.wrapped_coordinates(positions, cell)
        pbc: Tensor | None = None
        if cell32 is not None:
            pbc = torch.ones(3, dtype=torch.bool, device=positions.device)
        atomic = self.ani((numbers.unsqueeze(0), coords.unsqueeze(0)), cell=cell32, pbc=pbc, atomic=True).energies
        return atomic.to(torch.float64).sum() + self.self_energy(numbers)


def energy_and_forces(potential: Potential, numbers: np.ndarray, positions: np.ndarray,
                      cell: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Energy (Hartree) and forces (Hartree/Angstrom, ``(N, 3)`` float64) of one configuration."""
    potential.check_inputs(numbers, positions, cell)
    pos = torch.tensor(np.asarray(positions), dtype=torch.float64, requires_grad=True)
    z = torch.tensor(np.asarray(numbers), dtype=torch.long)
    box = None if cell is None else torch.tensor(np.asarray(cell), dtype=torch.float64)
    energy = potential(z, pos, box)
    (grad,) = torch.autograd.grad(energy, pos)
    return float(energy.detach()), -grad.numpy()
