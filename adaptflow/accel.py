"""Where and how tensors run: device choice, mixed precision, memory format, compilation, and a
prefetcher that keeps the accelerator fed.

On CUDA: bf16 autocast, channels_last, cudnn.benchmark, pinned host batches copied on a side stream
while the previous batch computes. On CPU: fp32, channels_last, one thread per core, no pointless worker
threads beyond one prefetcher. ``torch.compile`` is an option (``ADAPTFLOW_COMPILE=1``): it pays on GPUs for long runs. Each choice
can be set per machine through the ``ADAPTFLOW_*`` environment variables (:data:`ENV`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from adaptflow import distributed
from adaptflow.machine import ENV, cores, settings  # noqa: F401 (ENV and settings: re-exported)
from adaptflow.imaging import normalize, resize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    prefetch: int = 3

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def place(self, model: nn.Module) -> nn.Module:
        """Move the model to the device in the runtime's memory format (in place; returns it)."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def forward_fn(self, model: nn.Module, size: int | None = None) -> "Forward":
        """uint8 batch on the device → ``model``'s output, the model compiled when asked (see :class:`Forward`)."""
        return Forward(self, model, size)

    def features_fn(self, model: nn.Module, size: int | None = None) -> Any:
        """uint8 batch on the device → pooled features; input conversion (normalise, resize to ``size``,
        memory format) included, so that a compiled function fuses it with the first layers.

        Compiled on CUDA with CUDA graphs (``reduce-overhead``): inference replays the same graph batch
        after batch, and a small model's forward is otherwise bound by kernel launches on the host (on
        the lent H100, resnet10t at 32 px on device-resident batches: 2.7× plain compilation's images/s).
        Its output is overwritten by the next call: copy it out first. Shapes are static: a caller pads a
        last, shorter batch to the full one (as :func:`~adaptflow.stages.cache_features.extract` does) so that
        one graph serves every batch."""

        def pooled(x_uint8: torch.Tensor) -> torch.Tensor:
            x = self.to_input(x_uint8, size)
            return model.forward_head(model.forward_features(x), pre_logits=True)

        if not self.compile:
            return pooled
        return torch.compile(pooled, mode="reduce-overhead" if self.cuda else None, dynamic=False)

    def to_input(self, x_uint8: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """uint8 batch already on the device → normalised input (resized to ``size`` there when the stored
        side differs) in the runtime's memory format and, under mixed precision, already in its dtype.

        It is :func:`~adaptflow.imaging.model_input` with the memory format (and dtype) set before the
        resize, at the stored side, where the batch is small: the resize then writes the model-side batch
        channels-last at once instead of writing it and copying it into that layout (on the lent H100, 256
        images 64 → 224 px: 0.29 ms instead of 0.48 ms). The resize runs outside autocast: upsampling is on
        CUDA autocast's float32 list, so inside it the batch would be widened again, written at full size in
        float32 and cast back by the first layer. CUDA's kernels interpolate in float32 either way and round
        once, so the values are the ones the float32 resize would give."""
        x = normalize(x_uint8)
        cl = self.channels_last and x.ndim == 4
        if self.amp_dtype is not None or cl:
            x = x.to(dtype=self.amp_dtype or x.dtype, memory_format=torch.channels_last if cl else torch.preserve_format)
        with torch.autocast(self.device.type, enabled=False):
            x = resize(x, size)
        return x.contiguous(memory_format=torch.channels_last) if cl else x  # no copy when the resize kept it


class Forward:
    """A training forward: uint8 batch on the device → ``model``'s output, the model compiled when the runtime
    asks (weights stay shared with ``model``). Only the model is compiled, the input conversion runs eagerly:
    the training graph is differentiated, and keeping it to the model is the conservative choice.

    A compiler can fail on a model it accepted when tracing — at the first backward, or on a new batch shape.
    On the lent H100 (torch 2.11), compiled resnet10t training at 32 px failed inside inductor's backward with
    a stride assertion on ``convolution_backward`` (inductor had planned a channels-last weight gradient,
    cuDNN returned a contiguous one). :meth:`fall_back` lets the loop retry such a step eagerly and go on
    eagerly, with a warning, instead of losing the run.

    While compiled, the model's buffers (BatchNorm's running statistics) are copied before each step, in
    one multi-tensor copy, and :meth:`fall_back` puts them back: the failed attempt's forward leaves no
    trace. A recompile can come at any step (a new batch shape, layers unfrozen at a milestone), so every
    step is covered.

    Compiled with static shapes: an epoch's last, shorter batch gets its own graph, instead of turning
    the batch dimension dynamic for every later step (dynamo's default on a second shape, whose dynamic
    graph then catches the full batches too)."""

    def __init__(self, rt: Runtime, model: nn.Module, size: int | None = None):
        self.rt, self.model, self.size = rt, model, size
        self.net = torch.compile(model, dynamic=False) if rt.compile else model
        self.fell_back = ""  # why a compiled forward went eager ("" while it has not)
        self._saved: list[torch.Tensor] | None = None  # the buffers as they were before this step

    @property
    def compiled(self) -> bool:
        return self.net is not self.model

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            buffers = [b.detach() for b in self.model.buffers()]
            if self._saved is None or len(self._saved) != len(buffers):
                self._saved = [b.clone() for b in buffers]
            elif buffers:
                torch._foreach_copy_(self._saved, buffers)
        return self.net(self.rt.to_input(x_uint8, self.size))

    def fall_back(self, exc: BaseException) -> bool:
        """After a training step failed with ``exc``: if the model ran compiled, switch to the eager model for
        good (warning with the error) and return True, so that the caller retries the step; else False
        (the error is not the compiler's: re-raise it)."""
        if not self.compiled or isinstance(exc, torch.OutOfMemoryError):  # out of memory: not the compiler's
            return False
        self.fell_back = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        log.warning("compiled training step failed (%s); retrying it and going on eagerly", self.fell_back)
        if self._saved is not None:
            torch._foreach_copy_([b.detach() for b in self.model.buffers()], self._saved)
            self._saved = None
        self.net = self.model
        return True


def replay_graph(fn: Any, example: torch.Tensor, rt: Runtime) -> Any:
    """``fn`` (inference, no autograd) as a CUDA graph for batches shaped like ``example``: recorded once,
    then each call copies its batch into the graph's input and replays every kernel in one launch. Other
    shapes (a last, shorter batch) run ``fn`` as is. Nothing is compiled: the same kernels run, but the
    host no longer launches them one by one, which is what bounds a small model's eager forward.

    The output is overwritten by the next call: copy it out first. Where recording fails (a model that
    synchronises with the host inside its forward, say), ``fn`` is returned unchanged, with a warning."""
    if not rt.cuda:
        return fn
    static_in = example.clone()
    try:
        side = torch.cuda.Stream(device=rt.device)
        side.wait_stream(torch.cuda.current_stream(rt.device))
        with torch.cuda.stream(side), torch.no_grad():  # warm-up: cudnn picks its algorithms, memory settles
            for _ in range(3):
                with rt.autocast():
                    fn(static_in)
        torch.cuda.current_stream(rt.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad(), rt.autocast():
            static_out = fn(static_in)
    except Exception as exc:  # noqa: BLE001 — the eager function still works
        log.warning("running without a CUDA graph: recording failed (%s: %s)", type(exc).__name__, exc)
        return fn

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape != static_in.shape or x.dtype != static_in.dtype:
            return fn(x)
        static_in.copy_(x)
        graph.replay()
        return static_out

    return run



def check_train_processes(n: int) -> None:
    """``orchestrate.train_processes`` on this machine: on CUDA, one GPU per process. (On a CPU the processes
    split the cores.) Raises ValueError naming the key."""
    if n > 1 and runtime().cuda and n > torch.cuda.device_count():
        raise ValueError(f"orchestrate.train_processes: {n} processes, one per GPU, but this machine shows "
                         f"{torch.cuda.device_count()} GPU(s)")


def runtime(device: str = "auto", amp: str = "auto", channels_last: str | bool = "auto", compile: bool | None = None,
            prefetch: int = 3, num_threads: int | None = None) -> Runtime:
    """Resolve ``auto`` choices for this machine: an argument left at ``auto``/None takes its
    ``ADAPTFLOW_*`` setting (:data:`ENV`), then the machine's default."""
    env = settings()
    if device == "auto":
        device = env["device"]
        if device.startswith("cuda:") and distributed.launched() > 1:
            raise ValueError(f"ADAPTFLOW_DEVICE={device!r}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                             f"use auto or cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"ADAPTFLOW_DEVICE / device {device!r}: no CUDA device is available")
    if device == "cuda" and distributed.launched() > 1:  # each process its own GPU, made current before any use
        gpus, r = torch.cuda.device_count(), distributed.local_rank()
        if gpus == 1 and os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
            r = 0  # a launcher that shows each process its own GPU
        elif r >= gpus:
            raise ValueError(f"LOCAL_RANK {r}: this machine shows {gpus} GPU(s); start at most {gpus} processes per "
                             f"machine (orchestrate.train_processes, or torchrun --nproc_per_node)")
        torch.cuda.set_device(r)
        device = f"cuda:{r}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if num_threads or env["threads"]:  # the host side (loading, per-image augmentation) of parallel jobs
            torch.set_num_threads(num_threads or env["threads"])
    else:
        procs = distributed.local_processes()  # the processes a launcher started on this machine share its cores
        torch.set_num_threads(num_threads or env["threads"] or max(1, cores() // procs))
    if amp == "auto":
        amp = env["amp"]
    if amp == "auto":
        amp_dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    else:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    if channels_last == "auto":
        channels_last = env["channels_last"]
    if isinstance(channels_last, bool):
        cl = channels_last
    elif channels_last in ("auto", "0", "1"):
        cl = channels_last != "0"  # auto: on, on CPU as on CUDA
    else:
        raise ValueError(f"channels_last={channels_last!r}: expected auto, 0, 1, True or False")
    return Runtime(dev, amp_dtype, cl, env["compile"] if compile is None else compile, prefetch)


def default_runtime() -> Runtime:
    return runtime()


class Prefetcher:
    """Iterate tuples of CPU tensors (or None, or objects that move like one: ``pin_memory``, ``to``,
    ``record_stream``, e.g. augmentation draws) from ``source`` — e.g. ``(uint8 images, labels)`` — on a
    background thread and hand them over already on the device: pinned, copied on a side CUDA stream, so
    loading overlaps compute.

    On CPU it iterates inline: there is no transfer to overlap, and a second thread drawing augmentation
    parameters from torch's global generator would make seeded runs irreproducible.
    """

    _END = object()

    def __init__(self, source: Iterable[tuple[torch.Tensor | None, ...]], rt: Runtime):
        self.rt = rt
        self._source = source
        self._stop = threading.Event()
        if not rt.cuda:
            return
        self._q: queue.Queue = queue.Queue(maxsize=max(1, rt.prefetch))
        self._stream = torch.cuda.Stream(device=rt.device)
        self._thread = threading.Thread(target=self._work, args=(iter(source),), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, it: Iterator) -> None:
        try:
            for item in it:
                host = tuple(t.pin_memory() if t is not None else None for t in item)
                with torch.cuda.stream(self._stream):
                    dev = tuple(t.to(self.rt.device, non_blocking=True) if t is not None else None for t in host)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                if not self._put((dev, event)):
                    return
            self._put(self._END)
        except BaseException as exc:  # surface loader errors in the consumer
            self._put(exc)

    def __iter__(self) -> Iterator[tuple]:
        if not self.rt.cuda:
            yield from self._source
            return
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            tensors, event = item
            current = torch.cuda.current_stream(self.rt.device)
            current.wait_event(event)
            for t in tensors:
                if t is not None:
                    t.record_stream(current)
            yield tensors

    def close(self) -> None:
        self._stop.set()


def slices(images: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, None]]:
    """Consecutive uint8 batches of a (memory-mapped) array: one read per batch, nothing held."""
    for i in range(0, len(images), batch_size):
        # a copy: a slice of a read-only memory map is a read-only view, which torch warns about
        yield torch.from_numpy(np.array(images[i : i + batch_size], order="C")), None
