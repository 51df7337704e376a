"""Round-to-nearest weight quantizers for the formats of `nnpq.spec.formats`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nnpq.errors import NnpqError
from nnpq.kernels.int8 import dequantize_weight
from nnpq.spec.formats import TensorFormat, code_range
from nnpq.spec.packing import bf16_ceil, stored_code_bytes, stored_float_bytes


@dataclass
class QuantizedWeight:
    """Integer codes plus the scales and zero points that map them back to float32.

    ``scale`` and ``zero`` have shape ``(rows, groups)``; rows is 1 for per-tensor scales.
    """

    qweight: Tensor  # int8, (out, in)
    scale: Tensor  # float32
    zero: Tensor  # int8; (1, 1) zeros for symmetric formats
    group_size: int
    col_scale: Tensor | None = None  # (in,) input-equalization factors, or None

    def dequantize(self) -> Tensor:
        return dequantize_weight(self.qweight, self.scale, self.zero, self.group_size, self.col_scale)

    def stored_bytes(self, fmt: TensorFormat) -> int:
        """Bytes this weight takes in a model file: codes as `nnpq.spec.packing.store_codes` stores
        them, scales and equalization factors as `stored_float_bytes`, int8 zero points (asymmetric formats)."""
        extra = 0 if fmt.symmetric else self.zero.numel()
        if self.col_scale is not None:
            extra += stored_float_bytes(self.col_scale)
        return stored_code_bytes(self.qweight, fmt.bits) + stored_float_bytes(self.scale) + extra


def _group_view(w: Tensor, fmt: TensorFormat) -> tuple[Tensor, int]:
    """``w`` reshaped to ``(rows, groups, group_size)`` for the format's scale layout."""
    out_features, in_features = w.shape
    if fmt.granularity == "tensor":
        return w.reshape(1, 1, -1), in_features
    if fmt.granularity == "channel":
        return w.reshape(out_features, 1, in_features), in_features
    size = fmt.group_size_for(in_features)
    return w.reshape(out_features, in_features // size, size), size


def quant_params(w: Tensor, fmt: TensorFormat) -> tuple[Tensor, Tensor, int]:
    """Scales and zero points (both ``(rows, groups)``, float32) for ``w`` by min-max range; scales
    are rounded up onto the bfloat16 grid, so a model file stores them in half the bytes."""
    groups, group_size = _group_view(w.detach().to(torch.float32), fmt)
    if fmt.symmetric:
        qmax = 2 ** (fmt.bits - 1) - 1
        scale = bf16_ceil(groups.abs().amax(dim=-1) / qmax)
        zero = torch.zeros_like(scale)
    else:
        levels = 2**fmt.bits - 1
        lo = groups.amin(dim=-1).clamp(max=0.0)
        hi = groups.amax(dim=-1).clamp(min=0.0)
        scale = bf16_ceil((hi - lo) / levels)
        # codes live in [-2^(b-1), 2^(b-1)-1] so that they fit int8 for every width
        zero = torch.round(-lo / scale.clamp(min=torch.finfo(torch.float32).tiny)) - 2 ** (fmt.bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: any scale works
    return scale, zero, group_size


def round_to_grid(w: Tensor, scale: Tensor, zero: Tensor, group_size: int, fmt: TensorFormat) -> Tensor:
    """Nearest integer codes (int8) of ``w`` on the grid given by ``scale`` and ``zero``."""
    out_features, in_features = w.shape
    groups = w.to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    scale = scale.expand(out_features, groups.shape[1]).unsqueeze(-1)
    zero = zero.to(torch.float32).expand(out_features, groups.shape[1]).unsqueeze(-1)
    lo, hi = code_range(fmt)
    q = torch.clamp(torch.round(groups / scale + zero), lo, hi)
    return q.reshape(out_features, in_features).to(torch.int8)


def quantize_nearest(w: Tensor, fmt: TensorFormat) -> QuantizedWeight:
    """Round-to-nearest quantization of a ``(out, in)`` float weight to an integer format."""
    if not fmt.is_integer:
        raise NnpqError(f"format {fmt.label()} is not an integer format")
    scale, zero, group_size = quant_params(w, fmt)
    q = round_to_grid(w, scale, zero, group_size, fmt)
    if fmt.symmetric:
        zero = torch.zeros(1, 1)
    return QuantizedWeight(q, scale.contiguous(), zero.to(torch.int8).contiguous(), group_size)
