"""This machine's ``ADAPTFLOW_*`` settings and its CPU cores, and :func:`environ_kept` for environment
variables set for a block: torch-free, so ingest reads them without importing torch (:mod:`adaptflow.accel`
applies them to tensors)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# This machine's choices, from the environment: the same params.yaml runs on a laptop and on a GPU box, and
# how tensors run never changes what a stage computes (beyond floating-point rounding), so none of this is
# a stage parameter or part of any stage's key.
ENV = {
    "ADAPTFLOW_DEVICE": "auto | cpu | cuda | cuda:N (default auto: CUDA when present)",
    "ADAPTFLOW_AMP": "auto | bf16 | off (default auto: bf16 on CUDA, off on CPU)",
    "ADAPTFLOW_CHANNELS_LAST": "auto | 0 | 1 (default auto: on; on a 2-core CPU adaptflow's fit ran 1.1-1.3x and cache_features 1.4-1.6x faster with it)",
    "ADAPTFLOW_COMPILE": "0 | 1 (default 0): torch.compile the model in training and cache_features",
    "ADAPTFLOW_THREADS": "CPU threads per process (default: one per core this process may use, shared among the processes torchrun starts on the machine); also the threads ingest decodes image files with (default: the cores, up to 8)",
}


def settings(environ: dict | None = None) -> dict:
    """The ``ADAPTFLOW_*`` runtime settings, validated: a bad value raises ValueError naming the variable."""
    env = os.environ if environ is None else environ
    out: dict = {}
    device = env.get("ADAPTFLOW_DEVICE", "auto").strip() or "auto"
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"ADAPTFLOW_DEVICE={device!r}: expected {ENV['ADAPTFLOW_DEVICE']}")
    out["device"] = device
    amp = env.get("ADAPTFLOW_AMP", "auto").strip() or "auto"
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"ADAPTFLOW_AMP={amp!r}: expected {ENV['ADAPTFLOW_AMP']}")
    out["amp"] = amp
    cl = env.get("ADAPTFLOW_CHANNELS_LAST", "auto").strip() or "auto"
    if cl not in ("auto", "0", "1"):
        raise ValueError(f"ADAPTFLOW_CHANNELS_LAST={cl!r}: expected {ENV['ADAPTFLOW_CHANNELS_LAST']}")
    out["channels_last"] = cl
    comp = env.get("ADAPTFLOW_COMPILE", "0").strip() or "0"
    if comp not in ("0", "1"):
        raise ValueError(f"ADAPTFLOW_COMPILE={comp!r}: expected {ENV['ADAPTFLOW_COMPILE']}")
    out["compile"] = comp == "1"
    threads = env.get("ADAPTFLOW_THREADS", "").strip()
    if threads and not (threads.isdigit() and int(threads) > 0):
        raise ValueError(f"ADAPTFLOW_THREADS={threads!r}: expected {ENV['ADAPTFLOW_THREADS']}")
    out["threads"] = int(threads) if threads else None
    return out


def cores() -> int:
    """The CPU cores this process may use (its affinity where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def environ_kept(*names: str, **values: str) -> Iterator[None]:
    """Environment variables ``names`` and ``values``' keys put back as they were (or removed) after the block;
    ``values`` are set for it. What a block sets, or a library it calls sets, stays out of the rest of the process."""
    saved = {k: os.environ.get(k) for k in (*names, *values)}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
