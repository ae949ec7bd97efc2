"""cache_features: run the frozen source backbone once over every target split.

Features are keyed by the source weights' digest, the target data's digest and the preprocessing; a
re-run with the same three does no work. Heads (``linear_probe``) then train on these arrays instead of
pushing images through the backbone every epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from adaptflow import outputs, stopping
from adaptflow.data import store
from adaptflow.models import input_size, load
from adaptflow.params import Params
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.stages.pretrain import output_dir as source_model_dir
from adaptflow.accel import Prefetcher, Runtime, replay_graph, runtime, slices

log = logging.getLogger(__name__)

# name → (split, labeled filter)
SPLITS = {"labeled": ("train", True), "pool": ("train", False), "val": ("val", None), "test": ("test", None)}


def output_dir(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.features


def load_features(d: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one cached split (labeled, pool, val, test)."""
    outputs.digest(d)  # refuses an incomplete output
    return np.load(d / f"{name}.npy"), np.load(d / f"{name}_labels.npy")


CHUNK_BYTES = 8 << 20  # images read, pinned and copied to the device at once by extract (at most 16 batches)


@torch.no_grad()
def extract(model: torch.nn.Module, images: np.ndarray, batch_size: int, dev: torch.device | None = None,
            rt: Runtime | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Pooled features of uint8 images, streamed: images are read from the (memory-mapped) store in
    chunks of several batches and copied to the device on a background stream while the previous chunk
    runs; each chunk's features come back to the host in one copy and are written into ``out`` (e.g. a
    memory-mapped .npy) as they come, so host memory stays flat in N.

    Chunks, not batches, cross between the loader thread and the device: for a small model the host's
    per-batch work (a read, a pinned copy, a hand-over between threads, a copy back) takes as long as
    the forward pass itself, and doing it once per chunk keeps the device fed. On CUDA each full batch
    replays one recorded CUDA graph of the forward (:func:`~adaptflow.accel.replay_graph`), so the host
    no longer launches its kernels one by one either."""
    rt = rt or runtime(device=str(dev) if dev is not None else "auto")
    rt.place(model).eval()
    fn = rt.features_fn(model, input_size(model))
    # one batch shape for a compiled function or a recorded graph: a shorter batch (each split's last) is
    # padded to the full one, else it would compile again, or run without the graph
    fixed = rt.compile
    if rt.cuda and not rt.compile and len(images) >= batch_size:  # compiled: CUDA graphs already (features_fn)
        fn = replay_graph(fn, torch.zeros((batch_size, *images.shape[1:]), dtype=torch.uint8, device=rt.device), rt)
        fixed = True
    if out is None:
        out = np.zeros((len(images), model.num_features), np.float32)
    image_bytes = int(np.prod(images.shape[1:])) * images.dtype.itemsize
    group = max(1, min(16, CHUNK_BYTES // max(1, batch_size * image_bytes)))  # batches per chunk
    # pages of ``out`` already written: out of RSS every ~32 MB (images read as store Rows let go of their own)
    release_every = max(1, (32 << 20) // max(1, group * batch_size * out.shape[1] * out.dtype.itemsize))
    pending: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []
    i = 0
    for c, (xs, _) in enumerate(Prefetcher(slices(images, batch_size * group), rt)):
        stopping.check("cache_features")
        if c and c % release_every == 0:
            store.drop_pages(out)
        feats = torch.empty((len(xs), out.shape[1]), dtype=torch.float32, device=rt.device)
        for j in range(0, len(xs), batch_size):
            x = xs[j : j + batch_size]
            n = len(x)
            if fixed and n < batch_size:
                x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
            with rt.autocast():
                # copied out at once: a compiled function may reuse its output buffer on the next call
                feats[j : j + n] = fn(x)[:n]
        done = None
        feats = feats.to("cpu", non_blocking=rt.cuda)
        if rt.cuda:
            done = torch.cuda.Event()
            done.record()
        pending.append((i, feats, done))
        i += len(xs)
        while len(pending) > 2:  # the device stays two chunks ahead of the host writes
            _write(pending.pop(0), out)
    while pending:
        _write(pending.pop(0), out)
    return out


def _write(item: tuple[int, torch.Tensor, "torch.cuda.Event | None"], out: np.ndarray) -> None:
    start, f, done = item
    if done is not None:
        done.synchronize()
    out[start : start + len(f)] = f.numpy()


def input_key(params: Params, root: Path) -> outputs.Key:
    """This stage's identity: preprocess, the source model and the ingested target (batch_size changes no
    feature value, so it is not part of it)."""
    return outputs.input_key("cache_features", params.sections("preprocess"),
                             [source_model_dir(params, root), ingested_dir(params, root, "target")])


def run(params: Params, root: Path = Path(".")) -> dict:
    out = output_dir(params, root)
    tgt, src_model = ingested_dir(params, root, "target"), source_model_dir(params, root)
    key = input_key(params, root)
    if outputs.is_current(out, key):
        log.info("cache_features: up to date (%s)", out)
        return {"path": str(out), "digest": outputs.digest(out), "cached": True}
    rt = runtime()
    model, _ = load(src_model, rt.device)
    counts = {}
    with outputs.atomic_dir(out, "cache_features", key) as tmp:
        for name, (split, labeled) in SPLITS.items():
            s = store.load_split(tgt, split, labeled)
            feats = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.float32, shape=(len(s), model.num_features))
            extract(model, s.images, params.cache_features.batch_size, rt=rt, out=feats)
            feats.flush()
            del feats
            np.save(tmp / f"{name}_labels.npy", s.labels)
            counts[name] = len(s)
    log.info("cache_features: %s → %s", counts, out)
    return {"path": str(out), "digest": outputs.digest(out), "cached": False, "counts": counts}
