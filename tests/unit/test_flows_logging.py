"""The core's records reach a run's logs in Prefect's API from every process a run can live in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import logging\n"
         "from prefect.logging.configuration import setup_logging\n"
         "setup_logging()\n"  # Prefect set up first, as in a worker's or a served run's flow-run process
         "import flows\n"
         "core = logging.getLogger('adaptflow')\n"
         "print(sorted(type(h).__name__ for h in core.handlers), core.getEffectiveLevel())\n")


@pytest.mark.parametrize("inherited", [None, "adaptflow"], ids=["worker", "served"])
def test_the_core_logs_info_to_the_api_when_prefect_set_up_before_the_flow_was_imported(tmp_path, inherited):
    """A worker's flow-run process sets up Prefect's logging before it imports the flow (the extra-loggers
    default came too late: no handler); a served run's inherits the setting (Prefect adds the handler but
    leaves the core at the root's WARNING). Either way INFO records must reach the API handler."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_EXTRA_LOGGERS"}
    env["PREFECT_HOME"] = str(tmp_path)
    if inherited:
        env["PREFECT_LOGGING_EXTRA_LOGGERS"] = inherited
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "['APILogHandler'] 20", out.stdout


def test_a_setting_without_the_core_is_kept(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_LOGGING_EXTRA_LOGGERS": "mylib"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[] 30", out.stdout
