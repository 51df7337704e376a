"""The fused runtime's Triton backend (nnpq.runtime.triton_network) on the real ANI-2x.

Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported): the same Python path the CUDA runtime
takes. With ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the compiled kernels on
the GPU. Units: Hartree and Hartree/Å unless stated.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from triton_mode import triton_kernels  # noqa: E402

T, DEVICE, _INTERPRET = triton_kernels()
from nnpq.errors import NnpqError  # noqa: E402
from nnpq.models import energy_and_forces, load_fp32, load_potential  # noqa: E402
from nnpq.runtime import RuntimePotential, resolve_backend, runtime_from_tensors  # noqa: E402
from nnpq.runtime.network import IntWeight  # noqa: E402
from nnpq.runtime.triton_network import TritonElementNet  # noqa: E402
from nnpq.spec.formats import TensorFormat  # noqa: E402
from nnpq.spec.plan import PlanRule, QuantPlan  # noqa: E402
from nnpq.systems import get_system  # noqa: E402
from nnpq.units import HARTREE_TO_KCAL_MOL  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """Triton reads TRITON_INTERPRET again when it launches, so keep it set; and run whole ANI
    layers on wide interpreter tiles (its cost is per tile operation; no effect on a GPU)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", _INTERPRET)
        with T.interpreter_tile(256, 128):
            yield


def _triton(path, mode: str = "exact") -> RuntimePotential:
    potential = load_potential(path, mode=mode, device=DEVICE, backend="triton")
    assert potential.backend == "triton" and all(isinstance(n, TritonElementNet) for n in potential.networks.elements)
    return potential


def _assert_same_energy_forces(ref, test, numbers, positions) -> None:
    e0, f0 = energy_and_forces(ref, numbers, positions)
    e1, f1 = energy_and_forces(test, numbers, positions)
    # float32 networks summed in float64 (test_runtime: |dE| <= 3e-8 Ha, |dF| <= 1e-7 Ha/Å between
    # two float32 summation orders); a wrong scale, zero point or block moves them by ~1e-3
    assert abs(e1 - e0) < 1e-6, e1 - e0
    np.testing.assert_allclose(f1, f0, rtol=0, atol=2e-6)


def test_exact_triton_equals_torch_backend_per_channel(w8_path):
    system = get_system("ethanol")
    triton_potential = _triton(w8_path)
    blocks = [m for m in triton_potential.modules() if isinstance(m, IntWeight)]
    assert blocks and all(b.qweight.dtype == torch.int8 for b in blocks)  # codes kept as int8
    torch_potential = load_potential(w8_path, device=DEVICE, backend="torch")
    assert torch_potential.backend == "torch"
    _assert_same_energy_forces(torch_potential, triton_potential, system.atomic_numbers, system.positions)


def _mixed_tensors() -> tuple[QuantPlan, dict[str, torch.Tensor]]:
    """ANI-2x with layer 0 in several formats inside each element's stacked layer:
    H group-wise asymmetric (int8/g32 -> 28 inputs per group on the 1008-wide AEV) but member 3
    in 4-bit codes (int4/g32/asym); C per-channel with member 5 in fp16; O per-channel with per-member input
    equalization (factors in [0.5, 1.5): any positive factors are a valid stored weight)."""
    from nnpq.quant.apply import quantize_model

    channel = TensorFormat.parse("int8/channel")
    rules = (PlanRule(channel),
             PlanRule(TensorFormat.parse("int8/g32/asym"), element="H", layer=0),
             PlanRule(TensorFormat.parse("int4/g32/asym"), element="H", layer=0, member=3),
             PlanRule(TensorFormat.parse("fp16"), element="C", layer=0, member=5))
    tensors = dict(quantize_model(load_fp32("ani2x"), QuantPlan(rules=rules)).state_dict())
    gen = torch.Generator().manual_seed(0)
    for m in range(8):
        tensors[f"potentials.nnp.neural_networks.members.{m}.atomics.O.layers.0.col_scale"] = \
            torch.rand(1008, generator=gen) + 0.5
    return QuantPlan(rules=rules + (PlanRule(channel, element="O", layer=0, equalize=True),)), tensors


def test_exact_triton_equals_torch_backend_mixed_formats():
    plan, tensors = _mixed_tensors()
    reference = runtime_from_tensors("ani2x", plan, tensors, "mixed", backend="torch").to(DEVICE)
    potential = runtime_from_tensors("ani2x", plan, tensors, "mixed", backend="triton").to(DEVICE)
    kinds = {i: [type(b).__name__ + ("/eq" if getattr(b, "equalized", False) else "") for b in n.layers[0].blocks]
             for i, n in enumerate(potential.networks.elements) if i in (0, 1, 3)}  # H, C, O
    assert kinds == {0: ["IntWeight"] * 3, 1: ["IntWeight", "DenseWeight", "IntWeight"], 3: ["IntWeight/eq"]}, kinds
    system = get_system("ethanol")
    _assert_same_energy_forces(reference, potential, system.atomic_numbers, system.positions)


def test_exact_triton_forces_are_minus_the_energy_gradient(w8_path):
    """Central differences of the Triton-backend energy along three random unit directions of
    all atoms of a thermally displaced ethanol: ``-(E(x + h d) - E(x - h d)) / 2h = F . d``.

    h = 2^-9 Å: the float32 rounding of the energy (~1e-7 Ha) over 2h and the O(h^2) truncation
    leave ~1e-4 Ha/Å, against projected forces of ~0.05 Ha/Å.
    """
    from nnpq.validation.evaluate import perturbed_frames

    potential = _triton(w8_path)
    system = get_system("ethanol")
    positions = perturbed_frames(system.positions, 2, sigma=0.1, seed=1)[1].astype(np.float32).astype(np.float64)
    _, forces = energy_and_forces(potential, system.atomic_numbers, positions)
    z = torch.tensor(system.atomic_numbers, device=DEVICE)

    def energy(x: np.ndarray) -> float:
        with torch.no_grad():  # forward only: no gradient is computed
            return float(potential(z, torch.tensor(x, device=DEVICE)))

    h = 2.0 ** -9
    rng = np.random.default_rng(0)
    for _ in range(3):
        d = rng.normal(size=positions.shape)
        d /= np.linalg.norm(d)
        fd = -(energy(positions + h * d) - energy(positions - h * d)) / (2 * h)
        projected = float((forces * d).sum())
        assert abs(fd - projected) < 2e-4, (fd, projected)
        assert abs(projected) > 1e-2, projected  # a direction the forces act along


def test_fast_triton_stays_close_to_fp32_and_exact(w8_path, fp32_ani2x):
    """The CUDA fast mode (W8A16: AEV rounded to float16 in layer 0, tf32 input gradient) on
    ethanol, against FP32 TorchANI and the exact mode of the same file.

    Measured: fast vs exact force RMSE ~3e-3 kcal/mol/Å (the w8 plan's own error against FP32
    is ~1 kcal/mol/Å); under the interpreter the tf32 gradient is computed in float32.
    """
    system = get_system("ethanol")
    fast = _triton(w8_path, mode="fast")
    assert fast.mode == "fast"
    e_fast, f_fast = energy_and_forces(fast, system.atomic_numbers, system.positions)
    e_exact, f_exact = energy_and_forces(_triton(w8_path), system.atomic_numbers, system.positions)
    e_fp32, f_fp32 = energy_and_forces(fp32_ani2x, system.atomic_numbers, system.positions)

    def rmse(a, b) -> float:
        return float(np.sqrt(np.mean((a - b) ** 2)) * HARTREE_TO_KCAL_MOL)

    assert 0 < rmse(f_fast, f_exact) < 0.02, rmse(f_fast, f_exact)
    assert abs(e_fast - e_exact) * HARTREE_TO_KCAL_MOL / len(f_fast) < 2e-3
    # the plan's error dominates: fast mode adds at most a few percent to it
    assert rmse(f_fast, f_fp32) < 1.05 * rmse(f_exact, f_fp32), (rmse(f_fast, f_fp32), rmse(f_exact, f_fp32))


def test_backend_selection_and_misuse(w8_path):
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("auto", "cuda") == "triton"  # triton is importable here
    assert resolve_backend("torch", "cuda") == "torch"
    assert load_potential(w8_path).backend == "torch"  # CPU default
    for call, message in [
        (lambda: load_potential(w8_path, backend="cutlass"), "unknown runtime backend 'cutlass'"),
        (lambda: load_potential(w8_path, device="gpu"), "unknown device 'gpu'"),
        (lambda: torch.jit.script(_triton(w8_path).networks), "Triton runtime backend runs in Python only"),
    ]:
        with pytest.raises(NnpqError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_triton_backend_runs_in_openmm_pythonforce(w8_path):
    """The engine path a CUDA user gets: a PythonForce around the Triton runtime (a TorchForce
    cannot hold it, so the default backend picks PythonForce)."""
    openmm = pytest.importorskip("openmm")  # a bare GPU machine may lack it
    from openmm import unit

    from nnpq.md.openmm import create_system
    from nnpq.units import HARTREE_TO_KJ_MOL

    system = get_system("ethanol")
    potential = _triton(w8_path)
    omm = create_system(system.topology, potential, remove_cm_motion=False, device=DEVICE)
    assert isinstance(omm.getForce(0), openmm.PythonForce)
    context = openmm.Context(omm, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(system.positions * 0.1)
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    expected, _ = energy_and_forces(potential, system.atomic_numbers, system.positions)
    assert abs(energy - expected * HARTREE_TO_KJ_MOL) < 1e-3, (energy, expected * HARTREE_TO_KJ_MOL)


class _W8A8Net(TritonElementNet):
    """The rejected CUDA fast mode: layer 0 on `w8a8_linear` (dynamic per-atom INT8 activations,
    the radial and angular AEV blocks scaled apart), per-channel symmetric weights only."""

    def first_forward(self, x, w0):
        outs = []
        for start, stop, block, _ in self._parts():
            outs.append(T.w8a8_linear(x, block.qweight, block.scale, self.layers[0].bias[start:stop], self.alpha,
                                      act_splits=(112,), out_dtype=torch.float32))
        return torch.cat(outs, 1)


@pytest.mark.slow
def test_w8a16_is_the_accurate_cuda_fast_mode(w8_path):
    """Why the CUDA fast mode is W8A16: force RMSE added to the exact mode's forces on a hot
    frame of four library molecules (RMS force 16-32 kcal/mol/Å).

    Measured (kcal/mol/Å): W8A16 0.011, the CPU fast mode (two-plane INT8) 0.044, W8A8 1.09.
    """
    from nnpq.systems.library import library

    exact = _triton(w8_path)
    fast = {"w8a16": _triton(w8_path, mode="fast"), "cpu": load_potential(w8_path, mode="fast"),
            "w8a8": _triton(w8_path, mode="fast")}
    for net in fast["w8a8"].networks.elements:
        net.__class__ = _W8A8Net
    squared = {k: [] for k in fast}
    for entry in [e for e in library() if e.name in ("ethane", "norbornane", "styrene", "phenol")]:
        _, f_exact = energy_and_forces(exact, entry.numbers, entry.frames[-1])
        for name, potential in fast.items():
            squared[name].append(np.mean((energy_and_forces(potential, entry.numbers, entry.frames[-1])[1]
                                          - f_exact) ** 2))
    rmse = {k: float(np.sqrt(np.mean(v)) * HARTREE_TO_KCAL_MOL) for k, v in squared.items()}
    assert len(squared["w8a8"]) == 4 and rmse["w8a16"] < 0.03 and rmse["cpu"] < 0.1, rmse
    assert rmse["w8a8"] > 10 * max(rmse["w8a16"], rmse["cpu"]), rmse


def test_triton_backend_on_cpu_without_the_interpreter_is_a_one_line_error(w8_path):
    import subprocess
    import sys

    code = ("from nnpq.errors import NnpqError\nfrom nnpq.models import load_potential\n"
            f"try:\n    load_potential({str(w8_path)!r}, backend='triton')\nexcept NnpqError as e:\n    print(e)")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.strip().startswith("the Triton backend runs on CUDA, not on cpu") and out.count("\n") == 1, out
