"""The ``transfer_pipeline`` flow: the seven stages as a graph of Prefect tasks.

ingest (per role) → augment, pretrain → cache_features → finetune (strategy × seed, mapped) → evaluate →
register, then ``dvc commit`` when the project is a DVC pipeline. Each task is cached on its stage's input
key (``tasks/caching.py``), so a re-run with nothing changed does no work and a changed param re-runs only
the stages that read it. The whole run holds the project lock: a second run in the same project waits.

Prefect's ephemeral API is used unless ``PREFECT_API_URL`` points at a server.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import time
from pathlib import Path

from prefect import Flow, flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from adaptflow import orchestrate, outputs, stopping
from adaptflow.params import ROLES, Orchestrate, Params, load
from adaptflow.stages.finetune import runs
from adaptflow.stages.ingest import check_run
from flows.runners import task_runner
from tasks import stages as t
from tasks.caching import for_project

LAST_RUN = "last_run.json"
orchestrate.quiet_bad_input()  # bad input fails a run with its message, not three tracebacks (CLI, worker, serve)


def params_file(params_path: str, root: str) -> str:
    return params_path if os.path.isabs(params_path) else os.path.join(root, params_path)


def run_name() -> str:
    """``transfer_pipeline[mnist→uci_digits,k=10,finetune.lr=0.01]``: what this run adapts, and what it overrode."""
    args = flow_run.parameters
    overrides = [o for o in args.get("overrides") or [] if not o.startswith("orchestrate.")]
    try:
        p = load(params_file(args.get("params_path", "params.yaml"), args.get("root", ".")), args.get("overrides"))
        what = [f"{p.source.domain}→{p.target.domain}", f"k={p.target.k}"]
    except Exception:  # noqa: BLE001 — a bad params file fails in the flow body, with its message
        what = [args.get("params_path", "params.yaml")]
    return f"transfer_pipeline[{','.join(what + overrides)}]"


def _done(fut: PrefectFuture) -> dict:
    """A task's result, marked cached when Prefect returned a stored result (the task did not run)."""
    fut.wait()
    res = fut.result()
    return {**res, "cached": True} if fut.state.name == "Cached" else res


def settle(futures: list[PrefectFuture]) -> None:
    """After a failed stage: cancel the tasks that have not started and wait for the others, so that none is
    still writing once the flow body has left the project lock (Prefect's runner waits for its tasks only
    when the flow returns, after the lock is gone). Only the runners built on ``concurrent.futures``
    (sequential, threads, processes) can cancel, and the processes runner only a task whose wait for its
    upstream has not begun; on Dask every task is waited for. A stage training in several processes
    (``orchestrate.train_processes``) has them stopped; one training or extracting features in this
    process (a thread of the sequential or threads runner) ends at its next step (:mod:`adaptflow.stopping`)."""
    for f in futures:
        wrapped = getattr(f, "wrapped_future", None)
        if isinstance(wrapped, concurrent.futures.Future):
            wrapped.cancel()  # does nothing to a task already running
    orchestrate.stop_launches()  # a stage training in several processes stops (its task then ends); none starts
    for f in futures:
        try:
            f.wait()
        except Exception:  # noqa: BLE001 — cancelled, failed or stopped: either way it no longer runs
            pass
    # none of them runs now: stage functions called later in this context run. (A second Ctrl-C in the wait
    # leaves the request standing: a stage may still be running.)
    stopping.clear()


def artifact_key(what: str, params: Params) -> str:
    """A Prefect artifact key per target (lower-case letters, digits and dashes), so the UI keeps its history."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{what}-{params.registered_model_name()}".lower()).strip("-")


def _publish(params: Params, root: Path, evaluated: dict) -> None:
    """The comparison table as a Prefect markdown artifact (one per target, so the UI keeps its history)."""
    table = (root / params.paths.reports / "evaluate" / "comparison.md").read_text()
    name = params.registered_model_name()
    create_markdown_artifact(markdown=f"# {name}\n\n{table}", key=artifact_key("comparison", params),
                             description=f"strategies side by side on {params.target.domain} (evaluate stage, digest {evaluated['digest']})")


@flow(name="transfer_pipeline", flow_run_name=run_name, task_runner=task_runner(Orchestrate()))
def transfer_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> dict:
    """ingest → augment, pretrain → cache_features → finetune (each strategy × seed) → evaluate → register."""
    logger = get_run_logger()
    started = time.time()
    params = load(params_file(params_path, root), overrides)
    project = Path(root).resolve()
    with orchestrate.project_lock(project, what=f"flow run {flow_run.name or flow_run.id}", timeout=params.orchestrate.lock_timeout):
        orchestrate.allow_launches()  # (after an earlier run in this process stopped them)
        for p in orchestrate.remove_stale_outputs(params, project):
            logger.warning("removed %s, left by a run that was killed mid-stage", p)
        # bad input before any stage (also in a scheduled run, which no command checked first): tasks whose
        # inputs did not change are Prefect cache hits, which would skip augment's own check of the classes
        check_run(params, project)
        task = {name: for_project(getattr(t, name), project) for name in ("ingest", "augment", "pretrain", "cache_features", "finetune", "evaluate", "register")}
        r = str(project)
        ingested = {role: task["ingest"].submit(params, r, role) for role in ROLES}
        augmented = task["augment"].submit(params, r, wait_for=list(ingested.values()))
        # Pretrain waits for augment, which refuses a source holding target val/test images (and so for both
        # ingests): bad data fails the run before any training. Augment itself takes seconds.
        pretrained = task["pretrain"].submit(params, r, wait_for=[*ingested.values(), augmented])
        features = task["cache_features"].submit(params, r, wait_for=[pretrained, ingested["target"]])
        pairs = runs(params)
        tuned = task["finetune"].map(unmapped(params), unmapped(r), [s for s, _ in pairs], [k for _, k in pairs],
                                     wait_for=[ingested["source"], ingested["target"], pretrained, features])
        evaluated = task["evaluate"].submit(params, r, wait_for=list(tuned))
        blocker = orchestrate.dvc_commit_blocker(project, params_file(params_path, root), overrides) if params.orchestrate.dvc_commit else "orchestrate.dvc_commit is off"
        upstream = [*ingested.values(), augmented, pretrained, features, *tuned, evaluated]
        # dvc.lock records the stages before register first, as `dvc repro` would: register's lineage record
        # and tags then carry this run's dvc.lock hashes, not the previous run's
        committed = [t.dvc_commit.submit(r, "upstream", wait_for=upstream)] if blocker is None else []
        registered = task["register"].submit(params, r, wait_for=[evaluated, augmented, *committed])

        try:
            results: dict = {"ingest": {role: _done(f) for role, f in ingested.items()}}
            results.update({"augment": _done(augmented), "pretrain": _done(pretrained), "cache_features": _done(features)})
            results["finetune"] = {f"{s}[seed={k}]": _done(f) for (s, k), f in zip(pairs, tuned)}
            results["evaluate"] = _done(evaluated)
            _publish(params, project, results["evaluate"])
            for f in committed:  # a failed dvc commit is what stopped register: say that, not "upstream failed"
                f.result()
            results["register"] = _done(registered)
        except BaseException:  # a failed stage, Ctrl-C or a cancelled flow run: the lock outlives every task
            settle([*upstream, *committed, registered])
            raise

        if blocker is None:
            t.dvc_commit(r, "register")
            logger.info("dvc.lock now records this run's outputs: `dvc status` is clean")
        elif orchestrate.is_dvc_repo(project):
            logger.info("dvc.lock left as it is: %s", blocker)

        summary = _summary(results)
        reused = [k for k, v in summary.items() if v == "cached"]
        logger.info("transfer_pipeline done in %.1f s; %d of %d steps reused unchanged%s", time.time() - started, len(reused), len(summary),
                    f" (ran: {', '.join(k for k, v in summary.items() if v == 'ran')})" if len(reused) < len(summary) else "")
        outputs.atomic_write_text(orchestrate.state_dir(project) / LAST_RUN, json.dumps(
            {"flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name, "started": started, "seconds": time.time() - started,
             "steps": summary, "register": {k: results["register"].get(k) for k in ("model_name", "version", "promoted", "alias")}}, indent=2))
    return results


def _summary(results: dict) -> dict[str, str]:
    """``{"ingest[source]": "cached", "finetune[dann,seed=0]": "ran", ...}``: what this run did per step."""
    steps = {f"ingest[{role}]": r for role, r in results["ingest"].items()}
    steps.update({s: results[s] for s in ("augment", "pretrain", "cache_features")})
    steps.update({f"finetune[{k.replace('[', ',').rstrip(']')}]": r for k, r in results["finetune"].items()})
    steps.update({s: results[s] for s in ("evaluate", "register")})
    return {k: "cached" if r.get("cached") else "ran" for k, r in steps.items()}


def pipeline(params: Params) -> Flow:
    """The flow with the task runner ``params.orchestrate`` asks for."""
    return transfer_pipeline.with_options(task_runner=task_runner(params.orchestrate))


def run_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> dict:
    """Run the flow as ``params.orchestrate`` says (what ``adaptflow run`` calls)."""
    params = load(params_file(params_path, root), overrides)
    return pipeline(params)(params_path=params_path, overrides=list(overrides or []), root=root)
