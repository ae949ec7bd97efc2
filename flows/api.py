"""Start Prefect's ephemeral API server early, while the rest of ``adaptflow run`` is still importing.

Without ``PREFECT_API_URL`` every run starts a temporary local server (a subprocess, 5–7 s) the moment
the flow is first called — after torch, timm and the params have loaded. Starting it on a thread at the top
of the command overlaps the two, which is most of what stands between a warm re-run and a 15 s budget.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import flows  # noqa: F401  (Prefect's offline defaults, before the server process inherits the environment)

log = logging.getLogger(__name__)


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


def start_in_background() -> Callable[[], None]:
    """Start the ephemeral API server on a thread if this process will need one; returns a ``join`` to call
    before the flow runs (so the flow never races a half-started server). Until then the server's own log
    lines are held back; the join prints them."""

    def start() -> None:
        try:
            from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

            if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
                return
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()  # the instance the flow's client will find running
        except Exception as exc:  # noqa: BLE001 — the flow starts it itself, and reports what is wrong
            log.debug("early Prefect API start skipped: %s", exc)

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



def unreachable() -> str | None:
    """Why the Prefect server at ``PREFECT_API_URL`` cannot be used, or None: it answers its health check, or
    the variable is unset (the ephemeral API)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    with get_client(sync_client=True) as client:
        failed = client.api_healthcheck()
    if failed is None:
        return None
    return (f"no Prefect server answers at PREFECT_API_URL={url} ({type(failed).__name__}: {failed}): "
            "start one (`prefect server start --host 127.0.0.1`) or point PREFECT_API_URL at one")
