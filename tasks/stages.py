"""One Prefect task per stage, each a call to the core.

Caching is keyed on content (:class:`tasks.caching.StageInputs`); the flow binds each task to its
project with :func:`tasks.caching.for_project`. Retries with backoff only where the outside world can fail
transiently — reading raw files (ingest, incoming data), MLflow (register), DVC — not on training, where a
failure would only repeat.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.states import State
from prefect.tasks import exponential_backoff

from adaptflow import orchestrate, stages
from adaptflow.params import Params
from tasks.caching import StageInputs



def transient(task: object, task_run: object, state: State) -> bool:
    """Retry only what a second try can fix (a flaky disk, network or server). Bad input — a
    ``DataError`` (corrupt data, a missing folder, too few images) or any other ``ValueError`` — fails
    at once: retrying it would only repeat the same message later."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result itself could not be read: let the retry policy decide
        return True
    return not isinstance(exc, ValueError)


# 2 s, 4 s, 8 s … with ±50% jitter, so runs that failed together do not retry together.
FS_RETRY = {"retries": 2, "retry_delay_seconds": exponential_backoff(backoff_factor=2), "retry_jitter_factor": 0.5,
            "retry_condition_fn": transient}
REMOTE_RETRY = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=5), "retry_jitter_factor": 0.5,
                "retry_condition_fn": transient}


def _run(name: str, params: Params, root: str, **kw: object) -> dict:
    logger = get_run_logger()
    launched = False
    if name in orchestrate.TRAINING and params.orchestrate.train_processes > 1:
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # what this process's earlier stages cached on GPU 0 goes back to the processes
        launched = orchestrate.launch_training(name, params, Path(root), logger.info, **kw)
    result = stages.get(name)(params, Path(root), **kw)  # after a launch: finds what the processes wrote
    if launched:
        result = {**result, "cached": False, "runs": [{**r, "cached": False} for r in result["runs"]]} if "runs" in result else {**result, "cached": False}
    logger.info("%s%s: %s", name, "".join(f" {v}" for v in kw.values()),
                f"done in {params.orchestrate.train_processes} processes" if launched else "up to date, reused" if result.get("cached") else "done")
    return result


@task(name="ingest", task_run_name="ingest[{role}]", cache_policy=StageInputs(stage="ingest"), **FS_RETRY)
def ingest(params: Params, root: str, role: str) -> dict:
    return _run("ingest", params, root, role=role)


@task(name="augment", task_run_name="augment[{params.target.domain}]", cache_policy=StageInputs(stage="augment"))
def augment(params: Params, root: str) -> dict:
    return _run("augment", params, root)


@task(name="pretrain", task_run_name="pretrain[{params.pretrain.model},{params.source.domain}]", cache_policy=StageInputs(stage="pretrain"))
def pretrain(params: Params, root: str) -> dict:
    return _run("pretrain", params, root)


@task(name="cache_features", task_run_name="cache_features[{params.target.domain}]", cache_policy=StageInputs(stage="cache_features"))
def cache_features(params: Params, root: str) -> dict:
    return _run("cache_features", params, root)


@task(name="finetune", task_run_name="finetune[{strategy},k={params.target.k},seed={seed}]", cache_policy=StageInputs(stage="finetune"))
def finetune(params: Params, root: str, strategy: str, seed: int) -> dict:
    return _run("finetune", params, root, strategy=strategy, seed=seed)["runs"][0]


@task(name="evaluate", task_run_name="evaluate[{params.target.domain},k={params.target.k}]", cache_policy=StageInputs(stage="evaluate"))
def evaluate(params: Params, root: str) -> dict:
    return _run("evaluate", params, root)


@task(name="register", task_run_name="register[{params.target.domain}]", cache_policy=StageInputs(stage="register"), **REMOTE_RETRY)
def register(params: Params, root: str) -> dict:
    from prefect.runtime import flow_run  # the flow run id goes into the lineage record; the core never imports Prefect

    return stages.get("register")(params, Path(root), flow_run_id=flow_run.id)


@task(name="incoming", task_run_name="incoming[{params.target.domain}]", **FS_RETRY)
def absorb_incoming(params: Params, root: str) -> dict:
    """New target images from the watched folder into the target's image folder."""
    return orchestrate.absorb_incoming(params, Path(root))


@task(name="dvc_add", task_run_name="dvc_add[{path}]", **FS_RETRY)
def dvc_add(root: str, path: str) -> str:
    """Version a data folder: ``dvc add`` writes ``PATH.dvc`` (commit it) and puts the files in the DVC cache."""
    orchestrate.dvc(Path(root), "add", path)
    dvc_file = Path(root) / f"{path}.dvc"
    get_run_logger().info("dvc add %s → %s (commit it with git)", path, f"{path}.dvc")
    return str(dvc_file)


@task(name="dvc_commit", task_run_name="dvc_commit[{stages}]", **FS_RETRY)
def dvc_commit(root: str, stages: str = "all") -> None:
    """Record this run's outputs in dvc.lock, so `dvc status` is clean and `dvc repro` has nothing to do.
    ``stages``: ``upstream`` (every stage but register: committed before register runs, so the dvc.lock
    hashes its lineage record reads are this run's, as under ``dvc repro``), ``register``, or ``all``."""
    targets = {"all": [], "register": ["register"]}.get(stages)
    if targets is None:
        targets = [s for s in orchestrate.dvc_stage_names(Path(root)) if s != "register"]
    orchestrate.dvc(Path(root), "commit", "--force", *targets)  # not --quiet: a failure must say why
