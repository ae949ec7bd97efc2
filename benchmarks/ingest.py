"""Ingest benchmark: synth_digits at several N — images/s and peak memory, to show memory stays flat in N.

Each N runs ``adaptflow.stages.ingest.run`` (render → prepare → hash → dedupe → split → store) in a fresh
subprocess, so its peak RSS (``ru_maxrss``) is its own and not the parent's; the RSS right after imports is
recorded too, so the growth due to ingest itself is visible. Writes ``benchmarks/results/ingest.json`` and
``ingest.md``.

    python benchmarks/ingest.py [--sizes 10000 100000] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIMIT_MB = 2048  # the bound for N = 100,000


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(n: int, work: Path, overrides: list[str]) -> dict:
    """One measured ingest in this process (the parent starts a fresh interpreter per N)."""
    from adaptflow import params as params_mod
    from adaptflow.stages import ingest

    p = params_mod.load(HERE.parent / "params.yaml", [*overrides, "source.domain=synth_digits", f"source.synth.n={n}", "source.limit=null"])
    rss_imports = _rss_mb()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = ingest.run(p, work, "source")
    seconds = time.perf_counter() - start
    store_dir = Path(result["path"])
    return {
        "n": n,
        "n_images": result["n_images"],
        "duplicates_removed": result["duplicates_removed"],
        "seconds": round(seconds, 2),
        "images_per_s": round(n / seconds, 1),
        "rss_after_imports_mb": round(rss_imports, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "store_mb": round(sum(f.stat().st_size for f in store_dir.iterdir()) / 2**20, 1),
        # the machine's 1-minute load average before and after: on a shared machine it explains slow runs
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "image_size": p.preprocess.image_size,
        "channels": p.preprocess.channels,
        "synth_size": p.source.synth.size,
    }


def markdown(results: dict) -> str:
    lines = [
        "# Ingest benchmark: synth_digits",
        "",
        f"`{results['command']}` — {results['machine']}, {results['when']}.",
        "",
        "Each N is a fresh process running the whole ingest stage (render → `imaging.prepare` → SHA-1 → dedupe →",
        "content-keyed split → streamed uint8 store + parquet + card). Peak RSS is the process's `ru_maxrss`.",
        "",
        "| N | images/s | seconds | RSS after imports (MB) | peak RSS (MB) | growth (MB) | store (MB) | load avg before → after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        growth = r["peak_rss_mb"] - r["rss_after_imports_mb"]
        load = " → ".join(f"{x:.1f}" for x in r["load_avg"])
        lines.append(f"| {r['n']:,} | {r['images_per_s']:,.0f} | {r['seconds']:.1f} | {r['rss_after_imports_mb']:.0f} | {r['peak_rss_mb']:.0f} | {growth:.0f} | {r['store_mb']:.1f} | {load} |")
    big = max(results["runs"], key=lambda r: r["n"])
    verdict = "within" if big["peak_rss_mb"] < LIMIT_MB else "OVER"
    lines += ["", f"Peak RSS at N = {big['n']:,}: {big['peak_rss_mb']:.0f} MB, {verdict} the {LIMIT_MB} MB bound. "
              f"Images are {big['channels']}×{big['image_size']}×{big['image_size']} uint8 (rendered at {big['synth_size']} px).", ""]
    if results.get("note"):
        lines += [results["note"], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override, e.g. preprocess.image_size=28")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--note", default="", help="a line for the markdown (e.g. what else was running)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.overrides)))
        return

    runs = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="adaptflow-ingest-bench-") as work:
            cmd = [sys.executable, __file__, "--child", str(n), "--work", work] + [a for o in args.overrides for a in ("--set", o)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"N={n:>7,}: {runs[-1]['images_per_s']:>8,.0f} images/s, peak RSS {runs[-1]['peak_rss_mb']:,.0f} MB", flush=True)
    results = {
        "command": " ".join(["python benchmarks/ingest.py --sizes", *map(str, args.sizes), *(f"--set {o}" for o in args.overrides)]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "note": args.note,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ingest.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "ingest.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
