"""The fused quantized runtime: networks built from an artifact, hand-written forces, modes."""

from nnpq.runtime.network import FusedNetworks, build_networks
from nnpq.runtime.potential import (BACKENDS, MODES, RuntimePotential, resolve_backend, runtime_from_fp32,
                                   runtime_from_tensors)

__all__ = ["BACKENDS", "FusedNetworks", "MODES", "RuntimePotential", "build_networks", "resolve_backend",
           "runtime_from_fp32", "runtime_from_tensors"]
