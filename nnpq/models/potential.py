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
    def cutoff(self) -> float:
        """The model's range, Angstrom: the radial cutoff of its AEV computer (5.1 for ANI-2x)."""
        from nnpq.models.domain import aev_model

        return float(aev_model(self.model_name).potentials["nnp"].aev_computer.radial.cutoff)

    @torch.jit.unused
    def check_elements(self, numbers: np.ndarray) -> np.ndarray:
        """Raise `NnpqError` unless ``numbers`` is a non-empty 1-D integer array of elements the model has."""
        numbers = np.asarray(numbers)
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
        return numbers

    @torch.jit.unused
    def check_cell(self, cell: np.ndarray) -> None:
        """Raise `NnpqError` unless ``cell`` (rows, Angstrom) is finite, non-degenerate and at least twice
        the cutoff wide in every direction, so each atom sees each neighbour once (minimum image)."""
        cell = np.asarray(cell, dtype=np.float64)
        if cell.shape != (3, 3) or not np.all(np.isfinite(cell)) or abs(np.linalg.det(cell)) < 1e-6:
            raise NnpqError("periodic cell must be a finite, non-degenerate 3x3 matrix in Angstrom")
        widths = cell_widths(cell)
        narrow = int(np.argmin(widths))
        minimum = 2.0 * self.cutoff()
        if widths[narrow] < minimum:
            raise NnpqError(
                f"periodic cell is {widths[narrow]:.2f} Å wide along cell vector {'abc'[narrow]}, less than twice "
                f"the {self.cutoff():g} Å cutoff of {self.label} ({minimum:.2f} Å); use a larger box, e.g. "
                "replicate the cell"
            )

    @torch.jit.unused
    def check_inputs(self, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray | None = None) -> None:
        """Raise `NnpqError` for elements the model lacks, bad shapes or non-finite values, a periodic
        cell narrower than twice the cutoff, or atoms closer than `MIN_DISTANCE` Angstrom."""
        numbers = self.check_elements(numbers)
        positions = np.asarray(positions)
        if positions.shape != (len(numbers), 3):
            raise NnpqError(f"positions have shape {positions.shape}; expected ({len(numbers)}, 3) in Angstrom")
        if not np.all(np.isfinite(positions)):
            raise NnpqError("positions contain NaN or infinite values; check the input structure")
        if cell is not None:
            self.check_cell(cell)
        close = closest_pair(positions, cell, MIN_DISTANCE)
        if close is not None:
            i, j, distance = close
            raise NnpqError(f"atoms {i} and {j} are {distance:.3f} Å apart, closer than the {MIN_DISTANCE} Å any "
                            "real structure has; check the input structure (duplicated atoms, or positions in nm "
                            "instead of Å?)")


MIN_DISTANCE = 0.5  # Angstrom: far below any bond (H-H 0.74); closer atoms mean a broken input


def cell_widths(cell: np.ndarray) -> np.ndarray:
    """Perpendicular widths of a cell (rows are the cell vectors), same unit as ``cell``."""
    cell = np.asarray(cell, dtype=np.float64)
    volume = abs(np.linalg.det(cell))
    return np.array([volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)])


def closest_pair(positions: np.ndarray, cell: np.ndarray | None, within: float) -> tuple[int, int, float] | None:
    """The two atoms nearest each other if closer than ``within`` (minimum image when periodic), else ``None``.

    A k-d tree over the atoms, plus, in a periodic cell (any shape, at least ``2 * within`` wide), the
    periodic images of atoms within ``within`` of a face: O(N log N), ~0.1 s for 15,000 atoms.
    """
    from scipy.spatial import cKDTree

    points = np.asarray(positions, dtype=np.float64)
    owner = np.arange(len(points))
    if cell is not None:
        cell = np.asarray(cell, dtype=np.float64)
        frac = points @ np.linalg.inv(cell)
        frac -= np.floor(frac)
        points = frac @ cell
        margin = within / cell_widths(cell)
        images, owners = [points], [owner]
        for shift in np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1])).reshape(3, -1).T:
            if not shift.any():
                continue
            near = np.all((shift == 0) | ((shift == 1) & (frac < margin)) | ((shift == -1) & (frac > 1 - margin)),
                          axis=1)
            images.append(points[near] + shift @ cell)
            owners.append(owner[near])
        points, owner = np.concatenate(images), np.concatenate(owners)
    pairs = cKDTree(points).query_pairs(within, output_type="ndarray")
    pairs = pairs[owner[pairs[:, 0]] != owner[pairs[:, 1]]]
    if not len(pairs):
        return None
    distances = np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1)
    best = int(np.argmin(distances))
    i, j = sorted(owner[pairs[best]].tolist())
    return i, j, float(distances[best])


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
    """Energy (Hartree) and forces (Hartree/Angstrom, ``(N, 3)`` float64) of one configuration,
    computed on the device the potential's tensors are on."""
    potential.check_inputs(numbers, positions, cell)
    device = potential.self_energies.device
    pos = torch.tensor(np.asarray(positions), dtype=torch.float64, device=device, requires_grad=True)
    z = torch.tensor(np.asarray(numbers), dtype=torch.long, device=device)
    box = None if cell is None else torch.tensor(np.asarray(cell), dtype=torch.float64, device=device)
    energy = potential(z, pos, box)
    (grad,) = torch.autograd.grad(energy, pos)
    return float(energy.detach()), -grad.cpu().numpy()
