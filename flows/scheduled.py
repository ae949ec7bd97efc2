"""The scheduled run and its deployment: new target data in, versioned, adapted, gated.

``scheduled_pipeline`` moves new target images from the watched folder (``orchestrate.incoming``, default
``data/incoming/<target>/``) into the target's image folder, versions the folder with ``dvc add`` (in a
DVC repo), then runs ``transfer_pipeline`` — whose register stage moves ``champion`` only through the gate.
With nothing new and nothing changed every stage is a cache hit and the run is cheap.

Two ways to schedule it, both defined here and in ``prefect.yaml`` (nightly at 02:00 UTC by default):

- ``adaptflow deploy`` registers the deployment with a Prefect server (``PREFECT_API_URL``) for a process
  work pool; ``prefect worker start --pool adaptflow`` runs it. ``prefect deploy --all`` reads ``prefect.yaml``.
- ``adaptflow deploy --serve`` serves it from this process (no work pool or worker needed; still a server,
  whose scheduler creates the runs).
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.schedules import Cron

from adaptflow import orchestrate
from adaptflow.params import Params, load
from adaptflow.stages.register import summary
from flows import RUN_ENV
from flows.transfer_pipeline import artifact_key, params_file, pipeline
from tasks import stages as t

DEPLOYMENT = "nightly"
ENTRYPOINT = "flows.scheduled.scheduled_pipeline"  # a module path: works from any project folder adaptflow is installed for


@flow(name="scheduled_pipeline", flow_run_name="scheduled_pipeline[{params_path}]")
def scheduled_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> dict:
    """Absorb new target data, version it with DVC, run the pipeline and the registry gate."""
    logger = get_run_logger()
    params = load(params_file(params_path, root), overrides)
    project = Path(root).resolve()
    with orchestrate.project_lock(project, what=f"flow run {flow_run.name or flow_run.id}", timeout=params.orchestrate.lock_timeout):
        new = t.absorb_incoming(params, str(project))
        if new["added"] and orchestrate.is_dvc_repo(project):
            new["dvc_file"] = t.dvc_add(str(project), os.path.relpath(new["dataset"], project))
        elif new["added"]:
            logger.warning("%s is not a DVC repo: the %d new image(s) in %s are not versioned (run `dvc init` to version data)", project, new["added"], new["dataset"])
        if new["added"] or new["held"]:  # after dvc add: moved files are versioned whatever happens to the artifact
            _publish_incoming(params, new)
        result = pipeline(params)(params_path=params_path, overrides=list(overrides or []), root=str(project))
    reg = result["register"]
    logger.info("%s", summary(reg, project))  # a reused register says so, and where the aliases point now
    return {"incoming": new, "register": reg}


def _publish_incoming(params: Params, new: dict) -> None:
    """What the run took from the watched folder, as a Prefect table artifact (one key per target, so the UI
    keeps each run's): the files it left there, each with its reason, or one row saying none was left. The
    run goes on without it when the API refuses it (the files are already moved and logged)."""
    rows = new["held"] or [{"item": "(none)", "reason": "every incoming file was taken"}]
    try:
        create_table_artifact(table=[{"file": h["item"], "left in the incoming folder because": h["reason"]} for h in rows],
                              key=artifact_key("incoming", params),
                              description=f"{new['added']} new image(s) → {new['dataset'] or '(none moved)'}, "
                                          f"{new['duplicates']} already there, {len(new['held'])} left in {new['incoming']}")
    except Exception as exc:  # noqa: BLE001 — a record of the run, not its work
        get_run_logger().warning("incoming: the table artifact of what was left in %s was not published: %s", new["incoming"], exc)


def schedule(params: Params, cron: str | None = None) -> Cron:
    """The deployment's schedule, checked before any work, with the server it will live on
    (:func:`require_server`): ``cron`` (the ``--cron`` flag) or ``orchestrate.cron``, in
    ``orchestrate.timezone``. A cron Prefect cannot read is a RuntimeError naming where it came from."""
    expr = cron or params.orchestrate.cron
    try:
        when = Cron(expr, timezone=params.orchestrate.timezone)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        where = "--cron" if cron else "orchestrate.cron"
        raise RuntimeError(f"{where}: {expr!r} is not a cron schedule Prefect can read "
                           f"(minute hour day month weekday, e.g. '0 2 * * *'): {str(exc).splitlines()[-1].strip()}") from None
    require_server()
    return when


def require_server() -> None:
    """Schedules live on a Prefect server: the ephemeral API has no scheduler, so nothing would ever run.
    The server at ``PREFECT_API_URL`` must answer its health check."""
    from prefect.settings import PREFECT_API_URL

    from flows.api import unreachable

    if not PREFECT_API_URL.value():
        raise RuntimeError("a schedule lives on a Prefect server, and PREFECT_API_URL is not set: start one "
                           "(`prefect server start --host 127.0.0.1`) and `export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    why = unreachable()
    if why:
        raise RuntimeError(why)


def ensure_work_pool(name: str) -> None:
    """Create the process work pool ``name`` if the server has none by that name."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))


def deploy(params: Params, root: Path, parameters: dict, when: Cron, name: str = DEPLOYMENT, pool: str | None = None) -> str:
    """Register the scheduled deployment (code read from ``root`` by a process worker) on the schedule
    ``when`` (from :func:`schedule`); returns its id."""
    pool = pool or params.orchestrate.work_pool
    ensure_work_pool(pool)
    source = scheduled_pipeline.from_source(source=str(Path(root).resolve()), entrypoint=ENTRYPOINT)
    return str(source.deploy(name=name, work_pool_name=pool, schedules=[when], parameters=parameters, job_variables={"env": RUN_ENV},
                             description=scheduled_pipeline.__doc__, tags=["adaptflow"], print_next_steps=False))


def serve(parameters: dict, when: Cron, name: str = DEPLOYMENT) -> None:
    """Serve the schedule ``when`` (from :func:`schedule`) from this process until interrupted (runs start as
    subprocesses). A deployment of that name that a work pool runs is refused: serving takes it over (it
    leaves the pool) and pauses it when stopped, so the pool's worker would get no run until it was
    deployed again."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_deployment_by_name(f"{scheduled_pipeline.name}/{name}").work_pool_name
        except ObjectNotFound:
            pool = None
    if pool:
        raise RuntimeError(f"deployment {scheduled_pipeline.name}/{name} runs on work pool {pool!r}: serving it here would take it "
                           f"off the pool and pause it when this process stops; serve another name (--name served), or "
                           f"leave the schedule to the pool's worker")
    scheduled_pipeline.serve(name=name, schedules=[when], parameters=parameters, tags=["adaptflow"])
