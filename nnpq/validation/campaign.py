"""A campaign (systems x seeds x models) as a Dask task graph; Dask alone schedules it.

``serial`` runs the graph with Dask's synchronous scheduler in this process; otherwise a
``LocalCluster`` (worker processes, one thread each: OpenMM contexts live inside tasks) or
the cluster at ``scheduler`` (e.g. dask-jobqueue on SLURM; ``out`` must then be on a
filesystem every worker sees). Completion order does not matter: the report is merged
from the tasks' result files in task-name order.
"""

from __future__ import annotations

import logging

from nnpq.errors import NnpqError
from nnpq.validation.tasks import Campaign, fidelity_task, fidelity_name, run_name, run_task, start_name, start_task


def graph(c: Campaign) -> list:
    """One ``dask.delayed`` per task, keyed by task name; runs depend on their start, fidelity
    tasks on the FP32 and the model's run."""
    from dask import delayed

    def node(fn, name, *args):
        return delayed(fn, pure=False)(c, *args, dask_key_name=name)

    nodes: dict[str, object] = {}
    for system in c.systems:
        for seed in c.seeds:
            start = nodes[start_name(system, seed)] = node(start_task, start_name(system, seed), system, seed, None)
            for model in c.models:
                nodes[run_name(system, seed, model)] = node(run_task, run_name(system, seed, model),
                                                            system, seed, model, start)
            reference = nodes[run_name(system, seed, c.reference)]
            for model in c.models[1:]:
                nodes[fidelity_name(system, seed, model)] = node(
                    fidelity_task, fidelity_name(system, seed, model), system, seed, model, reference,
                    nodes[run_name(system, seed, model)])
    return [nodes[name] for name in sorted(nodes)]


def execute(c: Campaign, scheduler: str | None = None, workers: int = 2, serial: bool = False) -> list[dict]:
    """Run every task not already done; return each task's status (``done``, ``reused`` or
    ``failed`` with an ``error``), sorted by task name."""
    import dask
    import distributed  # noqa: F401  its config defaults must be loaded before the overrides below

    tasks = graph(c)
    # An MD task can keep its worker busy (and its event loop slow) for minutes on a loaded
    # machine: no heartbeat deadline, and patient connections, so a busy worker is not taken for dead.
    patience = {"distributed.scheduler.worker-ttl": None, "distributed.comm.timeouts.connect": "300s",
                "distributed.comm.timeouts.tcp": "900s"}
    with dask.config.set(patience):
        return _compute(tasks, scheduler, workers, serial)


def _compute(tasks: list, scheduler: str | None, workers: int, serial: bool) -> list[dict]:
    import dask

    if serial:
        statuses = dask.compute(*tasks, scheduler="synchronous")
    else:
        from dask.distributed import Client, LocalCluster

        if scheduler:
            try:
                client = Client(scheduler, timeout="30s")
            except (OSError, TimeoutError) as exc:
                raise NnpqError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); "
                                "check the address, or leave out --scheduler for a local cluster") from None
            with client:
                statuses = dask.compute(*tasks)
        else:
            if workers < 1:
                raise NnpqError(f"--workers must be at least 1, got {workers}")
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   silence_logs=logging.ERROR)
            try:
                with Client(cluster):
                    statuses = dask.compute(*tasks)
            finally:
                try:
                    cluster.close(timeout=120)
                except TimeoutError:  # workers slow to exit on a loaded machine: every result is already stored
                    logging.getLogger(__name__).warning("the local Dask cluster took long to shut down")
    return sorted(statuses, key=lambda s: s["task"])
