"""Low-level integer ops used by the quantized runtime."""

from nnpq.kernels.int8 import dequantize_weight, int_weight_linear

__all__ = ["dequantize_weight", "int_weight_linear"]
