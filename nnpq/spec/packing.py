"""Bit packing of integer codes narrower than 8 bits, so a 4-bit layer costs 4 bits on disk."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def pack_codes(codes: Tensor, bits: int, lowest: int) -> Tensor:
    """Pack int8 ``codes`` in ``[lowest, lowest + 2^bits)`` into a flat uint8 tensor, ``bits`` per code."""
    unsigned = (codes.to(torch.int16) - lowest).to(torch.uint8).reshape(-1).numpy()
    planes = np.unpackbits(unsigned[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little").copy())


def unpack_codes(packed: Tensor, bits: int, lowest: int, shape: tuple[int, ...]) -> Tensor:
    """Inverse of `pack_codes`: int8 codes of ``shape``."""
    count = int(np.prod(shape))
    flat = np.unpackbits(packed.numpy(), bitorder="little")[: count * bits].reshape(count, bits)
    unsigned = np.packbits(flat, axis=1, bitorder="little")[:, 0]
    return (torch.from_numpy(unsigned.astype(np.int16)) + lowest).to(torch.int8).reshape(shape)
