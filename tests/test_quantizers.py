"""Pure-tensor tests of the number formats, the plan and the round-to-nearest quantizers.

No ANI weights are needed: the weights are seeded random matrices shaped like ANI-2x
layers (1008 AEV inputs in the first layer).
"""

from __future__ import annotations

import json

import pytest
import torch

from nnpq.errors import NnpqError
from nnpq.kernels.int8 import dequantize_weight, int_weight_linear
from nnpq.models.layers import QuantizedLinear
from nnpq.spec.formats import FP32, INT8_CHANNEL, TensorFormat
from nnpq.spec.plan import PlanRule, QuantPlan, default_plan, require_known_elements, uniform_plan
from nnpq.quant.quantizers import quantize_nearest
from nnpq.spec.formats import code_range
from nnpq.spec.packing import bf16_ceil

OUT, IN = 48, 1008  # ANI-2x first hidden layers read the 1008-long AEV

# Rounding to the nearest grid point is off by at most half a step; float32 arithmetic in
# w/scale and q*scale adds a few ulp of |w| <= 127 * scale, i.e. ~1e-5 of a step.
HALF_STEP = 0.5 + 1e-4


def _weight(out: int = OUT, inp: int = IN, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # ANI weights are O(0.1); a few large outliers make per-channel scales differ per row
    w = 0.1 * torch.randn(out, inp, generator=g)
    w[torch.arange(out), torch.randint(0, inp, (out,), generator=g)] *= 5.0
    return w


def _step_per_weight(scale: torch.Tensor, group_size: int, out: int, inp: int) -> torch.Tensor:
    """The grid step of every weight, ``(out, in)``, from ``(rows, groups)`` scales."""
    return scale.expand(out, inp // group_size).repeat_interleave(group_size, dim=1)


# --- symmetric per-channel INT8 (the default format) -------------------------------------

def test_int8_per_channel_round_trip_within_half_step_per_row():
    w = _weight()
    qw = quantize_nearest(w, INT8_CHANNEL)
    assert qw.qweight.dtype == torch.int8
    assert qw.qweight.shape == w.shape
    assert qw.scale.shape == (OUT, 1) and qw.scale.dtype == torch.float32
    # symmetric: no zero point, a single 0 broadcasts
    assert qw.zero.shape == (1, 1) and int(qw.zero) == 0
    # min-max grid: scale is the row's max |w| over 127, rounded up onto bfloat16 (a file stores it in 2 bytes)
    torch.testing.assert_close(qw.scale[:, 0], bf16_ceil(w.abs().amax(dim=1) / 127), rtol=0, atol=0)
    assert torch.all(qw.scale[:, 0] <= w.abs().amax(dim=1) / 127 * (1 + 2.0 ** -7))

    err = (w - qw.dequantize()).abs()
    bound = HALF_STEP * qw.scale  # one step per row
    assert torch.all(err <= bound), float((err / qw.scale).max())
    # the bound is tight for random weights (the error is a real rounding error, not zero)
    assert float((err / qw.scale).max()) > 0.45

    codes = qw.qweight.to(torch.int32)
    assert int(codes.min()) >= -127 and int(codes.max()) <= 127
    # each row's largest |w| lands on the grid end (+-127), or one step inside it where rounding the
    # scale up took it below 126.5
    assert torch.all(codes.abs().amax(dim=1) >= 126)


def test_per_channel_scales_are_independent_per_row():
    """A row scaled by 1000 must not coarsen the grid of the other rows (per-tensor would)."""
    w = _weight()
    w[0] *= 1000.0
    per_channel = quantize_nearest(w, INT8_CHANNEL)
    per_tensor = quantize_nearest(w, TensorFormat(granularity="tensor"))
    err_ch = (w[1:] - per_channel.dequantize()[1:]).abs().max()
    err_t = (w[1:] - per_tensor.dequantize()[1:]).abs().max()
    assert err_ch <= HALF_STEP * per_channel.scale[1:].max()
    assert err_t > 100 * err_ch


@pytest.mark.parametrize(
    "fmt",
    [
        TensorFormat(granularity="tensor"),
        TensorFormat(granularity="group", group_size=16),
        TensorFormat(bits=4, granularity="group", group_size=16),
        TensorFormat(bits=4),
        TensorFormat(bits=4, symmetric=False),
        TensorFormat(bits=8, symmetric=False),
        TensorFormat(bits=8, granularity="group", group_size=16, symmetric=False),
    ],
    ids=lambda f: f.label(),
)
def test_formats_round_trip_within_half_step_and_code_range(fmt):
    w = _weight()
    qw = quantize_nearest(w, fmt)
    rows = 1 if fmt.granularity == "tensor" else OUT
    group_size = fmt.group_size if fmt.granularity == "group" else IN
    assert qw.group_size == group_size
    assert qw.scale.shape == (rows, IN // group_size)
    assert torch.all(qw.scale > 0)

    step = _step_per_weight(qw.scale, group_size, OUT, IN)
    err = (w - qw.dequantize()).abs()
    assert torch.all(err <= HALF_STEP * step), float((err / step).max())

    lo, hi = code_range(fmt)
    if fmt.symmetric:
        assert (lo, hi) == (-(2 ** (fmt.bits - 1) - 1), 2 ** (fmt.bits - 1) - 1)
    else:
        assert (lo, hi) == (-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1)
        assert qw.zero.shape == qw.scale.shape and qw.zero.dtype == torch.int8
    codes = qw.qweight.to(torch.int32)
    assert qw.qweight.dtype == torch.int8
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    # min-max grids use the whole code range (random rows have both signs)
    assert int(codes.max()) == hi
    assert int(codes.min()) == lo or (fmt.symmetric and fmt.granularity == "tensor")


def test_asymmetric_grid_beats_symmetric_on_one_sided_weights():
    """All-positive weights: the asymmetric grid spends all 2^b levels on [0, max], so its step is ~half."""
    w = _weight().abs()
    sym = quantize_nearest(w, TensorFormat(bits=4))
    asym = quantize_nearest(w, TensorFormat(bits=4, symmetric=False))
    torch.testing.assert_close(asym.scale, bf16_ceil(w.amax(dim=1, keepdim=True) / 15), rtol=0, atol=0)
    torch.testing.assert_close(sym.scale, bf16_ceil(w.amax(dim=1, keepdim=True) / 7), rtol=0, atol=0)
    err_sym = (w - sym.dequantize()).abs().max()
    err_asym = (w - asym.dequantize()).abs().max()
    assert err_asym < 0.6 * err_sym


@pytest.mark.parametrize(
    "fmt",
    [INT8_CHANNEL, TensorFormat(granularity="tensor"), TensorFormat(granularity="group", group_size=16),
     TensorFormat(bits=4, symmetric=False), TensorFormat(bits=8, granularity="group", group_size=16, symmetric=False)],
    ids=lambda f: f.label(),
)
def test_zero_rows_do_not_produce_nan(fmt):
    w = _weight()
    w[3] = 0.0
    w[7, :16] = 0.0  # a zero group inside an otherwise non-zero row
    if fmt.granularity == "tensor":
        w = torch.zeros(OUT, IN)
    qw = quantize_nearest(w, fmt)
    deq = qw.dequantize()
    assert torch.isfinite(qw.scale).all() and torch.all(qw.scale > 0)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[3], torch.zeros(IN))
    # 0 is on every grid (symmetric: code 0; asymmetric: the integer zero point), so zeros stay exact
    assert torch.equal(deq[7, :16], torch.zeros(16))


def test_group_size_falls_back_to_largest_divisor():
    """ANI's 1008-wide AEV has no divisor 32: g32 becomes g28 there, and the grid still holds."""
    w = _weight()  # 1008 = 2^4 * 3^2 * 7 inputs
    fmt = TensorFormat(granularity="group", group_size=32)
    assert fmt.group_size_for(1008) == 28 and fmt.group_size_for(256) == 32
    qw = quantize_nearest(w, fmt)
    assert qw.group_size == 28 and qw.scale.shape == (w.shape[0], 36)
    step = qw.scale.repeat_interleave(28, dim=1)
    assert torch.all((w - qw.dequantize()).abs() <= step / 2 + 1e-7)
    assert fmt.bits_per_weight(1008) == pytest.approx(8 + 32 / 28)


def test_non_integer_format_is_rejected_by_quantizer():
    with pytest.raises(NnpqError, match="not an integer format"):
        quantize_nearest(_weight(), TensorFormat(kind="fp16"))


# --- TensorFormat ------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_tensor_format_rejects_bad_widths(bits):
    with pytest.raises(NnpqError, match=f"integer width {bits} unsupported"):
        TensorFormat(bits=bits)


def test_tensor_format_validation():
    with pytest.raises(NnpqError, match="unknown weight format 'int3'"):
        TensorFormat(kind="int3")
    with pytest.raises(NnpqError, match="unknown granularity 'row'"):
        TensorFormat(granularity="row")
    with pytest.raises(NnpqError, match="positive group_size"):
        TensorFormat(granularity="group")
    with pytest.raises(NnpqError, match="malformed tensor format"):
        TensorFormat.from_dict({"kind": "int", "width": 8})
    # non-integer kinds ignore the integer fields
    assert TensorFormat(kind="fp16", bits=99).label() == "fp16"
    for bits in range(2, 9):
        assert TensorFormat(bits=bits).bits == bits


def test_bits_per_weight():
    # one fp32 scale per row of 1008 inputs: 8 + 32/1008
    assert INT8_CHANNEL.bits_per_weight(1008) == pytest.approx(8.0317, abs=1e-4)
    assert TensorFormat(bits=4, granularity="group", group_size=16).bits_per_weight(1008) == pytest.approx(6.0)
    # asymmetric adds an int8 zero point per scale
    assert TensorFormat(bits=4, granularity="group", group_size=32, symmetric=False).bits_per_weight(1024) \
        == pytest.approx(4 + 40 / 32)
    assert TensorFormat(granularity="tensor").bits_per_weight(1008) == 8.0
    assert FP32.bits_per_weight(1008) == 32.0
    assert TensorFormat(kind="bf16").bits_per_weight(1008) == 16.0
    # the default plan's INT8 is ~4x smaller than fp32
    assert 3.9 < FP32.bits_per_weight(1008) / INT8_CHANNEL.bits_per_weight(1008) < 4.0


def test_labels():
    assert INT8_CHANNEL.label() == "int8/channel"
    assert TensorFormat(bits=4, granularity="group", group_size=32, symmetric=False).label() == "int4/g32/asym"
    assert FP32.label() == "fp32"


# --- QuantPlan ---------------------------------------------------------------------------

INT4 = TensorFormat(bits=4)
INT6 = TensorFormat(bits=6)
FP16 = TensorFormat(kind="fp16")
BF16 = TensorFormat(kind="bf16")


def _plan() -> QuantPlan:
    # deliberately listed from most to least specific, so order alone cannot explain the result
    return QuantPlan(rules=(
        PlanRule(weight=FP16, member=0),
        PlanRule(weight=BF16, element="N", layer=2),
        PlanRule(weight=INT6, layer=1),
        PlanRule(weight=INT4, element="C"),
    ), description="test plan", extra={"note": [1, 2]})


def test_plan_most_specific_rule_wins():
    plan = _plan()
    assert plan.format_for(0, "C", 1) == FP16      # member beats layer and element
    assert plan.format_for(0, "N", 2) == FP16      # member beats element+layer
    assert plan.format_for(1, "N", 2) == BF16      # element+layer beats layer-only and element-only
    assert plan.format_for(1, "C", 1) == INT6      # layer beats element
    assert plan.format_for(1, "C", 2) == INT4      # element rule
    assert plan.format_for(1, "H", 0) == FP32      # no rule: fp32
    assert plan.format_for(7, "O", 3) == FP32


def test_plan_specificity_does_not_depend_on_rule_order():
    rules = _plan().rules
    reversed_plan = QuantPlan(rules=tuple(reversed(rules)))
    for key in [(0, "C", 1), (0, "N", 2), (1, "N", 2), (1, "C", 1), (1, "C", 2), (1, "H", 0)]:
        assert reversed_plan.format_for(*key) == _plan().format_for(*key), key


def test_default_plan_int8_hidden_fp32_final():
    plan = default_plan()
    for member in range(8):
        for element in ("H", "C", "N", "O", "S", "F", "Cl"):
            for layer in range(3):
                assert plan.format_for(member, element, layer) == INT8_CHANNEL
            assert plan.format_for(member, element, 3) == FP32  # the width-1 final layer
    assert uniform_plan(INT4, quantize_final=True).format_for(0, "H", 3) == INT4


def test_plan_json_round_trip():
    for plan in (_plan(), default_plan(), uniform_plan(TensorFormat(bits=4, granularity="group", group_size=16,
                                                                    symmetric=False), elements=["H", "C"])):
        text = json.dumps(plan.to_dict())
        back = QuantPlan.from_dict(json.loads(text))
        assert back == plan
        assert back.to_dict() == plan.to_dict()


def test_plan_from_dict_rejects_malformed():
    with pytest.raises(NnpqError, match="malformed quantization plan"):
        QuantPlan.from_dict({"rounding": "nearest"})
    with pytest.raises(NnpqError, match="malformed quantization plan"):
        QuantPlan.from_dict({"rules": [{"element": "H"}]})
    with pytest.raises(NnpqError, match="integer width 12"):
        QuantPlan.from_dict({"rules": [{"weight": {"kind": "int", "bits": 12}}]})


def test_require_known_elements():
    ani2x = ("H", "C", "N", "O", "S", "F", "Cl")
    require_known_elements(default_plan(), ani2x)  # element-free rules always pass
    require_known_elements(uniform_plan(INT4, elements=["S", "Cl"]), ani2x)
    with pytest.raises(NnpqError, match="plan names element 'Na'"):
        require_known_elements(uniform_plan(INT4, elements=["H", "Na"]), ani2x)
    # ANI-1x has no sulfur
    with pytest.raises(NnpqError, match="'S'"):
        require_known_elements(uniform_plan(INT4, elements=["S"]), ("H", "C", "N", "O"))


# --- the integer-weight kernel -----------------------------------------------------------

@pytest.mark.parametrize(
    "fmt",
    [INT8_CHANNEL, TensorFormat(granularity="tensor"), TensorFormat(bits=4, granularity="group", group_size=16,
                                                                    symmetric=False)],
    ids=lambda f: f.label(),
)
def test_int_weight_linear_equals_linear_with_dequantized_weight(fmt):
    w = _weight(out=32, inp=IN)
    bias = 0.01 * torch.randn(32, generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 7, IN, generator=torch.Generator().manual_seed(2))
    qw = quantize_nearest(w, fmt)
    deq = dequantize_weight(qw.qweight, qw.scale, qw.zero, qw.group_size)

    # an independent float64 dequantization: (q - zero) * scale, per group
    scale = _step_per_weight(qw.scale.double(), qw.group_size, 32, IN)
    zero = _step_per_weight(qw.zero.double(), qw.group_size, 32, IN)
    torch.testing.assert_close(deq.double(), (qw.qweight.double() - zero) * scale, rtol=1e-6, atol=0)

    y = int_weight_linear(x, qw.qweight, qw.scale, qw.zero, qw.group_size, bias)
    assert torch.equal(y, torch.nn.functional.linear(x, deq, bias))
    assert torch.equal(int_weight_linear(x, qw.qweight, qw.scale, qw.zero, qw.group_size, None),
                       torch.nn.functional.linear(x, deq))

    layer = QuantizedLinear(IN, 32, qw.scale.shape[0], qw.group_size, fmt.symmetric)
    layer.qweight.copy_(qw.qweight)
    layer.scale.copy_(qw.scale)
    layer.zero.copy_(qw.zero)
    layer.bias.copy_(bias)
    assert torch.equal(layer(x), y)
    assert torch.equal(torch.jit.script(layer)(x), y)
    # and the quantized product is close to the FP32 one (not some other matrix): measured
    # relative RMS error 0.011 (int8/channel), 0.022 (int8/tensor), 0.069 (int4/g16/asym)
    ref = torch.nn.functional.linear(x, w, bias)
    rel_rms = float((y - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    assert 0 < rel_rms < (0.05 if fmt.bits == 8 else 0.15)


def test_int_weight_linear_gradient_is_that_of_dequantized_linear():
    """Forces come from autograd through this kernel: the input gradient must be x-independent W^T."""
    qw = quantize_nearest(_weight(out=16, inp=64), INT8_CHANNEL)
    x = torch.randn(3, 64, dtype=torch.float32, requires_grad=True)
    y = int_weight_linear(x, qw.qweight, qw.scale, qw.zero, qw.group_size, None)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(grad, qw.dequantize().sum(dim=0).expand(3, 64), rtol=1e-5, atol=1e-6)


def test_fractional_bit_width_is_rejected():
    with pytest.raises(NnpqError, match="whole number of bits"):
        TensorFormat(bits=7.5)
