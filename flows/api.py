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


def start_in_background() -> Callable[[], None]:
    """Start the ephemeral API server on a thread if this process will need one; returns a ``join`` to call
    before the flow runs (so the flow never races a half-started server)."""

    def start() -> None:
        try:
            from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

            if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
                return
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()  # the instance the flow's client will find running
        except Exception as exc:  # noqa: BLE001 — the flow starts it itself, and reports what is wrong
            log.debug("early Prefect API start skipped: %s", exc)

    thread = threading.Thread(target=start, name="prefect-api-start", daemon=True)
    thread.start()
    return thread.join

