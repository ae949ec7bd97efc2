"""Strategy names: the grammar of ``base+objective+...`` and what a name implies (labels, source, pool).

Torch-free on purpose: params validation reads it, and a typo in params.yaml must fail before torch loads.
:mod:`adaptflow.strategies` re-exports every name here.
"""

from __future__ import annotations

BASES = ("scratch", "source_only", "linear_probe", "finetune", "partial", "gradual_unfreeze", "oracle")
OBJECTIVES = ("l2sp", "dann", "coral", "mmd", "fixmatch")
# Bases that do not train through the network cannot take objectives.
_NO_OBJECTIVES = ("source_only", "linear_probe", "scratch", "oracle")
_SOURCE_OBJECTIVES = ("dann", "coral", "mmd")  # align source and target features: need source batches
_POOL_OBJECTIVES = ("dann", "coral", "mmd", "fixmatch")  # read the unlabeled target pool


def parse(name: str) -> tuple[str, list[str]]:
    """``"dann+fixmatch"`` → ``("finetune", ["dann", "fixmatch"])``; raises ValueError naming what is wrong."""
    parts = [p.strip() for p in name.split("+") if p.strip()]
    if not parts:
        raise ValueError("empty strategy name")
    unknown = [p for p in parts if p not in BASES and p not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown strategy part(s) {unknown} in {name!r}; bases: {list(BASES)}, objectives: {list(OBJECTIVES)}")
    bases = [p for p in parts if p in BASES]
    if len(bases) > 1 or (bases and parts[0] != bases[0]):
        raise ValueError(f"{name!r}: at most one base, and it comes first (e.g. partial+dann)")
    base = bases[0] if bases else "finetune"
    objectives = [p for p in parts if p in OBJECTIVES]
    if len(set(objectives)) != len(objectives):
        raise ValueError(f"{name!r}: an objective is repeated")
    if objectives and base in _NO_OBJECTIVES:
        raise ValueError(f"{name!r}: {base} takes no objectives")
    return base, objectives


def needs_labels(name: str) -> bool:
    """Whether the strategy needs labeled target train images (target.k > 0)."""
    base, objectives = parse(name)
    if base in ("source_only", "oracle"):
        return False
    if base in ("scratch", "linear_probe"):
        return True
    return not any(o in _POOL_OBJECTIVES for o in objectives)


def uses_source(name: str) -> bool:
    return any(o in _SOURCE_OBJECTIVES for o in parse(name)[1])


def uses_pool(name: str) -> bool:
    return any(o in _POOL_OBJECTIVES for o in parse(name)[1])
