"""finetune in one process against several under torchrun, on this machine, with the project's params.

Prepares a project from ``params.yaml`` (ingest, augment, pretrain, cache_features, once), then times
``adaptflow stage finetune --strategy S`` alone and ``torchrun --nproc_per_node N -m adaptflow stage finetune
--strategy S``, alternating and flipping the order every round so that a machine whose speed drifts favours
neither; the run's output is removed before each. Records wall seconds (the command's, process start-up
included) and the target val accuracy of the epoch each run kept (what chose it; target test is not read).
Writes ``<out>.json`` and ``<out>.md``.

    python benchmarks/distributed.py --strategy dann+fixmatch --rounds 2 --out benchmarks/results/distributed_cpu

On a CPU the processes share its cores (one launcher's processes split them: ``ADAPTFLOW_THREADS``'
default), so this measures what the split costs or gains there; on a machine with N GPUs each process has
its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent


def sh(cmd: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def commit() -> str:
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", default="dann+fixmatch")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override key=value (repeatable)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "distributed_cpu")
    args = ap.parse_args()
    sets = [x for o in args.overrides for x in ("--set", o)]
    adaptflow = [str(BIN / "adaptflow")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
                "-m", "adaptflow"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        prep = {s: sh(adaptflow + ["stage", s, *sets], root) for s in ("ingest", "augment", "pretrain", "cache_features")}
        print("prepared:", {k: round(v, 1) for k, v in prep.items()}, flush=True)
        import yaml

        p = yaml.safe_load((root / "params.yaml").read_text())
        seed = p["finetune"]["seeds"][0]
        out_dir = root / p["paths"]["adapted"] / args.strategy / f"seed{seed}"
        modes = {1: adaptflow, args.processes: torchrun}
        for r in range(args.rounds):
            order = [1, args.processes] if r % 2 == 0 else [args.processes, 1]
            for n in order:
                shutil.rmtree(out_dir, ignore_errors=True)
                wall = sh(modes[n] + ["stage", "finetune", "--strategy", args.strategy, "--seed", str(seed), *sets], root)
                extra = json.loads((out_dir / "config.json").read_text())["extra"]
                assert extra["processes"] == n, extra
                rows.append({"round": r, "processes": n, "wall_s": round(wall, 2), "val_acc": extra["val_acc"],
                             "selection_score": extra["selection_score"], "best_epoch": extra["best_epoch"]})
                print(rows[-1], flush=True)
    walls = {n: [x["wall_s"] for x in rows if x["processes"] == n] for n in modes}
    # val_acc is None where a label-free rule chose the epoch (target.k = 0): its score stands in, said so
    key = "val_acc" if all(x["val_acc"] is not None for x in rows) else "selection_score"
    accs = {n: [x[key] for x in rows if x["processes"] == n] for n in modes}
    res = {"machine": platform.platform(), "cpus": os.cpu_count(), "commit": commit(), "strategy": args.strategy,
           "overrides": args.overrides, "processes": args.processes, "prepare_s": prep, "rows": rows,
           "median_wall_s": {str(n): statistics.median(v) for n, v in walls.items()},
           "speedup": statistics.median(walls[1]) / statistics.median(walls[args.processes])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    lines = [f"# finetune {args.strategy}: one process against {args.processes} under torchrun", "",
             f"`python benchmarks/distributed.py --strategy {args.strategy} --processes {args.processes} --rounds {args.rounds}"
             + "".join(f" --set {o}" for o in args.overrides) + f"` at {res['commit']} on {res['machine']}, {res['cpus']} CPUs.", "",
             f"| round | processes | wall s | {'target val acc' if key == 'val_acc' else 'label-free selection score'} (kept epoch) | best epoch |",
             "|---|---|---|---|---|"]
    lines += [f"| {x['round']} | {x['processes']} | {x['wall_s']} | {x[key]:.4f} | {x['best_epoch']} |" for x in rows]
    lines += ["", f"Median wall: {', '.join(f'{n} process(es) {statistics.median(v):.1f} s' for n, v in walls.items())}; "
              f"one over {args.processes}: {res['speedup']:.2f}×. {'Val accuracy' if key == 'val_acc' else 'Selection score'}: "
              + ", ".join(f"{n}: {statistics.mean(v):.4f}" for n, v in accs.items())
              + f" (the epoch each run kept, chosen {'on target val' if key == 'val_acc' else 'by the label-free rule'}; target test not read)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
