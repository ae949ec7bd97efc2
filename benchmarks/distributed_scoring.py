"""Scoring a checkpoint in several processes: each its share of the images (``predict_logits(across=True)``,
what every epoch's checkpoint score does under torchrun) against each scoring them all (what it did before).

Run it under the launcher; the first process writes ``<out>.json`` and ``<out>.md``:

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/distributed_scoring.py \
        --out benchmarks/results/distributed_scoring_cpu

Random uint8 images at ``preprocess``'s default 1×32×32 through ``--model`` (random weights: the time does not
depend on them). Both ways are timed alternately, ``--rounds`` times each, between barriers; medians reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from adaptflow import distributed
from adaptflow.accel import runtime
from adaptflow.models import ModelConfig, create
from adaptflow.training import predict_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    distributed.init(cuda=torch.cuda.is_available())
    rt = runtime()
    torch.manual_seed(0)
    model = create(ModelConfig(args.model, 1, 32, [str(i) for i in range(10)], {})).to(rt.device)
    images = np.random.default_rng(0).integers(0, 256, (args.images, 1, 32, 32), dtype=np.uint8)
    predict_logits(model, images[:512], rt=rt)  # warm-up
    times: dict[str, list[float]] = {"each scores all": [], "each its share": []}
    for _ in range(args.rounds):
        for name, across in (("each scores all", False), ("each its share", True)):
            distributed.barrier()
            start = time.perf_counter()
            predict_logits(model, images, rt=rt, across=across)
            distributed.barrier()
            times[name].append(round(time.perf_counter() - start, 3))
    if distributed.is_main():
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        res = {"processes": distributed.world(), "threads_per_process": torch.get_num_threads(), "device": str(rt.device),
               "machine": f"{platform.machine()}, {torch.get_num_threads() * distributed.world()} threads in all", "model": args.model,
               "images": args.images, "commit": sha, "seconds": times, "median_s": {k: statistics.median(v) for k, v in times.items()}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        m = res["median_s"]
        args.out.with_suffix(".md").write_text("\n".join([
            f"# Scoring {args.images:,} images in {res['processes']} processes ({res['device']})", "",
            f"`python -m torch.distributed.run --standalone --nproc_per_node {res['processes']} benchmarks/distributed_scoring.py "
            f"--out {args.out}` at {sha}: {args.model}, 1×32×32, {res['threads_per_process']} thread(s) per process, "
            f"{args.rounds} rounds alternating.", "",
            "| way | seconds (each round) | median |", "|---|---|---:|",
            *(f"| {k} | {', '.join(map(str, v))} | {m[k]:.2f} |" for k, v in times.items()), "",
            f"Each its share: {m['each scores all'] / m['each its share']:.2f}× faster.", ""]))
        print(json.dumps(res))
    distributed.finish()


if __name__ == "__main__":
    main()
