"""The fused runtime (nnpq.runtime) and its CPU kernels (nnpq.kernels.cpu) on the real ANI-2x.

Each kernel agrees with its plain-torch reference; the exact mode agrees with the same plan
run through TorchANI's per-member layers (autograd forces) and its forces are minus the
finite-difference gradient of its energy; the fast mode agrees with its own reference and
stays close to the exact mode. Units: Hartree and Hartree/Å unless stated.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnpq.errors import NnpqError
from nnpq.kernels import cpu
from nnpq.kernels.build import build_error
from nnpq.kernels.int8 import dequantize_weight
from nnpq.models import ANIPotential, energy_and_forces, load_fp32, load_potential
from nnpq.runtime import RuntimePotential, runtime_from_tensors
from nnpq.runtime.network import FastElementNet, IntWeight
from nnpq.spec.formats import TensorFormat
from nnpq.spec.plan import PlanRule, QuantPlan, uniform_plan
from nnpq.systems import get_system
from nnpq.units import HARTREE_TO_KCAL_MOL
from nnpq.validation.evaluate import perturbed_frames


# --- kernels against their references ------------------------------------------------------

def _spread_inputs(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Rows whose columns span four decades, like the AEV's radial and angular terms."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 1, cols)[torch.randperm(cols, generator=gen)]


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
@pytest.mark.parametrize("rows", [37, 5])  # 5 rows: the padded short product
def test_split_rows_and_product_equal_references(kernels, rows, monkeypatch):
    if kernels == "cpp" and not cpu.cpp_kernels():
        pytest.skip(f"the C++ kernels did not build here: {build_error('nnpq_int8')}")
    if kernels == "torch":
        monkeypatch.setattr(cpu, "cpp_kernels", lambda build=True: False)
    x = _spread_inputs(rows, 224)
    weight = torch.randn(48, 224, generator=torch.Generator().manual_seed(1))
    bias, col = torch.randn(48), torch.rand(224) + 0.5
    w_codes, w_scale = cpu.split_rows(weight)
    assert w_codes.dtype == torch.int8 and w_codes.shape == (96, 224) and w_scale.shape == (48, 1)
    codes, scale = cpu.split_rows(x, col)
    ref_codes, ref_scale = cpu.split_rows_torch(x, col)
    torch.testing.assert_close(scale, ref_scale)
    # a float rounding difference may move a second-plane code by one step (1/254 of the first's)
    assert (codes[:rows] == ref_codes[:rows]).all() and (codes[rows:].int() - ref_codes[rows:].int()).abs().max() <= 1
    w1, w2 = w_codes[:48].t(), w_codes[48:].t()
    for extra in ({}, {"col_scale": w_scale.flatten(), "bias": bias, "alpha": 0.1}):
        out = cpu.split_product(codes, scale, w1, w2, **extra)
        ref = cpu.split_product_reference(codes, scale, w1, w2, **extra)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_two_planes_carry_about_fifteen_bits():
    """Both operands split into two planes: the product errs ~1e-4 of its range against float64
    (measured 4.6e-5 on AEV-like inputs), where bfloat16 operands err ~3e-3."""
    x = _spread_inputs(64, 224, seed=2)
    weight = torch.randn(32, 224, generator=torch.Generator().manual_seed(3))
    exact = x.double() @ weight.double().t()
    w_codes, w_scale = cpu.split_rows(weight)
    out = cpu.split_product(*cpu.split_rows(x), w_codes[:32].t(), w_codes[32:].t(), w_scale.flatten())
    error = float((out.double() - exact).abs().max() / exact.abs().max())
    half = float(((x.bfloat16() @ weight.bfloat16().t()).double() - exact).abs().max() / exact.abs().max())
    assert error < 3e-4 and error < half / 10, (error, half)


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
@pytest.mark.parametrize("fmt", ["int8/channel", "int8/g32/asym", "int8/g8/asym", "int4/g32/asym", "int8/tensor"])
def test_dequantize_codes_equals_reference(fmt, kernels, monkeypatch):
    from nnpq.quant.quantizers import quantize_nearest

    if kernels == "cpp" and not cpu.cpp_kernels():
        pytest.skip(f"the C++ kernels did not build here: {build_error('nnpq_int8')}")
    if kernels == "torch":
        monkeypatch.setattr(cpu, "cpp_kernels", lambda build=True: False)
    tf = TensorFormat.parse(fmt)
    weight = torch.randn(64, 1008, generator=torch.Generator().manual_seed(3))
    q = quantize_nearest(weight, tf)
    zero = None if tf.symmetric else q.zero
    reference = dequantize_weight(q.qweight, q.scale, q.zero, q.group_size)
    tolerance = {"rtol": 1e-6, "atol": 1e-6 * float(reference.abs().max())}  # float32 rounding; a step is ~1e-2
    fast = cpu.dequantize_codes(q.qweight, q.scale, zero, q.group_size)
    torch.testing.assert_close(fast, reference, **tolerance)
    # two members' rows (32 each), each with its own equalization factors
    col = torch.rand(2, 1008, generator=torch.Generator().manual_seed(4)) + 0.5
    fast = cpu.dequantize_codes(q.qweight, q.scale, zero, q.group_size, col)
    torch.testing.assert_close(fast, reference / col.repeat_interleave(32, dim=0), **tolerance)


def test_equalized_members_dequantize_each_with_its_own_factors():
    gen = torch.Generator().manual_seed(4)
    codes = [torch.randint(-127, 128, (16, 56), dtype=torch.int8, generator=gen) for _ in range(2)]
    scales = [torch.rand(16, 1, generator=gen) for _ in range(2)]
    factors = [torch.rand(56, generator=gen) + 0.5 for _ in range(2)]
    block = IntWeight(torch.cat(codes), torch.cat(scales), None, torch.stack(factors), 56, 2)
    expected = torch.cat([dequantize_weight(c, s, torch.zeros(1, 1, dtype=torch.int8), 56, f)
                          for c, s, f in zip(codes, scales, factors)])
    torch.testing.assert_close(block.dequantize(), expected)


def test_celu_slope_equals_reference():
    z = torch.linspace(-2, 2, 4001)
    y = torch.nn.functional.celu(z, 0.1)
    torch.testing.assert_close(cpu.celu_slope(y, 0.1), cpu.celu_slope_reference(y, 0.1))
    # and it is CELU's derivative
    zz = z.clone().requires_grad_(True)
    (dz,) = torch.autograd.grad(torch.nn.functional.celu(zz, 0.1).sum(), zz)
    torch.testing.assert_close(cpu.celu_slope(y, 0.1), dz, rtol=1e-5, atol=1e-6)


# --- the exact mode against TorchANI's per-member layers ---------------------------------------

def _assert_same_energy_forces(ref, test, name: str, force_atol: float = 2e-6) -> None:
    system = get_system(name)
    e0, f0 = energy_and_forces(ref, system.atomic_numbers, system.positions, system.box)
    e1, f1 = energy_and_forces(test, system.atomic_numbers, system.positions, system.box)
    # float32 networks summed in float64: measured |dE| <= 3e-8 Ha, |dF| <= 1e-7 Ha/Å
    assert abs(e1 - e0) < 1e-6, (name, e1 - e0)
    np.testing.assert_allclose(f1, f0, rtol=0, atol=force_atol)


@pytest.mark.parametrize("name", ["aspirin", "sfcl-sulfonamide"])
def test_exact_mode_equals_reference_runtime(w8_ani2x, w8_reference, name):
    assert isinstance(w8_ani2x, RuntimePotential) and w8_ani2x.mode == "exact"
    _assert_same_energy_forces(w8_reference, w8_ani2x, name)


def test_exact_mode_equals_reference_on_periodic_water(w8_ani2x, w8_reference):
    _assert_same_energy_forces(w8_reference, w8_ani2x, "water-box", force_atol=5e-6)


def test_fp32_runtime_equals_torchani(fp32_ani2x):  # fixture: skips without the weights
    runtime = load_potential("ani2x", mode="exact")
    assert isinstance(runtime, RuntimePotential) and runtime.mode == "fp32"
    assert isinstance(fp32_ani2x, ANIPotential) and fp32_ani2x.mode == "fp32"
    _assert_same_energy_forces(fp32_ani2x, runtime, "sfcl-sulfonamide")


MIXED_PLAN = QuantPlan(rules=(
    PlanRule(TensorFormat.parse("int8/channel")),
    PlanRule(TensorFormat.parse("int4/g32/asym"), element="H", layer=0, member=3),  # one member differs
    PlanRule(TensorFormat.parse("int8/tensor"), element="H", layer=3),  # a quantized final layer
    PlanRule(TensorFormat.parse("fp16"), element="O", layer=1),
    PlanRule(TensorFormat.parse("bf16"), element="C", layer=2),
    PlanRule(TensorFormat.parse("fp32"), element="N", layer=0),
))


def test_exact_mode_equals_reference_for_a_mixed_plan(fp32_ani2x):
    """Members in different formats inside one stacked layer, half and FP32 layers, a quantized final layer."""
    from nnpq.quant.apply import quantize_model

    model = quantize_model(fp32_ani2x.ani, MIXED_PLAN)
    reference = ANIPotential(model, "mixed", "ani2x")
    runtime = runtime_from_tensors("ani2x", MIXED_PLAN, model.state_dict(), "mixed")
    _assert_same_energy_forces(reference, runtime, "sfcl-sulfonamide")


def test_runtime_keeps_int8_codes_and_less_memory_than_fp32(w8_ani2x):
    blocks = [m for m in w8_ani2x.modules() if isinstance(m, IntWeight)]
    assert len(blocks) == 7 * 3  # one stacked block of 8 members per element and hidden layer
    assert all(b.qweight.dtype == torch.int8 for b in blocks)
    net_bytes = sum(b.numel() * b.element_size() for b in w8_ani2x.networks.buffers())
    fp32_bytes = sum(p.numel() * 4 for p in load_fp32("ani2x").neural_networks.parameters())
    # int8 codes, a float32 scale per row, float32 biases and final layers: 0.254 of FP32
    assert 0.24 < net_bytes / fp32_bytes < 0.27, net_bytes / fp32_bytes


# --- the hand-written backward is the gradient ----------------------------------------------------

def test_network_gradient_equals_finite_differences_in_float64(w8_ani2x):
    """dE/dAEV of each element's fused ensemble (int8 codes dequantized in float64) against central differences."""
    import copy

    networks = copy.deepcopy(w8_ani2x.networks).double()
    system = get_system("sfcl-sulfonamide")
    species = w8_ani2x.z_to_index[torch.tensor(system.atomic_numbers)]
    coords, _ = w8_ani2x.wrapped_coordinates(torch.tensor(system.positions), None)
    aev = w8_ani2x.aev(species, coords, None).detach().double()
    gen = torch.Generator().manual_seed(0)
    h = 1e-5
    for element in species.unique().tolist():
        net = networks.elements[element]
        x = aev[species == element][:2]
        _, grad = net(x, True)
        for col in torch.randint(0, aev.shape[1], (4,), generator=gen).tolist() + [0]:
            plus, minus = x.clone(), x.clone()
            plus[0, col] += h
            minus[0, col] -= h
            fd = float(net(plus, False)[0].sum() - net(minus, False)[0].sum()) / (2 * h)
            assert abs(fd - float(grad[0, col])) <= 1e-6 * max(1.0, abs(fd)), (element, col, fd, float(grad[0, col]))


def test_exact_forces_equal_minus_finite_difference_gradient(w8_ani2x):
    """On ethanol, one component per atom, float64 central differences of the float32-evaluated energy.

    With h = 2^-9 Å the float32 rounding noise of the energy (~1e-7 Ha) and the O(h^2)
    truncation give |F_fd - F| <= ~1e-4 Ha/Å (measured 3e-5) on forces up to ~0.1 Ha/Å.
    """
    system = get_system("ethanol")
    positions = np.asarray(system.positions, dtype=np.float32).astype(np.float64)
    _, forces = energy_and_forces(w8_ani2x, system.atomic_numbers, positions)
    h = 2.0 ** -9
    for atom in range(len(positions)):
        for axis in (atom % 3,):
            plus, minus = positions.copy(), positions.copy()
            plus[atom, axis] += h
            minus[atom, axis] -= h
            e_plus, _ = energy_and_forces(w8_ani2x, system.atomic_numbers, plus)
            e_minus, _ = energy_and_forces(w8_ani2x, system.atomic_numbers, minus)
            fd = -(e_plus - e_minus) / (2 * h)
            assert abs(fd - forces[atom, axis]) < 2e-4, (atom, axis, fd, forces[atom, axis])


# --- fast mode ---------------------------------------------------------------------------------

class _ReferenceFastNet(FastElementNet):
    """`FastElementNet` with its layer-0 kernels swapped for their plain-torch references."""

    def first_forward(self, x, w0):
        f = self.first
        return cpu.split_product_reference(*cpu.split_rows_torch(x), f.w1.t(), None if f.w2 is None else f.w2.t(),
                                           f.w_scale, f.bias, self.alpha)

    def first_backward(self, dz, w0):
        f = self.first
        return cpu.split_product_reference(*cpu.split_rows_torch(dz, f.w_scale), f.w1, f.w2)


@pytest.mark.parametrize("plan", ["int8/channel", "int8/g8/asym"])
def test_fast_mode_equals_its_plain_torch_reference(plan, w8_path, w8_ani2x, tmp_path):
    if plan != "int8/channel":  # w8_path holds int8/channel; other formats are rounded here
        from nnpq.artifact import save_artifact
        from nnpq.pipeline import source_info
        from nnpq.quant.apply import quantize_model

        quantized = uniform_plan(TensorFormat.parse(plan))
        w8_path = tmp_path / "g8.nnpq"
        save_artifact(w8_path, quantize_model(load_fp32("ani2x"), quantized), quantized, source_info("ani2x"))
        w8_ani2x = load_potential(w8_path)
    fast = load_potential(w8_path, mode="fast")
    assert fast.mode == "fast" and all(isinstance(n, FastElementNet) for n in fast.networks.elements)
    system = get_system("sfcl-sulfonamide")
    species = fast.z_to_index[torch.tensor(system.atomic_numbers)]
    coords, _ = fast.wrapped_coordinates(torch.tensor(system.positions), None)
    aev = fast.aev(species, coords, None).detach()
    for i, net in enumerate(fast.networks.elements):
        x = aev[species == i]
        if len(x) == 0:
            continue
        # the stored per-channel codes are used as they are (one plane, two products); other
        # formats' dequantized weights are split into two planes (~15 bits, three products)
        f = net.first
        weight = w8_ani2x.networks.elements[i].layers[0].weight().double()
        planes = f.w1.double() + (0 if f.w2 is None else f.w2.double() / cpu.PLANE_RATIO)
        assert f.products == (2 if plan == "int8/channel" else 3)
        error = float((planes * f.w_scale.double()[:, None] - weight).abs().max() / weight.abs().max())
        assert error < (1e-7 if plan == "int8/channel" else 1e-4), error
        reference = _ReferenceFastNet.__new__(_ReferenceFastNet)
        reference.__dict__ = net.__dict__
        e, g = net(x, True)
        e_ref, g_ref = reference(x, True)
        torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-6)
        # float32 rounding differences (fast-math C++ vs torch, CELU's exp vs expm1) flip second-plane
        # codes, each ~3e-5 of its row's range (dropping the gradient's second plane erred 0.8 kcal/mol/Å in forces)
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=5e-4 * float(g_ref.abs().max()))


def test_fast_mode_stays_close_to_exact(w8_path, w8_ani2x, fp32_ani2x):
    """The fast mode adds little to the plan's own error.

    Measured on three frames of aspirin (0.05 Å displacements): exact vs FP32 force RMSE
    ~1.0 kcal/mol/Å (the w8 plan's weight rounding); fast vs exact 0.05 (0.01 from the INT8
    layer 0, the rest from the bfloat16 later layers).
    """
    fast = load_potential(w8_path, mode="fast")
    system = get_system("aspirin")
    for positions in perturbed_frames(system.positions, 3, sigma=0.05, seed=1):
        e_fast, f_fast = energy_and_forces(fast, system.atomic_numbers, positions)
        e_exact, f_exact = energy_and_forces(w8_ani2x, system.atomic_numbers, positions)
        rmse = np.sqrt(np.mean((f_fast - f_exact) ** 2)) * HARTREE_TO_KCAL_MOL
        assert 0 < rmse < 0.1, rmse
        assert abs(e_fast - e_exact) * HARTREE_TO_KCAL_MOL / len(positions) < 0.005


# --- modes through the loaders and engines ------------------------------------------------------

def test_modes_through_loaders(w8_path):  # fixture: skips without the weights
    assert isinstance(load_potential("ani2x"), ANIPotential)
    assert load_potential("ani2x", mode="fast").mode == "fast"
    assert load_potential(w8_path).mode == "exact"
    assert isinstance(load_potential(w8_path, mode="reference"), ANIPotential)
    with pytest.raises(NnpqError, match="unknown mode 'turbo'") as info:
        load_potential(w8_path, mode="turbo")
    assert "\n" not in str(info.value)


def test_exact_mode_runs_in_openmm_torchforce_and_fast_in_pythonforce(w8_path, w8_ani2x):
    import openmm
    from openmm import unit

    from nnpq.md.openmm import create_system
    from nnpq.units import HARTREE_TO_KJ_MOL

    system = get_system("ethanol")
    for mode, backend in (("exact", "torchforce"), ("fast", "pythonforce")):
        omm = create_system(system.topology, w8_path, mode=mode, backend=backend, remove_cm_motion=False)
        force = omm.getForce(0)
        assert isinstance(force, openmm.PythonForce) == (backend == "pythonforce"), (mode, type(force))
        context = openmm.Context(omm, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(system.positions * 0.1)
        energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        expected, _ = energy_and_forces(load_potential(w8_path, mode=mode), system.atomic_numbers, system.positions)
        assert abs(energy - expected * HARTREE_TO_KJ_MOL) < 1e-3, (mode, energy, expected * HARTREE_TO_KJ_MOL)
    with pytest.raises(NnpqError, match="pythonforce"):
        create_system(system.topology, w8_path, mode="fast", backend="torchforce")
