"""A run's request to stop, seen by the stages running in its process.

A pipeline run that fails, is interrupted (Ctrl-C, SIGTERM) or is cancelled stops what it started
(``flows.transfer_pipeline.settle``); a stage it runs in a thread cannot be interrupted from outside, so
training and feature extraction look here between steps and end with :class:`Stopped`. Nothing half-made
is kept: a stage writes into a temporary folder that only a finished stage promotes. Torch-free; the
flow sets it (through :func:`adaptflow.orchestrate.stop_launches`) and clears it when a run begins.
"""

from __future__ import annotations

import threading

_REQUESTED = threading.Event()


class Stopped(RuntimeError):
    """A stage ended early because its run is stopping."""


def request() -> None:
    _REQUESTED.set()


def clear() -> None:
    _REQUESTED.clear()


def requested() -> bool:
    return _REQUESTED.is_set()


def check(what: str) -> None:
    """Raise :class:`Stopped` if the run is stopping (``what``: the work that ends, for the message)."""
    if _REQUESTED.is_set():
        raise Stopped(f"{what}: stopped, the run is stopping")
