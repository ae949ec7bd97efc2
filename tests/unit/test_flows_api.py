"""`adaptflow run` starts Prefect's API early, but its log lines wait until the params have passed."""

from __future__ import annotations

import logging

from flows import api


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_server_lines_are_held_until_the_join_and_dropped_without_it(monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer

    monkeypatch.setattr(SubprocessASGIServer, "start", lambda self, timeout=None: None)  # no real server here
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
