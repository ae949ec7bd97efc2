"""Adaptation strategies and baselines, looked up by name.

A strategy name is a *base* optionally followed by *objectives*: ``finetune``, ``dann``,
``dann+fixmatch``, ``l2sp+fixmatch``, ``partial+coral``. The base says where the weights start and which
of them train (``scratch``, ``source_only``, ``linear_probe``, ``finetune``, ``partial``,
``gradual_unfreeze``, ``oracle``); each objective adds a loss (``l2sp``, ``dann``, ``coral``, ``mmd``,
``fixmatch``). A name made only of objectives starts from ``finetune``.

Every strategy takes a :class:`Context` and returns an :class:`Adapted` model whose checkpoint was chosen
on target val (or, with no target labels, by a label-free rule). None of them sees target test.
"""

from __future__ import annotations

import importlib
from typing import Callable

from adaptflow.strategies.base import Adapted, Context
from adaptflow.strategy_names import BASES, OBJECTIVES, needs_labels, parse, uses_pool, uses_source

__all__ = ["Adapted", "Context", "BASES", "OBJECTIVES", "parse", "get", "needs_labels", "uses_source", "uses_pool"]


def get(name: str) -> Callable[[Context], Adapted]:
    base, objectives = parse(name)
    module = importlib.import_module(f"adaptflow.strategies.{base}")
    if not objectives:
        return module.adapt
    return lambda ctx: module.adapt(ctx, objectives=objectives, name=name)
