"""`RuntimePotential`: the fused runtime behind the same interface as `nnpq.models.ANIPotential`.

Positions (Å) -> AEV (autograd) -> fused networks (hand-written backward, joined to the AEV's
autograd) -> atomic energies summed in float64 plus float64 self energies (Hartree).

Modes:
    ``exact`` (and ``fp32`` for a published model's own weights): weight-only arithmetic in
        float32; the energy is smooth and the forces are its exact gradient. TorchScript-able.
    ``fast``: layer 0 on INT8 activations and ``torch._int_mm``, per atom and AEV block
        scales. The energy is the fast-mode energy (piecewise smooth in the positions); the
        forces are the exact chain rule through the AEV of a layer-0 input gradient also
        computed in INT8: an approximation of the gradient of the ``exact`` energy surface,
        not the exact gradient of the reported fast energy. Python only (PythonForce).

Backends (`resolve_backend`): ``torch`` (torch products and the C++ kernels) on the CPU, and
``triton`` (`nnpq.runtime.triton_network`: the INT8 Triton kernels, Python only) on CUDA, where
the ``fast`` mode is W8A16 (float16 activations) instead of ``torch._int_mm``. The backend is
fixed when the runtime is built: load it with the device it will run on.
"""

import importlib.util

import torch
from torch import Tensor
from torchani.arch import ANI

from nnpq.errors import NnpqError
from nnpq.models.fp32 import assemble_architecture, model_spec
from nnpq.models.potential import Potential
from nnpq.runtime.network import FusedNetworks, build_networks
from nnpq.spec.plan import QuantPlan

MODES = ("exact", "fast")
BACKENDS = ("auto", "torch", "triton")
AEV_PREFIX = "potentials.nnp.aev_computer."


class TorchaniAEV(torch.nn.Module):
    """TorchANI's AEV computer (with its neighbour list) behind the runtime's AEV signature."""

    def __init__(self, computer: torch.nn.Module) -> None:
        super().__init__()
        self.computer = computer

    def forward(self, species: Tensor, positions: Tensor, cell: Tensor | None = None) -> Tensor:
        """``(N, K)`` float32 AEV of ``species`` (model order) at ``positions`` ``(N, 3)`` Å."""
        pbc: Tensor | None = None
        if cell is not None:
            pbc = torch.ones(3, dtype=torch.bool, device=positions.device)
        return self.computer(species.unsqueeze(0), positions.unsqueeze(0), cell, pbc)[0]


def _aev_module(computer: torch.nn.Module) -> torch.nn.Module:
    """The fast AEV (`nnpq.runtime.aev.FastAEV`) where that module exists, else TorchANI's own."""
    try:
        from nnpq.runtime.aev import FastAEV
    except ImportError:
        return TorchaniAEV(computer)
    return FastAEV.from_torchani(computer)


class RuntimePotential(Potential):
    """Energy of one configuration, Hartree (float64), from the fused runtime.

    Args:
        aev: ``(species (N,), positions (N, 3) Å, cell | None) -> (N, K)`` AEV, differentiable.
        networks: the fused element networks.
        numbers: the model's atomic numbers in model order.
        self_energies: per-element self energies, Hartree, model order.
        symbols, label, model_name, mode: as in `nnpq.models.potential.Potential`.
    """

    def __init__(self, aev: torch.nn.Module, networks: FusedNetworks, numbers: Tensor, self_energies: Tensor,
                 symbols: tuple[str, ...], label: str, model_name: str, mode: str) -> None:
        super().__init__(numbers, self_energies, symbols, label, model_name, mode)
        self.aev = aev
        self.networks = networks

    @property
    def backend(self) -> str:
        """``torch`` or ``triton`` (see `resolve_backend`)."""
        return self.networks.backend

    def forward(self, numbers: Tensor, positions: Tensor, cell: Tensor | None = None) -> Tensor:
        """Energy in Hartree (float64 scalar); positions ``(N, 3)`` Å, cell rows Å or ``None``."""
        coords, cell32 = self.wrapped_coordinates(positions, cell)
        species = self.z_to_index[numbers]
        atomic = self.networks(species, self.aev(species, coords, cell32))
        return atomic.to(torch.float64).sum() + self.self_energy(numbers)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise NnpqError(f"unknown runtime mode '{mode}'; use one of {', '.join(MODES)}")
    return mode


def resolve_backend(backend: str, device: str | torch.device = "cpu") -> str:
    """The network backend for a runtime that will run on ``device``: ``torch`` or ``triton``.

    ``auto`` is ``triton`` on CUDA when triton is importable, else ``torch``. ``triton`` on the
    CPU needs Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which
    runs the same Python path slowly: that is for tests.

    Raises:
        NnpqError: an unknown backend, or ``triton`` where it cannot run.
    """
    if backend not in BACKENDS:
        raise NnpqError(f"unknown runtime backend '{backend}'; use one of {', '.join(BACKENDS)}")
    try:
        on_cuda = torch.device(device).type == "cuda"
    except RuntimeError:
        raise NnpqError(f"unknown device '{device}'; use cpu or cuda") from None
    has_triton = importlib.util.find_spec("triton") is not None
    if backend == "auto":
        return "triton" if on_cuda and has_triton else "torch"
    if backend == "triton":
        if not has_triton:
            raise NnpqError("backend 'triton' needs the triton package (it comes with torch's CUDA wheels); "
                            "use backend='torch'")
        from nnpq.kernels.triton_int8 import INTERPRETED

        if not on_cuda and not INTERPRETED:
            raise NnpqError(f"the Triton backend runs on CUDA, not on {device}, unless TRITON_INTERPRET=1 was set "
                            "before triton was imported (tests); use device='cuda' or backend='torch'")
    return backend


def runtime_from_tensors(model_name: str, plan: QuantPlan, tensors: dict[str, Tensor], label: str,
                         neighborlist: str = "all_pairs", mode: str = "exact",
                         backend: str = "torch") -> RuntimePotential:
    """The runtime of a quantized model's tensors (as `nnpq.artifact.read_artifact` returns them);
    ``backend`` ``torch`` or ``triton`` (`resolve_backend`)."""
    check_mode(mode)
    spec = model_spec(model_name)
    ani = assemble_architecture(spec.name, neighborlist)
    computer = ani.potentials["nnp"].aev_computer
    aev_state = {k[len(AEV_PREFIX):]: v for k, v in tensors.items() if k.startswith(AEV_PREFIX)}
    computer.load_state_dict(aev_state, strict=False)
    networks = build_networks(spec.symbols, plan, tensors, mode, backend)
    return RuntimePotential(_aev_module(computer), networks, ani.atomic_numbers,
                            tensors["energy_shifter.self_energies"], spec.symbols, label, spec.name, mode)


def runtime_from_fp32(ani: ANI, model_name: str, mode: str = "exact", backend: str = "torch") -> RuntimePotential:
    """The runtime of a published FP32 TorchANI model; labelled mode ``fp32`` in ``exact`` mode."""
    check_mode(mode)
    spec = model_spec(model_name)
    networks = build_networks(spec.symbols, QuantPlan(rules=()), ani.state_dict(), mode, backend)
    return RuntimePotential(_aev_module(ani.potentials["nnp"].aev_computer), networks, ani.atomic_numbers,
                            ani.energy_shifter.self_energies, spec.symbols, spec.name, spec.name,
                            "fp32" if mode == "exact" else mode)
