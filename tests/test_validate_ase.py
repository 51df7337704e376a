"""`nnpq validate --engine ase`: the protocol's stages in ASE, into the same frames, checkpoints
and report as OpenMM's; the engine keys every run, so the two engines' results never mix."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from validation_campaign import tiny

from nnpq.cli import main
from nnpq.errors import NnpqError
from nnpq.md.openmm import create_system
from nnpq.systems import get_system
from nnpq.validation.ase_runs import AseStages
from nnpq.validation.protocol import SHORT, Protocol
from nnpq.validation.runs import StageContext, read_frames, run_stage, start_state
from nnpq.validation.schema import read_report

SYSTEM = "alanine-dipeptide"


def _bonds(topology) -> np.ndarray:
    return np.array([(a.index, b.index) for a, b in topology.bonds()])


def test_engine_is_checked():
    with pytest.raises(NnpqError, match="unknown engine 'foo'; use one of openmm, ase"):
        Protocol(engine="foo")


def test_cli_unknown_engine_is_one_line(w8_path, capsys):
    assert main(["validate", str(w8_path), "--systems", SYSTEM, "--engine", "foo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown engine 'foo'" in err and "\n" not in err


def test_ase_and_openmm_nve_from_one_start(fp32_ani2x, tmp_path):
    """Same model, start and seed: the first frame's potential energy is the same number in both
    engines (units converted exactly), ASE's kinetic energy is 1/2 m v^2 of the start velocities,
    and both conserve the total energy alike over 50 fs at 0.5 fs."""
    mol = get_system(SYSTEM)
    system = create_system(mol.topology, fp32_ani2x, remove_cm_motion=False)
    protocol = tiny(nve_ps=0.05)
    start = start_state(tmp_path / "start.npz", "k", system, mol.positions_nm(), protocol, seed=1)
    stage = protocol.stage("nve_0.5fs")
    omm = run_stage(StageContext(system, protocol, 1), start, stage, protocol, tmp_path / "openmm", "k",
                    _bonds(mol.topology))
    ase = run_stage(AseStages(fp32_ani2x, mol.topology, None, protocol, 1), start, stage, protocol, tmp_path / "ase",
                    "k", _bonds(mol.topology))
    assert omm.stable and ase.stable and len(ase.time_ps) == len(omm.time_ps) == 51
    np.testing.assert_allclose(ase.time_ps, omm.time_ps, rtol=1e-12)
    np.testing.assert_allclose(ase.positions_nm[0], omm.positions_nm[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ase.potential_kj_mol[0], omm.potential_kj_mol[0], rtol=1e-12, atol=1e-6)
    masses = np.array([a.element.mass._value for a in mol.topology.atoms()])
    np.testing.assert_allclose(ase.kinetic_kj_mol[0], 0.5 * np.sum(masses[:, None] * start.velocities**2), rtol=1e-9)
    # OpenMM's leapfrog reports the kinetic energy half a step on: close, not equal
    assert abs(omm.kinetic_kj_mol[0] - ase.kinetic_kj_mol[0]) < 0.1 * ase.kinetic_kj_mol[0]
    spread = {name: f.total_kj_mol.std() for name, f in (("openmm", omm), ("ase", ase))}
    kinetic = ase.kinetic_kj_mol.std()
    assert max(spread.values()) < 0.1 * kinetic  # conserved: a tenth of what flows between E_kin and E_pot
    assert 1 / 3 < spread["ase"] / spread["openmm"] < 3, spread
    slopes = [abs(np.polyfit(f.time_ps, f.total_kj_mol, 1)[0]) for f in (omm, ase)]
    assert max(slopes) * 0.05 < 2 * max(spread.values())  # no drift beyond the fluctuation over the run


def test_ase_stage_resumes_bit_for_bit(fp32_ani2x, tmp_path):
    """A Langevin stage in ASE stopped after two chunks and resumed gives the frames of the run
    made straight through (positions, momenta and the noise stream are checkpointed). FP32:
    the fused runtime's first few calls in a process round differently, by ~1e-10 nm."""
    mol = get_system("ethanol")
    system = create_system(mol.topology, fp32_ani2x, remove_cm_motion=False)
    protocol = tiny(checkpoint_frames=4)
    start = start_state(tmp_path / "start.npz", "k", system, mol.positions_nm(), protocol, seed=2)
    stage, bonds = protocol.stage("nvt"), _bonds(mol.topology)  # 24 steps, a frame every 2: 13 frames
    straight = run_stage(AseStages(fp32_ani2x, mol.topology, None, protocol, 2), start, stage, protocol,
                         tmp_path / "a", "k", bonds)
    short = tiny(checkpoint_frames=4, nvt_ps=0.008)
    run_stage(AseStages(fp32_ani2x, mol.topology, None, short, 2), start, short.stage("nvt"), short,
              tmp_path / "b", "k", bonds)
    resumed = run_stage(AseStages(fp32_ani2x, mol.topology, None, protocol, 2), start, stage, protocol,
                        tmp_path / "b", "k", bonds)
    assert len(resumed.time_ps) == len(straight.time_ps) == 13
    np.testing.assert_array_equal(resumed.positions_nm, straight.positions_nm)
    np.testing.assert_array_equal(resumed.total_kj_mol, straight.total_kj_mol)


def test_validate_ase_report_and_engine_keys(w8_path, tmp_path, capsys):
    """OpenMM then ASE (``--short``, one seed) in one output folder: the ASE campaign reuses the
    shared start but sets every OpenMM run and result aside; its report names the engine and
    holds drift and fidelity metrics; `nnpq compare` reads both reports."""
    out = tmp_path / "out"
    argv = ["validate", str(w8_path), "--systems", SYSTEM, "--seeds", "1", "--short", "--modes", "exact",
            "--serial", "--out", str(out)]
    assert main(argv) == 0
    openmm_report = tmp_path / "openmm" / "report.json"
    openmm_report.parent.mkdir()
    shutil.copy(out / "report.json", openmm_report)
    seed = out / "runs" / SYSTEM / "seed-1"
    openmm_nve = read_frames(seed / "fp32" / "nve_0.5fs")

    assert main(argv + ["--engine", "ase"]) == 0
    text = capsys.readouterr().out
    report = read_report(out / "report.json")
    assert report["engine"] == "ase" and report["engine_label"].startswith("ASE ")
    assert report["protocol"] == dataclasses.replace(SHORT, engine="ase").to_dict()
    assert report["complete"] and not report["missing"]
    assert report["execution"]["tasks"] == {"done": 3, "reused": 1, "failed": 0}  # the start is shared
    assert "Engine ASE" in (out / "report.html").read_text()
    # the OpenMM runs and results were set aside, never resumed
    for model in ("fp32", "ani2x-w8-exact"):
        assert (seed / model / "nve_0.5fs.stale-0" / "checkpoint.npz").is_file()
        assert (out / "tasks" / "run" / SYSTEM / "seed-1" / f"{model}.json.stale-0").is_file()
    assert (out / "tasks" / "fidelity" / SYSTEM / "seed-1" / "ani2x-w8-exact.json.stale-0").is_file()
    ase_nve = read_frames(seed / "fp32" / "nve_0.5fs")
    assert ase_nve.potential_kj_mol[0] == pytest.approx(openmm_nve.potential_kj_mol[0], rel=1e-12)  # one start
    assert not np.array_equal(ase_nve.positions_nm[1:], openmm_nve.positions_nm[1:])  # another integrator

    entry = report["systems"][SYSTEM]["models"]
    for key in ("fp32", "ani2x-w8-exact"):
        for stage in ("nve_0.5fs", "nve_1fs"):
            drift = entry[key]["drift"][stage]
            assert np.isfinite(drift["mean_mev_atom_ps"]) and all(entry[key]["stability"].values())
    force = entry["ani2x-w8-exact"]["fidelity"]["force"]["force_rmse"]
    openmm = read_report(openmm_report)["systems"][SYSTEM]["models"]["ani2x-w8-exact"]["fidelity"]["force"]
    assert 0 < force < 50 and force == pytest.approx(openmm["force_rmse"], rel=0.5)  # same model, other frames
    assert any(v["metric"] == "force_rmse" for v in report["verdicts"])
    assert SYSTEM in text

    assert main(["compare", str(openmm_report), str(out / "report.json"), "-o", str(tmp_path / "c.html")]) == 0
    assert "(ASE)" in capsys.readouterr().out
