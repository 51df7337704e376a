"""Kernels of the quantized runtime, each beside the plain-torch reference it is tested against.

- `int8`: weight dequantization and the weight-only reference product.
- `cpu`: the CPU runtime's passes: INT8 products of two-plane operands on ``torch._int_mm``
  (fast mode), one-pass dequantization (exact mode), CELU's slope; fused in C++
  (`int8_cpu.cpp`, built by `build`) where a compiler is present.
- `triton_int8`: CUDA kernels in Triton (W8A16/W8A32 with in-kernel dequantization, W8A8 with
  fused activation quantization); `python -m nnpq.kernels` checks them on a GPU.
- `reference`: plain-torch references of the Triton kernels.
"""

from nnpq.kernels.int8 import dequantize_weight, int_weight_linear

__all__ = ["dequantize_weight", "int_weight_linear"]
