"""`nnpq validate` and the CLI end to end: NVE runs, drift, report files, resume, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nnpq.cli import main
from nnpq.md.openmm import create_system
from nnpq.systems import get_system
from nnpq.validation.nve import NVESettings, prepare_start, run_nve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cli_systems_lists_catalogue(capsys):
    assert main(["systems"]) == 0
    out = capsys.readouterr().out
    for name in ("ethanol", "aspirin", "alanine-dipeptide", "water-box", "sfcl-sulfonamide"):
        assert name in out


def test_cli_quantize_writes_file_and_table(tmp_path, capsys):
    out = tmp_path / "e.nnpq"
    argv = ["quantize", "ani2x", "-o", str(out), "--rounding", "nearest", "--weight", "int8/channel",
            "--calibration-systems", "ethanol", "--no-library", "--no-baselines", "-q"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert out.is_file() and out.stat().st_size < 16e6  # 55 MB of FP32 -> about 14 MB
    assert "model file (MB)" in text and "held-out" in text and "int8/channel" in text


@pytest.mark.parametrize("argv, phrase", [
    (["validate", "missing.nnpq", "--system", "ethanol"], "not found"),
    (["quantize", "ani3x"], "unknown model"),
    (["quantize", "ani2x", "-o", "x.pt"], "should end in .nnpq"),
    (["quantize", "ani2x", "--calibration-systems", "ethanol,benzene"], "unknown system 'benzene'"),
])
def test_cli_errors_are_one_line(argv, phrase, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nnpq: error:") and phrase in err and "\n" not in err


def test_cli_unknown_system(w8_path, capsys):
    assert main(["validate", str(w8_path), "--system", "watr-box", "--steps", "30"]) == 2
    err = capsys.readouterr().err.strip()
    assert "did you mean 'water-box'" in err and "\n" not in err


def test_resumed_run_equals_uninterrupted_run(w8_ani2x, tmp_path):
    """A run extended from its checkpoint follows the same trajectory as one run straight through."""
    mol = get_system("ethanol")
    system = create_system(mol.topology, w8_ani2x, remove_cm_motion=False)
    short = NVESettings(steps=40, report_interval=5, checkpoint_interval=20, equilibration_steps=20)
    long = NVESettings(steps=80, report_interval=5, checkpoint_interval=20, equilibration_steps=20)
    start = prepare_start(system, mol.positions_nm(), short)
    run_nve(system, start, short, tmp_path / "ck.npz")
    resumed = run_nve(system, start, long, tmp_path / "ck.npz")
    straight = run_nve(system, start, long)
    assert len(resumed.time_ps) == len(straight.time_ps) == 17
    # OpenMM's checkpoint restores the state to ~1e-10 nm (not bit for bit), and in 40 more
    # steps that stays far below anything physical; a restart from the wrong state would be off by ~1e-3
    assert np.array_equal(resumed.positions_nm[:9], straight.positions_nm[:9])
    assert np.abs(resumed.positions_nm - straight.positions_nm).max() < 1e-7
    assert np.abs(resumed.potential_kj_mol - straight.potential_kj_mol).max() < 1e-4


@pytest.mark.parametrize("steps", [pytest.param(300, id="short"),
                                   pytest.param(2000, id="long", marks=pytest.mark.slow)])
def test_validate_alanine_dipeptide_end_to_end(w8_path, tmp_path, steps, capsys):
    out = tmp_path / "report"
    argv = ["validate", str(w8_path), "--system", "alanine-dipeptide", "--steps", str(steps),
            "--equilibration-steps", "100", "--out", str(out), "-q"]
    assert main(argv) == 0
    assert "Drift" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    for run in ("fp32", "quantized"):
        drift = report[run]["drift"]
        # 0.5 fs Verlet on 22 atoms in double: the total energy wanders far less than the
        # kinetic energy fluctuates, for FP32 and (weight-only, smooth) quantized alike
        assert drift["drift_to_kinetic_std"] < 0.5
        assert drift["total_energy_std_kj_mol"] < 1.0
        assert drift["n_frames"] == steps // 10 + 1
    force = report["errors"]["force"]
    assert 0 < force["force_rmse"] < 0.1 * force["force_rms_ref"]  # kJ/mol/nm
    assert 0 <= report["rmsd_angstrom_final"] < 3.0
    for name in ("energy.png", "rmsd.png", "dihedrals.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "Quantized" in (out / "report.md").read_text()
    # a rerun finds the finished checkpoints and reproduces the report without new dynamics
    assert main(argv) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["quantized"]["drift"] == report["quantized"]["drift"]
