"""Speed benchmark: adaptflow's data paths against timm's own eager loop, in one process and one run.

For each model, on images written to an ingested-style uint8 store (memory-mapped .npy):
  (a) timm eager forward-only on tensors already on the device,
  (b) adaptflow ``cache_features``' extractor streaming from the store (prefetch thread, pinned memory,
      side-stream copies, bf16 autocast, channels_last; optionally ``torch.compile``),
  (c) a bare eager timm train step on tensors already on the device,
  (d) adaptflow ``fit`` steps streaming from the store (the loop every strategy trains with),
and the ratios b/a and d/c — eager and compiled. Results go to ``<out>.json`` and ``<out>.md`` with the
device named. Without a GPU it runs on the CPU and says so.

    python benchmarks/speed.py --quick                    # CPU, a few minutes
    python benchmarks/speed.py --compile --out benchmarks/results/speed_h100   # a GPU: resnet18/50 at 224, resnet10t at 32
    python benchmarks/speed.py --cpu-part --out benchmarks/results/speed_cpu   # make run cold/warm, ingest + cache_features at N
    python benchmarks/speed.py --augment --out benchmarks/results/speed_augment_cpu   # strong augmentation, batched vs per image

Images are stored as ingest writes them (``--store-size``, default 64 px; uint8) and resized to the model's
side on the device, inside the compiled function when compiling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
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
from adaptflow.data.transforms import build_pipeline, role_specs  # noqa: E402
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


def parse_model(spec: str, default_size: int) -> tuple[str, int]:
    """``resnet18`` or ``resnet10t@32`` → (timm name, input side)."""
    name, _, size = spec.partition("@")
    return name, int(size) if size else default_size


def bench_model(spec: str, input_size: int, images: np.ndarray, batch: int, steps: int, compile_too: bool, warmup: int,
                cache_batch: int) -> dict:
    n, channels, stored = images.shape[0], images.shape[1], images.shape[2]
    rt = runtime(compile=False)  # the eager figures are eager whatever ADAPTFLOW_COMPILE says
    dev = rt.device
    # The store holds images as ingest wrote them (``stored`` px); the network sees ``input_size`` px:
    # adaptflow resizes on the device, inside the (compiled) function.
    cfg = ModelConfig(spec, channels, stored, [str(i) for i in range(10)], input_size=None if input_size == stored else input_size)
    model = rt.place(create(cfg))
    x = torch.randn(batch, channels, input_size, input_size, device=dev)
    if rt.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)
    n_fwd = (n // batch) * batch
    res: dict = {"model": spec, "size": input_size, "stored_size": stored, "batch": batch, "n_images": n, "train_images": steps * batch}

    # (a) timm eager forward-only, inputs already on the device at the model's side.
    model.eval()

    @torch.no_grad()
    def forward_loop(m, iters: int, inputs: torch.Tensor = x) -> None:
        for _ in range(iters):
            with rt.autocast():
                m(inputs)

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

    # (d) adaptflow fit streaming from the store: identity augmentation (the data path itself), then the
    # `digits` preset augmentation batched on the device (what pretraining runs).
    labels = np.random.default_rng(0).integers(0, 10, n).astype(np.int64)
    train = Split(images, labels, cfg.classes)
    val = Split(np.asarray(images[:batch]), labels[:batch], cfg.classes)
    digits = build_pipeline(role_specs("digits", [], []))

    def adaptflow_fit(r, iters: int, transform=v2.Identity()) -> None:
        done = fit(model, [{"params": model.parameters(), "lr": 1e-4}], train, val, epochs=1, batch_size=batch,
                   transform=transform, seed=0, steps_per_epoch=iters, rt=r, desc="speed")
        if done.compile_fell_back:  # fit went on eagerly: its time is no compiled figure
            raise RuntimeError(f"compiled training fell back to eager: {done.compile_fell_back}")

    adaptflow_fit(rt, warmup)
    res["d_adaptflow_finetune"] = steps * batch / timed(lambda: adaptflow_fit(rt, steps), dev)
    adaptflow_fit(rt, warmup, digits)
    res["d_adaptflow_finetune_augmented"] = steps * batch / timed(lambda: adaptflow_fit(rt, steps, digits), dev)
    res["b_over_a"] = res["b_adaptflow_cache_features"] / res["a_timm_forward"]
    res["d_over_c"] = res["d_adaptflow_finetune"] / res["c_timm_train_step"]
    res["d_augmented_over_c"] = res["d_adaptflow_finetune_augmented"] / res["c_timm_train_step"]

    # (a) and (b) again at cache_features' own default batch (inference holds no activations for backward,
    # so the stage runs larger batches than training): what the stage runs as configured, against timm's
    # forward at that same batch.
    if cache_batch != batch:
        n_cb = (n // cache_batch) * cache_batch
        x_cb = torch.randn(cache_batch, channels, input_size, input_size, device=dev)
        if rt.channels_last:
            x_cb = x_cb.contiguous(memory_format=torch.channels_last)
        model.eval()
        forward_loop(model, warmup, x_cb)
        res["cache_batch"] = cache_batch
        res["a_timm_forward_default_batch"] = n_cb / timed(lambda: forward_loop(model, n_cb // cache_batch, x_cb), dev)
        del x_cb
        extract(model, images[: cache_batch * 2], cache_batch, rt=rt)
        res["b_adaptflow_cache_features_default_batch"] = n_cb / timed(lambda: extract(model, images[:n_cb], cache_batch, rt=rt), dev)
        res["b_default_batch_over_a"] = res["b_adaptflow_cache_features_default_batch"] / res["a_timm_forward_default_batch"]

    if compile_too:
        # Each compiled part on its own: a compiler failure is recorded (with the error) and the rest runs.
        rtc = runtime(compile=True)

        def compiled(part: str, warm, run, images_run: int, key: str, ratio: str, base: str) -> None:
            try:
                t0 = time.perf_counter()
                warm()  # compiles
                res[f"compile_seconds_{part}"] = time.perf_counter() - t0
                res[key] = images_run / timed(run, dev)
                res[ratio] = res[key] / res[base]
            except Exception as exc:  # noqa: BLE001 — a benchmark records what failed and goes on
                res[f"compile_error_{part}"] = f"{type(exc).__name__}: {str(exc)[:500]}"

        compiled("forward", lambda: extract(model, images[: batch * warmup], batch, rt=rtc),
                 lambda: extract(model, images[:n_fwd], batch, rt=rtc), n_fwd,
                 "b_adaptflow_cache_features_compiled", "b_over_a_compiled", "a_timm_forward")
        compiled("train", lambda: adaptflow_fit(rtc, warmup), lambda: adaptflow_fit(rtc, steps), steps * batch,
                 "d_adaptflow_finetune_compiled", "d_over_c_compiled", "c_timm_train_step")
    return res


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Speed: adaptflow vs timm eager ({meta['device']})", "",
             f"torch {meta['torch']}, AMP {meta['amp']}, channels_last {meta['channels_last']}; images/s (higher is better).",
             "(a) timm eager forward on device tensors, (b) adaptflow cache_features from the uint8 store, "
             "(c) bare timm eager train step on device tensors, (d) adaptflow fit steps from the store.", "",
             "(d aug) is (d) with the `digits` preset augmentation (per-image random affine) batched on the device.",
             "The store holds uint8 images at the stored side; adaptflow resizes them to the model's side on the device.", "",
             "(@cache batch) is (a) and (b) at cache_features' default batch (params.yaml); its b/a compares the two there.",
             "Eager columns run with torch.compile off whatever the environment says. Compiled columns exclude "
             "the compile time, which is listed below the table.", "",
             "| model | px (stored) | batch | a | b | b/a | a @cache batch | b @cache batch | its b/a | c | d | d/c | d aug | d aug/c | b compiled | b/a compiled | d compiled | d/c compiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k, p=0: (f"{r[k]:.{p}f}" if k in r else "—")  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} ({r.get('stored_size', r['size'])}) | {r['batch']} | {f(r,'a_timm_forward')} | "
                     f"{f(r,'b_adaptflow_cache_features')} | {f(r,'b_over_a',2)} | {f(r,'a_timm_forward_default_batch')} | "
                     f"{f(r,'b_adaptflow_cache_features_default_batch')}{' (bs ' + str(r['cache_batch']) + ')' if 'cache_batch' in r else ''} | "
                     f"{f(r,'b_default_batch_over_a',2)} | {f(r,'c_timm_train_step')} | {f(r,'d_adaptflow_finetune')} | "
                     f"{f(r,'d_over_c',2)} | {f(r,'d_adaptflow_finetune_augmented')} | {f(r,'d_augmented_over_c',2)} | "
                     f"{f(r,'b_adaptflow_cache_features_compiled')} | {f(r,'b_over_a_compiled',2)} | "
                     f"{f(r,'d_adaptflow_finetune_compiled')} | {f(r,'d_over_c_compiled',2)} |")
    lines += ["", "Targets (issue): on a GPU b/a ≥ 1.4 and d/c > 1.0 with compilation; b/a ≥ 0.95 and d/c ≥ 0.95 without."]
    for r in rows:
        secs = [f"{part} {r[f'compile_seconds_{part}']:.0f} s" for part in ("forward", "train") if f"compile_seconds_{part}" in r]
        if secs:
            lines += ["", f"{r['model']} at {r['size']} px: compile time (warm-up, not in the figures): {', '.join(secs)}"]
        for part in ("forward", "train"):
            if f"compile_error_{part}" in r:
                lines += ["", f"{r['model']} at {r['size']} px: compiling the {part} pass failed: `{r[f'compile_error_{part}'][:300]}`"]
    return "\n".join(lines) + "\n"


def _child(argv: list[str], cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run a command; its wall seconds and the peak RSS of its largest process (GNU time)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rss_kb = int(proc.stderr.strip().splitlines()[-1])
    return {"wall_seconds": round(wall, 2), "peak_rss_mb": round(rss_kb / 1024, 1), "stdout": proc.stdout}


def cpu_part(ns: list[int]) -> dict:
    """The CPU figures: ``adaptflow run`` (the default ``make run`` job) cold and warm in a fresh clone of the
    project, then ingest, cache_features and pretrain's training loop at each N (synth_digits), each in its
    own process."""
    root = HERE.parent
    exe = Path(sys.executable).parent / "adaptflow"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    res: dict = {"run": {}, "scaling": []}
    with tempfile.TemporaryDirectory(prefix="adaptflow-cpu-") as tmp:
        proj = Path(tmp) / "project"  # a clone of the committed tree, as a user gets it (the venv is this one)
        subprocess.run(["git", "clone", "-q", str(root), str(proj)], check=True)
        for phase in ("cold", "warm"):
            r = _child([str(exe), "run"], cwd=proj, env=env)
            res["run"][phase] = {k: v for k, v in r.items() if k != "stdout"}
            print(f"adaptflow run ({phase}): {r['wall_seconds']} s, peak RSS {r['peak_rss_mb']} MB", flush=True)
        for n in ns:
            work = Path(tmp) / f"n{n}"
            ing = _child([sys.executable, __file__, "--_ingest", str(n), str(work)], env=env)
            cache = _child([sys.executable, __file__, "--_cache", str(work)], env=env)
            train = _child([sys.executable, __file__, "--_fit", str(work), str(FIT_STEPS)], env=env)
            row = {"n": n, **{part: {k: v for k, v in r.items() if k != "stdout"}
                              for part, r in (("ingest", ing), ("cache_features", cache), ("fit", train))}}
            row["ingest"]["images_per_s"] = round(n / ing["wall_seconds"], 1)
            row["cache_features"].update(json.loads(cache["stdout"].strip().splitlines()[-1]))
            row["fit"].update(json.loads(train["stdout"].strip().splitlines()[-1]))
            res["scaling"].append(row)
            print(json.dumps(row), flush=True)
    return res


def _ingest_one(n: int, work: Path) -> None:
    """Child: ingest N synth_digits images (the ingest stage itself, source role)."""
    from adaptflow import params as params_mod
    from adaptflow.stages import ingest

    p = params_mod.load(HERE.parent / "params.yaml", ["source.domain=synth_digits", f"source.synth.n={n}"])
    ingest.run(p, work, role="source")


def _cache_one(work: Path) -> None:
    """Child: cache_features' extractor over the ingested train split, into a memory-mapped .npy."""
    from adaptflow import params as params_mod
    from adaptflow.data import store

    p = params_mod.load(HERE.parent / "params.yaml", ["source.domain=synth_digits"])
    s = store.load_split(work / p.paths.ingested / "source", "train")
    rt = runtime()
    cfg = ModelConfig(p.pretrain.model, s.images.shape[1], s.images.shape[2], list(s.classes))
    model = create(cfg)
    feats = np.lib.format.open_memmap(work / "features.npy", mode="w+", dtype=np.float32, shape=(len(s), model.num_features))
    t0 = time.perf_counter()
    extract(model, s.images, p.cache_features.batch_size, rt=rt, out=feats)
    feats.flush()
    dt = time.perf_counter() - t0
    print(json.dumps({"images": len(s), "extract_seconds": round(dt, 2), "images_per_s": round(len(s) / dt, 1)}))


FIT_STEPS = 100  # pretrain steps timed per N: the same work at every N, so memory that grows with N shows


def _fit_one(work: Path, steps: int) -> None:
    """Child: pretrain's training loop for ``steps`` steps, its splits read as the pretrain stage reads them."""
    from adaptflow import params as params_mod
    from adaptflow.stages import pretrain
    from adaptflow.stages.augment import pipeline

    p = params_mod.load(HERE.parent / "params.yaml", ["source.domain=synth_digits"])
    train, val = pretrain.splits(p, work)
    cfg = ModelConfig(p.pretrain.model, train.images.shape[1], train.images.shape[2], list(train.classes))
    model = create(cfg)
    t0 = time.perf_counter()
    fit(model, [{"params": model.parameters(), "lr": p.pretrain.lr}], train, Split(val.images[:512], val.labels[:512], val.classes),
        epochs=1, batch_size=p.pretrain.batch_size, transform=pipeline(p, "source"), seed=0, steps_per_epoch=steps, desc="speed")
    dt = time.perf_counter() - t0
    print(json.dumps({"train_images": len(train), "steps": steps, "fit_seconds": round(dt, 2),
                      "images_per_s": round(steps * p.pretrain.batch_size / dt, 1)}))


def cpu_markdown(res: dict, device: str) -> str:
    lines = [f"# Speed on the CPU ({device})", "",
             "`adaptflow run` is the default `make run` job (params.yaml as committed) in a fresh clone of the project:",
             "cold = nothing computed yet, warm = the same command again (every stage up to date). Peak RSS is the",
             "largest single process (GNU time). Ingest, cache_features and fit: synth_digits at N images, each in its",
             "own process; cache_features times the extractor over the ingested train split; fit times pretrain's",
             f"training loop for {FIT_STEPS} steps (batch 128, source augmentation) on the train split as pretrain reads it.", "",
             "| job | wall s | peak RSS MB |", "|---|---|---|"]
    for phase, r in res["run"].items():
        lines.append(f"| adaptflow run ({phase}) | {r['wall_seconds']} | {r['peak_rss_mb']} |")
    lines += ["", "| N | ingest s | ingest img/s | ingest peak RSS MB | cache_features images | extract s | extract img/s | process wall s | peak RSS MB "
              "| fit img/s | fit peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["scaling"]:
        i, c, t = r["ingest"], r["cache_features"], r.get("fit", {})
        lines.append(f"| {r['n']} | {i['wall_seconds']} | {i['images_per_s']} | {i['peak_rss_mb']} | {c['images']} | {c['extract_seconds']} | "
                     f"{c['images_per_s']} | {c['wall_seconds']} | {c['peak_rss_mb']} | {t.get('images_per_s', '—')} | {t.get('peak_rss_mb', '—')} |")
    return "\n".join(lines) + "\n"


def augment_part(device: torch.device, repeats: int = 20) -> dict:
    """FixMatch's default strong view (params.yaml: RandAugment + RandomErasing) on uint8 batches already on
    ``device``: batched (:class:`BatchAugment`, per-image draws) against v2 image by image, the way a
    pipeline without a batched form runs. Milliseconds per batch, after warm-up."""
    from adaptflow.data.batch_augment import BatchAugment
    from adaptflow.params import load

    specs = [t.model_dump() for t in load(HERE.parent / "params.yaml").finetune.fixmatch.strong]
    pipe = build_pipeline(specs)
    rows = []
    for n, c, side in [(64, 1, 32), (64, 3, 32), (256, 3, 64), (256, 3, 224)]:
        x = torch.randint(0, 256, (n, c, side, side), dtype=torch.uint8, device=device)
        aug = BatchAugment(pipe, 0)
        assert aug.batched, specs
        per_image = lambda: torch.stack([pipe(img) for img in x])  # noqa: E731
        row = {"batch": n, "channels": c, "side": side}
        for key, fn in (("batched_ms", lambda: aug(x)), ("per_image_ms", per_image)):
            for _ in range(3):
                fn()
            row[key] = 1000 * timed(lambda: [fn() for _ in range(repeats)], device) / repeats
        row["speedup"] = row["per_image_ms"] / row["batched_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"pipeline": specs, "rows": rows}


def augment_markdown(res: dict, device: str) -> str:
    lines = [f"# Augmentation on the device: batched vs image by image ({device})", "",
             f"FixMatch's strong view from params.yaml: `{res['pipeline']}`, on uint8 batches already on the device;",
             "milliseconds per batch (lower is better), mean of 20 after 3 warm-up calls.", "",
             "| batch | channels | side | batched ms | image by image ms | speed-up |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {r['channels']} | {r['side']} | {r['batched_ms']:.1f} | {r['per_image_ms']:.1f} | {r['speedup']:.1f}× |")
    lines += ["", "`python benchmarks/speed.py --augment --out benchmarks/results/speed_augment_<device>`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_ingest":
        return _ingest_one(int(sys.argv[2]), Path(sys.argv[3]))
    if len(sys.argv) > 1 and sys.argv[1] == "--_cache":
        return _cache_one(Path(sys.argv[2]))
    if len(sys.argv) > 1 and sys.argv[1] == "--_fit":
        return _fit_one(Path(sys.argv[2]), int(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized: resnet10t at 32 px, N=2048")
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "resnet10t@32"],
                    help="timm names, optionally @side (default side: --size)")
    ap.add_argument("--size", type=int, default=224, help="the side the models see")
    ap.add_argument("--store-size", type=int, default=64,
                    help="the side images are stored at (as ingest writes them); a smaller model side is stored at its own")
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cache-batch", type=int, default=None,
                    help="(b) is also timed at this batch (default: params.yaml's cache_features.batch_size)")
    ap.add_argument("--steps", type=int, default=100, help="train steps timed for (c) and (d)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile")
    ap.add_argument("--cpu-part", nargs="*", type=int, metavar="N", default=None,
                    help="instead: the CPU figures (adaptflow run cold/warm, ingest + cache_features at these N; default 10000 50000 200000)")
    ap.add_argument("--augment", action="store_true", help="instead: FixMatch's strong augmentation, batched vs image by image")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "speed")
    args = ap.parse_args()
    rt = runtime()
    device = torch.cuda.get_device_name(0) if rt.cuda else f"CPU ({os.cpu_count()} cores, no GPU)"
    print(f"device: {device}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    part = (lambda: (augment_part(rt.device), augment_markdown)) if args.augment else \
        (lambda: (cpu_part(args.cpu_part or [10_000, 50_000, 200_000]), cpu_markdown)) if args.cpu_part is not None else None
    if part is not None:  # a part of its own: measured, written to <out>.json and <out>.md
        res, markdown = part()
        res["meta"] = {"device": device, "torch": torch.__version__, "machine": platform.platform()}
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
        md = markdown(res, device)
        args.out.with_suffix(".md").write_text(md)
        print(md)
        return
    if args.quick:
        args.models, args.size, args.store_size, args.channels, args.n, args.batch, args.steps, args.warmup = \
            ["resnet10t"], 32, 32, 1, 2048, 128, 8, 2
    if args.cache_batch is None:
        from adaptflow.params import load

        args.cache_batch = load(HERE.parent / "params.yaml").cache_features.batch_size
    rows: list[dict] = []
    meta = {"device": device, "torch": torch.__version__, "amp": str(rt.amp_dtype), "channels_last": rt.channels_last,
            "machine": platform.platform(), "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="adaptflow-speed-") as tmp:
        stores: dict[int, np.ndarray] = {}
        for spec in args.models:
            name, side = parse_model(spec, args.size)
            stored = min(args.store_size, side)
            if stored not in stores:
                t0 = time.perf_counter()
                stores[stored] = write_store(Path(tmp) / f"images{stored}.npy", args.n, stored, args.channels)
                print(f"store: {args.n} × {args.channels}×{stored}² uint8 written in {time.perf_counter() - t0:.1f} s", flush=True)
            r = bench_model(name, side, stores[stored], args.batch, args.steps, args.compile, args.warmup, args.cache_batch)
            rows.append(r)
            print(json.dumps(r), flush=True)
            write_results(args.out, rows, meta)  # after every model: a cut-short run keeps what it measured
    print(to_markdown(rows, meta))


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(to_markdown(rows, meta))


if __name__ == "__main__":
    main()
