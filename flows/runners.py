"""The task runner a pipeline run uses, from ``params.orchestrate`` (or ``adaptflow run --task-runner``).

Only the finetune runs (strategy × seed) and the independent early stages can overlap; which runner:

- ``sequential`` (default): one task at a time. Deterministic: each run seeds torch's *global* RNG and
  nothing else touches it meanwhile.
- ``threads``: overlapping runs in one process share torch's global RNG (and its intra-op thread pool), so
  the seeds no longer fix the results — fine for a quick look, not for numbers you will compare.
- ``processes``: one process per run: parallel *and* deterministic (each process has its own RNG).
- ``dask``: a Dask cluster (prefect-dask). ``orchestrate.dask_address`` names a running scheduler; without
  one a ``LocalCluster`` of single-threaded worker processes starts on 127.0.0.1 (deterministic too). The
  workers must see the project directory at the same path (a shared file system) and import adaptflow.
"""

from __future__ import annotations

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from adaptflow.params import Orchestrate


def task_runner(orch: Orchestrate) -> TaskRunner:
    if orch.task_runner == "sequential":
        return ThreadPoolTaskRunner(max_workers=1)
    if orch.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=orch.max_workers)
    if orch.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=orch.max_workers)
    from prefect_dask import DaskTaskRunner

    if orch.dask_address:
        return DaskTaskRunner(address=orch.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": orch.max_workers, "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})
