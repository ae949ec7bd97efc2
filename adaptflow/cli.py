"""The ``adaptflow`` command: run the pipeline, run one stage (what DVC calls), predict with a model."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer

from adaptflow import machine, orchestrate
from adaptflow import params as params_mod

# Every decode refuses a canvas over Pillow's limit (the file is quarantined, or skipped, with that reason): Pillow's
# own warning about the same file, printed first on stderr, would say it twice
warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit of \d+ pixels")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Adapt a source-domain model to a target domain, prove it helped, register the winner.")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file (sections per stage)")
SetOpt = typer.Option(None, "--set", "-s", "-S", help="override a param: key=value, e.g. finetune.lr=0.01 (repeatable; -S as in `dvc exp run -S`)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _error(msg: str) -> None:
    """Print ``error: msg``; in a process started by a pipeline run to train (``orchestrate.launch_training``),
    hand it to that run instead, which raises it once for all its processes."""
    if not orchestrate.refuse(msg):
        typer.secho(f"error: {msg}", fg="red", err=True)


def _load(path: Path, overrides: Optional[list[str]], flags: Optional[dict[str, str]] = None, plain_only: bool = False) -> params_mod.Params:
    """Params and this machine's ``ADAPTFLOW_*`` runtime settings, validated before any work. ``flags``: the
    command-line option each override came from (an error names the option the user typed). ``plain_only``:
    the params' plain checks alone (:func:`params.load`), no torch import: a first look in well under a second."""
    try:
        p = params_mod.load(path, overrides, plain_only=plain_only)
        if plain_only:
            return p
        from adaptflow import accel  # torch: after the params, whose plain checks need none

        accel.runtime()  # resolves the ADAPTFLOW_* settings for this machine, as every stage will
        return p
    except (params_mod.ParamsError, ValueError) as exc:
        msg = str(exc)
        for override, flag in (flags or {}).items():  # "--set X: …", or "… with --set A, X" where the file is blamed
            msg = msg.replace(f"--set {override}", flag).replace(override, flag)
        _error(msg)
        raise typer.Exit(2) from None


def _orchestrate_overrides(task_runner: Optional[str], max_workers: Optional[int], dask_address: Optional[str]) -> dict[str, str]:
    """The run-shape flags as ``orchestrate.*`` overrides (they change how the flow runs, never what it computes),
    each with the option it came from."""
    given = {"task_runner": ("--task-runner", task_runner), "max_workers": ("--max-workers", max_workers),
             "dask_address": ("--dask-address", dask_address)}
    return {f"orchestrate.{k}={v}": f"{flag} {v}" for k, (flag, v) in given.items() if v is not None}


@app.command()
def run(
    params: Path = ParamsOpt,
    set_: Optional[list[str]] = SetOpt,
    task_runner: Optional[str] = typer.Option(None, "--task-runner", "-r", help="sequential (default, deterministic) | threads | processes | dask "
                                              "(overrides orchestrate.task_runner)"),
    max_workers: Optional[int] = typer.Option(None, "--max-workers", help="parallel finetune runs (orchestrate.max_workers)"),
    dask_address: Optional[str] = typer.Option(None, "--dask-address", help="a running Dask scheduler, e.g. tcp://host:8786 (implies --task-runner dask)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug-level logging"),
) -> None:
    """Run the whole pipeline as a Prefect flow and print the comparison table."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # started by torchrun (read here without importing torch)
        typer.secho("error: adaptflow run is one process that runs the pipeline; under torchrun run the stages that "
                    "train in several: adaptflow stage pretrain, adaptflow stage finetune", fg="red", err=True)
        raise typer.Exit(2)
    with _end_on_sigterm():
        _run(params, set_, task_runner, max_workers, dask_address, verbose)


def _run(params: Path, set_: Optional[list[str]], task_runner: Optional[str], max_workers: Optional[int],
         dask_address: Optional[str], verbose: bool) -> None:
    from flows.api import start_in_background  # the orchestrator lives outside the core

    flags = _orchestrate_overrides(task_runner or ("dask" if dask_address else None), max_workers, dask_address)
    overrides = list(set_ or []) + list(flags)
    _load(params, overrides, flags, plain_only=True)  # a typo in a plain value fails at once, before any server starts
    api_ready = start_in_background()  # Prefect's local API server starts while torch and the params load
    _setup_logging(verbose)
    p = _load(params, overrides, flags)  # fail on a bad params value (the checks that need torch) before Prefect's API is used
    from adaptflow.stages import ingest

    with _bad_input_exits():  # and on a missing data path, too few images, weights that do not fit, no MLflow server
        ingest.check_run(p, Path.cwd())
    try:
        from adaptflow import accel

        accel.check_train_processes(p.orchestrate.train_processes)  # or more training processes than GPUs
    except ValueError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    from flows.transfer_pipeline import run_pipeline

    api_ready()
    from flows.api import unreachable

    why = unreachable()
    if why:
        typer.secho(f"error: {why}", fg="red", err=True)
        raise typer.Exit(2)
    with _bad_input_exits(), _api_lost_exits(p):
        result = run_pipeline(params_path=str(params), overrides=overrides, root=str(Path.cwd()))
    typer.echo("")
    typer.echo((Path(p.paths.reports) / "evaluate" / "comparison.md").read_text())
    from adaptflow.stages.register import summary

    typer.echo(summary(result["register"], Path.cwd()))
    _exit_now(0)


@contextlib.contextmanager
def _end_on_sigterm() -> Iterator[None]:
    """While in it, SIGTERM ends the run as Ctrl-C does: the stage running stops at its next step (the flow's
    settle asks it to), Prefect marks the flow run, and the exit hooks run, so Prefect's temporary API server
    stops with the run. (Prefect passes a SIGTERM that arrives during the flow on to the handler it found,
    here this one; Python's default would end the process without its exit hooks, leaving that server
    running.) The handler before is put back after (an in-process caller keeps its own)."""
    import signal
    import threading

    def end(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, end)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def _bad_input_exits() -> Iterator[None]:
    """Bad input (:func:`orchestrate.bad_input`) ends the command with its message and exit status 2, not a traceback;
    nothing partial was kept (stages write atomically)."""
    try:
        yield
    except orchestrate.bad_input() as exc:
        _error(str(exc))
        _exit_now(2)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _api_lost_exits(p: "params_mod.Params") -> Iterator[None]:
    """The Prefect API gone mid-run (a server stopped or restarted): one ``error:`` line saying what is kept, exit
    1, not the connection's traceback after minutes of Prefect's retries. The stages work without the API, so
    the ones that finished kept their outputs, and a run after it reuses them."""
    import httpx

    try:
        yield
    except httpx.TransportError as exc:
        from flows.api import api_url

        registry = Path(p.paths.reports) / "registry.json"
        _error(f"lost the Prefect API at {api_url() or 'its temporary local server'} during the run "
               f"({type(exc).__name__}: {exc}). Every stage that finished kept its outputs ({registry} says what register "
               "decided, if it ran); the run's state in Prefect is stale. Run again once the server answers: finished stages "
               "are reused")
        _exit_now(1)
        raise typer.Exit(1) from None


def _exit_now(code: int) -> None:
    """Exit after the exit hooks, skipping the interpreter's teardown of torch & co. Every ``atexit`` hook
    still runs (Prefect's log and event workers drain, its temporary API server stops). Only as the
    ``adaptflow`` command: an in-process caller (a test, a notebook) keeps its interpreter."""
    import atexit
    import os

    if Path(sys.argv[0]).name != "adaptflow":
        return
    # Logging first, while Prefect's API and event loop still run: its API log handler's flush otherwise waits
    # out a 5 s timeout once its own exit hooks have stopped them.
    logging.shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _check_stage_options(name: str, p: params_mod.Params, role: Optional[str], strategy: Optional[str], seed: Optional[int]) -> None:
    """``stage``'s options, checked before any work: each belongs to one stage and names what params hold."""
    given = {"--role": (role, "ingest"), "--strategy": (strategy, "finetune"), "--seed": (seed, "finetune")}
    for flag, (value, owner) in given.items():
        if value is not None and name != owner:
            raise ValueError(f"{flag} is for the {owner} stage, not {name}")
    if role is not None and role not in params_mod.ROLES:
        raise ValueError(f"--role: {role!r} is not one of {', '.join(params_mod.ROLES)}")
    if strategy is not None and strategy not in p.finetune.strategies:
        raise ValueError(f"--strategy: {strategy!r} is not in finetune.strategies ({', '.join(p.finetune.strategies)})")
    if seed is not None and seed not in p.finetune.seeds:
        raise ValueError(f"--seed: {seed} is not in finetune.seeds ({', '.join(map(str, p.finetune.seeds))})")


@app.command()
def stage(
    name: str = typer.Argument(..., help="ingest | augment | pretrain | cache_features | finetune | evaluate | register"),
    params: Path = ParamsOpt,
    set_: Optional[list[str]] = SetOpt,
    role: Optional[str] = typer.Option(None, help="ingest only: source or target (left out: the two, one after the other)"),
    strategy: Optional[str] = typer.Option(None, help="finetune only: one strategy (default: all in params)"),
    seed: Optional[int] = typer.Option(None, help="finetune only: one seed of finetune.seeds (default: all)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug-level logging"),
) -> None:
    """Run one stage in this process (what `dvc repro` calls); waits while a pipeline run holds the project.

    pretrain and finetune also train in several processes, one per GPU, under torch's launcher: with
    `--set orchestrate.train_processes=4` (or in params.yaml) this command starts them, as does
    `torchrun --nproc_per_node 4 -m adaptflow stage finetune`."""
    _setup_logging(verbose)
    with _bad_input_exits():
        orchestrate.check_held_for_me(Path.cwd())  # launched for a run that no longer holds the project: all refuse, at once
    p = _load(params, set_)
    from adaptflow import accel, distributed, stages

    try:
        fn = stages.get(name)
        _check_stage_options(name, p, role, strategy, seed)
        if distributed.launched() > 1 and name not in distributed.STAGES:
            raise ValueError(f"stage {name} runs in one process; of the stages only {' and '.join(distributed.STAGES)} "
                             f"train in several (torchrun started {distributed.launched()})")
        procs = p.orchestrate.train_processes if name in distributed.STAGES and distributed.launched() == 1 else distributed.launched()
        distributed.check_batches(p.training_batches(name, strategy) if name in distributed.STAGES else {}, procs)
        accel.check_train_processes(procs if procs > distributed.launched() else 1)
    except ValueError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    which = {"strategy": strategy, "seed": seed} if name == "finetune" else {}
    launcher = procs > distributed.launched()  # orchestrate.train_processes: this command starts the processes
    if distributed.launched_rank() > 0:
        logging.getLogger().setLevel(logging.WARNING)  # the first process reports; the others only what goes wrong
    if distributed.launched() > 1:
        distributed.init(cuda=accel.runtime().cuda)
    lock = orchestrate.project_lock(Path.cwd(), what=f"adaptflow stage {name}", timeout=p.orchestrate.lock_timeout)
    try:
        with _bad_input_exits(), distributed.main_first(lock):  # several processes: one holds the project for all
            if not os.environ.get(orchestrate.HOLDER_ENV):  # (started by a run that holds the project: it checked)
                orchestrate.check_upstream(name, p, Path.cwd(), **which)
            if launcher:
                orchestrate.remove_stale_launches(Path.cwd())  # params copies of launchers that were killed
            try:
                if launcher and orchestrate.launch_training(name, p, Path.cwd(), lambda line: typer.echo(line, err=True), **which):
                    return
            except orchestrate.LaunchFailed as exc:
                typer.secho(f"error: {exc}", fg="red", err=True)
                raise typer.Exit(1) from None
            if name == "ingest":
                for r in [role] if role else list(params_mod.ROLES):
                    fn(p, Path.cwd(), role=r)
            elif name == "finetune":
                fn(p, Path.cwd(), strategy=strategy, seed=seed)
            else:
                fn(p, Path.cwd())
    finally:
        distributed.finish()


@app.command()
def report(
    params: Path = ParamsOpt,
    set_: Optional[list[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="print metrics.json (the numbers behind the table) instead"),
) -> None:
    """Print the last evaluation: the comparison table (every number with its selection rule), whether it is
    still current for these params and data, and where the one-page HTML report is."""
    p = _load(params, set_)
    from adaptflow import orchestrate, outputs
    from adaptflow.data.files import DataError
    from adaptflow.stages import evaluate

    root = Path.cwd()
    out = evaluate.output_dir(p, root)
    if outputs.read_manifest(out) is None:
        typer.secho(f"error: no evaluation in {out}: run the pipeline first (adaptflow run, or dvc repro)", fg="red", err=True)
        raise typer.Exit(2)
    try:  # what check_upstream asks, all the way up: params, upstream outputs, raw data and weights files
        why = [] if outputs.is_current(out, orchestrate.identity("evaluate", p, root).key) else ["evaluate's own params or inputs differ"]
        why += orchestrate.upstream_problems("evaluate", p, root)
    except (outputs.MissingOutput, FileNotFoundError, DataError) as exc:
        why = [f"an input it was made from is missing or unreadable now ({exc})"]
    if why:
        typer.secho("note: this evaluation is not current for these params and data (re-run the pipeline for today's numbers):\n  "
                    + "\n  ".join(why), fg="yellow", err=True)
    if as_json:
        typer.echo((out / "metrics.json").read_text())
        return
    typer.echo((out / "comparison.md").read_text())
    typer.echo(f"report: {(out / 'report.html').resolve()}")


@app.command()
def deploy(
    name: str = typer.Option("nightly", "--name", "-n", help="deployment name"),
    cron: Optional[str] = typer.Option(None, "--cron", help="schedule, e.g. '0 2 * * *' (default orchestrate.cron, in orchestrate.timezone)"),
    pool: Optional[str] = typer.Option(None, "--pool", help="process work pool (default orchestrate.work_pool; created if missing)"),
    serve: bool = typer.Option(False, "--serve", help="serve the schedule from this process instead (blocks; Ctrl-C stops it)"),
    params: Path = ParamsOpt,
    set_: Optional[list[str]] = SetOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug-level logging"),
) -> None:
    """Schedule the pipeline: each run ingests new target data from orchestrate.incoming, versions it with DVC,
    runs every stage that changed and the registry gate. Needs a Prefect server (PREFECT_API_URL): its scheduler
    creates the runs, a worker (or, with --serve, this process) executes them."""
    _setup_logging(verbose)
    p = _load(params, set_)
    from flows import scheduled  # the orchestrator lives outside the core

    parameters = {"params_path": str(params), "overrides": list(set_ or []), "root": str(Path.cwd()) if serve else "."}
    try:
        when = scheduled.schedule(p, cron)  # checked, with its server, before any work
        if serve:
            typer.echo(f"serving scheduled_pipeline/{name} ({cron or p.orchestrate.cron}, {p.orchestrate.timezone}); Ctrl-C stops it")
            scheduled.serve(parameters, when, name=name)
            return
        dep_id = scheduled.deploy(p, Path.cwd(), parameters, when, name=name, pool=pool)
    except RuntimeError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"deployment scheduled_pipeline/{name} ({dep_id}): {cron or p.orchestrate.cron} {p.orchestrate.timezone}, work pool {pool or p.orchestrate.work_pool}\n"
               f"  run it now:   prefect deployment run 'scheduled_pipeline/{name}'\n"
               f"  start worker: prefect worker start --pool {pool or p.orchestrate.work_pool}")


def _expand(paths: list[Path]) -> list[Path]:
    """Files as given; a folder becomes every file below it (sorted), as ingest reads a class folder: any
    file PIL decodes is an image, whatever its name; one that is not is skipped with its reason later, and
    what ingest would not read (hidden files and folders, symlinked folders) is named here, a folder once. A
    file or folder whose name is not UTF-8 is kept, for predict to skip and count."""
    from adaptflow.data.files import BAD_FOLDER_NAME, BAD_NAME, shown, walk

    out: list[Path] = []
    for p in paths:
        if not p.is_dir():
            out.append(p)
            continue
        found = []
        for f, why in walk(p, skip_hidden_folders=True):
            if why and why not in (BAD_NAME, BAD_FOLDER_NAME):
                typer.secho(f"ignored {shown(f)}: {why}", fg="yellow", err=True)
            else:
                found.append(f)
        out += sorted(found)
    return out


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be written at ``path`` — checked before any work by writing a probe beside it
    (in the nearest folder that exists) — or None."""
    import tempfile

    if path.is_dir():
        return "is a folder"
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot be written ({folder} is a file)"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.probe-"):
            pass
    except OSError as exc:
        return f"cannot be written ({folder}: {exc.strerror or exc})"
    return None


@app.command()
def predict(
    paths: list[Path] = typer.Argument(..., help="image files and/or folders of images"),
    model: str = typer.Option(..., "--model", "-m", help="model URI: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="also write a CSV: path, label, confidence, proba_<class>..."),
    batch_size: int = typer.Option(1024, "--batch-size", min=1, help="images read and predicted at a time (memory stays flat in the number of files)"),
    strict: bool = typer.Option(False, "--strict", help="exit status 3 when any file was skipped (after printing and writing the rest), for a batch job to notice"),
) -> None:
    """Print one predicted label per image (path<TAB>label<TAB>confidence), a batch at a time. A folder is
    read as ingest reads a class folder: every file below it, whatever its name, except hidden files and
    folders (named on stderr). A file that is not a readable image is skipped and listed, with its reason, on
    stderr; the others are predicted. The CSV appears only once every batch is done.

    Example: adaptflow predict -m models:/adaptflow-uci_digits@champion photos/"""
    import pandas as pd

    from adaptflow import imaging, outputs, tracking
    from adaptflow.data.files import BAD_FOLDER_NAME, BAD_NAME, shown, undecodable

    missing = [shown(p) for p in paths if not p.exists()]
    if missing:
        typer.secho(f"error: no such file: {', '.join(missing)}", fg="red", err=True)
        raise typer.Exit(2)
    files = _expand(paths)
    if not files:
        typer.secho(f"error: no image files under {', '.join(map(str, paths))}", fg="red", err=True)
        raise typer.Exit(2)
    why = None if output is None else _unwritable(output)
    if why:
        typer.secho(f"error: --output {output} {why}; give a CSV file's path", fg="red", err=True)
        raise typer.Exit(2)
    try:
        tracking.configure(Path.cwd(), create=False)
    except tracking.NoStore as exc:
        if model.startswith(("models:", "runs:")):  # a model's own folder needs no store
            typer.secho(f"error: cannot load {model}: {exc}", fg="red", err=True)
            raise typer.Exit(2) from None
    if not re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", model) and not Path(model).exists():  # (a URI has a scheme; C: is a drive)
        typer.secho(f"error: cannot load {model}: no such model folder (give a registered model, e.g. "
                    f"models:/NAME@champion, or the folder of a logged model)", fg="red", err=True)
        raise typer.Exit(2)
    try:
        m = tracking.load_model(model)
    except Exception as exc:  # MLflow raises several types for a bad URI
        typer.secho(f"error: cannot load {model}: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None

    def frame(batch: list[Path]) -> "pd.DataFrame":
        return pd.DataFrame({"image": [str(p.resolve()) for p in batch]})

    # Paths, decoded one at a time by the model, keep memory flat in the files' sizes. They are the files the
    # user named, read in this process: a shell's ADAPTFLOW_READ_PATHS=0 (meant for a server) does not apply.
    # Set for the loop only: a caller in the same process (a test, a notebook) keeps its own setting.
    tables, n_unreadable = [], 0
    for p in [f for f in files if undecodable(str(f))]:  # no table or model input carries such a name as text
        typer.secho(f"skipped {shown(p)}: {BAD_FOLDER_NAME if p.is_dir() else BAD_NAME}", fg="yellow", err=True)
        n_unreadable += 1
    n_files, files = len(files), [f for f in files if not undecodable(str(f))]
    with machine.environ_kept(ADAPTFLOW_READ_PATHS="1"):
        for i in range(0, len(files), batch_size):
            batch = files[i : i + batch_size]
            try:  # each image is decoded once, by the model; only a batch that fails is checked file by file
                out = m.predict(frame(batch))
            except Exception:
                batch, unreadable = imaging.readable(batch)
                if not unreadable:
                    raise  # every file decodes: the failure is the model's, not the input's
                n_unreadable += len(unreadable)
                for p, why in unreadable:
                    typer.secho(f"skipped {shown(p)}: {why}", fg="yellow", err=True)
                if not batch:
                    continue
                out = m.predict(frame(batch))
            for p, label, conf in zip(batch, out["label"], out["confidence"]):
                typer.echo(f"{shown(p)}\t{label}\t{conf:.4f}")  # one line per file, whatever its name holds
            if output is not None:
                out.insert(0, "path", [str(p) for p in batch])
                tables.append(out)
    if n_unreadable == n_files:
        typer.secho(f"error: none of the {n_unreadable} file(s) is a readable image", fg="red", err=True)
        raise typer.Exit(2)
    if output is not None:
        table = pd.concat(tables, ignore_index=True)
        outputs.atomic_write_text(output, table.to_csv(index=False))
        typer.echo(f"wrote {len(table)} predictions to {output}", err=True)
    if n_unreadable:
        typer.secho(f"skipped {n_unreadable} of {n_files} file(s) (listed above)" + ("; --strict: exit status 3" if strict else ""),
                    fg="yellow", err=True)
        if strict:
            raise typer.Exit(3)


registry_app = typer.Typer(no_args_is_help=True, help="The model registry: aliases and their history (who was champion when, and why).")
app.add_typer(registry_app, name="registry")


def _registry_errors(command: Callable) -> Callable:
    """A registry command whose MLflow request fails (a bad name such as ``models:/m@champion``, a server that
    errs) ends with MLflow's message on one ``error:`` line and exit status 2, not a traceback."""
    import functools

    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> None:
        from adaptflow import tracking

        try:
            command(*args, **kwargs)
        except tracking.MlflowException as exc:
            typer.secho(f"error: {' '.join(str(exc.message).split())[:500]}", fg="red", err=True)
            raise typer.Exit(2) from None

    return run


ModelNameArg = typer.Argument(None, help="registered model name, e.g. adaptflow-uci_digits (default: this project's, from ./params.yaml)")


def _project_model(name: Optional[str]) -> str:
    """NAME as given, else the model this project registers (``register.model_name`` in ./params.yaml)."""
    if name:
        return name
    if not Path("params.yaml").is_file():
        _error("give the registered model's NAME (no params.yaml here to take this project's from)")
        raise typer.Exit(2)
    return _load(Path("params.yaml"), None, plain_only=True).registered_model_name()


@registry_app.command("history")
@_registry_errors
def registry_history(
    name: Optional[str] = ModelNameArg,
    alias: Optional[str] = typer.Option(None, "--alias", "-a", help="only this alias (champion, challenger)"),
    at: Optional[str] = typer.Option(None, "--at", help="which version held --alias (default champion) at this date/time (ISO; UTC unless a zone is given)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Every recorded alias move of NAME, oldest first; with --at, the version that held the alias then."""
    import json
    from dataclasses import asdict

    from adaptflow import aliases, tracking

    name = _project_model(name)
    with _bad_input_exits():
        tracking.configure(Path.cwd(), create=False)
    moves = tracking.alias_history(name, alias)
    outside = _warn_outside_moves(name, tracking.alias_history(name, None), tracking.model_aliases(name), alias)
    if at is not None:
        try:
            when = aliases.parse_time(at)
        except ValueError:
            typer.secho(f"error: --at {at!r}: expected an ISO date or time, e.g. 2026-11-22 or 2026-11-22T15:00", fg="red", err=True)
            raise typer.Exit(2) from None
        held = aliases.holder_at(moves, alias or "champion", when)
        if as_json:
            typer.echo(json.dumps(None if held is None else {**asdict(held), "iso_time": held.iso_time}, indent=2))
        elif held is None:
            typer.echo(f"{name}@{alias or 'champion'}: no version at {at} (no recorded move before then)")
        else:
            where = f"version {held.to_version}" if held.to_version is not None else "no version (removed)"
            typer.echo(f"{name}@{held.alias} at {at}: {where} (since {held.iso_time}, from {held.from_version or 'none'}, by {held.actor})\n  why: {held.reason}")
            if held.alias in outside and held is aliases.holder_at(moves, held.alias, float("inf")):
                typer.echo("  (unless the move outside adaptflow warned about above came before then)")
        return
    if as_json:
        typer.echo(json.dumps([{**asdict(m), "iso_time": m.iso_time} for m in moves], indent=2))
        return
    if not moves:
        if not tracking.model_aliases(name):
            typer.secho(f"error: {tracking.missing_model(name) or f'{name} is registered but has no aliases (none set, or all removed)'}",
                        fg="red", err=True)
            raise typer.Exit(2)
        others = sorted({m.alias for m in tracking.alias_history(name, None)}) if alias else []
        if others:
            typer.secho(f"error: --alias {alias}: {name} has no recorded moves of that alias; its aliases with moves: {', '.join(others)}", fg="red", err=True)
            raise typer.Exit(2)
        typer.echo(f"{name}: no recorded alias moves")
        return
    for m in moves:
        runs = ", ".join(f"{k}={v}" for k, v in m.context.items() if k in ("parent_run_id", "prefect_flow_run_id", "git_commit"))
        typer.echo(f"{m.seq:>4}  {m.iso_time}  {m.alias:<11} {m.from_version or '-':>4} → {m.to_version or '-':<4} {m.actor}\n      {m.reason}" + (f"\n      {runs}" if runs else ""))


def _warn_outside_moves(name: str, moves: list, current: dict[str, str], only: str | None = None) -> set[str]:
    """Warn (stderr) about each alias the registry has where its recorded history did not leave it; return them."""
    from adaptflow import aliases

    found = set()
    for alias in ("champion", "challenger"):  # the aliases adaptflow moves; others are someone else's
        why = aliases.drift(moves, alias, current.get(alias)) if only in (None, alias) else None
        if why:
            found.add(alias)
            typer.secho(f"warning: {name}@{why}. The history here ends before that move; the next move adaptflow makes "
                        "of this alias records it, as noticed then.", fg="yellow", err=True)
    return found


@registry_app.command("promote")
@_registry_errors
def registry_promote(name: str = typer.Argument(..., help="registered model name"),
                     version: str = typer.Argument(..., help="the version to make champion")) -> None:
    """Make VERSION champion: only a version whose gate passed and was held (a DVC experiment's, or a re-run's on
    the champion's own test set), while champion is still the version that gate compared it with. Choose it on
    val first (dvc exp show, or val_acc in adaptflow registry show)."""
    from adaptflow import tracking
    from adaptflow.stages.register import PromoteRefused, promote

    with _bad_input_exits():
        tracking.configure(Path.cwd(), create=False)
    try:
        done = promote(name, version)
    except PromoteRefused as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    if done.get("already"):
        typer.echo(f"{name}@champion: version {version} already; nothing moved")
        return
    typer.echo(f"{name}@champion: version {version} (was {done['previous_champion'] or 'none'}); gate: {done['reasons']}")


@registry_app.command("rollback")
@_registry_errors
def registry_rollback(name: str = typer.Argument(..., help="registered model name"),
                      reason: str = typer.Option(..., "--reason", help="why (recorded in the alias history)"),
                      to: Optional[str] = typer.Option(None, "--to", help="the former champion to go back to (default: the one the current champion replaced)")) -> None:
    """Put champion back on a version that held it before: by default the one the current champion replaced.
    Only a former champion; recorded in the alias history with --reason; the version left is tagged rolled_back.
    A pipeline run after it gates its candidate against the champion rolled back to."""
    from adaptflow import tracking
    from adaptflow.stages.register import PromoteRefused, rollback

    with _bad_input_exits():
        tracking.configure(Path.cwd(), create=False)
    try:
        done = rollback(name, reason, to)
    except PromoteRefused as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{name}@champion: version {done['version']} (rolled back from {done['previous_champion'] or 'no champion'}): {reason}")


@registry_app.command("show")
@_registry_errors
def registry_show(name: Optional[str] = ModelNameArg) -> None:
    """Where each alias of NAME points now, with the gate's verdict on that version; then every version whose
    gate passed and was held, with what chooses among them (val accuracy; at k = 0 the label-free score)."""
    from adaptflow import tracking
    from adaptflow.stages.register import GATED_AGAINST, HELD, ROLLED_BACK, gated_against_today

    name = _project_model(name)
    with _bad_input_exits():
        tracking.configure(Path.cwd(), create=False)
    current = tracking.model_aliases(name)
    held = tracking.find_versions(name, {"gate": HELD})
    _warn_outside_moves(name, tracking.alias_history(name, None), current)  # (an alias removed outside adaptflow too)
    if not current and not held:
        why = tracking.missing_model(name) or f"{name} is registered but has no aliases (none set, or all removed) and no held versions"
        typer.secho(f"error: {why}", fg="red", err=True)
        raise typer.Exit(2)

    def four(v: str | None) -> str | None:  # a tag holds the float's full repr; the table and the gate speak in 4 decimals
        try:
            return f"{float(v):.4f}" if math.isfinite(float(v)) else None
        except (TypeError, ValueError):
            return None

    def chooser(t: dict) -> str:  # what chooses among versions: val accuracy (at k = 0 the label-free score), never test
        val, im = four(t.get("val_acc")), four(t.get("pool_im"))
        return f"val_acc {val or '?'}" if val or not im else f"pool_im {im} (label-free: no target val labels)"

    for alias, version in sorted(current.items()):
        t = tracking.version_tags(name, version)
        test = "" if t.get("gate") == HELD else f"  test_acc {four(t.get('test_acc')) or '?'}"  # a held one is chosen on val alone
        rolled = f"  rolled back: {t[ROLLED_BACK]}" if ROLLED_BACK in t and alias != "champion" else ""
        typer.echo(f"{alias:<11} version {version}  {t.get('strategy', '?')} seed {t.get('seed', '?')}  {chooser(t)}{test}  "
                   f"gate {t.get('gate', '?')}: {t.get('gate_reasons', '')}{rolled}")
    champion = current.get("champion")
    stands = [v for v in held if gated_against_today(tracking.version_tags(name, v), champion)]
    for title, versions in ((f"held (gate passed; choose on these, not test, then: adaptflow registry promote {name} VERSION):", stands),
                            (f"held against an earlier champion (champion is now {champion or 'none'}: promote refuses; to gate one anew, bring back "
                             "its configuration, delete reports/registry.json and run adaptflow stage register):", [v for v in held if v not in stands])):
        if versions:
            typer.echo(title)
        for version in versions:
            t = tracking.version_tags(name, version)
            typer.echo(f"  version {version}  {t.get('strategy', '?')} seed {t.get('seed', '?')}  {chooser(t)}  gated against {t.get(GATED_AGAINST, '?')}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
