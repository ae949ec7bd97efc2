"""What an orchestrator needs from the core, without importing one.

The core never imports Prefect; Prefect's tasks (``tasks/``) and flows (``flows/``) call these:

- **Stage identity** (:func:`identity`): the input key a stage would compute — its params sections, the
  digests of its upstream outputs, the code version — and where its output lives, *without running it*.
  Prefect's cache key is this key, so a re-run with nothing changed is a cache hit, and a change to one
  params section or one upstream output invalidates exactly the stages that read it (the same answer
  ``dvc.yaml``'s deps/params give DVC, and the same key the stage's own manifest holds).
- **The project lock** (:func:`project_lock`): one pipeline run at a time per project directory. A second
  run waits (saying who holds the lock) instead of interleaving writes with the first. The lock is an OS
  file lock, so a run killed with SIGKILL releases it with its process. A ``dvc repro`` holds it from its
  first stage until it exits, so nothing runs between two of its stages.
- **Training processes** (:func:`launch_training`): pretrain and finetune in ``orchestrate.train_processes``
  processes, one per GPU, under torch's launcher; the caller's project lock holds for them.
- **Incoming data** (:func:`absorb_incoming`): the scheduled run's new target images, moved from a watched
  folder into the target's image folder.
- **DVC in step** (:func:`dvc`, :func:`dvc_commit_blocker`): after a Prefect run, ``dvc commit`` records what
  was produced, so ``dvc status`` is clean and ``dvc repro`` has nothing to do.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from adaptflow import machine, outputs, stopping
from adaptflow.params import Params
from adaptflow.stages import TRAINING

log = logging.getLogger(__name__)

STATE_DIR = ".adaptflow"  # per project: the lock, Prefect's result and cache-key storage, the last run's summary
LOCK_NAME = "project.lock"
DVC_RUN_NAME = "dvc_run.json"  # the dvc process whose stages hold the project (see project_lock)


# --------------------------------------------------------------------------------------------- identity
@dataclass(frozen=True)
class Identity:
    """A stage's input key and its output (a directory with a manifest, or register's ``registry.json``)."""

    stage: str
    key: str
    output: Path


# Each stage module computes its own key (``input_key``): the same function decides whether the stage skips
# and what Prefect's cache key is, so the two can never disagree.
def _ingest(params: Params, root: Path, role: str) -> Identity:
    from adaptflow.stages import ingest

    return Identity("ingest", ingest.input_key(params, root, role), ingest.output_dir(params, root, role))


def _augment(params: Params, root: Path) -> Identity:
    from adaptflow.stages import augment

    return Identity("augment", augment.input_key(params, root), augment.output_dir(params, root))


def _pretrain(params: Params, root: Path) -> Identity:
    from adaptflow.stages import pretrain

    return Identity("pretrain", pretrain.input_key(params, root), pretrain.output_dir(params, root))


def _cache_features(params: Params, root: Path) -> Identity:
    from adaptflow.stages import cache_features

    return Identity("cache_features", cache_features.input_key(params, root), cache_features.output_dir(params, root))


def _finetune(params: Params, root: Path, strategy: str, seed: int) -> Identity:
    from adaptflow.stages import finetune

    return Identity("finetune", finetune.input_key(params, root, strategy, seed), finetune.output_dir(params, root, strategy, seed))


def _evaluate(params: Params, root: Path) -> Identity:
    from adaptflow.stages import evaluate

    return Identity("evaluate", evaluate.input_key(params, root), evaluate.output_dir(params, root))


def _register(params: Params, root: Path) -> Identity:
    from adaptflow.stages import register

    return Identity("register", register.input_key(params, root), register.output_path(params, root))


_IDENTITY: dict[str, Callable[..., Identity]] = {
    "ingest": _ingest, "augment": _augment, "pretrain": _pretrain, "cache_features": _cache_features,
    "finetune": _finetune, "evaluate": _evaluate, "register": _register,
}


def identity(stage: str, params: Params, root: Path, **which: object) -> Identity:
    """The key ``stage`` would compute now (``which``: ``role`` for ingest, ``strategy``/``seed`` for one
    finetune run), read from the params and the upstream manifests only — nothing is trained or decoded.

    Raises FileNotFoundError when an upstream output is not complete yet (its stage must run first).
    """
    if stage not in _IDENTITY:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(_IDENTITY)}")
    return _IDENTITY[stage](params, Path(root), **which)


class NoStore(FileNotFoundError):
    """No MLflow store to use: a command that only reads the registry found none where it looked (it creates
    none), or no tracking server answers at the URI given."""


def bad_input() -> tuple[type[Exception], ...]:
    """What bad input raises: corrupt or missing data, too few images (``DataError``); an upstream stage's
    output not there yet, or made from other params (``MissingOutput``); no registry where one was expected
    (``NoStore``); and the project held by another run past ``orchestrate.lock_timeout`` (``ProjectLocked``).
    It ends a command with its message, exit 2, and no traceback."""
    from adaptflow.data.files import DataError

    return DataError, outputs.MissingOutput, NoStore, ProjectLocked


class _NoBadInputTraceback(logging.Filter):
    """A log record of a failure from bad input keeps its message, not the traceback: the message says what
    to fix, and a traceback (three of them, from a flow run's task, flow and engine) buries it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], bad_input()):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_bad_input(loggers: tuple[str, ...] = ("prefect.task_runs", "prefect.flow_runs", "prefect.flow_engine", "prefect.task_engine")) -> None:
    """Log bad input's failures on these (an orchestrator's) loggers without their tracebacks."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoBadInputTraceback) for f in logger.filters):
            logger.addFilter(_NoBadInputTraceback())


class InconsistentUpstream(outputs.MissingOutput):
    """A stage's upstream output is complete but was not made from the current params: the stages above it
    have to run again first."""


def _raw_now(params: Params, root: Path) -> Callable[[str], str]:
    """The raw inputs' fingerprint now, for an ingest output's stage (``ingest:ROLE``: the role's data) and
    for pretrain's (the weights file it starts from), each looked at once."""
    from functools import cache

    from adaptflow.stages import ingest, pretrain

    @cache
    def raw_now(stage: str) -> str:
        if stage == "pretrain":
            return pretrain.weights_now(params, root)
        role = stage.partition(":")[2]
        return ingest.raw_fingerprint(params, root, role) if role in ingest.ROLES else ""

    return raw_now


def upstream_problems(stage: str, params: Params, root: Path, **which: object) -> list[str]:
    """Why the outputs ``stage`` reads would not be made as they are now (:func:`outputs.inconsistent_upstream`
    for its key, all the way up); empty when all follow. Raises :class:`MissingOutput` when one is not there."""
    if stage == "finetune":
        from adaptflow.stages import finetune

        keys = [identity(stage, params, root, strategy=s, seed=k).key for s, k in finetune.selected(params, **which)]
    else:
        keys = [identity(stage, params, root).key]
    # Under `dvc repro` (DVC_STAGE set) DVC has compared the raw files by content already; their mtimes, which
    # the fingerprint reads, change with every checkout or pull and would refuse what DVC rightly reuses.
    raw_now = None if os.environ.get("DVC_STAGE") else _raw_now(params, root)
    problems: list[str] = []
    for key in keys:
        problems += [p for p in outputs.inconsistent_upstream(key, params.sections, raw_now) if p not in problems]
    return problems


def check_upstream(stage: str, params: Params, root: Path, **which: object) -> None:
    """Before ``stage`` runs on its own (``adaptflow stage``, what DVC calls): refuse upstream outputs made
    from params other than the current ones, from an output that has changed since, or (outside DVC, which
    compares them by content) from raw data that has changed since (an imagefolder's files, a CSV
    manifest), all the way up.
    ``which``: for finetune, ``strategy``/``seed`` narrow the runs checked. Raises :class:`InconsistentUpstream`
    listing each difference, or :class:`MissingOutput` when an upstream output is not there."""
    if stage == "ingest":  # reads raw data only
        return
    problems = upstream_problems(stage, params, root, **which)
    if problems:
        raise InconsistentUpstream(
            f"{stage} would read outputs that the current params would not make:\n  " + "\n  ".join(problems)
            + "\nrun the stages above it first (`dvc repro`, `adaptflow run`, or `adaptflow stage` for each)" + _unwatched_hint(params, root, problems))


def _unwatched_hint(params: Params, root: Path, problems: list[str]) -> str:
    """When raw data changed where `dvc repro` does not look, what to set so it does (else it finds nothing to do)."""
    from adaptflow.stages import ingest

    changed = [role for role in ingest.ROLES
               if f"{outputs._shown(ingest.output_dir(params, root, role).resolve())} was made from raw data{outputs.CHANGED_SINCE}" in problems]
    why = [w for w in (ingest.role_unwatched(params, root, role) for role in changed) if w]
    return "".join(f"; but {w}" for w in why)


def store_root(root: Path) -> Path:
    """Where the project's default MLflow store lives: ``root``, except in a ``dvc exp run --temp``/``--queue``
    workspace (a copy under ``.dvc/tmp/exps/`` that DVC deletes afterwards), where it is the project DVC names
    in ``DVC_ROOT`` — an experiment registers against the project's registry and champion, not a throwaway."""
    root = Path(root).resolve()
    project = os.environ.get("DVC_ROOT")
    if project and root.is_relative_to(Path(project).resolve() / ".dvc" / "tmp" / "exps"):
        return Path(project).resolve()
    return root


def default_tracking_uri(root: Path) -> str:
    """The project's own MLflow store (SQLite beside the project), used when ``MLFLOW_TRACKING_URI`` is unset."""
    return f"sqlite:///{store_root(root) / 'mlflow.db'}"


def tracking_uri(root: Path) -> str:
    """The MLflow store register writes to (what ``tracking.configure`` picks), known without importing MLflow."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def server_unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why the MLflow tracking server at an ``http(s)://`` ``uri`` cannot be used, or None (it answers: any status
    but a gateway's 502/503/504 — a proxy asking for credentials is reachable; or the store is not a server).
    Asked as MLflow's client asks (``requests``: credentials in the URI, ``MLFLOW_TRACKING_INSECURE_TLS``,
    ``MLFLOW_TRACKING_SERVER_CERT_PATH``). Without this, MLflow's client retries a closed port for minutes in
    silence, and a lookup that failed reads as "no such model"."""
    from urllib.parse import urlsplit, urlunsplit

    import requests

    if not uri.startswith(("http://", "https://")):
        return None
    parts = urlsplit(uri)
    shown = urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))) if parts.hostname else uri
    verify: bool | str = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true", "yes"):
        verify = False
    try:
        status = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout, verify=verify).status_code
    except (requests.RequestException, ValueError) as exc:  # refused, no such host, a timeout, TLS, a malformed URI
        why = type(exc).__name__
    else:
        if status not in (502, 503, 504):
            return None
        why = f"HTTP {status} from a gateway in front of it"
    return (f"no MLflow tracking server answers at {shown} ({why}): start it, or point MLFLOW_TRACKING_URI at "
            "one (unset, the project's own sqlite:///mlflow.db is used)")


def mlflow_unreachable(root: Path) -> str | None:
    """Why the MLflow server(s) register would use (tracking, and ``MLFLOW_REGISTRY_URI`` if set) cannot be
    used, or None."""
    uris = (tracking_uri(root), os.environ.get("MLFLOW_REGISTRY_URI"))
    return next(filter(None, (server_unreachable(u) for u in dict.fromkeys(uris) if u)), None)


def is_current(ident: Identity, root: Path) -> bool:
    """Whether the output on disk was produced from exactly these inputs (so the stage would skip).

    For register: ``registry.json`` holds this key, for this MLflow store, and a local store still exists
    (register itself also asks MLflow whether the version is still there).
    """
    if ident.stage != "register":
        return outputs.is_current(ident.output, ident.key)
    from adaptflow.stages.register import reusable

    uri = tracking_uri(root)
    store_gone = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()
    return reusable(ident.output, ident.key, uri) is not None and not store_gone


def state_dir(root: Path) -> Path:
    """Per-project orchestration state (git- and DVC-ignored): never shared between projects, so a cached
    result of one project can never stand in for a stage of another."""
    d = Path(root).resolve() / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d


def remove_stale_outputs(params: Params, root: Path) -> list[Path]:
    """Delete what writers killed mid-stage left (their PIDs are gone) in the stages' output folders
    (``paths.*``, and below) and beside them (a temporary copy of the folder itself): nowhere else."""
    done = []
    for out in sorted({Path(root) / p for p in params.paths.model_dump().values()}):
        done += outputs.remove_stale(out.parent, out.name) + outputs.remove_stale_tree(out)
    return done + remove_stale_launches(root)


# ------------------------------------------------------------------------------------ several processes
HOLDER_ENV = "ADAPTFLOW_LOCK_HOLDER"  # set by launch_training: the pid of the process that holds the lock for them
REFUSAL_ENV = "ADAPTFLOW_REFUSAL"  # set by launch_training: where a launched process writes why it refused
_LAUNCHES: set[subprocess.Popen] = set()  # the launchers running now (stop_launches)


class LaunchFailed(RuntimeError):
    """A training stage run under torch's launcher ended with an error of its own (its output says which)."""


def _pending(stage: str, params: Params, root: Path, strategy: str | None = None, seed: int | None = None) -> bool:
    """Whether ``stage`` (one finetune run, or all that params ask for) has something to train that is not
    trained yet."""
    if stage == "pretrain":
        return params.trains(stage) and not is_current(identity(stage, params, root), root)
    from adaptflow.stages.finetune import selected

    return any(params.trains(stage, s) and not is_current(identity(stage, params, root, strategy=s, seed=k), root)
               for s, k in selected(params, strategy, seed))


def refuse(message: str) -> bool:
    """In a process :func:`launch_training` started: leave why it refuses (bad input) for the launcher to raise,
    the first process's words only; whether it was left so (the process need not print it then)."""
    path = os.environ.get(REFUSAL_ENV)
    if not path or not os.environ.get(HOLDER_ENV):
        return False
    tmp = Path(f"{path}.{os.getpid()}")
    try:
        tmp.write_text(message, encoding="utf-8")
        os.link(tmp, path)  # whole or not at all; the first process's wins (every process may refuse alike)
    except FileExistsError:
        pass
    except OSError:
        return False  # no note: the message is printed instead
    finally:
        tmp.unlink(missing_ok=True)
    return True


_LAUNCH_LOCK = threading.Lock()


def _signal(proc: subprocess.Popen, kill: bool = False) -> None:
    """SIGTERM (or SIGKILL) to a launcher's process group; where there are no process groups (Windows), to it.
    ``kill`` also reaches the processes it started, which torchrun puts in sessions of their own."""
    import signal

    if proc.poll() is not None:
        return
    tree = []
    if kill:
        import psutil

        with suppress(psutil.Error):
            tree = psutil.Process(proc.pid).children(recursive=True)
    with suppress(ProcessLookupError, PermissionError):
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        else:
            proc.kill() if kill else proc.terminate()
    for child in tree:
        with suppress(Exception):
            child.kill()


def stop_launches() -> None:
    """The run is stopping (it failed, or was interrupted or cancelled): stop the training launchers this
    process started that still run (torchrun passes SIGTERM on to its processes), start no other until
    :func:`allow_launches`, and let the stages running in this process end at their next step
    (:mod:`adaptflow.stopping`)."""
    with _LAUNCH_LOCK:
        stopping.request()
        for proc in list(_LAUNCHES):
            _signal(proc)


def allow_launches() -> None:
    """A new run begins (in this context): :func:`launch_training` may start processes again, and the stages
    it submits run to their end unless it stops."""
    stopping.begin()


def launch_training(stage: str, params: Params, root: Path, echo: Callable[[str], None], strategy: str | None = None,
                    seed: int | None = None) -> bool:
    """Run a training stage in ``orchestrate.train_processes`` processes, one per GPU, under torch's own launcher
    (``torchrun --standalone``) with exactly these params; whether it did. Not when ``train_processes`` is 1,
    when already running under a launcher, or when nothing is left to train: the caller runs the stage in its
    own process then.

    The caller holds the project lock: it holds it for the processes (:func:`project_lock`), which stop should
    the caller die. They run ``adaptflow stage`` in ``root`` on a copy of the params written for them; their
    output goes to ``echo``, line by line. Their refusal (bad input, :func:`refuse`) is raised as ``DataError``
    with their words; any other failure as :class:`LaunchFailed`, as is a launch after :func:`stop_launches`."""
    n = params.orchestrate.train_processes
    if stage not in TRAINING or n <= 1 or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or not _pending(stage, params, root, strategy, seed):
        return False
    import yaml

    d = state_dir(root) / "launch"
    d.mkdir(exist_ok=True)
    base = d / f"{stage}-{os.getpid()}-{time.time_ns()}"  # the pid: remove_stale_launches knows a dead launcher's
    copy, refusal = base.with_suffix(".yaml"), base.with_suffix(".refusal")
    which = [a for k, v in (("--strategy", strategy), ("--seed", seed)) if v is not None for a in (k, str(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "adaptflow", "stage", stage, "--params", str(copy), *which]
    env = {"OMP_NUM_THREADS": str(max(1, machine.cores() // n)),  # (torchrun's default is 1)
           **os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", HOLDER_ENV: str(os.getpid()), REFUSAL_ENV: str(refusal)}
    log.info("%s in %d processes: %s", stage, n, " ".join(cmd[2:]))
    try:
        outputs.atomic_write_text(copy, yaml.safe_dump(params.to_dict(), sort_keys=False))
        with _LAUNCH_LOCK:  # (a stop_launches now sees this one, or this one sees it)
            if stopping.requested():
                raise LaunchFailed(f"{stage}: not started, the run is stopping")
            # its own process group: stopped as one, apart from the caller's terminal signals
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    encoding="utf-8", errors="replace", start_new_session=True)
            _LAUNCHES.add(proc)
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                echo(line.rstrip())
            code = proc.wait()
        except BaseException:  # interrupted or cancelled: the launcher stops its processes on SIGTERM
            _signal(proc)
            try:
                proc.communicate(timeout=60)  # (reading what they still say, so none blocks on a full pipe)
            except subprocess.TimeoutExpired:
                _signal(proc, kill=True)
                with suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=30)
            raise
        finally:
            _LAUNCHES.discard(proc)
        why = refusal.read_text(encoding="utf-8") if refusal.is_file() else None
    finally:
        copy.unlink(missing_ok=True)
        refusal.unlink(missing_ok=True)
    if why:
        from adaptflow.data.files import DataError

        raise DataError(why)
    if code != 0:
        raise LaunchFailed(f"{stage} in {n} processes (torchrun) exited {code}; its output above says why")
    if _pending(stage, params, root, strategy, seed):
        raise LaunchFailed(f"{stage} in {n} processes (torchrun) exited 0 but left no current output")
    return True


def remove_stale_launches(root: Path) -> list[Path]:
    """The params copies (and refusal notes) of launchers that were killed: their pid is in the name."""
    import psutil

    gone = []
    for f in sorted((state_dir(root) / "launch").glob("*-*-*.*")):
        pid = f.stem.split("-")[-2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            f.unlink(missing_ok=True)
            gone.append(f)
    return gone


# ------------------------------------------------------------------------------------------------- lock
class ProjectLocked(RuntimeError):
    """Another run holds this project's lock for longer than the caller would wait."""


def _holder(info: Path) -> str:
    try:
        h = json.loads(info.read_text())
    except (OSError, json.JSONDecodeError):
        return "another process (no holder record)"
    since = time.strftime("%H:%M:%S", time.localtime(h.get("since", 0)))
    return f"pid {h.get('pid')} on {h.get('host')} ({h.get('what')}, by {h.get('user')}, since {since})"


def _dvc_process():
    """The ``dvc`` process running this one's stage (nearest ancestor whose command is dvc) and its command
    line from ``dvc`` on (``dvc repro``, ``dvc exp run``), or None."""
    import psutil

    try:
        parents = psutil.Process().parents()
    except psutil.Error:
        return None
    for proc in parents:
        try:
            args = proc.cmdline()
        except psutil.Error:  # another user's process, or gone: not one we can name
            continue
        for i, arg in enumerate(args[:3]):
            if Path(arg).name in ("dvc", "dvc.exe"):
                return proc, " ".join(["dvc", *args[i + 1 : i + 3]])
    return None


def _note_dvc_run(root: Path) -> None:
    """A stage that DVC runs (``DVC_STAGE`` set) notes the ``dvc`` process driving it: that process holds the
    project for all its stages, so a pipeline run does not slip in between two of them."""
    found = _dvc_process() if os.environ.get("DVC_STAGE") else None
    if found is None:
        return
    proc, cmd = found
    outputs.atomic_write_text(state_dir(root) / DVC_RUN_NAME, json.dumps({
        "pid": proc.pid, "host": socket.gethostname(), "create_time": proc.create_time(), "cmd": cmd,
        "stage": os.environ["DVC_STAGE"], "since": time.time()}))


def dvc_run_in_progress(root: Path) -> dict | None:
    """The noted ``dvc repro`` / ``dvc exp run`` while it is still running and is not an ancestor of this
    process (whose stages it runs); None otherwise. A note whose process has ended is removed."""
    import psutil

    path = state_dir(root) / DVC_RUN_NAME
    try:
        rec = json.loads(path.read_text())
        if rec.get("host", socket.gethostname()) != socket.gethostname():
            return None  # a dvc run on another machine: its pid means nothing here (and OS file locks rarely span machines)
        proc = psutil.Process(int(rec["pid"]))
        alive = abs(proc.create_time() - float(rec["create_time"])) < 0.5  # not a later process with the same pid
    except FileNotFoundError:
        return None
    except psutil.AccessDenied:  # another user's process: alive
        alive = True
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):  # gone, or a note that cannot be read
        alive = False
    if not alive:
        path.unlink(missing_ok=True)
        return None
    try:
        mine = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    except psutil.Error:
        mine = {os.getpid()}
    return None if rec["pid"] in mine else rec


def _lock_record(root: Path) -> Path:
    """The holder's record beside the lock (the folder is not created: a process that only looks makes none)."""
    return Path(root).resolve() / STATE_DIR / (LOCK_NAME + ".json")


def _holds(holder: int, info: Path) -> bool:
    """Whether ``holder`` is one of this process's ancestors and holds the project lock (its record is written
    once the lock is taken and removed before it is let go)."""
    import psutil

    try:
        return holder in {p.pid for p in psutil.Process().parents()} and int(json.loads(info.read_text())["pid"]) == holder
    except Exception:  # noqa: BLE001 — a record that cannot be read, a process that cannot be seen: it does not
        return False


def check_held_for_me(root: Path) -> bool:
    """Whether this process was launched to train for a lock holder (:func:`launch_training`) that holds the
    project: the holder named in ``ADAPTFLOW_LOCK_HOLDER``. It then ends once that holder has died or let go
    (:func:`_end_with`). False when no holder is named; a named holder that does not hold the lock raises
    ProjectLocked at once, in every process: waiting for the lock would wait for the very process that waits
    for this one."""
    named = os.environ.get(HOLDER_ENV)
    if not named:
        return False
    info = _lock_record(root)
    if not (named.isdigit() and _holds(int(named), info)):
        raise ProjectLocked(f"launched by pid {named} to train for it, but that process does not hold the project lock "
                            f"(any more): {_holder(info)} does")
    _end_with(int(named), info)
    return True


_WATCHING: list[int] = []  # the holder this process watches (one watch per process)


def _end_with(holder: int, info: Path, poll: float = 1.0) -> None:
    """End this process once ``holder``, whose lock it works under, has died or no longer holds the project: a
    lock holder killed mid-run leaves no training behind that writes without the lock. Every launched process
    watches (torchrun puts each in a session of its own)."""
    if _WATCHING:
        return
    _WATCHING.append(holder)

    def watch() -> None:
        while _holds(holder, info):
            time.sleep(poll)
        log.error("pid %d, which held the project lock for this process, no longer does: stopping", holder)
        os._exit(3)

    threading.Thread(target=watch, name="lock-holder-watch", daemon=True).start()


@contextmanager
def project_lock(root: Path, what: str = "adaptflow", timeout: float | None = None, remind_every: float = 30.0,
                 poll: float = 2.0) -> Iterator[None]:
    """Hold ``root``'s project lock for the block: one pipeline run (or DVC stage) writes a project at a time.

    Re-entrant within a process (a scheduled flow holds it around the pipeline flow it calls), and held for
    the processes a holder starts to train a stage (:func:`launch_training`). Any other process waits, logging who holds the lock and reminding every ``remind_every`` seconds; with a
    ``timeout`` (seconds) it gives up with :class:`ProjectLocked`. The OS releases the lock of a killed
    process, so a crashed run never blocks the next one.

    A ``dvc repro`` (or ``dvc exp run``) holds the project from its first stage until it exits, not only
    while each stage runs: its stages note the dvc process (:func:`_note_dvc_run`), and anyone else who takes
    the lock while that process lives lets go and waits (checking every ``poll`` seconds), so nothing writes
    between two of its stages and ``dvc.lock`` records one consistent pipeline.
    """
    if check_held_for_me(root):  # a pipeline run that launched this stage's processes holds it for them
        yield
        return
    d = state_dir(root)
    info = _lock_record(root)
    lock = FileLock(str(d / LOCK_NAME), thread_local=False, is_singleton=True)
    started = time.monotonic()

    def left() -> float | None:
        return None if timeout is None else timeout - (time.monotonic() - started)

    def give_up(holder: str) -> ProjectLocked:
        return ProjectLocked(f"project {Path(root).resolve()} is still locked by {holder} after {timeout:.0f} s; "
                             f"wait for that run, or raise orchestrate.lock_timeout (the lock frees itself when its process exits)")

    def take() -> bool:
        """The file lock, waiting (with reminders) while another process holds it; whether it had to wait."""
        try:
            lock.acquire(timeout=0)
            return False
        except Timeout:
            log.warning("project %s is locked by %s: waiting for that run to finish (lock file %s)", Path(root).resolve(), _holder(info), lock.lock_file)
        while True:
            rest = left()
            if rest is not None and rest <= 0:
                raise give_up(_holder(info))
            try:
                lock.acquire(timeout=remind_every if rest is None else min(remind_every, rest))
                return True
            except Timeout:
                log.warning("still waiting for the project lock (held by %s, %.0f s so far)", _holder(info), time.monotonic() - started)

    waited, told = False, False
    while True:
        waited = take() or waited
        run = dvc_run_in_progress(root) if lock.lock_counter == 1 else None
        if run is None:
            break
        lock.release()
        waited = True
        holder = f"`{run['cmd']}` (pid {run['pid']}, between DVC stages; last stage {run['stage']})"
        if not told:
            log.warning("project %s is held by %s: waiting for it to finish", Path(root).resolve(), holder)
            told = True
        rest = left()
        if rest is not None and rest <= 0:
            raise give_up(holder)
        time.sleep(poll if rest is None else max(0.0, min(poll, rest)))
    if waited:
        log.info("project lock acquired after %.1f s", time.monotonic() - started)
    if lock.lock_counter == 1:
        outputs.atomic_write_text(info, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "user": getpass.getuser(),
                                                    "what": what, "since": time.time()}))
        _note_dvc_run(root)
    try:
        yield
    finally:
        if lock.lock_counter == 1:
            info.unlink(missing_ok=True)  # before the release: afterwards it may already be the next holder's
        lock.release()


# --------------------------------------------------------------------------------------------- incoming
def target_folder_name(params: Params) -> str:
    """The target data's short name: the folder of an imagefolder/csv target, else the built-in's name."""
    from adaptflow.data.domains import parse_spec

    spec = parse_spec(params.target.domain)
    if not spec.is_path:
        return spec.kind
    path = Path(spec.path)
    return path.stem if spec.kind == "csv" else path.name  # a folder's dots are part of its name (my.digits.v2)


def incoming_dir(params: Params, root: Path) -> Path:
    return Path(root) / params.orchestrate.incoming.format(domain=target_folder_name(params))


def _hold_back(files: list[Path], src: Path, dest: Path, params: Params, root: Path, held: list[dict]) -> list[Path]:
    """The incoming files that may join the dataset; the others are appended to ``held`` with the reason.

    A file holding an image the dataset (or another incoming class) has under another class is held: moved,
    it would be a label conflict, and ingest would exclude every copy, the one already there too. A class
    the dataset does not have yet joins only when ingest would keep enough of it to fill every split:
    counted as ingest counts, without copies among its own files (the same stored pixels), and after
    ``target.limit`` takes the class's share. Under the limit the new classes also take their share from
    the classes already there: while that would cut one of those below the minimum, every new class waits
    (the one ingest would then fail on is not a new class)."""
    from collections import Counter

    import numpy as np

    from adaptflow import imaging
    from adaptflow.data import store
    from adaptflow.data.files import scan_imagefolder
    from adaptflow.data.splits import class_quota
    from adaptflow.stages.ingest import class_size_needed, output_dir, stored_digest

    need, size, channels = class_size_needed(params, "target"), params.preprocess.image_size, params.preprocess.channels
    stored = output_dir(params, root, "target")
    owner: dict[str, str | None] = {}  # stored digest → the class that holds it (None: excluded as a label conflict)
    if outputs.read_manifest(stored) is not None:
        meta = store.read_meta(stored, ["sha1", "class_name"])
        owner.update(zip(meta["sha1"], meta["class_name"]))
        owner.update((c["sha1"], None) for c in store.read_card(stored).get("duplicates", {}).get("label_conflicts", []) if "sha1" in c)
    by_class: dict[str, list[Path]] = {}
    distinct: Counter = Counter()
    for f in files:
        c = f.relative_to(src).parts[0]
        try:  # decoded once, as ingest will decode it
            digest = stored_digest(imaging.prepare(f, size, channels))
        except imaging.UNREADABLE as exc:
            held.append({"item": str(f.relative_to(src)), "reason": imaging.unreadable(exc)})
            continue
        there = owner.get(digest, c)
        if there != c:
            why = ("the same image is already excluded from the dataset as a label conflict" if there is None else
                   f"the same image is in class {there!r}")
            held.append({"item": str(f.relative_to(src)), "reason": f"labeled {c!r}, but {why}: moved, every copy would be excluded "
                                                                     "as a label conflict; fix the label (or the folder) it is in"})
            continue
        distinct[c] += digest not in owner
        owner[digest] = c
        by_class.setdefault(c, []).append(f)
    new = {c: fs for c, fs in by_class.items() if not (dest / c).is_dir()}
    admitted = [f for fs in by_class.values() for f in fs]
    if not new:
        return admitted
    counts = Counter(scan_imagefolder(dest, "target.domain").class_names) if dest.is_dir() else Counter()  # listed now
    for c, fs in by_class.items():
        counts[c] += len(fs)  # and once these arrive
    limit = params.target.limit

    def shares(classes: set[str]) -> dict[str, int]:  # each class's share of target.limit with ``classes`` in
        names = sorted(c for c in counts if c in classes or c not in new)
        return dict(zip(names, (int(n) for n in class_quota(np.array([counts[c] for c in names]), limit)))) if limit else dict(counts)

    reasons: dict[str, str] = {}
    joining = set(new)
    while joining:  # a class held back leaves a larger share of the limit to the others: ask again
        share = shares(joining)
        for c in sorted(joining):
            fs = new[c]
            copies = len(fs) - distinct[c]
            usable = min(distinct[c], share[c] - copies)  # at worst the limit keeps every copy
            if usable < need:
                reasons[c] = (f"class {c!r} is new; ingest would keep {max(usable, 0)} of its {len(fs)} readable image(s)"
                              + (f" ({copies} copies among them)" if copies else "")
                              + (f" (target.limit={limit} takes its share)" if limit and share[c] < len(fs) else "")
                              + f"; it joins when that reaches {need} (one in every split, and target.k labeled)")
        if not joining - set(reasons):
            break
        if joining & set(reasons):
            joining -= set(reasons)
            continue
        alone = shares(set())  # the classes there now: the new ones must not take their share below the minimum
        squeezed = {c: n for c, n in share.items() if c not in new and n < need <= alone[c]}
        if squeezed:
            names = ", ".join(f"{c!r} to {n}" for c, n in sorted(squeezed.items()))
            for c in joining:
                reasons[c] = (f"class {c!r} is new; with it, target.limit={limit} would cut {names} image(s), below the "
                              f"{need} every class needs; it joins when target.limit is raised or removed")
        break
    waiting: set[Path] = set()
    for c, why in reasons.items():
        held += [{"item": str(f.relative_to(src)), "reason": why} for f in new[c]]
        waiting.update(new[c])
    return [f for f in admitted if f not in waiting]


def absorb_incoming(params: Params, root: Path) -> dict:
    """Move new target images from the watched folder (``orchestrate.incoming``, one subfolder per class)
    into the target's image folder, so ingest sees them; the watched folder is left empty.

    A file whose name is taken in the dataset is dropped when the bytes are the same and renamed when they
    differ. Hidden files (uploads in progress) stay where they are. So does — *held*, listed with its reason
    in the report and the log — a file outside a class folder, a file that is not a readable image, and
    every file of a class the dataset does not have yet until that class has enough readable images to fill
    every split and, under ``target.limit``, leaves every class there its minimum (moved, they would fail
    every later ingest). Moving is idempotent: a run killed midway moves
    the rest next time.
    """
    from adaptflow.data.domains import DataError, parse_spec, resolve
    from adaptflow.data.files import walk

    src = incoming_dir(params, root)
    report = {"incoming": str(src), "added": 0, "duplicates": 0, "classes": [], "dataset": None, "held": []}
    # hidden files and folders (uploads in progress) are not read, as ingest and predict read a folder
    files = sorted(p for p, why in walk(src, skip_hidden_folders=True) if why is None) if src.is_dir() else []
    loose = [p for p in files if len(p.relative_to(src).parts) < 2]
    if loose:
        log.warning("incoming: %d file(s) directly in %s are not in a class folder and stay there (e.g. %s)", len(loose), src, loose[0].name)
    report["held"] += [{"item": p.name, "reason": "not in a class folder: put it in a subfolder named after its class"} for p in loose]
    files = [p for p in files if p not in loose]
    if not files:
        log.info("incoming: nothing new in %s", src)
        return report
    spec = parse_spec(params.target.domain)
    if spec.kind != "imagefolder":
        raise DataError(f"incoming: {len(files)} new file(s) in {src}, but target.domain is {params.target.domain!r}; new data can only "
                        f"be added to an imagefolder target (set target.domain: imagefolder:data/raw/NAME and target.raw: data/raw/NAME)")
    dest = resolve(spec, root)
    files = _hold_back(files, src, dest, params, Path(root), report["held"])
    for h in report["held"][len(loose):]:  # (the loose files were said above, at once)
        log.warning("incoming: %s stays in %s: %s", h["item"], src, h["reason"])
    classes = set()
    for f in files:
        rel = f.relative_to(src)
        to = dest / rel
        to.parent.mkdir(parents=True, exist_ok=True)
        if to.exists():
            if outputs.file_digest(to) == outputs.file_digest(f):
                f.unlink()
                report["duplicates"] += 1
                continue
            to = to.with_name(f"{to.stem}-{outputs.file_digest(f)[:8]}{to.suffix}")
        shutil.move(str(f), str(to))
        report["added"] += 1
        classes.add(rel.parts[0])
    for d in sorted((p for p in src.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    report.update(classes=sorted(classes), dataset=str(dest))
    log.info("incoming: %d new image(s) in %d class(es) → %s (%d already there)", report["added"], len(classes), dest, report["duplicates"])
    return report


# -------------------------------------------------------------------------------------------------- DVC
class DvcError(RuntimeError):
    """A dvc command failed; the message carries its output."""


def is_dvc_repo(root: Path) -> bool:
    return (Path(root) / ".dvc").is_dir()


def dvc(root: Path, *args: str, timeout: float = 900) -> str:
    """Run ``dvc ARGS`` in ``root`` (the dvc beside this Python first) and return its stdout."""
    exe = Path(sys.executable).parent / "dvc"
    cmd = [str(exe) if exe.is_file() else (shutil.which("dvc") or "dvc"), *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` in {root} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def dvc_stage_names(root: Path) -> list[str]:
    """The stages of ``root``'s dvc.yaml as DVC names them (a ``foreach`` stage over a mapping or a list of
    strings: ``NAME@KEY``), read from the file; other forms ask ``dvc stage list``."""
    import yaml

    names: list[str] = []
    for name, stage in (yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}).get("stages", {}).items():
        each = stage.get("foreach") if isinstance(stage, dict) else None
        if each is None:
            names.append(name)
        elif isinstance(each, dict) or (isinstance(each, list) and all(isinstance(k, str) for k in each)):
            names += [f"{name}@{k}" for k in each]
        else:  # a templated list or other forms: DVC resolves them
            return dvc(Path(root), "stage", "list", "--name-only").split()
    return names


def dvc_commit_blocker(root: Path, params_path: str, overrides: list[str] | None) -> str | None:
    """Why a Prefect run's outputs must not be committed to ``dvc.lock`` (None: they may).

    ``dvc.lock`` records ``params.yaml`` as DVC reads it: outputs made from other values (``--set``
    overrides of anything but ``orchestrate``, another params file) would make the lock lie.
    """
    root = Path(root)
    if not is_dvc_repo(root) or not (root / "dvc.yaml").is_file():
        return "not a DVC pipeline (no .dvc/ and dvc.yaml here)"
    if not _in_git(root) and "no_scm = true" not in _read(root / ".dvc" / "config").replace("True", "true"):
        return "not inside a git repository (a copy without .git/): dvc needs git, or core.no_scm"
    if Path(params_path).resolve() != (root / "params.yaml").resolve():
        return f"params came from {params_path}, while dvc.yaml reads params.yaml"
    changed = [o for o in overrides or [] if not o.strip().startswith("orchestrate.")]
    if changed:
        return f"--set {' '.join(changed)} differs from params.yaml (dvc exp run -S records such runs)"
    return None


def _in_git(root: Path) -> bool:
    try:
        return subprocess.run(["git", "rev-parse", "--git-dir"], cwd=root, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
