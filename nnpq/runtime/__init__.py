"""The fused quantized runtime: networks built from an artifact, hand-written forces, modes."""

from nnpq.runtime.network import FusedNetworks, build_networks
from nnpq.runtime.potential import MODES, RuntimePotential, runtime_from_fp32, runtime_from_tensors

__all__ = ["FusedNetworks", "MODES", "RuntimePotential", "build_networks", "runtime_from_fp32",
           "runtime_from_tensors"]
