"""Start Prefect's ephemeral API server early, while the rest of ``adaptflow run`` is still importing.

Without ``PREFECT_API_URL`` every run starts a temporary local server (a subprocess, 5–7 s) the moment
the flow is first called — after torch, timm and the params have loaded. Starting it at the top of the
command overlaps the two, which is most of what stands between a warm re-run and a 15 s budget.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import warnings
from typing import Callable

import flows  # noqa: F401  (Prefect's offline defaults, before the server process inherits the environment)

log = logging.getLogger(__name__)

# torch's own filter for this warning, in torch/_native/__init__.py
TORCH_OVERRIDE_WARNING = r"Warning only once for all operators,  other operators may also be overridden\."


class _HoldServerLines(logging.Filter):
    """Keeps Prefect's "Starting/Stopping temporary server" lines back until the run goes ahead, so a
    command that stops on a bad params value prints its error alone."""

    LINES = ("Starting temporary server", "Stopping temporary server")

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.LINES):
            self.held.append(record)
            return False
        return True


def uvicorn_command(port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment Prefect's ``SubprocessASGIServer`` runs its ephemeral server with (a
    unit test holds the two equal), built without importing Prefect's server package."""
    import prefect
    from prefect.settings import get_current_settings

    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
            "--lifespan", "on"]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **get_current_settings().to_environment_variables(exclude_unset=True)}
    return args, env


def _free_port() -> int:
    """A port in Prefect's ephemeral range that nothing listens on now (a race is caught by Prefect: the
    server exits 3 and Prefect starts another on a new port)."""
    for _ in range(20):
        port = random.randrange(8000, 9000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 8000-8999 for Prefect's ephemeral API server")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Early:
    """The server processes this command spawned early, and whether it is exiting. The exit hook is
    registered on the main thread before the spawning thread starts, so it runs whenever the command ends —
    during the spawn too: the lock orders the two, and nothing is spawned once it has run."""

    lock = threading.Lock()
    closing = False
    spawned: list[subprocess.Popen] = []
    hooked = False

    @classmethod
    def at_exit(cls) -> None:
        """Stop every early process still running: one Prefect never adopted (the command ended first, on a
        bad params value); an adopted one is stopped by Prefect's own hook, registered later and so run
        earlier, and is gone by now."""
        with cls.lock:
            cls.closing = True
            procs, cls.spawned = cls.spawned, []
        for proc in procs:
            _stop(proc)


def _running_server() -> bool:
    """Prefect's ephemeral server already runs in this interpreter (an in-process caller's second run)."""
    mod = sys.modules.get("prefect.server.api.server")
    return mod is not None and getattr(mod.SubprocessASGIServer._instances.get(None), "running", False)


def _start_early() -> None:
    """Spawn the ephemeral server's process first, then hand it to Prefect's own ``SubprocessASGIServer``.

    Prefect would spawn it only after importing its server package here (≈2.5 s, sharing the interpreter
    lock with torch's import); the process then needs ≈3.5 s more to answer. Spawned as soon as Prefect's
    settings have loaded, it boots on the other core meanwhile. Prefect adopts it: ``start`` waits for the
    health check, starts another on a new port if this one was taken, and stops it at exit."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or _running_server():
        return
    port = _free_port()
    args, env = uvicorn_command(port)
    with _Early.lock:
        if _Early.closing:  # the command is exiting: spawn nothing its exit hook would not see
            return
        proc = subprocess.Popen(args, env=env)
        _Early.spawned = [p for p in _Early.spawned if p.poll() is None] + [proc]
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance the flow's client will find running
    if server.running:  # started meanwhile by another caller in this interpreter
        _stop(proc)
        return
    server.port = port
    first = [proc]

    def run_command() -> subprocess.Popen:
        """The early process first; a new one (Prefect's retry on a taken port) is Prefect's command, spawned
        under the exit hook's eyes like the early one."""
        if first:
            return first.pop()
        with _Early.lock:
            if _Early.closing:
                raise RuntimeError("adaptflow is exiting: no new Prefect API server")
            again = SubprocessASGIServer._run_uvicorn_command(server)
            _Early.spawned.append(again)
            return again

    server._run_uvicorn_command = run_command
    server.start()


def start_in_background() -> Callable[[], None]:
    """Start the ephemeral API server on a thread if this process will need one; returns a ``join`` to call
    before the flow runs (so the flow never races a half-started server). Until then the server's own log
    lines are held back; the join prints them."""

    def start() -> None:
        try:
            _start_early()
        except Exception as exc:  # noqa: BLE001 — the flow starts it itself, and reports what is wrong
            log.debug("early Prefect API start skipped: %s", exc)

    # Warning filters are process-wide and `catch_warnings` is not thread-safe: an import on this thread that
    # leaves a `catch_warnings` block restores the filters it found, dropping the one torch's import sets
    # meanwhile on the main thread around its kernel overrides (about 1 run in 7 then printed torch's
    # "Overriding a previously registered kernel" warning). The same filter, set before the thread starts,
    # is in every list a restore puts back. It stays for the process (an in-process caller keeps it too); other filters set that way by the main
    # thread's imports could be dropped the same way, none has been seen printing.
    warnings.filterwarnings("ignore", message=TORCH_OVERRIDE_WARNING, category=UserWarning)
    if not _Early.hooked:
        atexit.register(_Early.at_exit)
        _Early.hooked = True
    prefect_logger = logging.getLogger("prefect")  # the logger Prefect's SubprocessASGIServer writes to
    hold = _HoldServerLines()
    prefect_logger.addFilter(hold)
    thread = threading.Thread(target=start, name="prefect-api-start", daemon=True)
    thread.start()

    def join() -> None:
        thread.join()
        prefect_logger.removeFilter(hold)
        for record in hold.held:
            prefect_logger.handle(record)

    return join



def api_url() -> str | None:
    """The Prefect server this process talks to (``PREFECT_API_URL``), or None: the temporary local one."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def unreachable() -> str | None:
    """Why the Prefect server at ``PREFECT_API_URL`` cannot be used, or None: it answers its health check, or
    the variable is unset (the ephemeral API)."""
    from prefect import get_client

    url = api_url()
    if not url:
        return None
    with get_client(sync_client=True) as client:
        failed = client.api_healthcheck()
    if failed is None:
        return None
    return (f"no Prefect server answers at PREFECT_API_URL={url} ({type(failed).__name__}: {failed}): "
            "start one (`prefect server start --host 127.0.0.1`) or point PREFECT_API_URL at one")
