"""Training in several processes, launched by torch's own launcher: one process per GPU (or several on a CPU).

``torchrun --nproc_per_node 4 -m adaptflow stage finetune`` (or ``stage pretrain``) runs the stage in four
processes, each with a copy of the model:

- each takes an equal share of every batch: ``batch_size`` in params stays the batch of one optimizer step,
  so steps per epoch and the learning-rate schedule are those of one process (:func:`shard`; batch sizes
  must split evenly, :func:`check_batches`);
- after each backward the gradients of every trained parameter, the model's and an objective's (DANN's
  discriminator), are averaged across the processes in one all-reduce (:func:`average_gradients`): every
  process applies the same update and the copies stay equal;
- the alignment objectives (DANN, CORAL, MMD) compare the features of the whole batch, every process's
  gathered (:func:`gather`), not each process's share: CORAL's covariance and MMD's kernel means are
  statistics of the batch;
- BatchNorm's running statistics are averaged at the end of each epoch (:func:`average_buffers`);
- every process scores each epoch and keeps the first process's verdict (:func:`from_main`), so all keep
  the same checkpoint; only the first process writes the stage's output (:func:`is_main`).

It is not ``DistributedDataParallel``: a step here runs the model several times before its one backward
(the labeled batch, DANN's source and target batches, FixMatch's two views) and trains parameters outside
the model. Averaging after backward handles any such step; what it gives up is DDP's overlap of the
all-reduce with the backward pass. With equal shares the averaged gradient is the whole batch's, except
that BatchNorm normalises over each process's share, and each process draws its own augmentation and
dropout.

Alone (no ``torchrun``, or ``--nproc_per_node 1``) every function here is a no-op, and nothing is imported
beyond torch.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from adaptflow.params import check_batches  # noqa: F401  (torch-free: params validation checks the same)
from adaptflow.stages import TRAINING as STAGES  # noqa: F401  (the stages that may run in several processes)


def launched() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_rank() -> int:
    """This process's place among them (``RANK``), known before :func:`init`."""
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def local_processes() -> int:
    """How many of them run on this machine (``LOCAL_WORLD_SIZE``): they share its cores and GPUs."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def init(cuda: bool, timeout_s: float = 3600.0) -> bool:
    """Join the process group the launcher described: NCCL on CUDA, on the GPU :func:`adaptflow.accel.runtime`
    made this process's current one (its ``LOCAL_RANK``'s, or the one GPU it is shown); gloo on CPU.
    Whether this process is one of several; alone, nothing happens."""
    if launched() <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return active()


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first(ctx: contextlib.AbstractContextManager) -> Iterator[None]:
    """``ctx`` held by the first process alone (the project lock), the others starting once it holds it.

    The others wait in a barrier of their own, on a CPU group whose timeout is a year rather than the
    training group's hour: the first may wait for the project as long as another run holds it."""
    if not active():
        with ctx:
            yield
        return
    waiting = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    with ctx if is_main() else contextlib.nullcontext():
        dist.barrier(group=waiting)
        yield


def from_main(obj: Any) -> Any:
    """The first process's ``obj`` (picklable), in every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(idx: np.ndarray) -> np.ndarray:
    """This process's share of a batch's indices: every ``world()``-th, from its rank."""
    return idx[rank():: world()] if active() else idx


def share(n: int) -> slice:
    """This process's contiguous share of ``n`` rows (the first ``n % world()`` processes take one more)."""
    if not active():
        return slice(0, n)
    base, extra = divmod(n, world())
    lo = rank() * base + min(rank(), extra)
    return slice(lo, lo + base + (rank() < extra))


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``t`` (any number, none included), concatenated in rank order, on the CPU, in
    each process; no gradient. For results each process computed on its :func:`share` (alone: ``t`` itself).
    Pickled through ``all_gather_object``: for logits of a split once an epoch, not for a training step."""
    if not active():
        return t
    parts: list[Any] = [None] * world()
    dist.all_gather_object(parts, t.detach().cpu())
    parts = [p for p in parts if p.numel()]
    return torch.cat(parts) if parts else t.detach().cpu()


def seed(base: int) -> int:
    """A seed of this process's own for random draws that should differ across processes (augmentation):
    ``base`` itself in the first process, so one process draws as it always has."""
    if rank() == 0:
        return int(base)
    return int(np.random.SeedSequence([int(base), rank()]).generate_state(1)[0])


def _device() -> torch.device:
    """Where the process group's collectives take their tensors: this process's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every process's ``t`` (equal shapes), concatenated along the first dimension in rank order, in each
    process; gradients flow back to each process's own rows. A loss on the gathered batch, computed alike in
    every process, then yields (after :func:`average_gradients`) the gradient of that loss on the whole batch:
    the backward sums each row's gradient over the processes' copies of the loss, the average divides by
    their number. (A loss with dropout, DANN's discriminator, differs a little in each copy: the average is
    then the mean of the copies' gradients.)"""
    if not active():
        return t
    # (what torch.distributed.nn.functional.all_gather's deprecation points to); float32, so that the backward's
    # sum over the processes is not rounded to bf16 under mixed precision
    from torch.distributed._functional_collectives import all_gather_single_autograd

    return all_gather_single_autograd(t.float().contiguous(), 0, dist.group.WORLD)


def _reduce_flat(tensors: list[torch.Tensor], extra: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One all-reduce (sum) of ``tensors`` (and ``extra``) packed into one vector of ``dtype``; the summed vector."""
    dev = _device()
    parts = [t.detach().reshape(-1).to(dev, dtype) for t in tensors] + ([extra.to(dev, dtype)] if extra is not None else [])
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    return flat


def _unpack(flat: torch.Tensor, into: list[torch.Tensor], scale: float) -> None:
    """Copy consecutive pieces of ``flat`` (times ``scale``) into ``into``, each in its own shape and layout."""
    offset = 0
    for t in into:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view(t.shape).mul_(scale))
        offset += n


def average_gradients(params: list[nn.Parameter]) -> bool:
    """Average the gradients of ``params`` across the processes, in place; whether any process has one (whether
    to step). A gradient one process lacks counts as zero there; one no process has stays None, so the
    optimizer skips that parameter as it would alone."""
    if not active():
        return any(p.grad is not None for p in params)
    params = [p for p in params if p.requires_grad]  # frozen ones have none anywhere: nothing to send
    if not params:
        return False
    dev = params[0].device
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
    flat = _reduce_flat(grads, had)
    anywhere = (flat[-len(params):] > 0).tolist()
    _unpack(flat[: -len(params)], grads, 1.0 / world())
    for p, g, keep in zip(params, grads, anywhere):
        p.grad = g if keep else None
    return any(anywhere)


def average_buffers(modules: Iterable[nn.Module]) -> None:
    """Floating buffers (BatchNorm's running mean and variance) averaged across the processes, the others
    (BatchNorm's batch counter) taken from the first: every copy scores and saves the same statistics.
    Summed in float64, so that equal values (a frozen BatchNorm's) come back bit for bit."""
    if not active():
        return
    bufs = [b for m in modules for b in m.buffers()]
    floats = [b for b in bufs if b.is_floating_point()]
    others = [b for b in bufs if not b.is_floating_point()]
    if floats:
        _unpack(_reduce_flat(floats, dtype=torch.float64), floats, 1.0 / world())
    _from_first(others)


def _from_first(tensors: list[torch.Tensor]) -> None:
    """``tensors`` overwritten, in place, with the first process's values: one broadcast of them packed in float64
    (exact for float32 values and for counters)."""
    if tensors:
        packed = torch.cat([t.detach().reshape(-1).to(_device(), torch.float64) for t in tensors])
        dist.broadcast(packed, src=0)
        with torch.no_grad():
            _unpack(packed, tensors, 1.0)


def broadcast_state(modules: Iterable[nn.Module]) -> None:
    """Parameters and buffers as the first process has them, in every process: the copies start equal."""
    if active():
        _from_first([t for m in modules for t in [*m.parameters(), *m.buffers()]])


def mean_across(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each value averaged across the processes (one all-reduce; every process must pass the same keys)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    summed = _reduce_flat([torch.as_tensor(values[k]).reshape(1) for k in keys])
    return {k: v / world() for k, v in zip(keys, summed)}
