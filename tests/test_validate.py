"""`nnpq validate` and the CLI end to end: campaigns on Dask, resume after a kill, stale
checkpoints set aside, chunked frames, the HTML in a real browser, `nnpq compare`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from validation_campaign import TINY, TINY_FLAGS, shared_report, tiny

from nnpq.cli import main
from nnpq.md.openmm import create_system
from nnpq.systems import get_system
from nnpq.validation.runs import StageContext, read_frames, run_stage, start_state
from nnpq.validation.schema import read_report, without_volatile
from nnpq.validation.tasks import result_path
from nnpq.validation.validate import Execution, campaign_for, validate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cli_systems_lists_catalogue(capsys):
    assert main(["systems"]) == 0
    out = capsys.readouterr().out
    for name in ("ethanol", "aspirin", "alanine-dipeptide", "water-box", "sfcl-sulfonamide"):
        assert name in out


def test_cli_quantize_writes_file_and_table(tmp_path, capsys):
    out = tmp_path / "e.nnpq"
    argv = ["quantize", "ani2x", "-o", str(out), "--rounding", "nearest", "--weight", "int8/channel",
            "--calibration-systems", "ethanol", "--no-library", "--no-baselines", "--min-coverage", "0", "-q"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert out.is_file() and out.stat().st_size < 16e6  # 55 MB of FP32 -> about 14 MB
    assert "model file (MB)" in text and "held-out" in text and "int8/channel" in text


@pytest.mark.parametrize("argv, phrase", [
    (["validate", "missing.nnpq", "--systems", "ethanol"], "not found"),
    (["validate", "ani2x", "--systems", "ethanol"], "no model to validate"),
    (["compare", "nowhere/report.json"], "not found"),
    (["quantize", "ani3x"], "unknown model"),
    (["quantize", "ani2x", "-o", "x.pt"], "should end in .nnpq"),
    (["quantize", "ani2x", "--calibration-systems", "ethanol,benzene"], "unknown system 'benzene'"),
])
def test_cli_errors_are_one_line(argv, phrase, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nnpq: error:") and phrase in err and "\n" not in err


@pytest.mark.parametrize("extra, phrase", [
    (["--systems", "watr-box"], "did you mean 'water-box'"),
    (["--systems", "ethanol", "--seeds", "0"], "--seeds must be at least 1"),
    (["--systems", "ethanol", "--modes", "turbo"], "mode 'turbo' is not offered"),
    (["--systems", "ethanol", "--nve-ps", "0.001"], "fewer than 3 frames"),
    (["--systems", "ethanol", "--threshold", "force_rsme=20"], "unknown threshold metric 'force_rsme'"),
])
def test_cli_validate_bad_input(w8_path, extra, phrase, capsys):
    assert main(["validate", str(w8_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert phrase in err and "\n" not in err


def test_stage_resumes_from_appended_chunks(w8_ani2x, tmp_path):
    """A stage killed after its second chunk resumes from the checkpoint and follows the run made
    straight through; frames are appended as numbered chunks, never rewritten."""
    mol = get_system("ethanol")
    system = create_system(mol.topology, w8_ani2x, remove_cm_motion=False)
    protocol = tiny(checkpoint_frames=4)
    start = start_state(tmp_path / "start.npz", "k", system, mol.positions_nm(), protocol, seed=1)
    stage = protocol.stage("nve_0.5fs")  # 20 steps, a frame every 2 steps: 11 frames in 3 chunks
    bonds = np.array([(a.index, b.index) for a, b in mol.topology.bonds()])
    straight = run_stage(StageContext(system, protocol, 1), start, stage, protocol, tmp_path / "a", "k", bonds)
    assert len(straight.time_ps) == 11 and straight.stable
    assert sorted(p.name for p in (tmp_path / "a").glob("frames-*")) == [f"frames-0000{i}.npz" for i in range(3)]

    # A run of the same stage stopped after 16 steps (3 chunks), then resumed to 20 steps.
    short = tiny(checkpoint_frames=4, nve_ps=0.008)
    run_stage(StageContext(system, protocol, 1), start, short.stage("nve_0.5fs"), short, tmp_path / "b", "k", bonds)
    assert int(np.load(tmp_path / "b" / "checkpoint.npz")["step"]) == 16
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b").glob("frames-*")}
    resumed = run_stage(StageContext(system, protocol, 1), start, stage, protocol, tmp_path / "b", "k", bonds)
    assert len(resumed.time_ps) == 11
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b").glob("frames-*")}
    assert len(after) == 4 and all(after[name] == t for name, t in stamps.items())  # appended, not rewritten
    np.testing.assert_array_equal(resumed.positions_nm[:9], straight.positions_nm[:9])
    # OpenMM's checkpoint restores the state to ~1e-10 nm, not bit for bit; a restart from the wrong
    # state would be off by ~1e-3 nm after 4 steps
    assert np.abs(resumed.positions_nm - straight.positions_nm).max() < 1e-7
    assert 0 < np.abs(resumed.positions_nm[9:] - resumed.positions_nm[8]).max()
    # a checkpoint with another key is set aside, not resumed
    other = run_stage(StageContext(system, protocol, 1), start, stage, protocol, tmp_path / "b", "other", bonds)
    assert len(other.time_ps) == 11 and (tmp_path / "b.stale-0" / "checkpoint.npz").is_file()


@pytest.fixture(scope="module")
def ethanol_serial(tmp_path_factory, w8_path):
    """The ethanol campaign (FP32 + W8, 2 seeds) run with Dask's synchronous scheduler."""
    campaign = campaign_for([str(w8_path)], ["ethanol"], 2, tmp_path_factory.mktemp("serial"), TINY, ("exact",))
    return validate(campaign, execution=Execution(serial=True))


def test_local_cluster_gives_the_serial_report(ethanol_serial, w8_path, tmp_path):
    campaign = campaign_for([str(w8_path)], ["ethanol"], 2, tmp_path / "cluster", TINY, ("exact",))
    report = validate(campaign, execution=Execution(workers=2))
    assert report["execution"]["tasks"] == {"done": 8, "reused": 0, "failed": 0}  # 2 starts, 4 runs, 2 fidelity
    assert without_volatile(report) == without_volatile(ethanol_serial)
    assert ethanol_serial["complete"] and not ethanol_serial["missing"]


def test_killed_campaign_resumes_to_the_same_report(ethanol_serial, w8_path, tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "nnpq.cli", "validate", str(w8_path), "--systems", "ethanol", "--seeds", "2",
            "--serial", "--out", str(out), *TINY_FLAGS]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "tasks" / "run"
    deadline = time.monotonic() + 900  # generous: CI machines may be busy
    while not (first.is_dir() and any(first.rglob("*.json"))) and time.monotonic() < deadline:
        assert proc.poll() is None, "the campaign ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in (out / "tasks").rglob("*.json")}
    assert any("run" in p.parts for p in done)

    campaign = campaign_for([str(w8_path)], ["ethanol"], 2, out, TINY, ("exact",))
    partial = validate(campaign, execution=Execution(report_only=True))
    assert not partial["complete"]
    missing = {m["task"] for m in partial["missing"]}
    finished = sum("start" not in p.parts for p in done)
    assert "fidelity/ethanol/seed-2/ani2x-w8-exact" in missing and len(missing) == 6 - finished
    assert all(result_path(out, name) not in done for name in missing)
    assert "Incomplete campaign" in (out / "report.html").read_text()

    resumed = validate(campaign, execution=Execution(serial=True))
    assert resumed["execution"]["tasks"]["reused"] == len(done)
    assert resumed["execution"]["tasks"]["done"] == 8 - len(done)
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished tasks were not redone
    assert without_volatile(resumed) == without_volatile(ethanol_serial)


def test_requantized_model_never_reuses_old_trajectories(w8_path, tmp_path):
    """Re-quantize to the same file name: the rerun sets the old runs and results aside."""
    from nnpq.artifact import save_artifact
    from nnpq.models import load_fp32
    from nnpq.pipeline import source_info
    from nnpq.quant.apply import quantize_model
    from nnpq.spec.formats import TensorFormat
    from nnpq.spec.plan import uniform_plan

    model = tmp_path / "model.nnpq"
    shutil.copy(w8_path, model)
    out = tmp_path / "out"
    first = validate(campaign_for([str(model)], ["ethanol"], 1, out, TINY, ("exact",)), execution=Execution(serial=True))
    fp32_nve = read_frames(out / "runs/ethanol/seed-1/fp32/nve_0.5fs")

    plan = uniform_plan(TensorFormat.parse("int8/g32/asym"))  # another RTN plan, same file name
    save_artifact(model, quantize_model(load_fp32("ani2x"), plan), plan, source_info("ani2x"))
    second = validate(campaign_for([str(model)], ["ethanol"], 1, out, TINY, ("exact",)), execution=Execution(serial=True))

    assert second["models"][1]["sha256"] != first["models"][1]["sha256"]
    assert second["execution"]["tasks"] == {"done": 2, "reused": 2, "failed": 0}  # FP32 start and run reused
    run = out / "runs/ethanol/seed-1/model-exact"
    assert (run / "nve_0.5fs.stale-0" / "checkpoint.npz").is_file()  # the old model's frames, set aside
    assert (out / "tasks/run/ethanol/seed-1/model-exact.json.stale-0").is_file()
    assert (out / "tasks/fidelity/ethanol/seed-1/model-exact.json.stale-0").is_file()
    # the new model's errors differ from the old one's: the fidelity was measured again
    f1 = first["systems"]["ethanol"]["models"]["model-exact"]["fidelity"]["force"]["force_rmse"]
    f2 = second["systems"]["ethanol"]["models"]["model-exact"]["fidelity"]["force"]["force_rmse"]
    assert f1 != f2 and f2 < f1  # g32 groups round more finely than per-channel scales
    np.testing.assert_array_equal(read_frames(out / "runs/ethanol/seed-1/fp32/nve_0.5fs").positions_nm,
                                  fp32_nve.positions_nm)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (.ci/run installs it)")
def test_report_html_renders_in_headless_chromium(tmp_path_factory, w8_path, tmp_path):
    report_json = shared_report(tmp_path_factory, w8_path)
    page = report_json.with_name("report.html")
    report = read_report(report_json)
    shot = tmp_path / "shot.png"
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
              "--allow-file-access-from-files"]
    run = subprocess.run(common + [f"--screenshot={shot}", "--window-size=1400,3000", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    # What it rendered: a non-blank page (the title's text, tables and figures give many colours).
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] == 3000 and pixels.shape[1] == 1400
    assert len(np.unique(pixels.reshape(-1, pixels.shape[2])[:, :3].round(2), axis=0)) > 50
    assert pixels[:, :, :3].std() > 0.05
    # The DOM after rendering: the title, every image decoded (naturalWidth > 0).
    script = ("<script>window.onload=()=>{const imgs=[...document.images];document.title='loaded '+"
              "imgs.filter(i=>i.complete&&i.naturalWidth>0).length+' of '+imgs.length;}</script>")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    dom = subprocess.run(common + ["--dump-dom", "--virtual-time-budget=5000", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    n_images = page.read_text().count("<img ")
    assert n_images >= 2 * 6  # energy, drift, forces, distances, overlays, divergence per system
    assert f"<title>loaded {n_images} of {n_images}</title>" in dom
    assert report["title"] in dom and "Verdicts" in dom


def test_cli_compare_two_reports(tmp_path_factory, w8_path, tmp_path, capsys):
    report_json = shared_report(tmp_path_factory, w8_path)
    other = tmp_path / "other"
    shutil.copytree(report_json.parent, other)
    out = tmp_path / "compare.html"
    assert main(["compare", str(report_json), str(other), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    report = read_report(report_json)
    for system in report["systems"]:
        assert text.count(system) >= 2  # one row per report
    drift = report["systems"]["water-box"]["models"]["ani2x-w8-exact"]["drift"]["nve_0.5fs"]["mean_mev_atom_ps"]
    assert f"{drift:.3g}" in text
    page = out.read_text()
    assert page.count("<tr>") == 1 + 2 * len(report["systems"]) and "data:image/png;base64," in page
