"""Number formats a weight tensor can be stored in, as data.

An integer format is ``bits`` wide (2-8), symmetric or asymmetric, with one scale per
tensor, per output channel, or per group of ``group_size`` consecutive inputs of a channel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from nnpq.errors import NnpqError

KINDS = ("int", "fp32", "fp16", "bf16")
GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class TensorFormat:
    """Storage format of one weight tensor.

    Attributes:
        kind: ``int`` (integer codes with scales), ``fp16``, ``bf16`` or ``fp32`` (kept as is).
        bits: integer width, 2-8 (ignored unless ``kind == "int"``).
        granularity: ``tensor``, ``channel`` (per output row) or ``group``.
        group_size: inputs per scale when ``granularity == "group"``.
        symmetric: zero point fixed at 0 (else one integer zero point per scale).
    """

    kind: str = "int"
    bits: int = 8
    granularity: str = "channel"
    group_size: int = 0
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise NnpqError(f"unknown weight format '{self.kind}'; use one of {', '.join(KINDS)}")
        if self.kind != "int":
            return
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise NnpqError(f"integer width {self.bits!r} unsupported; use a whole number of bits from 2 to 8")
        if self.granularity not in GRANULARITIES:
            raise NnpqError(f"unknown granularity '{self.granularity}'; use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and self.group_size <= 0:
            raise NnpqError("group granularity needs a positive group_size, e.g. 32 or 128")

    @property
    def is_integer(self) -> bool:
        return self.kind == "int"

    def label(self) -> str:
        """Short human label, e.g. ``int8/channel``, ``int4/g32/asym``, ``fp16``."""
        if not self.is_integer:
            return self.kind
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        return f"int{self.bits}/{gran}" + ("" if self.symmetric else "/asym")

    def bits_per_weight(self, in_features: int) -> float:
        """Storage cost per weight in bits, scales and zero points included (fp32 scale, int8 zero)."""
        if not self.is_integer:
            return {"fp32": 32.0, "fp16": 16.0, "bf16": 16.0}[self.kind]
        per_scale = 32 + (0 if self.symmetric else 8)
        if self.granularity == "group":
            return self.bits + per_scale / self.group_size_for(in_features)
        if self.granularity == "channel":
            return self.bits + per_scale / in_features
        return float(self.bits)  # one scale for the whole tensor: negligible

    def group_size_for(self, in_features: int) -> int:
        """Inputs per scale in a layer of ``in_features`` inputs.

        For groups, the largest divisor of ``in_features`` not above ``group_size`` (ANI's
        1008-wide AEV has no divisor 32, so g32 becomes 28 there); otherwise all inputs.
        """
        if self.granularity != "group":
            return in_features
        return max(d for d in range(1, min(self.group_size, in_features) + 1) if in_features % d == 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorFormat":
        try:
            return cls(**data)
        except TypeError as exc:
            raise NnpqError(f"malformed tensor format {data!r}: {exc}") from None


FP32 = TensorFormat(kind="fp32")
INT8_CHANNEL = TensorFormat(kind="int", bits=8, granularity="channel")
