"""`nnpq validate`: FP32 and quantized models through the protocol on several systems and seeds,
as a Dask campaign, then one report (report.json in the schema, report.html beside it)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import nnpq
from nnpq.validation.campaign import execute
from nnpq.validation.identity import load, resolve_models, runtime_modes
from nnpq.validation.metrics import Thresholds, merge
from nnpq.validation.protocol import FULL, Protocol
from nnpq.validation.report import write_html
from nnpq.validation.schema import write_report_json
from nnpq.validation.tasks import Campaign


@dataclasses.dataclass(frozen=True)
class Execution:
    """Where the tasks run: Dask's synchronous scheduler (``serial``), the cluster at
    ``scheduler``, or a LocalCluster of ``workers`` processes; ``report_only`` runs nothing
    and reports what the output folder holds."""

    serial: bool = False
    scheduler: str | None = None
    workers: int = 2
    report_only: bool = False


def campaign_for(models: list[str], systems: list[str], seeds: int, out: str | os.PathLike,
                 protocol: Protocol = FULL, modes: tuple[str, ...] | None = None) -> Campaign:
    """The campaign, checked before any task starts: known systems, readable models that
    cover every system's elements, at least one seed. ``modes``: default every runtime mode."""
    from nnpq.errors import NnpqError
    from nnpq.models.domain import check_domain
    from nnpq.systems import get_system

    if seeds < 1:
        raise NnpqError(f"--seeds must be at least 1 (3 or more give a noise floor with a spread), got {seeds}")
    refs = resolve_models(models, modes or runtime_modes())
    for name in systems:
        system = get_system(name)
        for ref in refs[1:]:
            potential = load(ref, "cell_list" if system.is_periodic else "all_pairs")
            potential.check_inputs(system.atomic_numbers, system.positions, system.box)
            check_domain(potential, system.atomic_numbers, system.positions, system.box, f"nnpq validate {name}")
    return Campaign(str(Path(out).resolve()), protocol, tuple(refs), tuple(dict.fromkeys(systems)),
                    tuple(range(1, seeds + 1)))


def validate(campaign: Campaign, thresholds: Thresholds = Thresholds(),
             execution: Execution = Execution()) -> dict[str, Any]:
    """Run (or resume) ``campaign``, merge its results and write report.json and report.html
    into its output folder. Returns the report."""
    t0 = time.perf_counter()
    statuses = [] if execution.report_only else execute(campaign, execution.scheduler, execution.workers,
                                                        execution.serial)
    body = merge(campaign, thresholds, {s["task"]: s for s in statuses})
    counts = {state: sum(s["status"] == state for s in statuses) for state in ("done", "reused", "failed")}
    names = ", ".join(m.label for m in campaign.models[1:]) or campaign.reference.label
    report = {
        "title": f"nnpq validation: {names} against {campaign.reference.label}",
        "nnpq_version": nnpq.__version__,
        "platform": campaign.platform_name(),
        "engine": campaign.protocol.engine,
        "engine_label": campaign.engine_label(),
        "protocol": campaign.protocol.to_dict(),
        "seeds": list(campaign.seeds),
        "models": [dataclasses.asdict(m) for m in campaign.models],
        "thresholds": thresholds.to_dict(),
        **body,
        "execution": {"wall_seconds": time.perf_counter() - t0, "tasks": counts},
    }
    out = Path(campaign.out)
    write_report_json(out / "report.json", report)
    from nnpq.validation.schema import read_report

    report = read_report(out / "report.json")  # the page shows exactly what the file holds
    write_html(out / "report.html", report)
    return report
