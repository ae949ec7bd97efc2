"""Speed benchmark: adaptflow's data paths against timm's own eager loop, in one process and one run.

For each model, on images written to an ingested-style uint8 store (memory-mapped .npy):
  (a) timm eager forward-only on tensors already on the device,
  (b) adaptflow ``cache_features``' extractor streaming from the store (prefetch thread, pinned memory,
      side-stream copies, bf16 autocast, channels_last; optionally ``torch.compile``),
  (c) a bare eager timm train step on tensors already on the device,
  (d) adaptflow ``fit`` steps streaming from the store (the loop every strategy trains with),
and the ratios b/a and d/c — eager and compiled. Results go to ``<out>.json`` and ``<out>.md`` with the
device named. Without a GPU it runs on the CPU and says so.

    python benchmarks/speed.py --quick                               # CPU, a few minutes
    python benchmarks/speed.py --models resnet18 resnet50 --size 224 --n 50000 --compile   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adaptflow.accel import runtime  # noqa: E402
from adaptflow.data.store import Split  # noqa: E402
from adaptflow.models import ModelConfig, create  # noqa: E402
from adaptflow.stages.cache_features import extract  # noqa: E402
from adaptflow.training import fit  # noqa: E402
from torchvision.transforms import v2  # noqa: E402


def write_store(path: Path, n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    """Random uint8 images written to a memory-mapped store in chunks (host memory stays small)."""
    rng = np.random.default_rng(seed)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, channels, size, size))
    block = rng.integers(0, 256, size=(min(n, 1024), channels, size, size), dtype=np.uint8)
    for i in range(0, n, len(block)):
        m = min(len(block), n - i)
        arr[i : i + m] = np.roll(block, i // len(block) + 1, axis=-1)[:m]
    arr.flush()
    return np.load(path, mmap_mode="r")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def bench_model(name: str, images: np.ndarray, batch: int, steps: int, compile_too: bool, warmup: int) -> dict:
    n, channels, size = images.shape[0], images.shape[1], images.shape[2]
    rt = runtime()
    dev = rt.device
    cfg = ModelConfig(name, channels, size, [str(i) for i in range(10)])
    model = rt.place(create(cfg))
    x = torch.randn(batch, channels, size, size, device=dev)
    if rt.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)
    n_fwd = (n // batch) * batch
    res: dict = {"model": name, "size": size, "batch": batch, "n_images": n, "train_images": steps * batch}

    # (a) timm eager forward-only, inputs already on the device.
    model.eval()

    @torch.no_grad()
    def forward_loop(m, iters: int) -> None:
        for _ in range(iters):
            with rt.autocast():
                m(x)

    forward_loop(model, warmup)
    res["a_timm_forward"] = n_fwd / timed(lambda: forward_loop(model, n_fwd // batch), dev)

    # (b) adaptflow feature extraction from the store (eager), then compiled.
    extract(model, images[: batch * warmup], batch, rt=rt)
    res["b_adaptflow_cache_features"] = n_fwd / timed(lambda: extract(model, images[:n_fwd], batch, rt=rt), dev)

    # (c) bare eager timm train step, inputs already on the device.
    def train_loop(m, iters: int) -> None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        for _ in range(iters):
            with rt.autocast():
                loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    train_loop(model, warmup)
    res["c_timm_train_step"] = steps * batch / timed(lambda: train_loop(model, steps), dev)

    # (d) adaptflow fit streaming from the store (identity augmentation: the data path itself is measured).
    labels = np.random.default_rng(0).integers(0, 10, n).astype(np.int64)
    train = Split(images, labels, cfg.classes)
    val = Split(np.asarray(images[:batch]), labels[:batch], cfg.classes)

    def adaptflow_fit(r, iters: int) -> None:
        fit(model, [{"params": model.parameters(), "lr": 1e-4}], train, val, epochs=1, batch_size=batch,
            transform=v2.Identity(), seed=0, steps_per_epoch=iters, rt=r, desc="speed")

    adaptflow_fit(rt, warmup)
    res["d_adaptflow_finetune"] = steps * batch / timed(lambda: adaptflow_fit(rt, steps), dev)
    res["b_over_a"] = res["b_adaptflow_cache_features"] / res["a_timm_forward"]
    res["d_over_c"] = res["d_adaptflow_finetune"] / res["c_timm_train_step"]

    if compile_too:
        rtc = runtime(compile=True)
        t0 = time.perf_counter()
        extract(model, images[: batch * warmup], batch, rt=rtc)  # compiles
        res["compile_seconds_forward"] = time.perf_counter() - t0
        res["b_adaptflow_cache_features_compiled"] = n_fwd / timed(lambda: extract(model, images[:n_fwd], batch, rt=rtc), dev)
        t0 = time.perf_counter()
        adaptflow_fit(rtc, warmup)
        res["compile_seconds_train"] = time.perf_counter() - t0
        res["d_adaptflow_finetune_compiled"] = steps * batch / timed(lambda: adaptflow_fit(rtc, steps), dev)
        res["b_over_a_compiled"] = res["b_adaptflow_cache_features_compiled"] / res["a_timm_forward"]
        res["d_over_c_compiled"] = res["d_adaptflow_finetune_compiled"] / res["c_timm_train_step"]
    return res


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Speed: adaptflow vs timm eager ({meta['device']})", "",
             f"torch {meta['torch']}, AMP {meta['amp']}, channels_last {meta['channels_last']}; images/s (higher is better).",
             "(a) timm eager forward on device tensors, (b) adaptflow cache_features from the uint8 store, "
             "(c) bare timm eager train step on device tensors, (d) adaptflow fit steps from the store.", "",
             "| model | px | batch | a | b | b/a | c | d | d/c | b compiled | b/a compiled | d compiled | d/c compiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k, p=0: (f"{r[k]:.{p}f}" if k in r else "—")  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {f(r,'a_timm_forward')} | {f(r,'b_adaptflow_cache_features')} | "
                     f"{f(r,'b_over_a',2)} | {f(r,'c_timm_train_step')} | {f(r,'d_adaptflow_finetune')} | {f(r,'d_over_c',2)} | "
                     f"{f(r,'b_adaptflow_cache_features_compiled')} | {f(r,'b_over_a_compiled',2)} | "
                     f"{f(r,'d_adaptflow_finetune_compiled')} | {f(r,'d_over_c_compiled',2)} |")
    lines += ["", "Targets (issue): on a GPU b/a ≥ 1.4 and d/c > 1.0 with compilation; b/a ≥ 0.95 and d/c ≥ 0.95 without."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized: resnet10t at 32 px, N=2048")
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100, help="train steps timed for (c) and (d)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "speed")
    args = ap.parse_args()
    if args.quick:
        args.models, args.size, args.channels, args.n, args.batch, args.steps, args.warmup = ["resnet10t"], 32, 1, 2048, 128, 8, 2
    rt = runtime()
    device = torch.cuda.get_device_name(0) if rt.cuda else f"CPU ({os.cpu_count()} cores, no GPU)"
    print(f"device: {device}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="adaptflow-speed-") as tmp:
        t0 = time.perf_counter()
        images = write_store(Path(tmp) / "images.npy", args.n, args.size, args.channels)
        print(f"store: {args.n} × {args.channels}×{args.size}² uint8 written in {time.perf_counter() - t0:.1f} s", flush=True)
        for name in args.models:
            r = bench_model(name, images, args.batch, args.steps, args.compile, args.warmup)
            rows.append(r)
            print(json.dumps(r), flush=True)
    meta = {"device": device, "torch": torch.__version__, "amp": str(rt.amp_dtype), "channels_last": rt.channels_last,
            "machine": platform.platform(), "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = to_markdown(rows, meta)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
