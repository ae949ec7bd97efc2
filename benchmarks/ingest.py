"""Ingest benchmark: synth_digits at several N — images/s and peak memory, to show memory stays flat in N;
with ``--files``, a user's image folder instead (files written first, untimed), decoded on 1 thread and on
one per core, to show what decoding on several threads gains and that the store is the same.

Each N runs ``adaptflow.stages.ingest.run`` (render → prepare → hash → dedupe → split → store) in a fresh
subprocess, so its peak RSS (``ru_maxrss``) is its own and not the parent's; the RSS right after imports is
recorded too, so the growth due to ingest itself is visible. Writes ``benchmarks/results/ingest.json`` and
``ingest.md``.

    python benchmarks/ingest.py [--sizes 10000 100000] [--set key=value ...]
    python benchmarks/ingest.py --files jpg:256 png:32 --sizes 5000 20000 [--threads 1 2]   # → ingest_files.{json,md}
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


def write_files(folder: Path, n: int, kind: str) -> Path:
    """``n`` image files of ``kind`` (``ext:side``, e.g. ``jpg:256``) in one subfolder per class: synth_digits
    rendered at 48 px and resized to ``side``, as a user's photos of digits would be."""
    from PIL import Image

    from adaptflow.data import synth

    ext, side = kind.split(":")
    labels = synth.labels(n, 0)
    for i, y in enumerate(labels.tolist()):
        d = folder / str(y)
        d.mkdir(parents=True, exist_ok=True)
        im = synth.render(i, 0, 48, y).resize((int(side), int(side)), Image.BICUBIC)
        im.save(d / f"{i:06d}.{ext}", **({"quality": 90} if ext == "jpg" else {}))
    return folder


def child(n: int, work: Path, overrides: list[str], folder: Path | None = None) -> dict:
    """One measured ingest in this process (the parent starts a fresh interpreter per N)."""
    from adaptflow import params as params_mod
    from adaptflow.data import store
    from adaptflow.stages import ingest

    domain = [f"source.domain=imagefolder:{folder}"] if folder else ["source.domain=synth_digits", f"source.synth.n={n}"]
    p = params_mod.load(HERE.parent / "params.yaml", [*overrides, *domain, "source.limit=null"])
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
        "synth_size": None if folder else p.source.synth.size,  # (files: rendered at 48 px, see write_files)
        "threads": ingest.decode_threads(ingest.open_role(p, work, "source")),
        "data_hash": store.read_card(store_dir)["data_hash"],
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


def run_child(n: int, work: Path, overrides: list[str], folder: Path | None = None, threads: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), "--work", str(work)] + [a for o in overrides for a in ("--set", o)]
    cmd += ["--folder", str(folder)] if folder else []
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)} | ({"ADAPTFLOW_THREADS": str(threads)} if threads else {})
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def header(args) -> dict:
    argv = " ".join(sys.argv[1:])
    return {"command": f"python benchmarks/ingest.py {argv}".strip(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
            "when": time.strftime("%Y-%m-%d"), "note": args.note}


def write(args, name: str, runs: list[dict], to_markdown) -> None:
    results = header(args) | {"runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(to_markdown(results))
    print(to_markdown(results))


def files_main(args) -> None:
    """Each kind of file at each N: written once, then ingested in a fresh process per thread count."""
    from adaptflow import machine
    from adaptflow.stages.ingest import MAX_THREADS

    threads = args.threads or sorted({1, min(machine.cores(), MAX_THREADS)})  # one, and ingest's default
    runs = []
    for kind in args.files:
        for n in args.sizes:
            with tempfile.TemporaryDirectory(prefix="adaptflow-ingest-bench-") as tmp:
                folder = write_files(Path(tmp) / "images", n, kind)
                mb = sum(f.stat().st_size for f in folder.rglob("*.*")) / 2**20
                for t in threads:
                    r = run_child(n, Path(tmp) / f"work{t}", args.overrides, folder, t) | {"files": kind, "files_mb": round(mb, 1)}
                    runs.append(r)
                    print(f"{kind} N={n:>7,} threads={t}: {r['images_per_s']:>8,.0f} images/s, peak RSS {r['peak_rss_mb']:,.0f} MB", flush=True)
    write(args, "ingest_files", runs, files_markdown)


def files_markdown(results: dict) -> str:
    lines = ["# Ingest benchmark: image files", "", f"`{results['command']}` — {results['machine']}, {results['when']}.", "",
             "Each row is a fresh process running the whole ingest stage on a folder of image files (one subfolder per",
             "class; synth_digits rendered at 48 px, resized to the file side and saved, before timing): decode → ",
             "`imaging.prepare` → SHA-1 → dedupe → split → store. `threads` is `ADAPTFLOW_THREADS`: how many files are",
             "decoded at once. `same store`: the data hash equals the 1-thread run's.", "",
             "| files | N | MB on disk | threads | images/s | seconds | vs 1 thread | peak RSS (MB) | store (MB) | same store | load avg before → after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    base = {(r["files"], r["n"]): r for r in results["runs"] if r["threads"] == 1}
    for r in results["runs"]:
        b = base.get((r["files"], r["n"]))
        gain = f"{r['images_per_s'] / b['images_per_s']:.2f}×" if b else "–"
        same = ("yes" if r["data_hash"] == b["data_hash"] else "NO") if b else "–"
        load = " → ".join(f"{x:.1f}" for x in r["load_avg"])
        lines.append(f"| {r['files']} | {r['n']:,} | {r['files_mb']:.0f} | {r['threads']} | {r['images_per_s']:,.0f} | {r['seconds']:.1f} | {gain} | "
                     f"{r['peak_rss_mb']:.0f} | {r['store_mb']:.1f} | {same} | {load} |")
    lines += ["", f"Stored as {r['channels']}×{r['image_size']}×{r['image_size']} uint8.", ""]
    if results.get("note"):
        lines += [results["note"], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override, e.g. preprocess.image_size=28")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--note", default="", help="a line for the markdown (e.g. what else was running)")
    ap.add_argument("--files", nargs="+", metavar="EXT:SIDE", help="ingest a folder of such files (e.g. jpg:256 png:32) instead of synth_digits")
    ap.add_argument("--threads", type=int, nargs="+", help="with --files: ADAPTFLOW_THREADS values to compare (default: 1 and ingest's default, one per core up to 8)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.overrides, args.folder)))
        return
    if args.files:
        return files_main(args)

    runs = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="adaptflow-ingest-bench-") as work:
            runs.append(run_child(n, Path(work), args.overrides))
            print(f"N={n:>7,}: {runs[-1]['images_per_s']:>8,.0f} images/s, peak RSS {runs[-1]['peak_rss_mb']:,.0f} MB", flush=True)
    write(args, "ingest", runs, markdown)


if __name__ == "__main__":
    main()
