"""The quantization plan: which format each Linear layer of each element network gets.

A plan is data (JSON in the artifact). Rules match ``(element, layer)`` and optionally one
ensemble member; the most specific matching rule wins, so a plan can be as coarse as
"everything INT8" or as fine as one format per member, element and layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from nnpq.errors import NnpqError
from nnpq.spec.formats import FP32, INT8_CHANNEL, NO_ACTIVATION, ActivationFormat, TensorFormat


@dataclass(frozen=True)
class PlanRule:
    """Formats for layer ``layer`` of ``element``'s network (``None`` matches any): its weights
    and, for integer weights, the rounding of its input activations."""

    weight: TensorFormat
    element: str | None = None
    layer: int | None = None
    member: int | None = None
    activation: ActivationFormat = NO_ACTIVATION
    equalize: bool = False  # scale input columns before rounding (integer weights, calibrated)
    damp: float | None = None  # GPTQ damping relative to the mean Hessian diagonal; None: the plan's setting
    rounding: str | None = None  # "nearest" rounds this layer to nearest whatever the plan's rounding; None: the plan's

    def __post_init__(self) -> None:
        if self.rounding not in (None, "nearest"):
            raise NnpqError(f"a plan rule's rounding may only be 'nearest' (or absent), not '{self.rounding}'")

    def matches(self, member: int, element: str, layer: int) -> bool:
        return (
            (self.element is None or self.element == element)
            and (self.layer is None or self.layer == layer)
            and (self.member is None or self.member == member)
        )

    @property
    def specificity(self) -> int:
        # member beats layer beats element, so a per-member override always wins
        return 4 * (self.member is not None) + 2 * (self.layer is not None) + (self.element is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"element": self.element, "layer": self.layer, "member": self.member,
                "weight": self.weight.to_dict(), "activation": self.activation.to_dict(), "equalize": self.equalize,
                "damp": self.damp, "rounding": self.rounding}


@dataclass(frozen=True)
class QuantPlan:
    """An ordered set of rules plus how weights are rounded.

    ``rounding`` names the rounding algorithm (``nearest``); the final width-1 layer of
    each network is addressed as layer ``n_hidden`` (3 for ANI).
    """

    rules: tuple[PlanRule, ...]
    rounding: str = "nearest"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def rule_for(self, member: int, element: str, layer: int) -> PlanRule | None:
        """The most specific rule matching one layer (later rules win ties), or ``None``."""
        best: PlanRule | None = None
        for rule in self.rules:
            if rule.matches(member, element, layer) and (best is None or rule.specificity >= best.specificity):
                best = rule
        return best

    def format_for(self, member: int, element: str, layer: int) -> TensorFormat:
        """The weight format of one layer; layers no rule matches stay FP32."""
        rule = self.rule_for(member, element, layer)
        return FP32 if rule is None else rule.weight

    def equalize_for(self, member: int, element: str, layer: int) -> bool:
        """Whether one layer's input columns are equalized before rounding (integer weights only)."""
        rule = self.rule_for(member, element, layer)
        return rule is not None and rule.weight.is_integer and rule.equalize

    def damp_for(self, member: int, element: str, layer: int) -> float | None:
        """The GPTQ damping of one layer when its rule sets one, else ``None`` (the rounding settings')."""
        rule = self.rule_for(member, element, layer)
        return None if rule is None else rule.damp

    def rounds_to_nearest(self, member: int, element: str, layer: int) -> bool:
        """Whether one layer's own rule has it rounded to nearest, whatever the rounding settings."""
        rule = self.rule_for(member, element, layer)
        return rule is not None and rule.rounding == "nearest"

    def activation_for(self, member: int, element: str, layer: int) -> ActivationFormat:
        """The input-activation format of one layer (only integer-weight layers round inputs)."""
        rule = self.rule_for(member, element, layer)
        return NO_ACTIVATION if rule is None or not rule.weight.is_integer else rule.activation

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules], "rounding": self.rounding,
                "description": self.description, "extra": self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantPlan":
        try:
            rules = tuple(
                PlanRule(weight=TensorFormat.from_dict(r["weight"]), element=r.get("element"),
                         layer=r.get("layer"), member=r.get("member"),
                         activation=ActivationFormat.from_dict(r.get("activation", {})),
                         equalize=bool(r.get("equalize", False)), damp=r.get("damp"),
                         rounding=r.get("rounding"))
                for r in data["rules"]
            )
            return cls(rules=rules, rounding=data.get("rounding", "nearest"),
                       description=data.get("description", ""), extra=dict(data.get("extra", {})))
        except (KeyError, TypeError) as exc:
            raise NnpqError(f"malformed quantization plan: missing or bad field {exc}") from None


def uniform_plan(weight: TensorFormat = INT8_CHANNEL, n_hidden: int = 3,
                 elements: Iterable[str] | None = None, quantize_final: bool = False,
                 activation: ActivationFormat = NO_ACTIVATION, rounding: str = "nearest",
                 equalize: tuple[int, ...] = ()) -> QuantPlan:
    """Every hidden layer in ``weight``; final width-1 layers FP32 unless ``quantize_final``;
    layers listed in ``equalize`` get input equalization."""
    layers = list(range(n_hidden + (1 if quantize_final else 0)))
    targets = [None] if elements is None else list(elements)
    rules = tuple(PlanRule(weight=weight, element=e, layer=i, activation=activation, equalize=i in equalize)
                  for e in targets for i in layers)
    name = weight.label() + (f"+{activation.label()}" if activation.mode != "none" else "")
    return QuantPlan(rules=rules, rounding=rounding, description=f"uniform {name} on hidden layers"
                     + (" and final layers" if quantize_final else ", final layers fp32"))


def default_plan() -> QuantPlan:
    """Symmetric per-output-channel INT8 on every hidden layer; final layers FP32."""
    return uniform_plan(INT8_CHANNEL)


def require_known_elements(plan: QuantPlan, symbols: Iterable[str]) -> None:
    """Reject plans that name elements the model does not have."""
    known = set(symbols)
    for rule in plan.rules:
        if rule.element is not None and rule.element not in known:
            raise NnpqError(f"plan names element '{rule.element}' but the model has only {', '.join(sorted(known))}")
