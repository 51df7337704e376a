"""The one definition of report.json: its version, how it is written, how it is read back.

`nnpq validate` writes it, `nnpq compare`, the HTML writer and the tests read it, all
through this module. Layout (version 1); units are in the key names or the ``unit`` field:

- ``schema_version``, ``nnpq_version``, ``title``, ``platform``, ``protocol``, ``seeds``,
  ``thresholds``, ``engine`` (``openmm`` or ``ase``; absent in reports older than the ASE
  engine, which are OpenMM's) and ``engine_label`` (engine, version, platform, in words);
- ``models``: ``[{key, label, source, mode, sha256, reference}]``, the FP32 reference first;
- ``systems.NAME``: ``n_atoms``, ``periodic``, ``noise_floor.OBS`` (``mean``/``std``/``n`` of
  FP32-vs-FP32 Jensen-Shannon distances) and ``models.KEY`` with ``drift.STAGE``,
  ``stability.STAGE``, ``observables.OBS``, ``timing`` and, for quantized models,
  ``fidelity``, ``divergence.STAGE``, ``stress.STAGE``;
- ``verdicts``: ``[{system, model, metric, unit, value, noise_floor, noise_sigma, threshold,
  rule, pass}]``;
- ``missing``: ``[{task, reason}]`` and ``complete`` (false while tasks are missing);
- ``execution`` (wall time, tasks done/reused/failed) and every ``timing`` entry (seconds per
  step) describe how this run went: the only parts that differ between two runs of the same
  campaign (`without_volatile` removes them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nnpq.atomic_io import write_text_atomic
from nnpq.errors import NnpqError

SCHEMA_VERSION = 1
VOLATILE = ("execution", "timing")
REQUIRED = ("schema_version", "title", "models", "systems", "verdicts", "missing", "complete", "protocol", "seeds")


def write_report_json(path: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write ``report`` (plain JSON types) with the current schema version, atomically."""
    from nnpq.validation.report import to_jsonable

    body = {"schema_version": SCHEMA_VERSION, **to_jsonable(report)}
    missing = [k for k in REQUIRED if k not in body]
    if missing:
        raise ValueError(f"report lacks {missing}")  # a bug in the writer, not a user error
    return write_text_atomic(path, json.dumps(body, indent=1, sort_keys=True, allow_nan=False) + "\n")


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """A report.json written by `nnpq validate` (this schema version or older).

    Raises:
        NnpqError: missing file, not JSON, not a report, or a newer schema.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise NnpqError(f"report {path} not found; write one with 'nnpq validate MODEL --out DIR'")
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NnpqError(f"{path} is not a JSON file; pass the report.json that 'nnpq validate' wrote") from None
    if not isinstance(report, dict) or "schema_version" not in report:
        raise NnpqError(f"{path} is not an nnpq validation report (no schema_version)")
    if int(report["schema_version"]) > SCHEMA_VERSION:
        raise NnpqError(f"{path} uses report schema {report['schema_version']}, newer than this nnpq's "
                        f"({SCHEMA_VERSION}); upgrade nnpq")
    lacking = [k for k in REQUIRED if k not in report]
    if lacking:
        raise NnpqError(f"{path} is a damaged report (no {lacking[0]}); rerun 'nnpq validate'")
    return report


def without_volatile(report: Any) -> Any:
    """``report`` without its `VOLATILE` entries: what two runs of one campaign must share."""
    if isinstance(report, dict):
        return {k: without_volatile(v) for k, v in report.items() if k not in VOLATILE}
    if isinstance(report, list):
        return [without_volatile(v) for v in report]
    return report
