"""Quantized models on chemistry calibration never saw: the library, the chemistry split, rounding
that leaves unseen inputs alone, and the applicability-domain check."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from nnpq.errors import NnpqError
from nnpq.quant.equalize import MAX_FACTOR, equalization_factors
from nnpq.quant.gptq import gptq_quantize
from nnpq.quant.quantizers import quantize_nearest
from nnpq.spec.formats import INT8_G32_ASYM
from nnpq.systems.library import GROUPS, chemistry_split, functional_groups, library
from tests.conftest import requires_ani2x


def test_library_covers_every_element_and_bonding_situation():
    entries = library()
    molecules = [e for e in entries if e.cell is None]
    assert len(molecules) >= 100
    for z in (1, 6, 7, 8, 16, 9, 17):
        assert sum(z in e.numbers for e in molecules) >= 20 if z in (1, 6, 7, 8) else 10
    present = set().union(*(functional_groups(e.smiles) for e in molecules))
    assert present == set(GROUPS)  # every group of the catalogue has molecules
    liquid = [e for e in entries if e.cell is not None]
    assert liquid and liquid[0].frames.shape[1] > 100  # a condensed organic phase
    for e in entries:  # physical frames: no atoms closer than 0.7 Å
        for frame in e.frames:
            d = np.linalg.norm(frame[:, None] - frame[None], axis=-1) + 10 * np.eye(len(frame))
            assert d.min() > 0.7, e.name


def test_chemistry_split_holds_groups_out_of_calibration():
    calibration, held, groups = chemistry_split(library(), seed=0)
    assert groups and held
    assert 0.1 <= len(held) / len([e for e in library() if e.cell is None]) <= 0.3
    for e in calibration:
        assert not functional_groups(e.smiles) & set(groups), e.name
    for e in held:
        assert functional_groups(e.smiles) & set(groups), e.name
    assert chemistry_split(library(), seed=1)[2] != groups  # the seed chooses the groups


def test_gptq_leaves_unexcited_inputs_at_round_to_nearest():
    """Inputs with no calibration signal keep their weights (to one rounding step), never zeroed."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen) * 0.1
    x = torch.randn(500, 64, generator=gen)
    x[:, 40:] = 0.0  # features calibration never excites
    hessian = (x.T @ x).double()
    q = gptq_quantize(w, hessian, INT8_G32_ASYM, damp=1e-2).dequantize()
    rtn = quantize_nearest(w, INT8_G32_ASYM)
    step = rtn.scale.repeat_interleave(rtn.group_size, dim=1)
    assert torch.all((q[:, 40:] - w[:, 40:]).abs() <= 0.51 * step[:, 40:] + 1e-7)
    assert w[:, 40:].abs().max() > 10 * step[:, 40:].max()  # so zeroing them would have been caught
    # where calibration has signal, GPTQ beats rounding on its own objective
    err = lambda d: float(torch.sum((d.double() @ hessian) * d.double()))
    assert err(q - w) < err(rtn.dequantize() - w)


def test_equalization_factors_are_bounded_and_neutral_where_unseen():
    rms = torch.tensor([0.0, 1e-9, 1e-3, 0.1, 1.0, 10.0, 0.0])
    s = equalization_factors(rms, 0.5)
    assert s[0] == 1 and s[-1] == 1
    assert torch.all(s >= 1 / MAX_FACTOR) and torch.all(s <= MAX_FACTOR)
    assert torch.equal(equalization_factors(rms, 0.0), torch.ones_like(rms))


def test_coverage_plan_rounds_first_layers_and_keeps_the_rest_as_asked():
    from nnpq.pipeline import coverage_plan
    from nnpq.spec.formats import INT8_G8_ASYM, NO_ACTIVATION

    coverage = {"H": {"excited_fraction": 0.97}, "S": {"excited_fraction": 0.6}}
    plan = coverage_plan(INT8_G8_ASYM, NO_ACTIVATION, "gptq", coverage, 0.9)
    assert plan.format_for(0, "H", 0) == INT8_G8_ASYM and plan.equalize_for(0, "H", 0)
    assert plan.format_for(0, "S", 0).kind == "fp16"
    assert all(plan.format_for(3, e, layer).kind == "fp16" for e in coverage for layer in (1, 2))
    assert plan.description.startswith("uniform int8/g8/asym on first layers, fp16 later hidden layers, fp16 first")
    same = coverage_plan(INT8_G8_ASYM, NO_ACTIVATION, "gptq", coverage, 0.0, later=None)
    assert all(same.format_for(0, e, layer) == INT8_G8_ASYM for e in coverage for layer in (0, 1, 2))
    assert same.description == "uniform int8/g8/asym on hidden layers, final layers fp32"


@pytest.fixture(scope="module")
def split_quantize(tmp_path_factory):
    """The default pipeline (GPTQ + equalization + refit) on the whole library but one built-in
    system, with the held-out chemistry molecules and the RTN int8/g32/asym baseline measured on
    them. A 60-molecule subset is too thin to judge per molecule: its coverage is lower, and the
    RMSE of a 4-atom molecule over 3 frames is a draw (RTN int8/g32/asym on acetylene: 0.07-0.25
    kcal/mol/Å across frame sets), so the ratios it gave swung between 0.8 and 1.7 with the code."""
    from nnpq.pipeline import QuantizeOptions, quantize_to_file
    from nnpq.quant.calibration import CalibrationSettings
    from nnpq.quant.refit import RefitSettings

    settings = CalibrationSettings(systems=("ethanol",), temperatures=(300.0,), frames_per_temperature=2,
                                   displaced=1, library_kinds=("md300K/0", "md600K/0"), seed=0)
    options = QuantizeOptions(calibration=settings, refit=RefitSettings(steps=3))
    path = tmp_path_factory.mktemp("gen") / "gen.nnpq"
    return path, quantize_to_file("ani2x", path, options)


@requires_ani2x
def test_default_plan_no_worse_than_rtn_on_held_out_chemistry(split_quantize):
    _, result = split_quantize
    # the networks calibration covers poorly keep their first layer in fp16, the others are rounded
    sparse = {e for e, c in result.coverage.items() if c["excited_fraction"] < 0.9}
    assert sparse and {e for e in result.coverage if result.plan.format_for(0, e, 0).kind == "fp16"} == sparse
    # and the later hidden layers, whose inputs also leave the calibrated range, are fp16 too
    assert all(result.plan.format_for(m, e, layer).kind == "fp16" for m in range(8) for e in result.coverage
               for layer in (1, 2))
    ours = result.heldout["this plan"]["chemistry"]["per_molecule"]
    rtn = result.heldout["int8/g32/asym RTN"]["chemistry"]["per_molecule"]
    assert len(ours) >= 5 and set(ours) == set(rtn)
    worse = {m: (ours[m]["force_rmse"], rtn[m]["force_rmse"]) for m in ours
             if ours[m]["force_rmse"] > rtn[m]["force_rmse"]}
    assert not worse, worse
    # one built-in system instead of five: energies well below rounding's, near the 0.005 target
    energy = result.heldout["this plan"]["chemistry"]["energy_mae_per_atom"]
    assert energy < 0.5 * result.heldout["int8/g32/asym RTN"]["chemistry"]["energy_mae_per_atom"] and energy < 0.01


@requires_ani2x
def test_domain_check_fires_outside_and_stays_silent_on_calibration(split_quantize):
    from nnpq.models import load_potential
    from nnpq.models.domain import check_domain
    from nnpq.systems import get_system

    path, result = split_quantize
    assert set(result.coverage) == {"H", "C", "N", "O", "S", "F", "Cl"}
    assert all(0 < c["excited_fraction"] <= 1 for c in result.coverage.values())
    potential = load_potential(path)
    ethanol = get_system("ethanol")  # calibrated on
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_domain(potential, ethanol.atomic_numbers, ethanol.positions) == {}
    # two molecules squeezed together: a contact no calibration frame has
    pos = np.concatenate([ethanol.positions, ethanol.positions + np.array([1.6, 0.0, 0.0])])
    with pytest.warns(UserWarning, match="outside its calibrated domain") as record:
        found = check_domain(potential, np.concatenate([ethanol.atomic_numbers] * 2), pos)
    assert found and "atom" in str(record[0].message)


@requires_ani2x
def test_fast_mode_holds_on_held_out_chemistry(split_quantize):
    """The quantize table's fast-mode row (INT8 layer 0, bfloat16 later layers, the runtime as it
    runs) stays within 0.25 kcal/mol/Å of FP32 on the held-out molecules (issue 8; ~0.1 with the
    full default calibration) and close to the weight-only (exact) errors."""
    _, result = split_quantize
    exact, fast = (result.heldout[k]["chemistry"] for k in ("this plan", "this plan, fast mode"))
    assert set(fast["per_molecule"]) == set(exact["per_molecule"])
    assert fast["force_rmse"] < 0.25, fast["force_rmse"]
    assert fast["force_rmse"] != exact["force_rmse"]  # a row of its own, not the exact mode's
    assert exact["force_rmse"] - 0.01 < fast["force_rmse"] < exact["force_rmse"] + 0.1
    assert fast["energy_mae_per_atom"] < exact["energy_mae_per_atom"] + 0.005


@requires_ani2x
def test_engine_set_up_warns_once_outside_the_domain_and_stays_silent_on_built_in_systems(split_quantize, tmp_path):
    """The OpenMM force (as `nnpq simulate` builds it) and `nnpq validate`'s set-up check the
    starting structure: silent on a calibrated system, one warning naming the squeezed atoms."""
    from openmm import app, unit

    from nnpq.md.openmm import create_system
    from nnpq.systems import get_system
    from nnpq.validation.validate import campaign_for

    path, _ = split_quantize
    ethanol = get_system("ethanol")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_system(ethanol.topology, str(path), backend="pythonforce", positions=ethanol.positions)
        campaign_for([str(path)], ["ethanol"], 1, tmp_path / "campaign")
    modeller = app.Modeller(ethanol.topology, ethanol.positions * unit.angstrom)
    modeller.add(ethanol.topology, (ethanol.positions + np.array([1.6, 0.0, 0.0])) * unit.angstrom)
    with pytest.warns(UserWarning, match="outside its calibrated domain") as record:
        create_system(modeller.topology, str(path), backend="pythonforce", positions=modeller.positions)
    assert len(record) == 1 and "OpenMM starting structure" in str(record[0].message)
    assert "atom(s): " in str(record[0].message)
    with pytest.raises(NnpqError, match=r"positions have shape \(9, 3\)"):
        create_system(modeller.topology, str(path), backend="pythonforce", positions=ethanol.positions)
