"""Prefect flows over the adaptflow stages.

Importing any of them sets Prefect's offline defaults first (they reach the ephemeral API server's process
too): no telemetry, the core's ``adaptflow`` loggers forwarded to Prefect's run logs.
"""

import logging
import os

# A flow-run process a worker starts gets these too (the deployments' job variables), before Prefect starts.
RUN_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "adaptflow", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
for _key, _value in RUN_ENV.items():
    os.environ.setdefault(_key, _value)

from prefect.logging.handlers import APILogHandler  # noqa: E402 — after the defaults: Prefect reads its settings from them


def forward_core_logs() -> None:
    """The core's ``adaptflow`` records, INFO and up, go to the run's logs in Prefect's API. Prefect hands its
    API handler to the extra loggers when it sets up logging; where that happened before this package was
    imported — a worker's flow-run process (``python -m prefect.engine``) imports the flow only then — the
    setting above came too late, so the handler is added here. Either way the core's level is lowered to
    INFO where it is higher (Prefect leaves the root logger, and so the core, at WARNING)."""
    if "adaptflow" not in [name.strip() for name in os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"].split(",")]:
        return  # the user's own setting leaves the core out
    core = logging.getLogger("adaptflow")
    for handler in logging.getLogger("prefect.extra").handlers:
        if isinstance(handler, APILogHandler) and handler not in core.handlers:  # Prefect's own: not a test's capture handler
            core.addHandler(handler)
    if any(isinstance(h, APILogHandler) for h in core.handlers) and core.getEffectiveLevel() > logging.INFO:
        core.setLevel(logging.INFO)


forward_core_logs()
