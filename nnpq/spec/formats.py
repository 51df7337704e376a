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

    @classmethod
    def parse(cls, label: str) -> "TensorFormat":
        """The inverse of `label`: ``int8/channel``, ``int4/g32/asym``, ``int8/tensor``, ``fp16``, ..."""
        text = label.strip().lower()
        if text in ("fp32", "fp16", "bf16"):
            return cls(kind=text)
        parts = text.split("/")
        try:
            if not parts[0].startswith("int"):
                raise ValueError
            bits = int(parts[0][3:])
            gran = parts[1] if len(parts) > 1 else "channel"
            symmetric = not (len(parts) > 2 and parts[2] == "asym")
            if len(parts) > 3 or (len(parts) > 2 and parts[2] != "asym"):
                raise ValueError
            if gran.startswith("g"):
                return cls("int", bits, "group", int(gran[1:]), symmetric)
            return cls("int", bits, gran, 0, symmetric)
        except (ValueError, IndexError):
            raise NnpqError(f"cannot read weight format '{label}'; write e.g. int8/channel, int8/g32, "
                            "int4/g32/asym, int8/tensor, fp16 or bf16") from None


def code_range(fmt: TensorFormat) -> tuple[int, int]:
    """Smallest and largest integer code of an integer format."""
    if fmt.symmetric:
        qmax = 2 ** (fmt.bits - 1) - 1
        return -qmax, qmax
    return -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1


ACTIVATION_MODES = ("none", "dynamic", "static")
ACTIVATION_RANGES = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class ActivationFormat:
    """INT8 rounding of a layer's input (only on layers with integer weights).

    Attributes:
        mode: ``none``; ``dynamic`` (one scale per row, i.e. per atom, from its absolute
            maximum at run time); ``static`` (one scale per layer fixed at calibration).
        range: how a static scale is calibrated: ``minmax``, ``percentile`` or ``mse``
            (the clipping that minimizes the mean squared rounding error).
        percentile: the percentile of |x| used by ``range == "percentile"``.

    Rounded activations make the energy piecewise constant in the positions; the forces
    are then taken through a straight-through estimator (the rounding's derivative is
    treated as 1) and are not the exact gradient of the reported energy.
    """

    mode: str = "none"
    range: str = "mse"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.mode not in ACTIVATION_MODES:
            raise NnpqError(f"unknown activation mode '{self.mode}'; use one of {', '.join(ACTIVATION_MODES)}")
        if self.range not in ACTIVATION_RANGES:
            raise NnpqError(f"unknown activation range '{self.range}'; use one of {', '.join(ACTIVATION_RANGES)}")

    def label(self) -> str:
        if self.mode == "none":
            return ""
        return "a8/row" if self.mode == "dynamic" else f"a8/{self.range}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ActivationFormat":
        try:
            return cls(**data)
        except TypeError as exc:
            raise NnpqError(f"malformed activation format {data!r}: {exc}") from None


NO_ACTIVATION = ActivationFormat()
FP32 = TensorFormat(kind="fp32")
INT8_CHANNEL = TensorFormat(kind="int", bits=8, granularity="channel")
INT8_G32_ASYM = TensorFormat(kind="int", bits=8, granularity="group", group_size=32, symmetric=False)
INT8_G8_ASYM = TensorFormat(kind="int", bits=8, granularity="group", group_size=8, symmetric=False)
