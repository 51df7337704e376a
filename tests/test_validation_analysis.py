"""Pure-analysis parts of nnpq.validation: drift fit, structure/error metrics, report files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nnpq.errors import NnpqError
from nnpq.validation.drift import DriftResult, fit_drift
from nnpq.validation.report import summary_table, to_jsonable, write_report
from nnpq.validation.structure import (
    dihedral_series,
    energy_errors,
    force_errors,
    kabsch_rmsd,
    rmsd_series,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation matrix."""
    k = axis / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


# ------------------------------------------------------------------------- drift


def test_fit_drift_recovers_known_slope_within_stderr():
    rng = np.random.default_rng(0)
    t = np.linspace(0.0, 10.0, 2001)  # ps
    true_slope = 0.35  # kJ/mol/ps
    etot = -5000.0 + true_slope * t + rng.normal(0.0, 0.5, t.size)
    ekin = 150.0 + rng.normal(0.0, 8.0, t.size)
    res = fit_drift(t, etot, ekin, n_atoms=22)
    assert isinstance(res, DriftResult)
    assert res.slope_stderr_kj_mol_ns > 0 and res.ols_stderr_kj_mol_ns > 0
    assert abs(res.slope_kj_mol_ns - true_slope * 1000.0) < 4 * res.slope_stderr_kj_mol_ns
    assert abs(res.slope_kj_mol_ns - true_slope * 1000.0) < 4 * res.ols_stderr_kj_mol_ns
    # White noise: block stderr is the conservative one (about n_blocks times the OLS value).
    assert res.slope_stderr_kj_mol_ns > res.ols_stderr_kj_mol_ns
    assert res.duration_ps == pytest.approx(10.0)
    assert res.total_drift_kj_mol == pytest.approx(res.slope_kj_mol_ns / 1000.0 * 10.0)
    assert res.kinetic_std_kj_mol == pytest.approx(8.0, rel=0.1)
    assert res.drift_to_kinetic_std == pytest.approx(abs(res.total_drift_kj_mol) / res.kinetic_std_kj_mol)
    assert res.total_energy_std_kj_mol == pytest.approx(0.5, rel=0.1)  # noise about the fit
    assert (res.n_atoms, res.n_frames) == (22, 2001)


def test_fit_drift_unit_conversion_by_hand():
    # Exact line: 1 kJ/mol/ps on 1 atom. 1 eV = 96.48533212331 kJ/mol, so
    # 1 kJ/mol/ps = 1000/96.485... meV/ps = 10.3643 meV/atom/ps, and 1000 kJ/mol/ns.
    t = np.arange(0.0, 2.0, 0.1)
    res = fit_drift(t, 3.0 + 1.0 * t, np.full(t.size, 10.0), n_atoms=1)
    assert res.slope_kj_mol_ns == pytest.approx(1000.0)
    assert res.slope_mev_atom_ps == pytest.approx(10.3643, abs=1e-4)
    assert res.slope_stderr_kj_mol_ns == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(res.drift_to_kinetic_std)  # constant kinetic energy: no scale
    # Per-atom unit divides by the atom count.
    res22 = fit_drift(t, 3.0 + 1.0 * t, np.full(t.size, 10.0), n_atoms=22)
    assert res22.slope_mev_atom_ps == pytest.approx(10.3643 / 22, rel=1e-5)
    d = res22.to_dict()
    assert json.loads(json.dumps(d))["slope_kj_mol_ns"] == pytest.approx(1000.0)
    assert isinstance(d["n_atoms"], int)


def test_fit_drift_few_frames_falls_back_to_ols_stderr():
    t = np.arange(6, dtype=float)
    e = np.array([0.0, 1.1, 1.9, 3.2, 3.9, 5.1])
    res = fit_drift(t, e, np.ones(6) + t, n_atoms=3)  # 6 frames < 5 blocks * 3 frames
    assert res.slope_stderr_kj_mol_ns == res.ols_stderr_kj_mol_ns
    slope, _ = np.polyfit(t, e, 1)
    assert res.slope_kj_mol_ns == pytest.approx(slope * 1000.0)


def test_fit_drift_nan_raises_one_line_error():
    t = np.linspace(0, 1, 50)
    e = np.zeros(50)
    e[17] = np.nan
    with pytest.raises(NnpqError) as exc:
        fit_drift(t, e, np.ones(50), n_atoms=5)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "NaN at frame 17" in msg and "--timestep" in msg


@pytest.mark.parametrize(
    "t, e, k",
    [
        (np.arange(2.0), np.zeros(2), np.zeros(2)),  # too few frames
        (np.arange(5.0), np.zeros(4), np.zeros(5)),  # length mismatch
    ],
)
def test_fit_drift_rejects_bad_input(t, e, k):
    with pytest.raises(NnpqError) as exc:
        fit_drift(t, e, k, n_atoms=1)
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------- structure


def test_kabsch_rmsd_zero_for_rigid_motion_and_hand_value():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(12, 3))
    b = a @ _rotation(np.array([1.0, 2.0, -0.5]), 1.1).T + np.array([3.0, -2.0, 0.7])
    assert kabsch_rmsd(a, b) == pytest.approx(0.0, abs=1e-10)
    masses = rng.uniform(1, 16, 12)
    assert kabsch_rmsd(a, b, masses) == pytest.approx(0.0, abs=1e-10)

    # Symmetric stretch of a linear 3-atom molecule: no rotation or translation can
    # help, so the RMSD is the plain one: sqrt((0.1^2 + 0 + 0.1^2) / 3).
    x = np.array([[-1.0, 0, 0], [0, 0, 0], [1.0, 0, 0]])
    y = np.array([[-1.1, 0, 0], [0, 0, 0], [1.1, 0, 0]])
    assert kabsch_rmsd(x, y) == pytest.approx(math.sqrt(0.02 / 3), rel=1e-12)
    # Mass-weighted: weights (1, 2, 1) -> sqrt((0.01 + 0.01) / 4).
    assert kabsch_rmsd(x, y, np.array([1.0, 2.0, 1.0])) == pytest.approx(math.sqrt(0.02 / 4), rel=1e-12)
    # Same stretch, rotated and shifted: superposition recovers the same value.
    y2 = y @ _rotation(np.array([0.0, 1.0, 1.0]), 0.7).T + 5.0
    assert kabsch_rmsd(x, y2) == pytest.approx(math.sqrt(0.02 / 3), rel=1e-9)


def test_kabsch_rmsd_does_not_reflect():
    # A chiral tetrahedron and its mirror image are not superimposable by rotation.
    a = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    b = a * np.array([1.0, 1.0, -1.0])
    assert kabsch_rmsd(a, b) > 0.1


def test_rmsd_series_periodic_ignores_uniform_translation():
    rng = np.random.default_rng(2)
    traj = rng.normal(size=(4, 10, 3))
    shifted = traj + np.array([0.3, -1.2, 2.0]) + np.arange(4)[:, None, None] * 0.5  # drifting centre
    assert np.allclose(rmsd_series(traj, shifted, periodic=True), 0.0, atol=1e-12)
    # A genuine displacement of one atom by d out of N shows up (mean removed):
    moved = traj.copy()
    moved[:, 0, 0] += 1.0
    expected = math.sqrt((1 - 1 / 10) ** 2 / 10 + 9 * (1 / 10) ** 2 / 10)
    assert np.allclose(rmsd_series(traj, moved, periodic=True), expected)
    # Non-periodic path superimposes, so a rotation is free too.
    rot = traj @ _rotation(np.array([0.0, 0.0, 1.0]), 0.4).T
    assert rmsd_series(traj, rot).shape == (4,)
    assert np.allclose(rmsd_series(traj, rot), 0.0, atol=1e-10)
    # ...but the periodic path must not: rotation is not a symmetry of a box.
    assert np.all(rmsd_series(traj, rot, periodic=True) > 0.1)


def test_force_errors_per_element_by_hand():
    z = np.array([8, 1, 1])  # water
    ref = np.zeros((2, 3, 3))
    test = np.zeros((2, 3, 3))
    test[:, 0, 0] = 3.0  # O: error 3 in one of 3 components, both frames
    test[0, 1, 1] = 1.0  # H1: error 1 in frame 0 only
    test[1, 2, 2] = -1.0  # H2: error -1 in frame 1 only
    ref[:, :, :] = 2.0
    test += 2.0
    out = force_errors(ref, test, z)
    assert out["per_element"]["O"]["force_rmse"] == pytest.approx(math.sqrt(9 * 2 / 6))
    assert out["per_element"]["H"]["force_rmse"] == pytest.approx(math.sqrt(2 / 12))
    assert out["per_element"]["O"]["n"] == 1 and out["per_element"]["H"]["n"] == 2
    assert out["force_rmse"] == pytest.approx(math.sqrt((9 * 2 + 2) / 18))
    assert out["force_mae"] == pytest.approx((3 * 2 + 2) / 18)
    assert out["force_max_abs"] == pytest.approx(3.0)
    assert out["force_rms_ref"] == pytest.approx(2.0)
    # Single-frame (N, 3) input gives the same as a one-frame trajectory.
    assert force_errors(ref[0], test[0], z)["force_rmse"] == pytest.approx(math.sqrt((9 + 1) / 9))


def test_energy_errors_removes_constant_offset_in_relative_metric():
    e_ref = np.array([-100.0, -101.0, -99.5, -100.5])
    wiggle = np.array([0.2, -0.2, 0.2, -0.2])
    e_test = e_ref + 5.0 + wiggle
    out = energy_errors(e_ref, e_test, n_atoms=10)
    assert out["energy_mae"] == pytest.approx(5.0)  # |5 +- 0.2| averages to 5
    assert out["energy_mae_per_atom"] == pytest.approx(0.5)
    assert out["energy_max_abs_per_atom"] == pytest.approx(0.52)
    assert out["energy_rmse_per_atom"] == pytest.approx(math.sqrt(5.2**2 / 2 + 4.8**2 / 2) / 10)
    assert out["energy_mean_offset"] == pytest.approx(5.0)
    assert out["relative_energy_mae_per_atom"] == pytest.approx(0.02)
    # Pure offset: relative error vanishes exactly.
    assert energy_errors(e_ref, e_ref + 7.0, 10)["relative_energy_mae_per_atom"] == pytest.approx(0.0, abs=1e-12)


def _place_chain(dihedral1_deg: float, dihedral2_deg: float) -> np.ndarray:
    """5 points with bond length 0.15 nm, angles 110 deg and the two given dihedrals."""
    from math import cos, radians, sin

    def next_point(a, b, c, bond, angle, dihedral):
        # NeRF: place d so that |cd| = bond, angle bcd = angle, dihedral abcd = dihedral.
        bc = (c - b) / np.linalg.norm(c - b)
        n = np.cross(b - a, bc)
        n /= np.linalg.norm(n)
        m = np.cross(n, bc)
        d2 = np.array([-bond * cos(angle), bond * sin(angle) * cos(dihedral), bond * sin(angle) * sin(dihedral)])
        return c + d2[0] * bc + d2[1] * m + d2[2] * n

    ang = radians(110.0)
    p = [np.array([0.0, 0, 0]), np.array([0.15, 0, 0])]
    p.append(p[1] + 0.15 * np.array([-cos(ang), sin(ang), 0.0]))
    p.append(next_point(p[0], p[1], p[2], 0.15, ang, radians(dihedral1_deg)))
    p.append(next_point(p[1], p[2], p[3], 0.15, ang, radians(dihedral2_deg)))
    return np.array(p)


def _peptide_topology():
    """ACE(C) - ALA(N, CA, C) - NME(N): just the atoms that define phi and psi."""
    from openmm.app import Topology, element

    top = Topology()
    chain = top.addChain()
    atoms = []
    for res_name, names in (("ACE", ["C"]), ("ALA", ["N", "CA", "C"]), ("NME", ["N"])):
        res = top.addResidue(res_name, chain)
        for name in names:
            atoms.append(top.addAtom(name, element.nitrogen if name == "N" else element.carbon, res))
    for a, b in zip(atoms[:-1], atoms[1:]):
        top.addBond(a, b)
    return top


def test_dihedral_series_known_angles_and_none_without_backbone():
    from openmm.app import Topology, element

    top = _peptide_topology()
    frames = np.array([_place_chain(-60.0, 140.0), _place_chain(75.0, -40.0)])
    out = dihedral_series(top, frames)
    assert out is not None
    np.testing.assert_allclose(out["phi_deg"], [-60.0, 75.0], atol=1e-3)
    np.testing.assert_allclose(out["psi_deg"], [140.0, -40.0], atol=1e-3)

    water = Topology()
    res = water.addResidue("HOH", water.addChain())
    for name, el in (("O", element.oxygen), ("H1", element.hydrogen), ("H2", element.hydrogen)):
        water.addAtom(name, el, res)
    assert dihedral_series(water, np.zeros((2, 3, 3))) is None


# ------------------------------------------------------------------------ report


def _fake_run(rng, slope, n_atoms=22):
    t = np.linspace(0, 5, 501)
    tot = -4000 + slope * t + rng.normal(0, 0.3, t.size)
    kin = 80 + rng.normal(0, 5, t.size)
    return {"time_ps": t, "total_kj_mol": tot, "kinetic_kj_mol": kin, "potential_kj_mol": tot - kin}


def test_write_report_files(tmp_path):
    rng = np.random.default_rng(3)
    s_fp, s_q = _fake_run(rng, 0.05), _fake_run(rng, 0.08)
    d_fp = fit_drift(s_fp["time_ps"], s_fp["total_kj_mol"], s_fp["kinetic_kj_mol"], 22)
    d_q = fit_drift(s_q["time_ps"], s_q["total_kj_mol"], s_q["kinetic_kj_mol"], 22)
    z = np.array([6] * 6 + [1] * 12 + [7, 7, 8, 8])
    f_ref = rng.normal(0, 500, (3, 22, 3))
    errors = {
        "energy": energy_errors(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.4, 3.6]), 22),
        "forces": force_errors(f_ref, f_ref + rng.normal(0, 4.184 * 10, (3, 22, 3)), z),
    }
    report = {
        "model": {"name": "ani2x", "quantization": "int8 weight-only"},
        "system": "alanine-dipeptide",
        "settings": {"timestep_fs": 0.5, "steps": np.int64(10000)},
        "fp32": {"drift": d_fp.to_dict()},
        "quantized": {"drift": d_q},  # a DriftResult itself must serialise too
        "errors": errors,
        "timing": {"fp32": {"ns_per_day": np.float32(12.5)}, "quantized": {"ns_per_day": 20.0}},
        "nan_value": float("nan"),
    }
    t = s_fp["time_ps"]
    series = {
        "fp32": s_fp,
        "quantized": s_q,
        "comparison": {
            "time_ps": t,
            "rmsd_angstrom": 0.01 * t**2,
            "phi_deg_fp32": rng.uniform(-180, 180, t.size),
            "psi_deg_fp32": rng.uniform(-180, 180, t.size),
            "phi_deg_quantized": rng.uniform(-180, 180, t.size),
            "psi_deg_quantized": rng.uniform(-180, 180, t.size),
        },
    }
    paths = write_report(tmp_path / "out", report, series, title="Validation: ani2x int8")
    assert {p.name for p in paths["figures"]} == {"energy.png", "rmsd.png", "dihedrals.png"}
    for p in paths["figures"]:
        assert p.read_bytes().startswith(PNG_MAGIC)

    text = paths["json"].read_text()
    loaded = json.loads(text)  # strict JSON: NaN became null
    assert "NaN" not in text and loaded["nan_value"] is None
    assert loaded["fp32"]["drift"]["slope_kj_mol_ns"] == pytest.approx(d_fp.slope_kj_mol_ns)
    assert loaded["quantized"]["drift"]["slope_mev_atom_ps"] == pytest.approx(d_q.slope_mev_atom_ps)
    assert loaded["settings"]["steps"] == 10000
    assert loaded["errors"]["forces"]["per_element"]["H"]["n"] == 12
    assert json.loads(json.dumps(to_jsonable(report), sort_keys=True)) == loaded

    md = paths["markdown"].read_text()
    assert md.startswith("# Validation: ani2x int8")
    # Drift numbers as displayed (3 significant figures) for both runs.
    assert f"{d_fp.slope_mev_atom_ps:.3g}" in md and f"{d_q.slope_kj_mol_ns:.3g}" in md
    assert "| FP32 | Quantized |" in md
    # Force RMSE ~ 41.84 kJ/mol/nm per component = 1 kcal/mol/Å: both units present.
    frmse = errors["forces"]["force_rmse"]
    assert f"{frmse:.4g}" in md and f"{frmse / 41.84:.4g}" in md
    # Energy MAE per atom in kJ/mol and kcal/mol.
    emae = errors["energy"]["energy_mae_per_atom"]
    assert f"{emae:.4g}" in md and f"{emae / 4.184:.4g}" in md
    assert "final 0.25 Å" in md  # 0.01 * 5^2
    for name in ("energy.png", "rmsd.png", "dihedrals.png"):
        assert f"]({name})" in md
    assert "How to read this" in md

    plain = summary_table(report)
    assert f"{d_fp.slope_mev_atom_ps:.3g}" in plain and "---:" not in plain  # plain, not markdown
    assert "Force RMSE, H (12 atoms)" in plain and "Force RMSE, H (12 atoms)" in md


def test_write_report_tolerates_missing_series(tmp_path):
    rng = np.random.default_rng(4)
    s = _fake_run(rng, 0.0)
    d = fit_drift(s["time_ps"], s["total_kj_mol"], s["kinetic_kj_mol"], 22)
    # Only FP32, no kinetic energy, no comparison: energy.png alone, no crash.
    only_fp32 = {"fp32": {"time_ps": s["time_ps"], "total_kj_mol": s["total_kj_mol"]}}
    paths = write_report(tmp_path, {"fp32": {"drift": d.to_dict()}}, only_fp32, "only fp32")
    assert [p.name for p in paths["figures"]] == ["energy.png"]
    assert paths["figures"][0].read_bytes().startswith(PNG_MAGIC)
    assert json.loads(paths["json"].read_text())["fp32"]["drift"]["n_frames"] == 501
    assert "RMSD" not in paths["markdown"].read_text().split("How to read this")[0]
    # Nothing at all: still a valid (if empty) report.
    paths = write_report(tmp_path / "empty", {}, {}, "empty")
    assert paths["figures"] == [] and json.loads(paths["json"].read_text()) == {}
    assert summary_table({}) == ""
