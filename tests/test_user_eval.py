"""`nnpq evaluate`: a quantized model against its FP32 reference on the user's own structure files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nnpq.cli import main
from nnpq.errors import NnpqError
from nnpq.structures import read_configurations
from nnpq.systems import get_system
from nnpq.validation.evaluate import outputs_on, set_errors
from nnpq.validation.user_eval import evaluate_files, format_evaluation

N_ASPIRIN = 4  # thermal-like aspirin frames
SIGMA = 0.05  # Å, Gaussian displacements about the MMFF geometry
# INT8 per-channel ANI-2x on these frames measured ~0.93-1.11 kcal/mol/Å force RMSE (of ~60 RMS force)
# and ~0.031-0.044 kcal/mol/atom energy MAE over seeds; budgets leave about a factor 2
FORCE_RMSE_BUDGET = 2.0
ENERGY_MAE_BUDGET = 0.10


def _aspirin_frames(seed: int = 0) -> list:
    base = get_system("aspirin").to_ase()
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(N_ASPIRIN):
        atoms = base.copy()
        atoms.positions = atoms.positions + rng.normal(scale=SIGMA, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real structure files a user might bring: multi-frame XYZ, periodic extXYZ, PDB, DCD + topology."""
    import ase.io
    import mdtraj as md

    d = tmp_path_factory.mktemp("structures")
    out = {}
    frames = _aspirin_frames()
    out["xyz"] = d / "aspirin.xyz"
    ase.io.write(out["xyz"], frames, format="xyz")

    # one vacuum ethanol frame and one periodic water-box frame (cell + pbc) in one extended XYZ
    out["extxyz"] = d / "mixed.extxyz"
    ase.io.write(out["extxyz"], [get_system("ethanol").to_ase(), get_system("water-box").to_ase()],
                 format="extxyz")

    out["pdb"] = d / "ethanol.pdb"
    ase.io.write(out["pdb"], get_system("ethanol").to_ase(), format="proteindatabank")

    # the same aspirin frames as a DCD (float32 Å on disk, nm in mdtraj) with a PDB topology
    system = get_system("aspirin")
    xyz_nm = np.stack([a.positions for a in frames]).astype(np.float32) / np.float32(10.0)
    traj = md.Trajectory(xyz_nm, md.Topology.from_openmm(system.topology))
    out["dcd"] = d / "aspirin.dcd"
    traj.save_dcd(str(out["dcd"]))
    out["top"] = d / "aspirin-top.pdb"
    traj[0].save_pdb(str(out["top"]))

    # frame 0 fine, frame 1 with a sodium ion the model lacks
    na = get_system("ethanol").to_ase()
    na.append("Na")
    na.positions[-1] = [6.0, 0.0, 0.0]
    out["na"] = d / "with-sodium.xyz"
    ase.io.write(out["na"], [get_system("ethanol").to_ase(), na], format="xyz")

    out["garbage"] = d / "notes.xyz"
    out["garbage"].write_text("these are my notes\nnot a structure\n1 2 3\n")
    return out


@pytest.fixture(scope="module")
def w8_result(w8_path, files) -> dict:
    """The quantized model on aspirin XYZ, the mixed periodic extXYZ and the ethanol PDB."""
    return evaluate_files(w8_path, [str(files["xyz"]), str(files["extxyz"]), str(files["pdb"])])


def test_fp32_against_itself_is_exactly_zero(fp32_ani2x, files):
    inputs = [str(files["xyz"]), str(files["extxyz"]), str(files["pdb"])]
    result = evaluate_files("ani2x", inputs, progress=True)
    assert result["model"] == result["reference"] == "ani2x"
    assert result["neighborlist"] == "cell_list"  # the water box is periodic
    assert result["overall"]["force_rmse"] == 0.0
    assert result["overall"]["energy_mae_per_atom"] == 0.0
    assert result["overall"]["force_rms_ref"] > 1.0
    for entry in list(result["per_file"].values()) + list(result["per_element"].values()):
        assert entry["force_rmse"] == 0.0


def test_quantized_errors_positive_and_within_budget(w8_result, files):
    r = w8_result
    assert r["model"] == "ani2x-w8.nnpq" and r["reference"] == "ani2x"
    assert r["units"] == {"energy": "kcal/mol", "force": "kcal/mol/Å"}
    assert r["n_configurations"] == N_ASPIRIN + 2 + 1
    n_water = get_system("water-box").n_atoms
    assert r["n_atoms_total"] == N_ASPIRIN * 21 + 9 + n_water + 9
    aspirin = r["per_file"][str(files["xyz"])]
    assert aspirin["n_frames"] == N_ASPIRIN and aspirin["n_atoms"] == 21 and not aspirin["periodic"]
    assert 0.05 < aspirin["force_rmse"] < FORCE_RMSE_BUDGET
    assert 0.0 < aspirin["energy_mae_per_atom"] < ENERGY_MAE_BUDGET
    assert aspirin["force_rmse"] < 0.05 * aspirin["force_rms_ref"]  # a few % of the forces themselves
    assert r["per_file"][str(files["extxyz"])]["periodic"] and r["per_file"][str(files["extxyz"])]["n_frames"] == 2
    assert r["per_file"][str(files["extxyz"])]["n_atoms"] is None  # frames of different sizes
    assert r["per_file"][str(files["pdb"])]["n_frames"] == 1
    for entry in r["per_file"].values():
        assert 0.0 < entry["force_rmse"] < FORCE_RMSE_BUDGET
        assert 0.0 < entry["energy_mae_per_atom"] < 0.15
    assert 0.0 < r["overall"]["force_rmse"] < FORCE_RMSE_BUDGET
    json.dumps(r)  # JSON-able as it is


def test_per_element_and_per_file_pool_to_overall(w8_result):
    r = w8_result
    assert set(r["per_element"]) == {"H", "C", "O"}
    n_water = get_system("water-box").n_atoms
    assert sum(e["n_atoms"] for e in r["per_element"].values()) == r["n_atoms_total"]
    assert r["per_element"]["C"]["n_atoms"] == N_ASPIRIN * 9 + 2 + 2
    assert r["per_element"]["O"]["n_atoms"] == N_ASPIRIN * 4 + 1 + n_water // 3 + 1
    total_sq = r["overall"]["force_rmse"] ** 2 * r["n_atoms_total"]
    by_element = sum(e["force_rmse"] ** 2 * e["n_atoms"] for e in r["per_element"].values())
    assert by_element == pytest.approx(total_sq, rel=1e-9)
    sizes = {name: N_ASPIRIN * 21 if name.endswith("aspirin.xyz") else 9 + n_water if name.endswith("extxyz") else 9
             for name in r["per_file"]}
    by_file = sum(f["force_rmse"] ** 2 * sizes[name] for name, f in r["per_file"].items())
    assert by_file == pytest.approx(total_sq, rel=1e-9)
    for e in r["per_element"].values():
        assert e["force_rmse"] > 0.0


def test_xyz_result_equals_direct_evaluation(fp32_ani2x, w8_path, w8_ani2x, files):
    result = evaluate_files(w8_path, [str(files["xyz"])])
    assert result["neighborlist"] == "all_pairs"
    configs = read_configurations(files["xyz"])
    direct = set_errors(outputs_on(fp32_ani2x, configs), outputs_on(w8_ani2x, configs), configs)
    # outputs_on batches molecules through TorchANI, evaluate goes frame by frame: float32 summation order
    for key in ("force_rmse", "force_rms_ref", "energy_mae_per_atom", "energy_max_per_atom"):
        assert result["overall"][key] == pytest.approx(direct[key], rel=1e-5, abs=1e-9)
        if key in result["per_file"][str(files["xyz"])]:
            assert result["per_file"][str(files["xyz"])][key] == pytest.approx(direct[key], rel=1e-5, abs=1e-9)
    for sym, entry in direct["per_element"].items():
        assert result["per_element"][sym]["force_rmse"] == pytest.approx(entry["force_rmse"], rel=1e-5)


def test_dcd_frames_match_the_same_frames_from_xyz(w8_path, files):
    from_dcd = read_configurations(files["dcd"], files["top"])
    from_xyz = read_configurations(files["xyz"])
    assert len(from_dcd) == N_ASPIRIN
    for a, b in zip(from_dcd, from_xyz):
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-4)  # float32 nm <-> Å rounding
    dcd = evaluate_files(w8_path, [str(files["dcd"])], topology=str(files["top"]))
    xyz = evaluate_files(w8_path, [str(files["xyz"])])
    assert dcd["per_file"][str(files["dcd"])]["n_frames"] == N_ASPIRIN
    for key in ("force_rmse", "force_rms_ref", "energy_mae_per_atom"):
        assert dcd["overall"][key] == pytest.approx(xyz["overall"][key], rel=1e-3)


def test_format_evaluation_table(w8_result, files):
    text = format_evaluation(w8_result)
    lines = text.splitlines()
    assert "kcal/mol/Å" in text and "kcal/mol" in text and "ref RMS F" in text
    assert sum(line.startswith("overall") for line in lines) == 1
    for name in ("aspirin.xyz", "mixed.extxyz", "ethanol.pdb"):
        assert sum(name in line for line in lines) == 1
    for sym in ("H", "C", "O"):
        assert any(line.split()[:1] == [sym] for line in lines)
    # fixed width: the overall and per-file rows line up
    rows = [line for line in lines if line.startswith("overall") or ".xyz" in line or ".pdb" in line
            or ".extxyz" in line]
    assert len({len(row) for row in rows}) == 1


def test_cli_json_and_output_file(w8_path, files, tmp_path, capsys):
    out = tmp_path / "sub" / "eval.json"
    argv = ["evaluate", str(w8_path), "--input", str(files["pdb"]), str(files["xyz"]), "--json", "-o", str(out), "-q"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert printed["n_configurations"] == N_ASPIRIN + 1
    assert set(printed["per_file"]) == {str(files["pdb"]), str(files["xyz"])}
    assert 0.0 < printed["overall"]["force_rmse"] < FORCE_RMSE_BUDGET


def test_cli_table(w8_path, files, capsys):
    assert main(["evaluate", str(w8_path), "--input", str(files["pdb"]), "--reference", "ani2x", "-q"]) == 0
    text = capsys.readouterr().out
    assert "overall" in text and "ethanol.pdb" in text and "kcal/mol/Å" in text


@pytest.mark.parametrize("case, phrases", [
    ("sodium", ["with-sodium.xyz:1", "Na"]),
    ("dcd_without_topology", ["aspirin.dcd", "--topology"]),
    ("missing", ["no-such-file.xyz", "not found"]),
    ("garbage", ["notes.xyz", "cannot read"]),
    ("missing_topology", ["nope.pdb", "not found"]),
])
def test_cli_bad_inputs_exit_2_with_one_line(w8_path, files, case, phrases, capsys):
    inputs = {"sodium": [str(files["na"])], "dcd_without_topology": [str(files["dcd"])],
              "missing": [str(files["xyz"].parent / "no-such-file.xyz")], "garbage": [str(files["garbage"])],
              "missing_topology": [str(files["dcd"]), "--topology", str(files["xyz"].parent / "nope.pdb")]}[case]
    assert main(["evaluate", str(w8_path), "--input", *inputs, "-q"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("nnpq: error:") and "\n" not in err and "Traceback" not in err
    for phrase in phrases:
        assert phrase in err
    assert captured.out == ""


def test_no_inputs_is_an_error():
    with pytest.raises(NnpqError, match="--input"):
        evaluate_files("ani2x", [])


def test_dcd_calibration_files_need_and_use_a_topology(files, fp32_ani2x):
    from nnpq.quant.calibration import CalibrationSettings, build_calibration_set

    settings = CalibrationSettings(systems=(), files=(str(files["dcd"]),), topology=str(files["top"]), library=False)
    calib = build_calibration_set(fp32_ani2x, settings)
    configs = calib.calibration + calib.holdout
    assert len(configs) == N_ASPIRIN and calib.holdout and calib.calibration
    xyz = {c.source.split(":")[1]: c.positions for c in read_configurations(files["xyz"])}
    for c in configs:  # the DCD frames are the XYZ frames (float32 on disk)
        assert np.allclose(c.positions, xyz[c.source.split(":")[1]], atol=1e-4)
    with pytest.raises(NnpqError, match="--calibration-topology"):
        build_calibration_set(fp32_ani2x, CalibrationSettings(systems=(), files=(str(files["dcd"]),)))
