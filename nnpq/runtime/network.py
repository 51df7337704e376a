"""The fused ensemble network: atomic energies and their exact gradient with respect to the AEV.

Per element, the ensemble's members run together: one wide layer-0 product (the members'
layer-0 weights stacked into ``(members * H0, K)``) and batched ``(members, out, in)`` products
for the later layers, the width-1 final layers included; the atomic energy is the mean over
members, as in TorchANI's ``Ensemble``. The backward pass is written out by hand from the
stored CELU outputs (``CELU'(z) = 1`` for ``z > 0``, else ``y / alpha + 1``), so forces need no
generic autograd graph through the network and no dequantized weight outlives its element.

Weights stay in the storage format the plan gave them (int8 codes with float32 scales, fp16,
bf16 or fp32). In the ``exact`` mode each element's weights are dequantized to float32 when
its atoms are evaluated and dropped after, so the energy is a smooth function of the AEV and
the returned gradient is its exact derivative. The ``fast`` mode (`FastElementNet`) runs
layer 0 as W8A8 on ``torch._int_mm`` (see `nnpq.kernels.cpu`). These are the ``torch``
backend; the ``triton`` backend (`nnpq.runtime.triton_network`, for CUDA) runs layer 0 on the
Triton INT8 kernels instead.
"""


import re

import torch
from torch import Tensor

from nnpq.errors import NnpqError
from nnpq.kernels.cpu import (celu_slope, cpp_kernels, dequantize_codes, dequantize_codes_torch, split_product,
                              split_rows)
from nnpq.spec.formats import TensorFormat
from nnpq.spec.plan import QuantPlan

CELU_ALPHA = 0.1  # TorchANI's TightCELU
NETWORK_PREFIX = "potentials.nnp.neural_networks.members."
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class IntWeight(torch.nn.Module):
    """Consecutive members' weights of one layer as int8 codes, stacked ``(members * out, in)``."""

    members: int
    group_size: int
    equalized: bool

    def __init__(self, qweight: Tensor, scale: Tensor, zero: Tensor | None, col_scale: Tensor | None,
                 group_size: int, members: int) -> None:
        super().__init__()
        self.members = members
        self.group_size = group_size
        self.equalized = col_scale is not None
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)  # None for symmetric formats
        self.register_buffer("col_scale", col_scale if col_scale is not None else torch.ones(1, 1))

    def dequantize(self) -> Tensor:
        col_scale = self.col_scale if self.equalized else None
        if torch.jit.is_scripting():  # TorchScript holds no Python dispatch: the plain-torch passes
            return dequantize_codes_torch(self.qweight, self.scale, self.zero, self.group_size, col_scale)
        return dequantize_codes(self.qweight, self.scale, self.zero, self.group_size, col_scale)


class DenseWeight(torch.nn.Module):
    """Consecutive members' weights of one layer in fp32, fp16 or bf16, stacked ``(members * out, in)``."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def dequantize(self) -> Tensor:
        return self.weight


class StackedLayer(torch.nn.Module):
    """One layer of one element for all members: weight blocks (members grouped by format) and biases."""

    def __init__(self, blocks: list[torch.nn.Module], bias: Tensor) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.register_buffer("bias", bias)

    def weight(self) -> Tensor:
        """The weight ``(members * out, in)`` in the biases' dtype (float32), built now and owned by the caller."""
        parts: list[Tensor] = []
        for block in self.blocks:
            parts.append(block.dequantize().to(self.bias.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


class ElementNet(torch.nn.Module):
    """The ensemble of one element: atomic energies ``(n,)`` and ``dE/dAEV`` ``(n, K)``."""

    members: int
    alpha: float

    def __init__(self, layers: list[StackedLayer], members: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.members = members
        self.alpha = CELU_ALPHA  # TorchScript reads no module-level floats

    def first_forward(self, x: Tensor, w0: Tensor) -> Tensor:
        """Layer 0's activation ``(n, members * H0)``."""
        return torch.nn.functional.celu(torch.addmm(self.layers[0].bias, x, w0.t()), self.alpha)

    def first_backward(self, dz: Tensor, w0: Tensor) -> Tensor:
        """``dE/dx`` from ``dE/dz`` of layer 0."""
        return dz.mm(w0)

    def first_input_grad(self, g: Tensor, h: Tensor, w0: Tensor) -> Tensor:
        """``dE/dx`` from ``dE/dh`` ``g`` of layer 0's activation ``h`` (both ``(n, members * H0)``)."""
        return self.first_backward(celu_slope(h, self.alpha).mul_(g), w0)

    def first_weight(self) -> Tensor:
        return self.layers[0].weight()

    def later_weights(self) -> list[Tensor]:
        """Layers 1.. as ``(members, out, in)`` float32."""
        weights: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                w = layer.weight()
                weights.append(w.view(self.members, w.shape[0] // self.members, w.shape[1]))
        return weights

    def later_biases(self) -> list[Tensor]:
        biases: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                biases.append(layer.bias.view(self.members, 1, -1))
        return biases

    def later_forward(self, y: Tensor, ws: list[Tensor], bs: list[Tensor], i: int) -> Tensor:
        """Pre-activation ``(members, n, out)`` of later layer ``i + 1`` from its input ``y``."""
        return torch.baddbmm(bs[i], y, ws[i].transpose(1, 2))

    def later_backward(self, dz: Tensor, ws: list[Tensor], i: int) -> Tensor:
        """``dE/d(input)`` of later layer ``i + 1`` from ``dE/dz`` of its output ``(members, n, out)``."""
        return torch.bmm(dz, ws[i])

    def forward(self, x: Tensor, need_grad: bool) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        w0 = self.first_weight()
        ws = self.later_weights()
        bs = self.later_biases()
        h = self.first_forward(x, w0)
        # (n, members * H0) -> (members, n, H0): each member's slice of the wide product
        ys = [h.view(n, self.members, -1).transpose(0, 1)]
        last = len(ws) - 1
        out = ys[0]
        for i in range(len(ws)):
            z = self.later_forward(ys[-1], ws, bs, i)
            if i == last:
                out = z
            else:
                ys.append(torch.nn.functional.celu(z, self.alpha))
        energies = out.sum(0).squeeze(-1) / self.members
        if not need_grad:
            return energies, x.new_zeros(0)
        # backward: dE/d(final input) is the final weight / members, for every atom
        g = (ws[last] / self.members).expand(self.members, n, ws[last].shape[2])
        for i in range(last - 1, -1, -1):
            g = self.later_backward(celu_slope(ys[i + 1], self.alpha).mul_(g), ws, i)
        return energies, self.first_input_grad(g.transpose(0, 1).reshape(n, -1), h, w0)


class SplitInt8Linear(torch.nn.Module):
    """A stacked layer 0 on ``torch._int_mm``: ``celu(x @ W.T + b)`` and the input gradient ``dz @ W``.

    Activations (and output gradients) are split into two INT8 planes per row
    (`nnpq.kernels.cpu.split_rows`, ~15 bits). The weight is used exactly as the plan stored it:
    symmetric INT8 codes with one scale per row (per-channel or per-tensor formats, no
    equalization) are one plane, two INT8 products per pass; any other format is dequantized
    once at load and split into two planes too (~15 bits), three products per pass.
    """

    alpha: float

    def __init__(self, layer: StackedLayer, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.register_buffer("bias", layer.bias)
        block = layer.blocks[0]
        if (len(layer.blocks) == 1 and isinstance(block, IntWeight) and block.zero is None and not block.equalized
                and block.group_size == block.qweight.shape[1]):
            self.register_buffer("w1", block.qweight)
            self.register_buffer("w2", None)
            self.register_buffer("w_scale", block.scale.flatten().to(torch.float32))
        else:
            codes, scale = split_rows(layer.weight())
            rows = scale.shape[0]
            self.register_buffer("w1", codes[:rows])
            self.register_buffer("w2", codes[rows:])
            self.register_buffer("w_scale", scale.flatten())

    @property
    def products(self) -> int:
        """INT8 products per pass (forward or backward)."""
        return 2 if self.w2 is None else 3

    def forward(self, x: Tensor) -> Tensor:
        codes, scale = split_rows(x)
        return split_product(codes, scale, self.w1.t(), None if self.w2 is None else self.w2.t(), self.w_scale,
                             self.bias, self.alpha)

    def input_grad(self, dz: Tensor) -> Tensor:
        codes, scale = split_rows(dz, self.w_scale)  # the weight's row scales lie on the reduction axis
        return split_product(codes, scale, self.w1, self.w2)


class FastElementNet(ElementNet):
    """`ElementNet` whose layer 0 runs on ``torch._int_mm`` (`SplitInt8Linear`), forward and input
    gradient, and whose later layers' backward runs in bfloat16.

    Layer 0 adds ~1e-4 relative error to the plan's own. Later layers run backward with bfloat16
    weights and gradients, and forward in float32 except layer 1 (bfloat16 inputs and weights):
    bfloat16 elsewhere in the forward pass tripled the energy error (0.008 kcal/mol/atom on
    held-out chemistry, against 0.0027 in float32 and 0.0033 with layer 1 in bfloat16).
    """

    def __init__(self, layers: list[StackedLayer], members: int) -> None:
        super().__init__(layers, members)
        self.first = SplitInt8Linear(layers[0], self.alpha)
        layers[0].blocks = torch.nn.ModuleList()  # only the INT8 planes (and the bias) are used from now on
        self.n_later = len(layers) - 1
        for i, w in enumerate(super().later_weights()):  # small: kept dequantized rather than rebuilt per call
            self.register_buffer(f"later_{i}", w)
            self.register_buffer(f"half_{i}", w.to(torch.bfloat16))

    @torch.jit.unused
    def first_weight(self) -> Tensor:
        return self.first.w_scale  # the INT8 products take no float32 weight: none is built

    @torch.jit.unused
    def later_weights(self) -> list[Tensor]:
        return [getattr(self, f"later_{i}") for i in range(self.n_later)]

    @torch.jit.unused
    def later_forward(self, y: Tensor, ws: list[Tensor], bs: list[Tensor], i: int) -> Tensor:
        if i > 0:
            return super().later_forward(y, ws, bs, i)
        return torch.bmm(y.to(torch.bfloat16), self.half_0.transpose(1, 2)).to(torch.float32).add_(bs[0])

    @torch.jit.unused
    def later_backward(self, dz: Tensor, ws: list[Tensor], i: int) -> Tensor:
        return torch.bmm(dz.to(torch.bfloat16), getattr(self, f"half_{i}")).to(torch.float32)

    @torch.jit.unused
    def first_forward(self, x: Tensor, w0: Tensor) -> Tensor:
        return self.first(x)

    @torch.jit.unused
    def first_backward(self, dz: Tensor, w0: Tensor) -> Tensor:
        return self.first.input_grad(dz)


class FusedNetworks(torch.nn.Module):
    """All element networks: ``(species (N,), aev (N, K))`` -> atomic energies ``(N,)`` in Hartree.

    The hand-computed ``dE/daev`` joins autograd through `_AtomicEnergies` (an autograd
    Function) in Python, and under TorchScript, which has no custom Functions, through a
    linearization: ``E + sum((aev - aev.detach()) * dE/daev)`` has the value ``E`` exactly and
    the derivative ``dE/daev``. Either way only first derivatives are available.
    """

    mode: str
    backend: str

    def __init__(self, elements: list[ElementNet], mode: str, backend: str = "torch") -> None:
        super().__init__()
        self.elements = torch.nn.ModuleList(elements)
        self.mode = mode
        self.backend = backend

    def energies_and_gradient(self, species: Tensor, x: Tensor, need_grad: bool) -> tuple[Tensor, Tensor]:
        """Atomic energies ``(N,)`` and, when ``need_grad``, ``dE/dx`` ``(N, K)`` (else an empty tensor)."""
        energies = x.new_empty(x.shape[0])
        grad = torch.empty_like(x) if need_grad else x.new_zeros(0)
        for i, net in enumerate(self.elements):
            index = (species == i).nonzero().flatten()
            if index.numel() > 0:
                e, g = net(x.index_select(0, index), need_grad)
                energies.index_copy_(0, index, e)
                if need_grad:
                    grad.index_copy_(0, index, g)
        return energies, grad

    def forward(self, species: Tensor, aev: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            return _AtomicEnergies.apply(self, species, aev)
        energies, grad = self.energies_and_gradient(species, aev.detach(), aev.requires_grad)
        if aev.requires_grad:
            energies = energies + ((aev - aev.detach()) * grad).sum(1)
        return energies


class _AtomicEnergies(torch.autograd.Function):
    """Atomic energies whose backward is the hand-computed ``dE/daev`` of `FusedNetworks`."""

    @staticmethod
    def forward(ctx, networks: FusedNetworks, species: Tensor, aev: Tensor) -> Tensor:
        energies, grad = networks.energies_and_gradient(species, aev, ctx.needs_input_grad[2])
        ctx.save_for_backward(grad)
        return energies

    @staticmethod
    def backward(ctx, grad_energies: Tensor):
        (grad,) = ctx.saved_tensors
        return None, None, grad * grad_energies.unsqueeze(1)


# --- construction from a state dict ------------------------------------------------------------

def _prefix(member: int, element: str, layer: int, n_hidden: int) -> str:
    where = f"layers.{layer}." if layer < n_hidden else "final_layer."
    return f"{NETWORK_PREFIX}{member}.atomics.{element}.{where}"


def _count(tensors: dict[str, Tensor], pattern: str) -> int:
    found = {int(m[1]) for k in tensors if (m := re.search(pattern, k))}
    return 1 + max(found) if found else 0


def _weight_block(tensors: dict[str, Tensor], prefixes: list[str], fmt: TensorFormat, equalized: bool) -> torch.nn.Module:
    """One block of members sharing a format, stacked along the output rows."""
    def stack(name: str) -> Tensor:
        return torch.cat([tensors[p + name] for p in prefixes], 0)

    if not fmt.is_integer:
        return DenseWeight(stack("weight").to(HALF_DTYPES.get(fmt.kind, torch.float32)))
    qweight = stack("qweight")
    rows = qweight.shape[0] // len(prefixes)
    # per-tensor scales (one per member) are repeated over that member's rows so blocks stack
    scale = torch.cat([tensors[p + "scale"].expand(rows, -1) for p in prefixes], 0).contiguous()
    zero = None
    if not fmt.symmetric:
        zero = torch.cat([tensors[p + "zero"].expand(rows, -1) for p in prefixes], 0).contiguous()
    col_scale = torch.stack([tensors[p + "col_scale"] for p in prefixes]) if equalized else None
    return IntWeight(qweight, scale, zero, col_scale, fmt.group_size_for(qweight.shape[1]), len(prefixes))


def _stacked_layer(tensors: dict[str, Tensor], plan: QuantPlan, element: str, layer: int,
                   members: int, n_hidden: int) -> StackedLayer:
    blocks: list[torch.nn.Module] = []
    start = 0
    keys = [(plan.format_for(m, element, layer), plan.equalize_for(m, element, layer)) for m in range(members)]
    for m in range(1, members + 1):
        if m == members or keys[m] != keys[start]:
            prefixes = [_prefix(k, element, layer, n_hidden) for k in range(start, m)]
            blocks.append(_weight_block(tensors, prefixes, *keys[start]))
            start = m
    bias = torch.cat([tensors[_prefix(m, element, layer, n_hidden) + "bias"] for m in range(members)])
    return StackedLayer(blocks, bias.to(torch.float32))


def build_networks(symbols: tuple[str, ...] | list[str], plan: QuantPlan, tensors: dict[str, Tensor],
                   mode: str = "exact", backend: str = "torch") -> FusedNetworks:
    """The fused networks of a TorchANI-layout state dict (an artifact's tensors or an FP32 model's).

    Args:
        symbols: the model's elements in model order (``H, C, N, O, S, F, Cl`` for ANI-2x).
        plan: the storage format of every layer (an empty plan: all FP32).
        tensors: the state dict, keys as ``potentials.nnp.neural_networks.members.3.atomics.H.layers.0.qweight``.
        mode: ``exact`` or ``fast``.
        backend: ``torch`` (torch products and the C++ kernels; TorchScript-able) or ``triton``
            (`nnpq.runtime.triton_network`: CUDA tensors, or CPU ones under Triton's interpreter).

    Raises:
        NnpqError: a tensor the plan needs is missing.
    """
    members = _count(tensors, r"members\.(\d+)\.")
    n_hidden = _count(tensors, r"\.layers\.(\d+)\.bias$")
    if backend not in ("torch", "triton"):
        raise NnpqError(f"unknown network backend '{backend}'; use torch or triton")
    elements: list[ElementNet] = []
    if backend == "torch":
        cpp_kernels()  # builds the fused C++ passes once (~30 s), else the plain-torch passes run
    try:
        for element in symbols:
            layers = [_stacked_layer(tensors, plan, element, layer, members, n_hidden)
                      for layer in range(n_hidden + 1)]
            if backend == "triton":
                from nnpq.runtime.triton_network import TritonElementNet  # imports triton

                elements.append(TritonElementNet(layers, members, mode))
            elif mode == "fast":
                elements.append(FastElementNet(layers, members))
            else:
                elements.append(ElementNet(layers, members))
    except KeyError as exc:
        raise NnpqError(f"model tensors lack {exc.args[0]}, which the plan needs; re-create the file "
                        "with 'nnpq quantize'") from None
    return FusedNetworks(elements, mode, backend)
