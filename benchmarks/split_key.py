"""What keying splits by content costs ingest: per image, decode vs ``ingest.content_key`` vs ``imaging.prepare``.

Ingest decodes each file, hashes its decoded pixels (the key that places it in a split) and prepares it for
the store. This times the three on random-noise JPEGs (the worst case for the decoder; the hash's cost only
depends on the pixel count) at a few sizes, one core, and writes ``benchmarks/results/split_key.{json,md}``.

    python benchmarks/split_key.py [--sides 28 256 1024] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def _ms(fn, n: int) -> float:
    """Median milliseconds of five rounds of ``n`` calls."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - start) / n * 1e3)
    return float(np.median(rounds))


def measure(side: int, size: int) -> dict:
    from adaptflow.imaging import prepare
    from adaptflow.stages.ingest import content_key

    rng = np.random.default_rng(side)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    n = max(5, 200_000 // (side * side) * 10)

    def decode() -> Image.Image:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im

    im = decode()
    row = {"side": side, "mode": im.mode, "file_kb": round(len(data) / 1024, 1), "calls": n,
           "decode_ms": _ms(decode, n), "content_key_ms": _ms(lambda: content_key(im), n), "prepare_ms": _ms(lambda: prepare(im, size, 1), n)}
    row["key_share"] = row["content_key_ms"] / (row["decode_ms"] + row["prepare_ms"])
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", type=int, nargs="+", default=[28, 256, 1024])
    ap.add_argument("--size", type=int, default=32, help="the store's image side (preprocess.image_size)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = [measure(s, args.size) for s in args.sides]
    results = {"command": "python benchmarks/split_key.py --sides " + " ".join(map(str, args.sides)) + f" --size {args.size}",
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
               "when": time.strftime("%Y-%m-%d"), "load_avg": round(os.getloadavg()[0], 2), "runs": rows}
    lines = ["# What content-keyed splits cost ingest", "", f"`{results['command']}` — {results['machine']}, {results['when']}, "
             f"load average {results['load_avg']}.", "",
             "Per image, one core, median of five rounds: decoding a random-noise RGB JPEG, hashing its decoded pixels "
             "(`ingest.content_key`, the split's key) and preparing it for the store (`imaging.prepare`).", "",
             "| side (px) | file (KB) | decode (ms) | content_key (ms) | prepare (ms) | key / (decode + prepare) |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['side']} | {r['file_kb']} | {r['decode_ms']:.3f} | {r['content_key_ms']:.3f} | {r['prepare_ms']:.3f} | {r['key_share']:.1%} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "split_key.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "split_key.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
