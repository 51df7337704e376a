"""Linear layers of the quantized runtime; each holds its weight in its storage format."""


import torch
from torch import Tensor

from nnpq.kernels.int8 import fake_quantize_activation, int_weight_linear
from nnpq.spec.formats import NO_ACTIVATION, ActivationFormat, TensorFormat

ACT_MODES = {"none": 0, "dynamic": 1, "static": 2}

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class QuantizedLinear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` as int8 codes, float32 scales and int8 zero points ``(rows, groups)``."""

    in_features: int
    out_features: int
    group_size: int
    act_mode: int

    def __init__(self, in_features: int, out_features: int, rows: int, group_size: int,
                 symmetric: bool = True, activation: ActivationFormat = NO_ACTIVATION,
                 equalized: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.act_mode = ACT_MODES[activation.mode]
        # static activation scale (INT8 step of the layer input); unused for other modes
        self.register_buffer("act_scale", torch.zeros(1))
        # input-equalization factors (see `dequantize_weight`); a single 1 when not equalized
        self.register_buffer("col_scale", torch.ones(in_features if equalized else 1))
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(rows, groups))
        # symmetric formats have no zero point: a single 0 broadcasts over all groups
        zero_shape = (1, 1) if symmetric else (rows, groups)
        self.register_buffer("zero", torch.zeros(zero_shape, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features))

    @classmethod
    def empty(cls, fmt: TensorFormat, in_features: int, out_features: int,
              activation: ActivationFormat = NO_ACTIVATION, equalized: bool = False) -> "QuantizedLinear":
        """A layer shaped for ``fmt``, to be filled by ``load_state_dict``."""
        rows = 1 if fmt.granularity == "tensor" else out_features
        group_size = fmt.group_size_for(in_features)
        return cls(in_features, out_features, rows, group_size, fmt.symmetric, activation, equalized)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_mode != 0:
            x = fake_quantize_activation(x, self.act_scale, self.act_mode == 1)
        return int_weight_linear(x, self.qweight, self.scale, self.zero, self.group_size, self.bias, self.col_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class HalfLinear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` stored in fp16 or bf16 and widened to float32 in the call."""

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features))

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


def empty_layer(fmt: TensorFormat, in_features: int, out_features: int,
                activation: ActivationFormat = NO_ACTIVATION, equalized: bool = False) -> torch.nn.Module:
    """An unfilled layer of the right class and shapes for ``fmt``."""
    if fmt.kind == "fp32":
        layer = torch.nn.Linear(in_features, out_features)
        layer.requires_grad_(False)
        return layer
    if fmt.kind in HALF_DTYPES:
        return HalfLinear(in_features, out_features, HALF_DTYPES[fmt.kind])
    return QuantizedLinear.empty(fmt, in_features, out_features, activation, equalized)
