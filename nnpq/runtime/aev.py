"""ANI atomic environment vectors (AEVs) and their neighbour lists on a fast path.

`FastAEV` computes what TorchANI 2.9's ``AEVComputer`` computes (same constants, feature
order, 0.25 radial factor, ``acos(0.95 cos)`` angle, cosine cutoffs), to float rounding, for
one structure: species ``(N,)`` element indices in model order, positions ``(N, 3)`` in Å, an
optional ``(3, 3)`` cell in Å (rows are the lattice vectors; full 3D periodicity, any
triclinic cell, atoms may lie outside it). The AEV is ``(N, F)`` in the positions' dtype:
the radial block species-major (species x radial shifts), then the angular block (triu
species pair x radial shifts x angle sections). It is differentiable with respect to the
positions through an exact hand-written vector-Jacobian product (first order).

CPU backends, fastest first:

- ``cpp``: `aev_cpu.cpp`, a C++/OpenMP cell list, forward and backward registered as torch
  ops (``torch.ops.nnpq_aev``) with a C++ autograd function, so TorchScript (openmm-torch's
  TorchForce) runs it too. Built with g++ on first use and cached by torch. In eager mode
  its neighbour list is a Verlet list (`VERLET_SKIN`), rebuilt only when an atom moved more
  than half the skin.
- ``compile``: the torch kernels below through ``torch.compile``.
- ``torch``: vectorized torch with the explicit backward (`_AEVFunction`): the reference,
  and the path on CUDA when TorchANI's cuAEV is not installed. The angle term is evaluated as
  ``cos(theta - theta_s) = c cos(theta_s) + sqrt(1 - c^2) sin(theta_s)`` (c = 0.95 cos),
  without ``acos``/``cos`` per feature.
- ``autograd``: the same forward with plain autograd. TorchScript cannot hold an
  ``autograd.Function``, so a scripted ``torch`` module runs this.

`PaddedAEV` (from `FastAEV.capture_friendly`) keeps fixed-capacity neighbour buffers (a
Verlet list with a skin, padded and masked) so that the AEV step has static shapes and can be
captured in one CUDA graph; the buffers are refilled in place and reallocated only when a
capacity is exceeded.
"""

import copy
import math
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from nnpq.errors import NnpqError
from nnpq.kernels.build import build_error, load_extension

# A padding pair points from atom 0 to itself displaced this far (Å): finite, beyond every cutoff.
_PAD_DISTANCE = 1.0e3

try:  # TorchANI's compiled CUDA AEV, when the user has built it (`ani build-extensions`)
    from torchani.csrc import CUAEV_IS_INSTALLED
except ImportError:  # pragma: no cover - torchani is a hard dependency
    CUAEV_IS_INSTALLED = False


def _unused_if_no_cuaev(fn):
    return torch.jit.export(fn) if CUAEV_IS_INSTALLED else torch.jit.unused(fn)


# ----------------------------------------------------------------------------------------
# Neighbour list (no gradients: integer indices and constant shift vectors)
# ----------------------------------------------------------------------------------------

def neighbor_pairs(positions: Tensor, cell: Optional[Tensor],
                   cutoff: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Directed pairs (i, j) with |r_j + shift - r_i| <= cutoff (Å), sorted by centre i.

    Returns ``(i, j, shift, d)``: int64 ``(P,)``, int64 ``(P,)``, the ``(P, 3)`` shift vector
    in Å that maps ``r_j`` to the image of j next to i (zero without a cell) and the distance
    ``(P,)`` in Å, all without gradient. Every unordered pair appears twice, once per
    direction. Cell list over fractional coordinates: bins at least cutoff/2 wide across their
    planes and a stencil of +-k bins that covers the cutoff, which is exact for triclinic
    cells; periodic images (also of an atom itself, in a small cell) come from the stencil.
    """
    with torch.no_grad():
        device = positions.device
        pos = positions.detach().to(torch.float64)
        margin = cutoff * (1.0 + 1e-4)
        if cell is not None:
            box = cell.detach().to(torch.float64)
            frac = pos @ torch.linalg.inv(box)
            image = torch.floor(frac)
            frac = frac - image
            pos = pos - image @ box  # wrapped into the cell
            rows = torch.arange(3, device=device)
            cross = torch.linalg.cross(box.index_select(0, (rows + 1) % 3), box.index_select(0, (rows + 2) % 3))
            heights = torch.abs(torch.linalg.det(box)) / torch.linalg.vector_norm(cross, dim=1)
        else:
            box = torch.eye(3, dtype=torch.float64, device=device)
            lo = pos.min(0).values
            heights = (pos.max(0).values - lo).clamp(min=margin) * (1.0 + 1e-6)
            frac = (pos - lo) / heights
            image = torch.zeros_like(frac)
        bins = torch.clamp(torch.floor(2.0 * heights / margin), min=1).to(torch.long)
        reach = torch.ceil(margin * bins.to(torch.float64) / heights).to(torch.long)
        b = torch.minimum(torch.floor(frac * bins).to(torch.long), bins - 1)
        cell_id = (b[:, 0] * bins[1] + b[:, 1]) * bins[2] + b[:, 2]
        counts = torch.bincount(cell_id, minlength=int(bins.prod()))
        starts = torch.cumsum(counts, 0) - counts
        order = torch.argsort(cell_id, stable=True)

        stencil = torch.cartesian_prod(torch.arange(-int(reach[0]), int(reach[0]) + 1, device=device),
                                       torch.arange(-int(reach[1]), int(reach[1]) + 1, device=device),
                                       torch.arange(-int(reach[2]), int(reach[2]) + 1, device=device))
        n_stencil = stencil.shape[0]
        nb = (b.unsqueeze(1) + stencil.unsqueeze(0)).view(-1, 3)  # one slot per (atom, stencil bin)
        if cell is not None:
            nb_image = torch.div(nb, bins, rounding_mode="floor")
            nb = nb - nb_image * bins
            valid = torch.ones(nb.shape[0], dtype=torch.bool, device=device)
        else:
            nb_image = torch.zeros_like(nb)
            valid = ((nb >= 0) & (nb < bins)).all(1)
            nb = torch.minimum(torch.clamp(nb, min=0), bins - 1)
        nb_id = (nb[:, 0] * bins[1] + nb[:, 1]) * bins[2] + nb[:, 2]
        has_image = (nb_image != 0).any(1)
        slot_shift = (nb_image.to(torch.float64) @ box).to(positions.dtype)
        pos_w = pos.to(positions.dtype)
        n_cand = counts.index_select(0, nb_id) * valid
        slot = torch.repeat_interleave(torch.arange(n_cand.shape[0], device=device), n_cand)
        local = torch.arange(slot.shape[0], device=device) - (torch.cumsum(n_cand, 0) - n_cand).index_select(0, slot)
        j = order.index_select(0, starts.index_select(0, nb_id).index_select(0, slot) + local)
        i = torch.div(slot, n_stencil, rounding_mode="floor")
        v = pos_w.index_select(0, j) - pos_w.index_select(0, i) + slot_shift.index_select(0, slot)
        d2 = (v * v).sum(1)
        keep = torch.nonzero((d2 <= cutoff * cutoff) & ((i != j) | has_image.index_select(0, slot))).view(-1)
        i, j, slot = i.index_select(0, keep), j.index_select(0, keep), slot.index_select(0, keep)
        shift_int = nb_image.index_select(0, slot) + image.index_select(0, i).to(torch.long) - image.index_select(
            0, j).to(torch.long)
        shift = (shift_int.to(torch.float64) @ box).to(positions.dtype)
        return i, j, shift, torch.sqrt(d2.index_select(0, keep))


def center_triples(centers: Tensor, n_atoms: int) -> Tuple[Tensor, Tensor]:
    """All unordered pairs (a, b), a > b, of list entries that share a centre.

    ``centers`` must be sorted. Returns indices into ``centers``, grouped by centre.
    """
    counts = torch.bincount(centers, minlength=n_atoms)
    starts = torch.cumsum(counts, 0) - counts
    n_max = int(counts.max()) if counts.numel() > 0 else 0
    local = torch.tril_indices(n_max, n_max, -1, device=centers.device)  # rows r > cols c, row-major
    n_local = torch.div(counts * (counts - 1), 2, rounding_mode="floor")
    take = torch.arange(local.shape[1], device=centers.device).unsqueeze(0) < n_local.unsqueeze(1)
    hits = torch.nonzero(take)
    owner, k = hits[:, 0], hits[:, 1]
    return starts[owner] + local[0, k], starts[owner] + local[1, k]


# ----------------------------------------------------------------------------------------
# The AEV from pair vectors: forward shared by both paths, explicit backward
# ----------------------------------------------------------------------------------------

def _cosine_cutoff(d: Tensor, cutoff: float) -> Tuple[Tensor, Tensor]:
    """0.5 cos(pi d / rc) + 0.5 and its derivative, zero beyond the cutoff (masked slots)."""
    inside = (d <= cutoff).to(d.dtype)
    arg = d * (math.pi / cutoff)
    return (0.5 * torch.cos(arg) + 0.5) * inside, (-0.5 * math.pi / cutoff) * torch.sin(arg) * inside


def aev_from_vectors(vectors: Tensor, rad_index: Tensor, tri_a: Tensor, tri_b: Tensor, tri_index: Tensor,
                     n_atoms: int, etas: Tensor, shift_r: Tensor, shift_a: Tensor, cos_sec: Tensor,
                     sin_sec: Tensor, radial_cutoff: float, angular_cutoff: float, num_species: int,
                     num_pairs: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The AEV ``(N, F)`` from directed pair vectors ``(P, 3)`` (Å) and the index lists.

    ``rad_index``: centre * species + neighbour species, per pair; ``tri_a``/``tri_b``: the
    two pairs of each triple (a centre and two of its neighbours); ``tri_index``: centre *
    species_pairs + triu pair index. ``etas`` = (radial eta, angular eta, zeta); the radial and
    angular shifts (Å) and the cos/sin of the angle sections.
    Slots beyond a cutoff contribute exactly zero (padding). Also returns what the explicit
    backward reuses: distances, radial Gaussians, the triples' radial Gaussians (no cutoff),
    their cutoff products and their angle terms.
    """
    eta_r, eta_a, zeta = etas[0], etas[1], etas[2]
    d = torch.linalg.vector_norm(vectors, dim=1)
    fc, _ = _cosine_cutoff(d, radial_cutoff)
    gauss = 0.25 * torch.exp(-eta_r * (d.unsqueeze(1) - shift_r) ** 2)  # (P, R)
    radial = torch.zeros((n_atoms * num_species, shift_r.shape[0]), dtype=d.dtype, device=d.device)
    radial = radial.index_add(0, rad_index, gauss * fc.unsqueeze(1))

    va = vectors.index_select(0, tri_a)
    vb = vectors.index_select(0, tri_b)
    da = d.index_select(0, tri_a)
    db = d.index_select(0, tri_b)
    fa, _ = _cosine_cutoff(da, angular_cutoff)
    fb, _ = _cosine_cutoff(db, angular_cutoff)
    fab = fa * fb
    c = 0.95 * (va * vb).sum(1) / torch.clamp(da * db, min=1e-10)
    s = torch.sqrt(1.0 - c * c)
    half = 0.5 * (1.0 + c.unsqueeze(1) * cos_sec + s.unsqueeze(1) * sin_sec)  # (1 + cos(theta - theta_s)) / 2
    ang = 2.0 * half ** zeta  # (T, Z)
    expo = torch.exp(-eta_a * (0.5 * (da + db).unsqueeze(1) - shift_a) ** 2)  # (T, S)
    n_feats = shift_a.shape[0] * cos_sec.shape[0]
    terms = ((expo * fab.unsqueeze(1)).unsqueeze(2) * ang.unsqueeze(1)).view(-1, n_feats)
    angular = torch.zeros((n_atoms * num_pairs, n_feats), dtype=d.dtype, device=d.device)
    angular = angular.index_add(0, tri_index, terms)
    out = torch.cat([radial.view(n_atoms, -1), angular.view(n_atoms, -1)], dim=1)
    return out, d, gauss, expo, fab, ang


def aev_vjp(grad_out: Tensor, vectors: Tensor, d: Tensor, gauss: Tensor, expo: Tensor, fab: Tensor, ang: Tensor,
            rad_index: Tensor, tri_a: Tensor, tri_b: Tensor, tri_index: Tensor, etas: Tensor, shift_r: Tensor,
            shift_a: Tensor, cos_sec: Tensor, sin_sec: Tensor, radial_cutoff: float, angular_cutoff: float,
            num_species: int) -> Tensor:
    """dE/d(pair vectors) ``(P, 3)`` from dE/dAEV ``(N, F)``: the hand-written backward of `aev_from_vectors`."""
    eta_r, eta_a, zeta = etas[0], etas[1], etas[2]
    n_rs = shift_r.shape[0]
    n_rad_cols = num_species * n_rs
    grad_out = grad_out.contiguous()

    # Radial: term = gauss * fc, d gauss / dd = -2 eta (d - shift) gauss.
    gr = grad_out[:, :n_rad_cols].reshape(-1, n_rs).index_select(0, rad_index) * gauss  # (P, R)
    fc, dfc = _cosine_cutoff(d, radial_cutoff)
    grad_d = fc * (gr * (d.unsqueeze(1) - shift_r)).sum(1) * (-2.0 * eta_r) + dfc * gr.sum(1)

    # Angular: term[s, z] = expo[s] fab ang[z], with expo = exp(-eta (mean - shift)^2).
    ga = grad_out[:, n_rad_cols:].reshape(-1, expo.shape[1], ang.shape[1]).index_select(0, tri_index)  # (T, S, Z)
    g_expo = torch.bmm(ga, ang.unsqueeze(2)).squeeze(2) * expo  # dE/d expo * expo / fab, (T, S)
    g_ang = torch.bmm(expo.unsqueeze(1), ga).squeeze(1) * fab.unsqueeze(1)  # dE/d ang, (T, Z)
    va = vectors.index_select(0, tri_a)
    vb = vectors.index_select(0, tri_b)
    da = d.index_select(0, tri_a)
    db = d.index_select(0, tri_b)
    g_fab = g_expo.sum(1)
    # d expo / d da = -eta (mean - shift) expo, the mean being (da + db) / 2
    g_mean = fab * (g_expo * (0.5 * (da + db).unsqueeze(1) - shift_a)).sum(1) * (-eta_a)
    fa, dfa = _cosine_cutoff(da, angular_cutoff)
    fb, dfb = _cosine_cutoff(db, angular_cutoff)
    inv_ab = 1.0 / torch.clamp(da * db, min=1e-10)
    cosv = (va * vb).sum(1) * inv_ab
    c = 0.95 * cosv
    s = torch.sqrt(1.0 - c * c)
    half = 0.5 * (1.0 + c.unsqueeze(1) * cos_sec + s.unsqueeze(1) * sin_sec)
    # ang = 2 half^zeta: d ang / d half = zeta ang / half; d half / d c = (cos_s - sin_s c / s) / 2
    dhalf = cos_sec - sin_sec * (c / s).unsqueeze(1)
    g_cos = (g_ang * ang / half * dhalf).sum(1) * (0.475 * zeta)  # 0.475 = 0.95 / 2
    g_da = g_mean + g_fab * dfa * fb
    g_db = g_mean + g_fab * fa * dfb
    inv_a = 1.0 / da
    inv_b = 1.0 / db
    gc = (g_cos * inv_ab).unsqueeze(1)
    grad_va = ((g_da - g_cos * cosv * inv_a) * inv_a).unsqueeze(1) * va + gc * vb
    grad_vb = ((g_db - g_cos * cosv * inv_b) * inv_b).unsqueeze(1) * vb + gc * va

    grad_v = (grad_d / d).unsqueeze(1) * vectors
    return grad_v.index_add(0, tri_a, grad_va).index_add(0, tri_b, grad_vb)


class _AEVFunction(torch.autograd.Function):
    """AEV from pair vectors with a hand-written vector-Jacobian product (first order only).

    ``kernels`` is the (forward, vjp) pair: `aev_from_vectors`/`aev_vjp` or their compiled versions.
    """

    @staticmethod
    def forward(ctx, kernels, vectors, rad_index, tri_a, tri_b, tri_index, n_atoms, etas, shift_r, shift_a, cos_sec,
                sin_sec, radial_cutoff, angular_cutoff, num_species, num_pairs):
        out, d, gauss, expo, fab, ang = kernels[0](vectors, rad_index, tri_a, tri_b, tri_index, n_atoms, etas,
                                                   shift_r, shift_a, cos_sec, sin_sec, radial_cutoff,
                                                   angular_cutoff, num_species, num_pairs)
        ctx.save_for_backward(vectors, d, gauss, expo, fab, ang, rad_index, tri_a, tri_b, tri_index, etas, shift_r,
                              shift_a, cos_sec, sin_sec)
        ctx.constants = (radial_cutoff, angular_cutoff, num_species)
        ctx.vjp = kernels[1]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_v = ctx.vjp(grad_out, *ctx.saved_tensors, *ctx.constants)
        return (None, grad_v) + (None,) * 14


_EAGER_KERNELS = (aev_from_vectors, aev_vjp)
_COMPILED_KERNELS: list = []


def compiled_kernels() -> tuple:
    """`aev_from_vectors` and `aev_vjp` through ``torch.compile`` (Inductor C++/OpenMP, dynamic shapes).

    Compiled once per process on the first call (about a minute of CPU), then reused for any size.
    """
    if not _COMPILED_KERNELS:
        _COMPILED_KERNELS.append((torch.compile(aev_from_vectors, dynamic=True), torch.compile(aev_vjp, dynamic=True)))
    return _COMPILED_KERNELS[0]


# ----------------------------------------------------------------------------------------
# The C++ kernel (aev_cpu.cpp): built on first use with torch.utils.cpp_extension, cached in
# torch's extension directory ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)
# ----------------------------------------------------------------------------------------

def load_cpp_extension(build: bool = True) -> bool:
    """Load the C++/OpenMP AEV ops (``torch.ops.nnpq_aev``), compiling them if ``build``; True on success."""
    return load_extension("nnpq_aev", Path(__file__).with_name("aev_cpu.cpp"), build)


def cpp_extension_error() -> Optional[str]:
    """Why the C++ kernel could not be built, if it could not."""
    return build_error("nnpq_aev")


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------

BACKENDS = ("auto", "cpp", "compile", "torch", "autograd")


class FastAEV(torch.nn.Module):
    """TorchANI's ANI AEV for one structure, with its own neighbour list and explicit backward.

    ``forward(species (N,) int64 element indices in model order, positions (N, 3) Å,
    cell (3, 3) Å or None) -> (N, F)`` AEV, differentiable with respect to positions.

    Backends on the CPU: ``cpp`` (C++/OpenMP kernel, the default when it builds), ``compile``
    (the torch kernels through ``torch.compile``), ``torch`` (vectorized torch, explicit
    backward: the reference), ``autograd`` (the same forward with plain autograd; what a scripted
    ``torch``/``autograd`` module runs; a scripted ``cpp`` module keeps the C++ kernel). On CUDA: TorchANI's cuAEV
    when it is installed, else the ``torch`` path.
    """

    num_species: int
    num_pairs: int
    radial_cutoff: float
    angular_cutoff: float
    backend: str
    use_cuaev: bool

    def __init__(self, radial_eta: float, radial_shifts: Tensor, radial_cutoff: float, angular_eta: float,
                 angular_zeta: float, angular_shifts: Tensor, angular_sections: Tensor, angular_cutoff: float,
                 num_species: int, triu_index: Tensor, backend: str = "auto") -> None:
        super().__init__()
        if angular_cutoff > radial_cutoff:
            raise NnpqError(f"angular cutoff {angular_cutoff} exceeds radial cutoff {radial_cutoff}: "
                            "build the AEV with angular_cutoff <= radial_cutoff")
        self.num_species = int(num_species)
        self.num_pairs = self.num_species * (self.num_species + 1) // 2
        self.radial_cutoff = float(radial_cutoff)
        self.angular_cutoff = float(angular_cutoff)
        self.use_cuaev = False
        f64 = torch.float64
        sections = angular_sections.to(f64)
        self.register_buffer("etas", torch.tensor([radial_eta, angular_eta, angular_zeta], dtype=f64))
        self.register_buffer("shift_r", radial_shifts.to(f64).clone())
        self.register_buffer("shift_a", angular_shifts.to(f64).clone())
        self.register_buffer("cos_sec", torch.cos(sections))
        self.register_buffer("sin_sec", torch.sin(sections))
        self.register_buffer("triu_index", triu_index.to(torch.long).clone())
        counts = torch.tensor([len(radial_shifts), len(angular_shifts), len(sections)], dtype=f64)
        self.register_buffer("params", torch.cat([self.etas, counts, self.shift_r, self.shift_a, self.cos_sec,
                                                  self.sin_sec]))
        self.out_dim = self.num_species * len(radial_shifts) + self.num_pairs * len(angular_shifts) * len(sections)
        self.backend = "torch"
        self.set_backend(backend)

    @torch.jit.unused
    def set_backend(self, backend: str) -> None:
        """Choose the CPU backend (see the class docstring); ``auto`` is ``cpp`` if it builds, else ``torch``."""
        if backend not in BACKENDS:
            raise NnpqError(f"unknown AEV backend {backend!r}: use one of {', '.join(BACKENDS)}")
        if backend in ("auto", "cpp"):
            if load_cpp_extension():
                backend = "cpp"
            elif backend == "cpp":
                raise NnpqError(f"the C++ AEV kernel did not build ({cpp_extension_error()}): install g++ or use "
                                "backend='torch'")
            else:
                backend = "torch"
        self.backend = backend
        # TorchScript compiles per class: only `_CppFastAEV`, whose instances exist once the ops are
        # loaded, holds a scriptable method that calls them.
        self.__class__ = _CppFastAEV if backend == "cpp" else FastAEV

    @classmethod
    def from_torchani(cls, aev_computer: torch.nn.Module, backend: str = "auto") -> "FastAEV":
        """Copy the constants of a TorchANI 2.9 ``AEVComputer`` (ANI radial/angular terms, cosine cutoff)."""
        from torchani.aev._terms import ANIAngular, ANIRadial
        from torchani.cutoffs import CutoffCosine

        radial, angular = aev_computer.radial, aev_computer.angular
        if type(radial) is not ANIRadial or type(angular) is not ANIAngular:
            raise NnpqError(f"FastAEV supports TorchANI's ANIRadial/ANIAngular terms, got "
                            f"{type(radial).__name__}/{type(angular).__name__}: use the pyaev AEVComputer")
        if not (isinstance(radial.cutoff_fn, CutoffCosine) and isinstance(angular.cutoff_fn, CutoffCosine)):
            raise NnpqError("FastAEV supports the cosine cutoff only: build the model with cutoff_fn='cosine'")
        module = cls(float(radial.eta.item()), radial.shifts.detach().cpu(), float(radial.cutoff),
                     float(angular.eta.item()), float(angular.zeta.item()), angular.shifts.detach().cpu(),
                     angular.sections.detach().cpu(), float(angular.cutoff), int(aev_computer.num_species),
                     aev_computer.triu_index.detach().cpu(), backend)
        if CUAEV_IS_INSTALLED:
            cuaev = copy.deepcopy(aev_computer)
            cuaev.set_strategy("cuaev")
            module.cuaev = cuaev
            module.use_cuaev = True
        return module

    def capture_friendly(self, pair_capacity: Optional[int] = None, triple_capacity: Optional[int] = None,
                         skin: float = 0.5) -> "PaddedAEV":
        """The same AEV over fixed-capacity, padded neighbour buffers (Verlet list, skin in Å)."""
        return PaddedAEV(self, pair_capacity, triple_capacity, skin)

    def index_lists(self, species: Tensor, i: Tensor, j: Tensor, d: Tensor,
                    angular_cutoff: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-pair radial rows and per-triple pairs and angular rows, from a sorted directed list."""
        rad_index = i * self.num_species + species.index_select(0, j)
        ang = torch.nonzero(d <= angular_cutoff).view(-1)
        ta, tb = center_triples(i.index_select(0, ang), species.shape[0])
        tri_a = ang.index_select(0, ta)
        tri_b = ang.index_select(0, tb)
        sa = species.index_select(0, j.index_select(0, tri_a))
        sb = species.index_select(0, j.index_select(0, tri_b))
        tri_index = i.index_select(0, tri_a) * self.num_pairs + self.triu_index[sa, sb]
        return rad_index, tri_a, tri_b, tri_index

    def check_inputs(self, species: Tensor, positions: Tensor, cell: Optional[Tensor]) -> None:
        """One-line errors for shapes the AEV cannot take."""
        if species.dim() != 1 or positions.shape != (species.shape[0], 3):
            raise NnpqError(f"FastAEV takes species (N,) and positions (N, 3) for one structure, got "
                            f"{list(species.shape)} and {list(positions.shape)}")
        if cell is not None and cell.shape != (3, 3):
            raise NnpqError(f"cell must be (3, 3) in Å with lattice vectors as rows, got {list(cell.shape)}")

    def compute(self, species: Tensor, positions: Tensor, vectors: Tensor, rad_index: Tensor, tri_a: Tensor,
                tri_b: Tensor, tri_index: Tensor) -> Tensor:
        """The AEV from pair vectors and index lists with the torch kernels (explicit backward in eager mode)."""
        n_atoms = species.shape[0]
        dt = positions.dtype
        etas, shift_r, shift_a = self.etas.to(dt), self.shift_r.to(dt), self.shift_a.to(dt)
        cos_sec, sin_sec = self.cos_sec.to(dt), self.sin_sec.to(dt)
        if torch.jit.is_scripting() or self.backend == "autograd":
            return aev_from_vectors(vectors, rad_index, tri_a, tri_b, tri_index, n_atoms, etas, shift_r, shift_a,
                                    cos_sec, sin_sec, self.radial_cutoff, self.angular_cutoff, self.num_species,
                                    self.num_pairs)[0]
        return self._explicit(vectors, rad_index, tri_a, tri_b, tri_index, n_atoms, etas, shift_r, shift_a, cos_sec,
                              sin_sec)

    @torch.jit.unused
    def _explicit(self, vectors: Tensor, rad_index: Tensor, tri_a: Tensor, tri_b: Tensor, tri_index: Tensor,
                  n_atoms: int, etas: Tensor, shift_r: Tensor, shift_a: Tensor, cos_sec: Tensor,
                  sin_sec: Tensor) -> Tensor:
        kernels = compiled_kernels() if self.backend == "compile" else _EAGER_KERNELS
        return _AEVFunction.apply(kernels, vectors, rad_index, tri_a, tri_b, tri_index, n_atoms, etas, shift_r,
                                  shift_a, cos_sec, sin_sec, self.radial_cutoff, self.angular_cutoff,
                                  self.num_species, self.num_pairs)

    @torch.jit.unused
    def _cpp_forward(self, species: Tensor, positions: Tensor, cell: Optional[Tensor]) -> Tensor:
        raise NnpqError("the C++ AEV kernel is not loaded: use FastAEV(..., backend='cpp')")

    @_unused_if_no_cuaev
    def _cuaev_forward(self, species: Tensor, positions: Tensor, cell: Optional[Tensor]) -> Tensor:
        pbc: Optional[Tensor] = None
        if cell is not None:
            pbc = torch.ones(3, dtype=torch.bool, device=positions.device)
        return self.cuaev(species.unsqueeze(0), positions.unsqueeze(0), cell, pbc)[0]

    def forward(self, species: Tensor, positions: Tensor, cell: Optional[Tensor] = None) -> Tensor:
        self.check_inputs(species, positions, cell)
        if positions.is_cuda:
            if self.use_cuaev:
                return self._cuaev_forward(species, positions, cell)
        elif self.backend == "cpp":
            return self._cpp_forward(species, positions, cell)
        i, j, shift, d = neighbor_pairs(positions, cell, self.radial_cutoff)
        rad_index, tri_a, tri_b, tri_index = self.index_lists(species, i, j, d, self.angular_cutoff)
        vectors = positions.index_select(0, j) - positions.index_select(0, i) + shift
        return self.compute(species, positions, vectors, rad_index, tri_a, tri_b, tri_index)


VERLET_SKIN = 0.5  # Å beyond the radial cutoff kept in the C++ path's neighbour list


class _CppFastAEV(FastAEV):
    """`FastAEV` whose CPU path is the C++ kernel (``torch.ops.nnpq_aev``), also under TorchScript.

    In eager mode the neighbour list is a Verlet list: pairs within the radial cutoff plus
    `VERLET_SKIN`, rebuilt only when an atom moved more than half the skin or the cell or atom
    count changed (the kernels skip pairs beyond each cutoff, so the AEV is unchanged). Under
    TorchScript the list is rebuilt every call.
    """

    def _cpp_forward(self, species: Tensor, positions: Tensor, cell: Optional[Tensor]) -> Tensor:
        if torch.jit.is_scripting():
            offsets, nbr, shift = torch.ops.nnpq_aev.neighbors(positions, cell, self.radial_cutoff)
        else:
            offsets, nbr, shift = self._verlet_neighbors(positions, cell)
        counts = offsets[1:] - offsets[:-1]
        centers = torch.repeat_interleave(torch.arange(species.shape[0], device=positions.device), counts)
        vectors = positions.index_select(0, nbr) - positions.index_select(0, centers) + shift
        return torch.ops.nnpq_aev.aev(vectors, offsets, nbr, species, self.params, self.triu_index,
                                      self.radial_cutoff, self.angular_cutoff)

    @torch.jit.unused
    def _verlet_neighbors(self, positions: Tensor, cell: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        pos = positions.detach()
        kept = self.__dict__.get("_verlet")
        if kept is not None:
            ref_pos, ref_cell, lists = kept
            same_cell = (cell is None and ref_cell is None) or (
                cell is not None and ref_cell is not None and torch.equal(cell, ref_cell))
            if same_cell and ref_pos.shape == pos.shape and ref_pos.dtype == pos.dtype and bool(
                    ((pos - ref_pos) ** 2).sum(1).max() < (VERLET_SKIN / 2) ** 2):
                return lists
        lists = torch.ops.nnpq_aev.neighbors(pos, cell, self.radial_cutoff + VERLET_SKIN)
        self.__dict__["_verlet"] = (pos.clone(), None if cell is None else cell.detach().clone(), lists)
        return lists


class PaddedAEV(torch.nn.Module):
    """`FastAEV` over fixed-capacity neighbour buffers, for CUDA-graph capture.

    The buffers hold a Verlet list (pairs within cutoff + skin, triples within the angular
    cutoff + skin), padded with pairs of length `_PAD_DISTANCE` that every cutoff masks. They
    are refilled in place when an atom moved more than skin/2 (or the cell or species
    changed) and reallocated only when a capacity is exceeded; `update_neighbors` says when
    that happened, i.e. when a captured graph must be captured again. `compute` has static
    shapes (no host synchronisation), so it is the part a CUDA graph replays.
    """

    def __init__(self, base: FastAEV, pair_capacity: Optional[int], triple_capacity: Optional[int],
                 skin: float, headroom: float = 1.25) -> None:
        super().__init__()
        if skin < 0:
            raise NnpqError(f"skin must be >= 0 Å, got {skin}")
        self.base = base
        self.skin = float(skin)
        self.headroom = float(headroom)
        self.pair_capacity = int(pair_capacity or 0)
        self.triple_capacity = int(triple_capacity or 0)
        self.rebuilds = 0
        self.reallocations = 0
        self._ref_positions: Optional[Tensor] = None
        self._ref_cell: Optional[Tensor] = None
        self._ref_species: Optional[Tensor] = None
        self._buffers_ready = False

    def needs_rebuild(self, species: Tensor, positions: Tensor, cell: Optional[Tensor]) -> bool:
        if not self._buffers_ready or self._ref_positions is None or self._ref_positions.shape != positions.shape:
            return True
        if not torch.equal(self._ref_species, species):
            return True
        if (cell is None) != (self._ref_cell is None) or (cell is not None and not torch.equal(self._ref_cell, cell)):
            return True
        moved = (positions.detach() - self._ref_positions).square().sum(1).max()
        return bool(moved > (0.5 * self.skin) ** 2) if self.skin > 0 else bool(moved > 0)

    def update_neighbors(self, species: Tensor, positions: Tensor, cell: Optional[Tensor] = None) -> bool:
        """Refill the buffers if needed; True when they were reallocated (recapture any graph)."""
        if not self.needs_rebuild(species, positions, cell):
            return False
        base = self.base
        i, j, shift, d = neighbor_pairs(positions, cell, base.radial_cutoff + self.skin)
        rad_index, tri_a, tri_b, tri_index = base.index_lists(species, i, j, d, base.angular_cutoff + self.skin)
        n_pairs, n_triples = i.shape[0], tri_a.shape[0]
        grown = not self._buffers_ready
        if n_pairs + 1 > self.pair_capacity:  # at least one padding pair for padded triples to point at
            self.pair_capacity = int(math.ceil((n_pairs + 1) * self.headroom))
            grown = True
        if n_triples > self.triple_capacity:
            self.triple_capacity = int(math.ceil(max(n_triples, 1) * self.headroom))
            grown = True
        dev = positions.device
        if grown:
            long = dict(dtype=torch.long, device=dev)
            self.pair_i = torch.zeros(self.pair_capacity, **long)
            self.pair_j = torch.zeros(self.pair_capacity, **long)
            self.shift = torch.zeros(self.pair_capacity, 3, dtype=positions.dtype, device=dev)
            self.rad_index = torch.zeros(self.pair_capacity, **long)
            self.tri_a = torch.zeros(self.triple_capacity, **long)
            self.tri_b = torch.zeros(self.triple_capacity, **long)
            self.tri_index = torch.zeros(self.triple_capacity, **long)
            self.reallocations += 1
        pad = self.pair_capacity - 1
        for buf, val, fill in ((self.pair_i, i, 0), (self.pair_j, j, 0), (self.rad_index, rad_index, 0),
                               (self.tri_a, tri_a, pad), (self.tri_b, tri_b, pad), (self.tri_index, tri_index, 0)):
            buf[: val.shape[0]].copy_(val)
            buf[val.shape[0]:].fill_(fill)
        self.shift[:n_pairs].copy_(shift)
        self.shift[n_pairs:].zero_()
        self.shift[n_pairs:, 0] = _PAD_DISTANCE
        self._ref_positions = positions.detach().clone()
        self._ref_cell = None if cell is None else cell.detach().clone()
        self._ref_species = species.detach().clone()
        self._buffers_ready = True
        self.rebuilds += 1
        return grown

    def compute(self, species: Tensor, positions: Tensor) -> Tensor:
        """The AEV from the current buffers: static shapes, capturable in a CUDA graph."""
        vectors = positions.index_select(0, self.pair_j) - positions.index_select(0, self.pair_i) + self.shift
        return self.base.compute(species, positions, vectors, self.rad_index, self.tri_a, self.tri_b, self.tri_index)

    def forward(self, species: Tensor, positions: Tensor, cell: Optional[Tensor] = None) -> Tensor:
        self.base.check_inputs(species, positions, cell)
        self.update_neighbors(species, positions, cell)
        return self.compute(species, positions)
