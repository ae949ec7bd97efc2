"""`adaptflow run` starts Prefect's API early: its process is spawned before Prefect's server package is
imported, Prefect adopts that very process, and its log lines wait until the params have passed."""

from __future__ import annotations

import logging
import subprocess

import pytest

from flows import api


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_server_lines_are_held_until_the_join_and_dropped_without_it(monkeypatch):
    monkeypatch.setattr(api, "_start_early", lambda: None)  # no real server here
    prefect_logger, seen = logging.getLogger("prefect"), _Collect()
    prefect_logger.addHandler(seen)
    level, before = prefect_logger.level, list(prefect_logger.filters)
    prefect_logger.setLevel(logging.INFO)
    try:
        join = api.start_in_background()
        prefect_logger.info("Starting temporary server on http://127.0.0.1:1")
        prefect_logger.info("something else")
        assert seen.lines == ["something else"]  # a params error now would print alone
        join()
        assert seen.lines == ["something else", "Starting temporary server on http://127.0.0.1:1"]
        prefect_logger.info("Stopping temporary server on http://127.0.0.1:1")
        assert seen.lines[-1].startswith("Stopping")  # once joined, nothing is held
        api.start_in_background()  # never joined: the command stopped on bad params
        prefect_logger.info("Stopping temporary server on http://127.0.0.1:2")
        assert seen.lines[-1].endswith(":1")
    finally:
        prefect_logger.removeHandler(seen)
        prefect_logger.setLevel(level)
        for f in [f for f in prefect_logger.filters if f not in before]:
            prefect_logger.removeFilter(f)


def test_the_early_command_is_the_one_prefect_runs(monkeypatch):
    """The command is built without Prefect's server package: it must stay what Prefect itself would run."""
    import prefect.server.api.server as server_mod

    seen = {}

    def popen(args, env=None, **kw):
        seen.update(args=args, env=env, kw=kw)
        return None

    monkeypatch.setattr(server_mod.subprocess, "Popen", popen)
    server_mod.SubprocessASGIServer(port=8123)._run_uvicorn_command()
    server_mod.SubprocessASGIServer._instances.pop(8123, None)
    args, env = api.uvicorn_command(8123)
    assert args == seen["args"] and env == seen["env"] and not seen["kw"]


class _Proc:
    """Stands in for the early server process."""

    def __init__(self) -> None:
        self.terminated = False

    def poll(self):
        return 0 if self.terminated else None

    def terminate(self) -> None:
        self.terminated = True

    def wait(self, timeout=None) -> int:
        return 0


@pytest.fixture
def fresh_server(monkeypatch):
    """Prefect's ephemeral-server registry and the early spawns emptied for the test, the real ones put back after."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})
    monkeypatch.setattr(api._Early, "spawned", [])
    monkeypatch.setattr(api._Early, "closing", False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no server configured (another test may have one)
        yield SubprocessASGIServer


@pytest.fixture
def spawned(monkeypatch) -> list[_Proc]:
    """Stand-ins for the processes ``_start_early`` spawns, each knowing its ``--port``."""
    procs: list[_Proc] = []

    def popen(args, env):
        procs.append(_Proc())
        procs[-1].port = int(args[args.index("--port") + 1])
        return procs[-1]

    monkeypatch.setattr(api.subprocess, "Popen", popen)
    return procs


def test_prefect_adopts_the_early_process(monkeypatch, fresh_server, spawned):
    started = []
    monkeypatch.setattr(fresh_server, "start", lambda self, timeout=None: started.append(self._run_uvicorn_command()))
    api._start_early()
    server = fresh_server()
    assert started == spawned and len(spawned) == 1  # Prefect's start got the early process, spawned once
    assert server.port == spawned[0].port  # and knows the port it listens on
    # a second spawn (the port was taken: Prefect retries on a new one) is Prefect's own command, and the
    # exit hook knows it; once the command is exiting, nothing more is spawned
    calls = []
    monkeypatch.setattr(fresh_server, "_run_uvicorn_command", lambda self: calls.append(self) or _Proc())
    again = server._run_uvicorn_command()
    assert calls == [server] and api._Early.spawned == [spawned[0], again]
    api._Early.at_exit()
    assert again.terminated and spawned[0].terminated
    with pytest.raises(RuntimeError, match="exiting"):
        server._run_uvicorn_command()
    assert calls == [server]


def test_the_early_process_is_stopped_when_the_command_ends_before_it_answers(monkeypatch, fresh_server, spawned):
    """The command ends (a bad params value) while Prefect still waits for the server: the exit hook stops it
    (once Prefect has it, Prefect's own hook, registered later and so run first, has stopped it already)."""
    monkeypatch.setattr(fresh_server, "start", lambda self, timeout=None: api._Early.at_exit())
    api._start_early()
    assert len(spawned) == 1 and spawned[0].terminated and api._Early.spawned == []


def test_nothing_is_spawned_once_the_command_is_exiting(fresh_server, spawned):
    api._Early.at_exit()  # the exit hook ran while the thread was still importing Prefect's settings
    api._start_early()
    assert spawned == []


def test_no_early_server_when_one_runs_in_this_interpreter_already(fresh_server, spawned):
    fresh_server().running = True  # an in-process caller's earlier run started it
    api._start_early()
    assert spawned == []


def test_no_early_server_when_a_server_is_configured(fresh_server, spawned):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        api._start_early()
    assert spawned == []


@pytest.mark.integration
def test_a_real_early_server_answers_and_stops(fresh_server):
    """The real thing: the process spawned early is the one Prefect health-checks, and it stops."""
    import httpx

    api._start_early()
    server = fresh_server()
    try:
        (early,) = api._Early.spawned
        assert server.running and server.server_process is early  # adopted, not a second one Prefect spawned
        assert httpx.get(f"{server.api_url}/health", timeout=10).status_code == 200
    finally:
        server.stop()
    assert early.poll() is not None


def test_torch_override_warning_stays_silent_when_the_other_thread_restores_the_filters(monkeypatch):
    """torch's import silences its kernel-override warning inside `catch_warnings`; an import on the early
    server's thread that leaves its own `catch_warnings` meanwhile puts back a list without that filter."""
    import warnings

    monkeypatch.setattr(api, "_start_early", lambda: None)
    with warnings.catch_warnings(record=True) as seen:  # the test's filters come back after
        warnings.simplefilter("always")
        api.start_in_background()()
        captured_by_the_other_thread = list(warnings.filters)
        with warnings.catch_warnings():  # torch's import, on the main thread
            warnings.filterwarnings("ignore", message=api.TORCH_OVERRIDE_WARNING, category=UserWarning)
            warnings.filters[:] = captured_by_the_other_thread  # the other thread's block ends
            warnings._filters_mutated()
            warnings.warn("Warning only once for all operators,  other operators may also be overridden.", UserWarning)
    assert not [w for w in seen if "other operators" in str(w.message)]
