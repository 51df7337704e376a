"""One tiny validation campaign per test session, written by `nnpq validate` itself and read by
the report, HTML and compare tests (test_validate.py and test_validation_analysis.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nnpq.validation.protocol import FULL, Protocol

#: A few femtoseconds per stage, frames every fs: enough frames for every metric, seconds of MD.
#: The same protocol as the CLI builds from `TINY_FLAGS`.
TINY = dataclasses.replace(FULL, equilibration_ps=0.005, nve_ps=0.01, nvt_ps=0.012, stress_ps=0.005,
                           frame_interval_fs=1.0)
# the exact mode only: the fast mode doubles every campaign and is validated the same way
TINY_FLAGS = ["--equilibration-ps", "0.005", "--nve-ps", "0.01", "--nvt-ps", "0.012", "--stress-ps", "0.005",
              "--frame-interval-fs", "1.0", "--modes", "exact"]
SYSTEMS = ("alanine-dipeptide", "water-box")

_cache: dict[str, Path] = {}


def tiny(**changes) -> Protocol:
    return dataclasses.replace(TINY, **changes)


def shared_report(tmp_path_factory, w8_path: Path) -> Path:
    """report.json of FP32 + the W8 fixture on alanine dipeptide and the water box, 2 seeds,
    written once per session through the CLI (serial scheduler)."""
    if "report" not in _cache:
        from nnpq.cli import main

        out = tmp_path_factory.mktemp("validation") / "w8"
        argv = ["validate", str(w8_path), "--systems", *SYSTEMS, "--seeds", "2", "--serial", "--out", str(out),
                *TINY_FLAGS]
        assert main(argv) == 0
        _cache["report"] = out / "report.json"
    return _cache["report"]
