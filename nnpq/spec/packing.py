"""How integer codes are stored on disk: bit packing of codes narrower than 8 bits, or entropy
coding (LZMA, as xz streams); and float32 tensors whose values bfloat16 holds exactly (the
quantizers put scales and equalization factors on that grid) stored in half the bytes.

Quantized weights are far from uniform over their code range (per-channel INT8 codes of ANI-2x
carry ~5.9 bits of information each: one large weight sets each row's scale and most codes sit
near zero), so each code tensor is stored in whichever is smaller (`store_codes`), and the model
file pays for the information, not the width. Codes are coded column by column (one input
feature's codes together: a feature whose weights are small gives a run of small codes), which
LZMA turns into 5.6 bits per per-channel INT8 code of ANI-2x (zlib, row by row: 6.1).
"""

from __future__ import annotations

import lzma
import math

import numpy as np
import torch
from torch import Tensor

PACKED, CODED = "packed", "coded"
MIN_SAVING = 0.05  # coding costs a decode at load: used only where it saves at least this share
MIN_NARROWED = 64  # a float32 tensor is stored as bfloat16 from this many values (its name costs header bytes)


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


def encode_codes(codes: Tensor) -> Tensor:
    """int8 ``(out, in)`` ``codes``, column by column, as an xz (LZMA2) stream in a flat uint8 tensor."""
    data = lzma.compress(codes.t().contiguous().numpy().tobytes(), format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE,
                         filters=[{"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 0, "pb": 0}])
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_codes(coded: Tensor, shape: tuple[int, int]) -> Tensor:
    """Inverse of `encode_codes`: int8 codes of ``shape`` ``(out, in)``.

    Never inflates more than ``shape`` holds, so a crafted stream cannot exhaust memory.

    Raises:
        ValueError: the stream is not xz data, or does not hold exactly ``prod(shape)`` codes.
    """
    count = math.prod(shape)
    stream = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        raw = stream.decompress(coded.numpy().tobytes(), count)
    except lzma.LZMAError as exc:
        raise ValueError(f"not a valid xz stream ({exc})") from None
    if len(raw) != count or not stream.eof or stream.unused_data:
        raise ValueError(f"the stream does not hold exactly {count} codes")
    return torch.frombuffer(bytearray(raw), dtype=torch.int8).reshape(shape[1], shape[0]).t().contiguous()


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` codes stored plainly: int8 at 8 bits, `pack_codes` below."""
    return count if bits >= 8 else (count * bits + 7) // 8


def _worth_coding(coded: int, plain: int) -> bool:
    return coded <= (1 - MIN_SAVING) * plain


def store_codes(codes: Tensor, bits: int, lowest: int) -> tuple[str | None, Tensor]:
    """How int8 ``codes`` of a ``bits``-wide format are stored: ``(None, codes)`` as they are (8
    bits), ``(PACKED, bytes)`` (narrower), or ``(CODED, bytes)`` where that saves `MIN_SAVING`."""
    coded = encode_codes(codes)
    if _worth_coding(coded.numel(), packed_bytes(codes.numel(), bits)):
        return CODED, coded
    return (PACKED, pack_codes(codes, bits, lowest)) if bits < 8 else (None, codes)


def stored_code_bytes(codes: Tensor, bits: int) -> int:
    """Bytes `store_codes` spends on ``codes``."""
    plain, coded = packed_bytes(codes.numel(), bits), encode_codes(codes).numel()
    return coded if _worth_coding(coded, plain) else plain


def bf16_ceil(values: Tensor) -> Tensor:
    """Positive float32 ``values`` rounded up to the nearest bfloat16 value (kept as float32):
    a scale on that grid is stored in 2 bytes, and rounding up never clips a weight."""
    bits = values.to(torch.float32).contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def narrows_to_bf16(t: Tensor) -> bool:
    """Whether float32 ``t`` is stored as bfloat16: every value exact there, and enough of them."""
    return t.dtype == torch.float32 and t.numel() >= MIN_NARROWED and \
        bool(torch.equal(t.to(torch.bfloat16).to(torch.float32), t))


def stored_float_bytes(t: Tensor) -> int:
    """Bytes a model file spends on tensor ``t`` (any but integer codes: those are `stored_code_bytes`)."""
    return t.numel() * (2 if narrows_to_bf16(t) else t.element_size())
