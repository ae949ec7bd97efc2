"""Memory format on the CPU: adaptflow's own paths with ``ADAPTFLOW_CHANNELS_LAST=0`` and ``=1``, alternated.

Runs ``speed.py --quick`` (resnet10t at 32 px: cache_features' extractor and ``fit`` from a uint8 store, and
timm's bare loops) once per setting per round, the two settings alternating and the order flipping every
round, so that a machine whose speed drifts (a shared CPU) favours neither. Writes each round's images/s and the median ratio per column to
``<out>.json`` and ``<out>.md``.

    python benchmarks/channels_last.py --rounds 3 --out benchmarks/results/channels_last_cpu

With ``--accuracy``, the question is whether the two settings train equally well (the memory format changes
the float rounding, so the training paths diverge): ``transfer.py`` runs its (k, seed) grid once per setting,
the same strategies and seeds, and ``<out>.json`` / ``<out>.md`` get each strategy's target test accuracy,
mean ± std over the seeds, under both, with the paired per-seed difference. Checkpoints and the candidate are
chosen on target val as the pipeline chooses them; test chooses nothing.

    python benchmarks/channels_last.py --accuracy --seeds 0 1 2 --out benchmarks/results/channels_last_accuracy_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adaptflow.report import pm, signed  # noqa: E402  (one seed: the value alone, no "± 0")
COLUMNS = {
    "b_adaptflow_cache_features_default_batch": "cache_features (b), its default batch",
    "d_adaptflow_finetune": "fit (d)",
    "d_adaptflow_finetune_augmented": "fit with the digits augmentation (d aug)",
    "a_timm_forward_default_batch": "timm forward (a), the same batch",
    "c_timm_train_step": "timm train step (c)",
}


def one(setting: str, work: Path, r: int) -> dict:
    out = work / f"cl{setting}_{r}"
    env = {**os.environ, "ADAPTFLOW_CHANNELS_LAST": setting}
    proc = subprocess.run([sys.executable, str(HERE / "speed.py"), "--quick", "--out", str(out)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"speed.py --quick with ADAPTFLOW_CHANNELS_LAST={setting} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.with_suffix(".json").read_text())["rows"][0]


def accuracy(args: argparse.Namespace) -> None:
    """transfer.py's grid under each setting; per strategy, mean ± std of target test accuracy and the paired difference."""
    grids = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in ("0", "1"):
            out = Path(tmp) / f"transfer_cl{setting}"
            cmd = [sys.executable, str(HERE / "transfer.py"), "--k", str(args.k), "--seeds", *map(str, args.seeds), "--no-oracle",
                   "--set", f"finetune.strategies=[{','.join(args.strategies)}]", "--out", str(out), "--workdir", str(Path(tmp) / f"work{setting}")]
            cmd += [x for o in args.overrides for x in ("--set", o)]
            started = time.time()
            proc = subprocess.run(cmd, env={**os.environ, "ADAPTFLOW_CHANNELS_LAST": setting}, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"transfer.py with ADAPTFLOW_CHANNELS_LAST={setting} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            grids[setting] = json.loads(out.with_suffix(".json").read_text())
            print(f"ADAPTFLOW_CHANNELS_LAST={setting}: {time.time() - started:.0f} s", flush=True)
    per_seed = {setting: {c["seed"]: c for c in g["cells"]} for setting, g in grids.items()}
    rows = {}
    for s in args.strategies:
        acc = {setting: [per_seed[setting][seed]["strategies"][s]["test_acc"] for seed in args.seeds] for setting in grids}
        diff = [b - a for a, b in zip(acc["0"], acc["1"])]
        rows[s] = {"test_acc": acc, "mean": {k: statistics.mean(v) for k, v in acc.items()},
                   "std": {k: statistics.stdev(v) if len(v) > 1 else None for k, v in acc.items()},  # one seed: no spread
                   "paired_diff_1_minus_0": diff, "paired_diff_mean": statistics.mean(diff),
                   "paired_diff_std": statistics.stdev(diff) if len(diff) > 1 else None}
    picked = {setting: [per_seed[setting][seed]["candidate"] for seed in args.seeds] for setting in grids}
    cand = {setting: [per_seed[setting][seed]["strategies"][per_seed[setting][seed]["candidate"]]["test_acc"] for seed in args.seeds]
            for setting in grids}
    meta = grids["1"]["meta"]
    res = {"machine": platform.platform(), "cpus": os.cpu_count(), "k": args.k, "seeds": args.seeds, "overrides": args.overrides, "strategies": rows,
           "candidate": {"picked": picked, "test_acc": cand}, "commit": grids["1"]["meta"]["commit"]}
    fmt = lambda v: pm(statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None, len(v))  # noqa: E731
    lines = ["# Channels-last on the CPU: does it train as well?", "",
             f"`python benchmarks/channels_last.py --accuracy --k {args.k} --seeds {' '.join(map(str, args.seeds))}` on {res['machine']} "
             f"({res['cpus']} CPUs), overrides {args.overrides or 'none'}, code {res['commit']}: `transfer.py` ({meta['source']} → {meta['target']}, k = {args.k}; the seed changes the splits, "
             "the source pretraining, the initial weights and the augmentation draws) once with `ADAPTFLOW_CHANNELS_LAST=0` and once "
             "with `=1`. Target test accuracy, mean ± std over the seeds; checkpoints chosen on target val, test chose nothing.", "",
             "| strategy | contiguous (`=0`) | channels-last (`=1`) | paired difference 1 − 0, mean ± std | per seed 0 → 1 |",
             "|---|---|---|---|---|"]
    for s, r in rows.items():
        per = ", ".join(f"{a:.4f} → {b:.4f}" for a, b in zip(r["test_acc"]["0"], r["test_acc"]["1"]))
        lines.append(f"| {s} | {fmt(r['test_acc']['0'])} | {fmt(r['test_acc']['1'])} | "
                     f"{signed(r['paired_diff_mean'], r['paired_diff_std'], len(r['paired_diff_1_minus_0']))} | {per} |")
    lines += ["", f"Candidate (best target val accuracy, as evaluate picks it): `=0` picked {', '.join(picked['0'])}, test "
              f"{fmt(cand['0'])}; `=1` picked {', '.join(picked['1'])}, test {fmt(cand['1'])}."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--accuracy", action="store_true", help="train under both settings (transfer.py) and compare test accuracy over seeds")
    ap.add_argument("--k", type=int, default=10, help="with --accuracy: labeled target images per class (≥ 1)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="with --accuracy")
    ap.add_argument("--strategies", nargs="+", default=["scratch", "source_only", "finetune", "dann+fixmatch"], help="with --accuracy")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="with --accuracy: a params override key=value")
    args = ap.parse_args()
    if args.accuracy:
        if args.k < 1 or len(set(args.seeds)) != len(args.seeds):
            ap.error("--accuracy needs --k ≥ 1 (the candidate is chosen on labeled target val) and distinct --seeds")
        args.out = args.out or HERE / "results" / "channels_last_accuracy_cpu"
        return accuracy(args)
    args.out = args.out or HERE / "results" / "channels_last_cpu"
    runs: dict[str, list[dict]] = {"0": [], "1": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for setting in ("0", "1") if r % 2 == 0 else ("1", "0"):  # a drift favours neither setting
                runs[setting].append(one(setting, Path(tmp), r))
                print(f"round {r + 1}, ADAPTFLOW_CHANNELS_LAST={setting}: " +
                      ", ".join(f"{k} {runs[setting][-1][k]:.0f}" for k in COLUMNS), flush=True)
    ratio = {k: statistics.median(b[k] / a[k] for a, b in zip(runs["0"], runs["1"])) for k in COLUMNS}
    res = {"machine": platform.platform(), "cpus": os.cpu_count(), "model": "resnet10t at 32 px (speed.py --quick)", "runs": runs,
           "median_ratio_channels_last_over_contiguous": ratio}
    lines = ["# Channels-last on the CPU", "",
             f"`python benchmarks/channels_last.py --rounds {args.rounds}` on {res['machine']} ({res['cpus']} CPUs): "
             "`speed.py --quick` (resnet10t at 32 px, 2,048 images, batch 128; cache_features at its default batch) "
             "with `ADAPTFLOW_CHANNELS_LAST=0` and `=1`, alternated (0 first in odd rounds, 1 first in even ones). "
             "Images/s, higher is better.", "",
             "| column | " + " | ".join(f"round {r + 1}: 0 → 1" for r in range(args.rounds)) + " | median ratio 1/0 |",
             "|---|" + "---|" * args.rounds + "---:|"]
    for k, name in COLUMNS.items():
        cells = [f"{a[k]:.0f} → {b[k]:.0f}" for a, b in zip(runs["0"], runs["1"])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio[k]:.2f} |")
    lines += ["", "The ratio is per round (the `1` run against the `0` run of the same round), then the median."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
