"""One Prefect task per stage. Each is a call to the core; the stage itself skips work whose inputs are
unchanged (its output manifest holds the input key), so a re-run with nothing changed does no work."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from adaptflow import stages
from adaptflow.params import Params


@task(name="ingest", task_run_name="ingest[{role}]", retries=1, retry_delay_seconds=5)
def ingest(params: Params, root: str, role: str) -> dict:
    return stages.get("ingest")(params, Path(root), role=role)


@task(name="augment")
def augment(params: Params, root: str) -> dict:
    return stages.get("augment")(params, Path(root))


@task(name="pretrain")
def pretrain(params: Params, root: str) -> dict:
    return stages.get("pretrain")(params, Path(root))


@task(name="cache_features")
def cache_features(params: Params, root: str) -> dict:
    return stages.get("cache_features")(params, Path(root))


@task(name="finetune", task_run_name="finetune[{strategy},seed={seed}]")
def finetune(params: Params, root: str, strategy: str, seed: int) -> dict:
    return stages.get("finetune")(params, Path(root), strategy=strategy, seed=seed)["runs"][0]


@task(name="evaluate")
def evaluate(params: Params, root: str) -> dict:
    return stages.get("evaluate")(params, Path(root))


@task(name="register", retries=2, retry_delay_seconds=[5, 20])  # talks to MLflow: retry transient failures
def register(params: Params, root: str) -> dict:
    return stages.get("register")(params, Path(root))
