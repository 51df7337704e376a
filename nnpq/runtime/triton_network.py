"""The fused element network on the Triton kernels (`nnpq.kernels.triton_int8`): the runtime's CUDA backend.

`TritonElementNet` is `ElementNet` with layer 0, the wide product of all members (1008 AEV
features in; most of the network's arithmetic), on Triton: an int8 block of members runs
`w8_linear` forward (codes dequantized inside the GEMM, bias and CELU in the epilogue) and
`w8_linear_input_grad` backward (CELU's derivative in the prologue); its weight stays int8
codes, no float copy is made. Blocks stored as fp16, bf16 or fp32 keep torch products. The later
layers (a few hundred features, batched over members in one ``bmm`` each) are `ElementNet`'s:
dequantized per call and multiplied in float32.

Modes (the energy the forces are the gradient of):

- ``exact``: float32 activations and gradients at precision ``"ieee"`` in both passes: the
  weight-only energy of the torch backend (same weights; the summation order differs, so they
  agree to float tolerance), smooth in the positions, and forces that are its exact gradient.
- ``fast``: W8A16. Layer 0's input, the AEV, is rounded to float16 for the forward product on
  the tensor cores (float32 accumulation, float32 output); per-channel weights enter the dot as
  exact codes (scale in the epilogue), group-wise ones with each group's scale folded into the
  float16 weight tile. The input gradient takes float32 operands at precision ``"tf32"``
  (float16's 10-bit mantissa with float32's range: ``dE/dz`` times a weight scale lies below
  float16's normal range). The forces are the chain rule through that gradient: an
  approximation of the gradient of the ``exact`` energy, not the exact gradient of the reported
  fast energy (piecewise constant in the AEV).

  Chosen by measurement under the interpreter (tf32 there computed as float32), ANI-2x per-channel
  INT8 (round to nearest), one hot frame each of four library molecules (ethane, norbornane,
  styrene, phenol; RMS force 16-32 kcal/mol/Å), force RMSE added to the ``exact`` mode's forces:
  this W8A16 0.011 kcal/mol/Å; the CPU fast mode (two-plane INT8, `nnpq.kernels.cpu`) 0.044;
  W8A8 with dynamic per-atom activation scales, radial and angular AEV blocks scaled apart
  (`w8a8_linear`, ``act_splits=(112,)``) 1.09, so W8A8 is not used (re-measured by the slow
  test ``test_w8a16_is_the_accurate_cuda_fast_mode``). On int8/g32/asym, folding the
  group scales into float16 weight tiles added 0.01057 against 0.01055 with exact weights
  (``fold_scales=False``, slower).

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` before triton is imported), which is how the tests run this very path.
Python only: TorchScript (openmm-torch's ``TorchForce``) cannot hold Triton; use the torch backend
there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nnpq.errors import NnpqError
from nnpq.kernels import triton_int8  # looked up per call: tests may reload it in the interpreter's mode
from nnpq.kernels.cpu import celu_slope
from nnpq.runtime.network import ElementNet, IntWeight, StackedLayer

FAST_INPUT = torch.float16


class TritonElementNet(ElementNet):
    """`ElementNet` whose layer 0 runs on the Triton INT8 kernels; ``mode`` ``exact`` or ``fast`` (module docstring)."""

    fast: bool

    def __init__(self, layers: list[StackedLayer], members: int, mode: str) -> None:
        super().__init__(layers, members)
        self.fast = mode == "fast"

    def __prepare_scriptable__(self):
        raise NnpqError("the Triton runtime backend runs in Python only (PythonForce, ASE, direct calls); "
                        "load the model with backend='torch' for TorchScript / TorchForce")

    def first_weight(self) -> Tensor:
        return self.layers[0].bias  # unused placeholder: no float32 copy of layer 0 is built

    def _parts(self) -> list[tuple[int, int, torch.nn.Module, int]]:
        """Layer 0 as launches: (first output column, end column, block, member in the block or -1 for all).

        An equalized block has one ``col_scale`` per member, which the kernels take per launch.
        """
        parts: list[tuple[int, int, torch.nn.Module, int]] = []
        start = 0
        for block in self.layers[0].blocks:
            rows = (block.qweight if isinstance(block, IntWeight) else block.weight).shape[0]
            if isinstance(block, IntWeight) and block.equalized:
                per = rows // block.members
                parts += [(start + m * per, start + (m + 1) * per, block, m) for m in range(block.members)]
            else:
                parts.append((start, start + rows, block, -1))
            start += rows
        return parts

    def first_forward(self, x: Tensor, w0: Tensor) -> Tensor:
        bias = self.layers[0].bias
        x_in = x.to(FAST_INPUT) if self.fast else x
        outs: list[Tensor] = []
        for start, stop, block, member in self._parts():
            if isinstance(block, IntWeight):
                q, scale, zero, col = _codes(block, member)
                outs.append(triton_int8.w8_linear(
                    x_in, q, scale, zero, block.group_size, bias[start:stop], col, self.alpha,
                    out_dtype=torch.float32, precision="ieee"))
            else:
                w = block.dequantize().to(torch.float32)
                outs.append(torch.nn.functional.celu(torch.addmm(bias[start:stop], x, w.t()), self.alpha))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def first_input_grad(self, g: Tensor, h: Tensor, w0: Tensor) -> Tensor:
        out: Tensor | None = None
        for start, stop, block, member in self._parts():
            g_part, h_part = g[:, start:stop], h[:, start:stop]
            if isinstance(block, IntWeight):
                q, scale, zero, col = _codes(block, member)
                part = triton_int8.w8_linear_input_grad(
                    g_part, q, scale, zero, block.group_size, col, h_part, self.alpha,
                    out_dtype=torch.float32, precision="tf32" if self.fast else "ieee")
            else:
                part = celu_slope(h_part, self.alpha).mul_(g_part).mm(block.dequantize().to(torch.float32))
            out = part if out is None else out.add_(part)
        assert out is not None  # a layer has at least one block
        return out


def _codes(block: IntWeight, member: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(codes, scales, zero points, col_scale) of a whole block (``member`` -1) or of one member's rows."""
    if member < 0:
        return block.qweight, block.scale, block.zero, None
    rows = block.qweight.shape[0] // block.members
    sel = slice(member * rows, (member + 1) * rows)
    zero = None if block.zero is None else block.zero[sel]
    return block.qweight[sel], block.scale[sel], zero, block.col_scale[member]
