"""nnpq: quantized neural network potentials for molecular dynamics."""

__version__ = "0.1.0"
