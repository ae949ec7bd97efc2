"""Adaptation strategies and baselines, one small module each, looked up by name.

Every strategy takes a :class:`Context` (the source checkpoint, the labeled target train set, the target
val set, the cached features) and returns an :class:`Adapted` model whose checkpoint was chosen on target
val. None of them sees target test.
"""

from __future__ import annotations

import importlib
from typing import Callable

from adaptflow.strategies.base import Adapted, Context

__all__ = ["Adapted", "Context", "get"]


def get(name: str) -> Callable[[Context], Adapted]:
    from adaptflow.params import STRATEGIES

    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {list(STRATEGIES)}")
    return importlib.import_module(f"adaptflow.strategies.{name}").adapt
