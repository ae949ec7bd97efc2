"""A run's request to stop, seen by the stages running in its process.

A pipeline run that fails, is interrupted (Ctrl-C, SIGTERM) or is cancelled stops what it started
(``flows.transfer_pipeline.settle``); a stage it runs in a thread cannot be interrupted from outside, so
training and feature extraction look here between steps and end with :class:`Stopped`. Nothing half-made
is kept: a stage writes into a temporary folder that only a finished stage promotes.

Each run has its own request (:func:`begin`, in a context variable that the task runner's threads inherit),
so one run stopping in a process stops none of another's stages. Torch-free.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar

_RUN: ContextVar[threading.Event] = ContextVar("adaptflow_stop", default=threading.Event())


class Stopped(RuntimeError):
    """A stage ended early because its run is stopping."""


def begin() -> None:
    """A run begins, in this context: a request of its own, which the stages it submits from here see."""
    _RUN.set(threading.Event())


def request() -> None:
    _RUN.get().set()


def clear() -> None:
    _RUN.get().clear()


def requested() -> bool:
    return _RUN.get().is_set()


def check(what: str) -> None:
    """Raise :class:`Stopped` if the run is stopping (``what``: the work that ends, for the message)."""
    if _RUN.get().is_set():
        raise Stopped(f"{what}: stopped, the run is stopping")
