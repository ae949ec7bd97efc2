"""register: record the run in MLflow, register the candidate, and move ``champion`` only through the gate.

The candidate was chosen by evaluate without the test split (target val, or a label-free score when the
target has no labels). The gate then reads target test once: the candidate strategy's mean test accuracy
over seeds, and the candidate model's own, must beat ``scratch`` and ``source_only`` (their means) and chance by
``register.margin``, and the candidate model must beat the current champion re-scored on the same test images
(so a champion registered on other data is compared fairly). A candidate that fails gets the ``challenger``
alias and the reasons. A candidate that a registered version already serves (``served_digest``) registers,
gates and moves nothing.

Both aliases move by compare-and-set (``tracking.move_alias``): ``champion`` moves only if it still points
where the gate read it, and every move lands in the registered model's alias history. A test set picks the
champion once (:func:`hold`): under ``dvc exp run``, or when the champion or any other version was gated on
this same test set, a passing gate is held (``challenger``, gate ``passed, held``): a sweep must not pick its champion by test
score; :func:`promote` applies a held verdict once the version is chosen on val.

What MLflow receives, per pipeline run: one parent run (the whole resolved params, per-strategy metrics,
the evaluate report and plots, dataset cards, dataset inputs, lineage) and one nested run per strategy and
seed (its metrics, learning curve, plots, checkpoint config); the source model has a run of its own, shared
by every pipeline run that starts from the same source weights. The lineage record (``reports/lineage.json``
and the parent run's ``lineage.json``) ties the orchestrator's run id, the git commit, the ``dvc.lock``
hashes, the dataset digests, the MLflow run ids and the model version together.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from adaptflow import outputs
from adaptflow.data import store
from adaptflow.params import Params
from adaptflow.stages.evaluate import majority  # the gate's chance: what evaluate reports as chance
from adaptflow.stages.evaluate import output_dir as evaluate_dir
from adaptflow.stages.evaluate import run_key
from adaptflow.stages.finetune import output_dir as adapted_dir
from adaptflow.stages.finetune import runs
from adaptflow.stages.ingest import output_dir as ingested_dir
from adaptflow.stages.pretrain import output_dir as source_model_dir

log = logging.getLogger(__name__)

LINEAGE_SCHEMA = 1


def output_path(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.reports / "registry.json"


def lineage_path(params: Params, root: Path) -> Path:
    return Path(root) / params.paths.reports / "lineage.json"


def gate(
    candidate_acc: float,
    baseline_accs: dict[str, float],
    champion_acc: float | None,
    margin: float,
    candidate_model_acc: float | None = None,
    unchecked: list[str] = (),
    chance: tuple[str, float] | None = None,
    model_test_acc: float | None = None,
) -> tuple[bool, list[str]]:
    """Whether the candidate may become champion, and why (one reason per check).

    ``candidate_acc`` and ``baseline_accs`` are the strategies' mean test accuracies over seeds;
    ``candidate_model_acc`` is the registered model's own (defaults to ``candidate_acc``), which is what
    the champion — one model — is compared with. ``chance`` is (the test split's most common class, its
    share): always answering it scores that share, so the candidate must beat it like a baseline — the one
    baseline that needs no training and that no params setting removes. Each baseline and chance must be
    beaten both by the mean and, given as ``model_test_acc``, by the registered model's own accuracy on the
    whole test split: a good mean must not carry a weak seed's model (the one val chose) past scratch.
    """
    ok, reasons = True, []
    model_acc = candidate_acc if candidate_model_acc is None else candidate_model_acc
    if unchecked:  # allowed by register.require_baselines: false; said, not hidden
        reasons.append(f"not checked against {', '.join(unchecked)} (not in evaluate.baselines; register.require_baselines: false)")
    if chance is not None:
        label, share = chance
        lowest = candidate_acc if model_test_acc is None else min(candidate_acc, model_test_acc)
        passed = round(lowest - share, 9) > margin
        ok &= passed
        which = "" if model_test_acc is None else f"the lower of the mean {candidate_acc:.4f} and this model's {model_test_acc:.4f}: "
        reasons.append(f"{'beats' if passed else 'does not beat'} chance ({which}{lowest:.4f} vs {share:.4f} for always "
                       f"answering the most common test class, {label!r}; margin {margin})")
    lowest = candidate_acc if model_test_acc is None else min(candidate_acc, model_test_acc)
    which = "" if lowest == candidate_acc else f"this model's, below the strategy's mean {candidate_acc:.4f}: "
    for name, acc in baseline_accs.items():
        passed = round(lowest - acc, 9) > margin  # rounded: "by exactly the margin" is not a float accident
        ok &= passed
        reasons.append(f"{'beats' if passed else 'does not beat'} {name} ({which}{lowest:.4f} vs {acc:.4f}, margin {margin})")
    if champion_acc is None:
        reasons.append("no current champion")
    else:
        passed = round(model_acc - champion_acc, 9) > 0
        ok &= passed
        reasons.append(f"{'beats' if passed else 'does not beat'} current champion ({model_acc:.4f} vs {champion_acc:.4f} on this test set)")
    return ok, reasons


def git_info(root: Path) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown", "git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower()}


def dvc_lock_hashes(root: Path, exclude: tuple[str, ...] = ("register",)) -> dict | None:
    """The output hashes ``dvc.lock`` records per stage (``{stage: {path: md5}}``), and the lock file's own
    sha256; None outside a DVC pipeline. Under ``dvc repro`` the upstream stages' entries are written before
    register runs, so they describe exactly the data this registration used; register's own entry (the
    previous registration's records) is left out."""
    path = Path(root) / "dvc.lock"
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        lock = yaml.safe_load(raw) or {}
    except yaml.YAMLError:
        return {"sha256": hashlib.sha256(raw).hexdigest(), "stages": {}, "error": "dvc.lock is not valid YAML"}
    stages = {}
    for stage, entry in (lock.get("stages") or {}).items():
        if stage in exclude:
            continue
        outs = {o["path"]: o.get("md5") or o.get("hash") or o.get("etag") for o in entry.get("outs") or [] if "path" in o}
        stages[stage] = outs
    return {"sha256": hashlib.sha256(raw).hexdigest(), "stages": stages}


def orchestrator(flow_run_id: str | None) -> dict[str, str | None]:
    """Who ran this registration: a Prefect flow run (its id, passed in by the Prefect task — the core
    never imports Prefect), a DVC stage (DVC exports ``DVC_STAGE``), or a direct call."""
    if flow_run_id:
        return {"kind": "prefect", "prefect_flow_run_id": str(flow_run_id)}
    if os.environ.get("DVC_STAGE"):
        return {"kind": "dvc", "dvc_stage": os.environ["DVC_STAGE"], "dvc_exp": os.environ.get("DVC_EXP_NAME")}
    return {"kind": "direct"}


def _png_b64(image_chw: np.ndarray) -> str:
    from PIL import Image

    arr = image_chw[0] if image_chw.shape[0] == 1 else image_chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _read_evaluation(ev_dir: Path) -> dict:
    """evaluate's full record (``evaluation.json``)."""
    path = ev_dir / "evaluation.json"
    if not path.is_file():
        raise outputs.MissingOutput(f"{path}: missing (run the evaluate stage first)")
    return json.loads(path.read_text())


def input_key(params: Params, root: Path) -> outputs.Key:
    """This stage's identity (with the MLflow store it wrote to, what decides whether it may skip): its
    params and the digests of the evaluation, both datasets, the source model and every adapted model."""
    upstream = [evaluate_dir(params, root), ingested_dir(params, root, "target"), ingested_dir(params, root, "source"),
                source_model_dir(params, root)] + [adapted_dir(params, root, s, k) for s, k in runs(params)]
    return outputs.input_key("register", params.sections("register", "evaluate", "finetune.strategies", "finetune.seeds"), upstream)


def reusable(out: Path, key: str, tracking_uri: str) -> dict | None:
    """The last registration's record (``registry.json``) if it was made from exactly these inputs into
    this store, else None. The caller still checks that its version exists: :func:`run` asks MLflow, the
    orchestrator (which must not import MLflow) only that a local store is still there."""
    try:
        record = json.loads(Path(out).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("key") == key and record.get("tracking_uri") == tracking_uri and record.get("version") else None


def registered_before(name: str, key: str, root: Path, params: Params) -> dict | None:
    """The record of the version already registered from exactly these inputs (its ``register_key`` tag) in
    this store, written back to ``registry.json`` and ``lineage.json`` as that registration wrote them: going
    back to inputs registered before registers nothing new. Of several such versions, the newest whose verdict
    still stands: a promoted one that is still champion, or another whose gate compared it with today's
    champion. None if none stands (champion has moved since, or was removed) or its run kept no record: then
    the inputs are gated again, against today's champion, as a new version. Inputs that registered nothing (a
    version already served their candidate) are found by their pipeline run's ``register_key`` tag, and stand
    while the champion is where it was."""
    from adaptflow import tracking

    champion = tracking.alias_version(name, "champion")
    for version in tracking.find_versions(name, {REGISTER_KEY: key}):  # newest first: the first whose verdict stands
        tags = tracking.version_tags(name, version)
        if tags.get("gate") == "promoted":
            current = champion == version  # promoted: still champion (not replaced, nor the alias removed)
        else:
            current = champion != version and gated_against_today(tags, champion)
        run_id = tags.get("parent_run_id")
        records = {f: tracking.load_run_dict(run_id, f) for f in ("registry.json", "lineage.json")} if current and run_id else {}
        decision, lineage = records.get("registry.json"), records.get("lineage.json")
        if decision and lineage and decision.get("key") == key and decision.get("version") == version:
            write_records(params, root, decision, lineage)
            return decision
    # inputs whose candidate a version already served registered nothing: their pipeline run kept the records
    run_id = tracking.find_run({"adaptflow.kind": "pipeline", REGISTER_KEY: key})
    records = {f: tracking.load_run_dict(run_id, f) for f in ("registry.json", "lineage.json")} if run_id else {}
    decision, lineage = records.get("registry.json"), records.get("lineage.json")
    if decision and lineage and decision.get("key") == key and decision.get("gate") in (SAME, SAME_VERSION):
        stands = (champion == decision["version"] if decision["gate"] == SAME else  # still the champion; or nothing moved since
                  champion == decision.get("champion") and tracking.version_exists(name, decision["version"])
                  and standing_version(name, [decision["version"]]) == decision["version"])
        if stands:
            write_records(params, root, decision, lineage)
            return decision
    return None


def write_records(params: Params, root: Path, decision: dict, lineage: dict) -> None:
    """``lineage.json`` then ``registry.json`` (what marks register done), as a registration writes them and a
    return to its inputs writes them back: the same bytes, so dvc.lock's hashes hold."""
    outputs.atomic_write_text(lineage_path(params, root), json.dumps(lineage, indent=2))
    outputs.atomic_write_text(output_path(params, root), json.dumps(decision, indent=2))


REGISTER_KEY = "register_key"  # version tag: the register input key it was registered from


def run(params: Params, root: Path = Path("."), flow_run_id: str | None = None) -> dict:
    """Register the candidate behind the gate. ``flow_run_id``: the Prefect flow run that called this, for
    the lineage record (not part of the stage's identity: a re-run with nothing changed does no work)."""
    from adaptflow import tracking  # MLflow is imported only by the stage that needs it

    root = Path(root)
    out = output_path(params, root)
    ev_dir, tgt, src = evaluate_dir(params, root), ingested_dir(params, root, "target"), ingested_dir(params, root, "source")
    pairs = runs(params)
    key = input_key(params, root)
    name = params.registered_model_name()
    tracking_uri = tracking.configure(root)
    previous = reusable(out, key, tracking_uri)
    if previous and tracking.version_exists(name, previous["version"]):
        log.info("register: up to date (version %s of %s)", previous["version"], name)
        return {**previous, "cached": True}
    restored = registered_before(name, key, root, params)
    if restored:  # e.g. back at a commit after `dvc exp run` overwrote reports/registry.json (not in git or the DVC cache)
        log.info("register: version %s of %s was registered from these inputs before: its records restored, nothing registered",
                 restored["version"], name)
        return {**restored, "cached": True}

    ev = _read_evaluation(ev_dir)
    candidate, candidate_seed = ev["candidate"], ev["candidate_seed"]
    tgt_card, src_card = store.read_card(tgt), store.read_card(src)
    lock = dvc_lock_hashes(root)
    orch = orchestrator(flow_run_id)
    tags = provenance_tags(params, root, lock, orch)
    tags["source_model_run_id"] = _source_model_run(params, root, tags)
    test = store.load_split(tgt, "test")
    # the model's input example: a target train image (its models had those), never a test image, which would
    # leave the project inside every copy of the model
    train = store.load_split(tgt, "train")
    example = _png_b64(train.images[0]) if len(train) else None
    meta = store.read_meta(tgt, ["split", "sha1", "content"])
    test_ids = meta.loc[meta["split"] == "test", ["content", "sha1"]]  # in load_split's row order
    datasets = [(f"source:{src_card['domain']}", src_card["data_hash"], src, "training"),
                (f"target:{tgt_card['domain']}", tgt_card["data_hash"], tgt, "training, validation (val) and evaluation (test)")]

    decision: dict = {"key": key, "tracking_uri": tracking_uri, "model_name": name, "candidate": candidate,
                      "candidate_selection": ev["candidate_selection"], "time": time.time()}
    with tracking.start_run(f"pipeline[{tgt_card['domain']}]", tags={**tags, "adaptflow.kind": "pipeline"}) as parent_id:
        decision["parent_run_id"] = parent_id
        tracking.log_params(params.to_dict())
        tracking.log_dict(params.to_dict(), "params.json")
        for ds_name, digest, path, context in datasets:
            tracking.log_dataset(ds_name, digest, path, context)
        tracking.log_artifacts(ev_dir, "evaluate")  # report.html, report.md, metrics, plots
        tracking.log_artifacts(tgt / store.CARD, "dataset_cards/target")
        tracking.log_artifacts(src / store.CARD, "dataset_cards/source")
        seen = meta[meta["split"].isin(["train", "val"])]
        tracking.log_dict({h: sorted(seen[h]) for h in SEEN_KEYS}, SEEN)  # what a later gate leaves out
        per = ev["strategies"]
        tracking.log_metrics({**{f"{s}.{k}": v for s, m in per.items() for k, v in m.items() if _is_number(v)},
                              **{f"{s}.recall.{c}": v for s, m in per.items() for c, v in m["recall"].items()},
                              **{f"transfer_gain.{k}": v for k, v in ev["transfer_gain"].items()}})
        # a candidate that serves exactly what a registered version serves is that version: not logged or registered again
        served = tracking.served_digest(adapted_dir(params, root, candidate, candidate_seed)) if candidate is not None else None
        same = standing_version(name, tracking.find_versions(name, {SERVED: served})) if served else None
        run_ids, model_uri = {}, None
        for s, seed in pairs:
            run_ids[run_key(s, seed)], uri = _log_strategy_run(params, root, ev, s, seed, tags, datasets[1], example, log_model=same is None)
            model_uri = uri or model_uri

        if candidate is None:
            decision.update({"version": None, "promoted": False, "reasons": ["no non-baseline strategy ran"], "alias": None})
        else:
            test_set = store.split_hash(tgt, "test", by="content")
            decision.update(_gate_and_register(params, ev, test, test_ids, model_uri, {**tags, REGISTER_KEY: key, TEST_SET: test_set, SERVED: served},
                                               name, same, {"parent_run_id": parent_id, "candidate_run_id": run_ids[run_key(candidate, candidate_seed)],
                                                "orchestrator": orch["kind"], **{k: v for k, v in orch.items() if v and k != "kind"}}))
            tracking.set_tags({"model_name": name, "model_version": decision["version"], "gate": decision["alias"], REGISTER_KEY: key})
        decision["run_ids"] = run_ids
        decision["source_model_run_id"] = tags["source_model_run_id"]
        lineage = _lineage(params, root, ev, decision, orch, tags, lock, tgt_card, src_card, decision.get("model_uri", model_uri), tracking_uri, pairs)
        tracking.log_dict(lineage, "lineage.json")
        tracking.log_dict(decision, "registry.json")
    write_records(params, root, decision, lineage)
    log.info("register: %s version %s %s — %s", name, decision.get("version"), "→ champion" if decision["promoted"] else "already champion" if decision.get("gate") == SAME else
             "already registered" if decision.get("gate") == SAME_VERSION else "not promoted", "; ".join(decision["reasons"]))
    return {**decision, "cached": False}


def provenance_tags(params: Params, root: Path, lock: dict | None, orch: dict) -> dict[str, str]:
    """What every run and registered version carries so its exact code and data can be found again: git
    commit and dirty flag, data hashes and stage-output digests, the source model's digest, the code version,
    the params hash, the ``dvc.lock`` output hashes per stage, and who ran it."""
    tgt, src = ingested_dir(params, root, "target"), ingested_dir(params, root, "source")
    tgt_card, src_card = store.read_card(tgt), store.read_card(src)
    tags = {
        **git_info(root),
        "target_domain": tgt_card["domain"],
        "source_domain": src_card["domain"],
        "target_data_hash": tgt_card["data_hash"],
        "source_data_hash": src_card["data_hash"],
        "target_output_digest": outputs.digest(tgt),
        "source_output_digest": outputs.digest(src),
        "source_model_digest": outputs.digest(source_model_dir(params, root)),
        "code_version": outputs.code_version(),
        "params_hash": params.section_hash(*params.to_dict().keys()),
    }
    if lock is not None:
        tags["dvc_lock_sha256"] = lock["sha256"]
        tags.update({f"dvc.{stage}": ",".join(f"{p}={h}" for p, h in outs.items()) for stage, outs in lock["stages"].items()})
    tags.update({f"orchestrator.{k}": v for k, v in orch.items() if v})
    return tags


def _source_model_run(params: Params, root: Path, tags: dict) -> str:
    """The MLflow run of the source model: found by its digest (shared by every pipeline run that starts
    from the same weights), else recorded now with its pretrain params, learning curve and config."""
    from adaptflow import tracking

    src_model, src = source_model_dir(params, root), ingested_dir(params, root, "source")
    digest = tags["source_model_digest"]
    found = tracking.find_run({"adaptflow.kind": "source_model", "source_model_digest": digest})
    if found:
        return found
    p = params.to_dict()
    began = json.loads((src_model / "config.json").read_text()).get("extra", {}).get("init") or {}
    start = {"started_from": began.get("weights") or "random", **({"started_from_sha256": began["sha256"]} if began.get("sha256") else {})}
    return tracking.record_run(
        f"source_model[{tags['source_domain']}]",
        tags={"adaptflow.kind": "source_model", "source_model_digest": digest, "source_domain": tags["source_domain"],
              "source_data_hash": tags["source_data_hash"], "git_commit": tags["git_commit"], "git_dirty": tags["git_dirty"], **start},
        params={"pretrain": p["pretrain"], "preprocess": p["preprocess"], "source": p["source"]},
        history=_history(src_model), artifacts=[src_model / "config.json", src_model / "history.json", src / store.CARD],
    )


def _log_strategy_run(params: Params, root: Path, ev: dict, s: str, seed: int, tags: dict, dataset: tuple,
                      example: str | None, log_model: bool = True) -> tuple[str, str | None]:
    """One nested run for one strategy and seed; logs the model too when it is the candidate run (the one
    model this pipeline run may register: logged once, in MLflow only) and ``log_model`` (false: a registered
    version serves it already). Returns (run id, model URI)."""
    from adaptflow import tracking

    rk, d = run_key(s, seed), adapted_dir(params, root, s, seed)
    r = ev["runs"][rk]
    model_uri = None
    with tracking.start_run(f"{s}[seed={seed}]", nested=True, tags={**tags, "adaptflow.kind": "strategy_run", "strategy": s, "seed": seed}) as rid:
        tracking.log_params(params.to_dict())
        tracking.log_params({"run": {"strategy": s, "seed": seed, "checkpoint_selection": ev["checkpoint_selection"].get(s, ""),
                                     "best_epoch": r.get("best_epoch")}})
        tracking.log_dataset(*dataset)
        tracking.log_metrics({**{k: v for k, v in r.items() if _is_number(v) and k not in ("seed", "best_epoch")},
                              **{f"recall.{c}": v for c, v in r["recall"].items()}})
        tracking.log_history(_history(d))
        for f in ("config.json", "history.json"):
            if (d / f).is_file():
                tracking.log_artifacts(d / f, "checkpoint")
        # this run's plots are the parent's evaluate/plots/<these names>: stored once, pointed at
        tracking.set_tags({f"plot.{kind}": f"evaluate/{ev['plots'][kind][rk]}" for kind in ("confusion", "reliability")})
        if log_model and s == ev["candidate"] and seed == ev["candidate_seed"]:
            model_uri = tracking.log_image_model(d, ev["classes"], example)
    return rid, model_uri


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _history(directory: Path) -> list[dict]:
    path = Path(directory) / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


SEEN = "target_seen.json"  # per registration: the target images its models trained or chose on, by hash
# "content" (the decoded pixels: what splits, whatever preprocess stored) and "sha1" (the stored pixels: two files
# of one image that decode differently, an L and an RGB copy, share it); registrations before content hashes
# recorded sha1 alone, which misses an image stored at another size or mode
SEEN_KEYS = ("content", "sha1")


def unseen_test(test_ids: pd.DataFrame, seen: dict | None) -> tuple[np.ndarray, str | None]:
    """The test rows the champion never trained or chose a checkpoint on, and a note for the gate's reasons
    when the comparison is not on the whole test set as it stands. New target data re-splits every class, so
    images the champion trained on can land in today's test split: scored on them, it would be flattered.
    ``test_ids`` has a column per hash in :data:`SEEN_KEYS`, one row per test image; ``seen`` is the
    champion's record (:data:`SEEN`)."""
    every = np.arange(len(test_ids))
    keys = [k for k in SEEN_KEYS if seen and isinstance(seen.get(k), list)]
    if not keys:
        return every, "the champion's target images are not recorded (registered before they were): compared on the whole test set"
    # by every hash recorded: a file whose decoded content differs (another mode or size of one image) but whose
    # stored pixels match one the champion had is an image it had
    known = {k: set(seen[k]) for k in keys}
    had = np.zeros(len(test_ids), dtype=bool)
    for k in keys:
        had |= test_ids[k].isin(known[k]).to_numpy()
    keep = np.flatnonzero(~had).astype(np.int64)
    older = None if SEEN_KEYS[0] in keys else ("the champion's images are recorded by stored-pixel hash only: "
                                               "any it had at another image size or mode are not recognised")
    if len(keep) == len(every):
        return every, older
    if not len(keep):
        return every, "every test image was among the champion's training or val images: compared on the whole test set, which flatters the champion"
    return keep, (f"champion and candidate compared on the {len(keep)} of {len(every)} test images the champion never trained or chose on "
                  f"({len(every) - len(keep)} it had were left out)" + (f"; {older}" if older else ""))


def _accuracy(model: Any, test: store.Split, rows: np.ndarray) -> float:
    pred = model.predict(pd.DataFrame({"image": [_png_b64(test.images[int(i)]) for i in rows]}))
    return float((pred["label"].to_numpy() == np.array(test.classes)[test.labels[rows]]).mean())


def _gate_and_register(params: Params, ev: dict, test: store.Split, test_ids: pd.DataFrame, model_uri: str | None, tags: dict, name: str,
                       same: str | None, context: dict) -> dict:
    """Read the champion, score it and the candidate on the test images the champion has not seen, gate,
    register, and move an alias by compare-and-set. ``same``: the version already serving exactly the
    candidate whose verdict stands (:func:`standing_version`): then nothing is registered, gated or moved (see
    :func:`_already_registered`)."""
    from adaptflow import aliases, tracking

    candidate, candidate_seed = ev["candidate"], ev["candidate_seed"]
    per, cand_run = ev["strategies"], ev["runs"][run_key(candidate, candidate_seed)]
    cand_mean, cand_acc = per[candidate]["test_acc"], cand_run["test_acc"]
    champion = tracking.alias_version(name, "champion")  # what the gate reads; the move checks it is unchanged
    decision = {"previous_champion": champion, "candidate_seed": candidate_seed, "candidate_test_acc": cand_acc, "candidate_mean_test_acc": cand_mean}
    if same is not None:
        return {**decision, **_already_registered(name, same, champion, f"the candidate ({candidate}, seed {candidate_seed})", tags[SERVED])}
    champion_acc, cand_vs_champion, note = None, cand_acc, None
    if champion is not None:
        rows, note = unseen_test(test_ids, tracking.seen_by(name, champion, SEEN))
        # both through the registered models' own predict, on the same images: evaluate's number for the
        # candidate comes from another path (autocast and channels_last on a GPU), which can differ by an image
        champion_acc = _accuracy(tracking.load_model(f"models:/{name}/{champion}"), test, rows)
        cand_vs_champion = _accuracy(tracking.load_model(model_uri), test, rows)
    baselines = {b: per[b]["test_acc"] for b in params.evaluate.baselines}
    passed, reasons = gate(cand_mean, baselines, champion_acc, params.register.margin, candidate_model_acc=cand_vs_champion,
                           unchecked=params.unchecked_baselines(), chance=majority(test), model_test_acc=cand_acc)
    reasons += [note] if note else []
    version = tracking.register(model_uri, name, {
        **tags, "strategy": candidate, "seed": candidate_seed, "val_acc": cand_run["val_acc"], "test_acc": cand_acc,
        "test_ece": cand_run["test_ece"], "strategy_mean_test_acc": cand_mean, "selection": ev["candidate_selection"],
        "pool_im": cand_run.get("pool_im"),
        "parent_run_id": context["parent_run_id"], "test_data_hash": ev["test_data_hash"]})
    context = {**context, "test_data_hash": ev["test_data_hash"], "git_commit": tags["git_commit"]}
    held = hold(name, version, champion, tags[TEST_SET]) if passed else None
    promoted = passed and not held
    reasons += [held] if held else []
    alias = "champion" if promoted else "challenger"
    if promoted:
        try:
            tracking.move_alias(name, "champion", version, expected=champion, reason="gate passed: " + "; ".join(reasons), context=context)
        except aliases.AliasConflict as exc:
            promoted, alias = False, "challenger"
            reasons.append(f"champion moved to version {exc.found or 'none'} while the gate compared against version {exc.expected or 'none'}: "
                           f"not promoted (re-run register to gate against the new champion)")
    verdict = "promoted" if promoted else HELD if held else "rejected"
    if not promoted:
        tracking.move_alias(name, "challenger", version, expected=aliases.ANY, reason=f"gate {verdict}: " + "; ".join(reasons), context=context)
    tracking.set_version_tags(name, version, {"gate": verdict, "gate_reasons": "; ".join(reasons), GATED_AGAINST: champion or "none"})
    return {**decision, "version": version, "promoted": promoted, "gate": verdict, "alias": alias, "reasons": reasons,
            "previous_champion_test_acc": champion_acc, "champion": version if promoted else champion, "model_uri": model_uri}


def standing_version(name: str, same: list[str]) -> str | None:
    """Of the versions serving exactly a candidate (newest first), the one that answers for it, or None: the
    champion; else the newest whose verdict still stands (gated against today's champion) or that was rolled
    back. Its verdict is the candidate's: gating it again (with another margin, on a test set that gated it
    before, or after a rollback took it out) would let a re-run undo a decision made once. None when each one's
    verdict was against a champion since replaced: the candidate is registered and gated anew (a passing gate
    on a test set gated before is held)."""
    from adaptflow import tracking

    champion = tracking.alias_version(name, "champion")
    if champion in same:
        return champion
    for version in same:
        tags = tracking.version_tags(name, version)
        if ROLLED_BACK in tags:
            return version
        # a verdict recorded in full (a registration cut short left none) and given against today's champion; a
        # promoted version no longer champion (replaced, or the alias removed) stands for nothing
        if tags.get("gate") in ("rejected", HELD) and GATED_AGAINST in tags and gated_against_today(tags, champion):
            return version
    return None


def _already_registered(name: str, version: str, champion: str | None, candidate: str, served: str) -> dict:
    """The decision for a candidate that ``version`` already serves (:func:`standing_version`): nothing
    registered, gated or moved. The champion stays champion; another version keeps its verdict (a held one is
    promoted by hand; a rolled-back one stays out unless rolled back to)."""
    from adaptflow import tracking

    said = (f"{candidate} serves exactly what version {version} serves (weights, classes, input and serving code, by {SERVED} "
            f"{served}): nothing registered, no alias moved")
    if version == champion:
        return {"version": version, "promoted": False, "gate": SAME, "alias": "champion", "previous_champion_test_acc": None,
                "reasons": [f"{said}; it is the champion"], "champion": champion, "model_uri": f"models:/{name}/{version}"}
    tags = tracking.version_tags(name, version)
    then = tags.get("gate", "not recorded")
    alias = next((a for a, v in tracking.model_aliases(name).items() if v == version), None)
    why = f"{said}; its gate said {then!r} against champion {tags.get(GATED_AGAINST, 'none')}" + (
        f", and it was rolled back ({tags[ROLLED_BACK]})" if ROLLED_BACK in tags else "")
    if then == HELD:
        why += f"; to make it champion: adaptflow registry promote {name} {version}"
    elif ROLLED_BACK in tags:
        why += f"; to put it back anyway: adaptflow registry rollback {name} --to {version} --reason '…'"
    return {"version": version, "promoted": False, "gate": SAME_VERSION, "alias": alias, "previous_champion_test_acc": None,
            "reasons": [why], "champion": champion, "model_uri": f"models:/{name}/{version}"}


def hold(name: str, version: str, champion: str | None, test_set: str) -> str | None:
    """Why a version whose gate passed must wait for `adaptflow registry promote` rather than move champion,
    or None. A test set picks the champion at most once: were every run gated on it free to promote, a sweep
    (DVC experiments, or runs with other params or code on the same test images) would end with the champion
    whose test score was best, chosen by test — and so would runs repeated until one passes, so any version
    gated on it before holds this one, whatever that gate said. ``test_set``: :data:`TEST_SET`, the test images and labels by
    decoded content, so another ``preprocess`` is the same test set; a new one (new target data, or a
    re-split: another ``seed`` or fraction) gates afresh."""
    from adaptflow import tracking

    then = (f"choose among the held versions on val (adaptflow registry show {name}), then "
            f"`adaptflow registry promote {name} {version}`")
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        return f"held: DVC experiment {experiment!r} never moves champion (across a sweep, the best test score would pick it); {then}"
    if champion is not None and tracking.version_tags(name, champion).get(TEST_SET) == test_set:
        return (f"held: champion (version {champion}) was registered on this same test set ({TEST_SET} {test_set}), "
                f"which picks the champion once (re-gated on it run after run, the best test score would pick it); {then}")
    # a gate that failed on this test set counts too: run after run until one passes, the test score would choose
    gated = [v for v in tracking.find_versions(name, {TEST_SET: test_set}) if v != version]
    if gated:
        shown = ", ".join(gated[:5]) + (f" and {len(gated) - 5} more" if len(gated) > 5 else "")
        return (f"held: version(s) {shown} were gated on this same test set ({TEST_SET} {test_set}) before, which picks the champion "
                f"once (re-run until a gate passes, the test score would choose); {then}")
    return None


TEST_SET = "test_set"  # version tag: the test images and labels it was gated on, by decoded content (store.split_hash)


SERVED = "served_digest"  # version tag: what it serves, by content (tracking.served_digest)
SAME = "same as champion"  # verdict: the candidate serves exactly what the champion serves; nothing registered
SAME_VERSION = "same as a registered version"  # verdict: ... what another version serves; nothing registered or gated


HELD = "passed, held"  # the gate passed, but the version waits for `adaptflow registry promote` (see hold)
GATED_AGAINST = "gated_against"  # version tag: the champion the gate compared with ("none": there was none)
ROLLED_BACK = "rolled_back"  # version tag: why a rollback took champion off it (cleared when a rollback puts it back)


def gated_against_today(tags: dict, champion: str | None) -> bool:
    """Whether a version's gate compared it with today's champion (``champion``; None: there is none), so its
    verdict still stands: what promote requires, and what `registry show` sorts held versions by."""
    return tags.get(GATED_AGAINST, "none") == (champion or "none")


def promote(name: str, version: str, who: str = "adaptflow registry promote") -> dict:
    """Make ``version`` champion: only a version whose gate passed and was held (see :func:`hold`), and only
    while champion is still the version that gate compared it with — otherwise its verdict is stale and
    :class:`PromoteRefused` says what to run. The move is compare-and-set and lands in the alias history."""
    from adaptflow import aliases, tracking

    if not tracking.version_exists(name, version):
        raise PromoteRefused(tracking.missing_model(name) or f"{name} version {version}: no such registered version")
    tags = tracking.version_tags(name, version)
    current = tracking.alias_version(name, "champion")
    if current == str(version):  # asked twice, or promoted by its gate: nothing to move (but a challenger left behind)
        _retire_challenger(name, str(version), who)
        return {"model_name": name, "version": str(version), "previous_champion": current, "already": True,
                "reasons": tags.get("gate_reasons", "")}
    if tags.get("gate") != HELD:
        back = (f"; it was champion before: to go back to it, adaptflow registry rollback {name} --to {version} --reason '…'"
                if str(version) in _former_champions(name) else "")
        raise PromoteRefused(f"{name} version {version}: its gate was {tags.get('gate', 'never run')!r}, and only a version whose gate passed "
                             f"and was held can be promoted by hand ({tags.get('gate_reasons', 'no reasons recorded')}){back}")
    against = tags.get(GATED_AGAINST, "none")
    if not gated_against_today(tags, current):
        raise PromoteRefused(f"{name} version {version} was gated against champion {against}, but champion is now {current or 'none'}: "
                             "its verdict no longer holds; gate its weights anew against the current champion: bring back the "
                             "configuration that made it (its params are in its parent run; a DVC experiment: dvc exp apply it), delete "
                             "reports/registry.json, run adaptflow stage register, and promote the new version that registers")
    reasons = tags.get("gate_reasons", "")
    try:
        tracking.move_alias(name, "champion", version, expected=current, reason=f"promoted by hand ({who}): gate passed: {reasons}",
                            context={"orchestrator": "cli", "promoted_from": "challenger"})
    except aliases.AliasConflict as exc:
        raise PromoteRefused(f"champion moved to version {exc.found or 'none'} meanwhile: nothing promoted") from None
    tracking.set_version_tags(name, version, {"gate": "promoted", "gate_reasons": f"{reasons}; then promoted by hand ({who})"})
    _retire_challenger(name, str(version), who)
    return {"model_name": name, "version": version, "previous_champion": current, "reasons": reasons}


def _former_champions(name: str) -> set[str]:
    """The versions adaptflow made champion at some time (by a gate, a promotion or a rollback: not one noticed
    there after a move outside adaptflow, which no gate passed)."""
    from adaptflow import tracking

    return {m.to_version for m in tracking.alias_history(name, "champion") if m.to_version is not None and not m.context.get("outside")}


def rollback(name: str, reason: str, to: str | None = None, who: str = "adaptflow registry rollback") -> dict:
    """Put ``champion`` back on a version that held it before (``to``; default: the one the current champion
    replaced when it was promoted, so a second rollback steps back once more), with ``reason`` in the alias history: the way back from a bad model in production. Only a former
    champion (a gate passed it then), never a version that was not; compare-and-set, like every move. The
    version rolled back from is tagged ``rolled_back`` with the reason. :class:`PromoteRefused` says why not."""
    from adaptflow import aliases, tracking

    if not reason.strip():
        raise PromoteRefused("--reason: say why (it goes into the alias history)")
    current = tracking.alias_version(name, "champion")
    if current is None and to is None:
        raise PromoteRefused(tracking.missing_model(name) or f"{name} has no champion: give --to a former champion to put back")
    moves = [m for m in tracking.alias_history(name, "champion") if not m.context.get("outside")]  # what adaptflow moved
    if to is None:
        put = next((m for m in reversed(moves) if m.to_version == current and "rolled_back_from" not in m.context), None)  # not a rollback
        if put is None or put.from_version is None:
            raise PromoteRefused(f"{name}@champion is version {current}, and the alias history shows no version before it"
                                 + ("" if put else " (it was put there outside adaptflow)") + ": give --to VERSION")
        to = put.from_version
    to = str(to)
    if to == current:
        raise PromoteRefused(f"{name}@champion is version {to} already")
    if not tracking.version_exists(name, to):
        raise PromoteRefused(tracking.missing_model(name) or f"{name} version {to}: no such registered version")
    if to not in _former_champions(name):
        raise PromoteRefused(f"{name} version {to} was never made champion by adaptflow: only a former champion can be rolled back to "
                             "(a held version: adaptflow registry promote; any other goes through the gate, in a pipeline run)")
    try:
        tracking.move_alias(name, "champion", to, expected=current, reason=f"rolled back by hand ({who}) from version {current or 'none'}: {reason}",
                            context={"orchestrator": "cli", "rolled_back_from": current})
    except aliases.AliasConflict as exc:
        raise PromoteRefused(f"champion moved to version {exc.found or 'none'} meanwhile: nothing rolled back") from None
    if current is not None:
        tracking.set_version_tags(name, current, {ROLLED_BACK: reason})
    tracking.delete_version_tag(name, to, ROLLED_BACK)  # champion again: an earlier rollback from it no longer stands
    _retire_challenger(name, to, who, how="made champion again by a rollback")  # champion and challenger never name one version
    return {"model_name": name, "version": to, "previous_champion": current}


def _retire_challenger(name: str, version: str, who: str, how: str = "promoted to champion by hand") -> None:
    """``challenger`` names a version that is not champion: remove it where it names ``version``, champion now
    (also on a retry after a promotion that stopped before this step)."""
    from adaptflow import aliases, tracking

    try:
        tracking.move_alias(name, "challenger", None, expected=version, reason=f"version {version} {how} ({who})",
                            context={"orchestrator": "cli"})
    except aliases.AliasConflict:
        pass  # challenger names another version (or none): it stays


def summary(reg: dict, root: Path) -> str:
    """One line on what register did this run — or, when it was reused (a cache hit), that nothing was
    registered and where the aliases point now: the stored verdict belongs to the run that made it. What
    ``adaptflow run`` prints and a scheduled run logs."""
    from adaptflow import tracking

    name = reg.get("model_name")
    verdict = ("promoted to champion" if reg.get("promoted") else "already champion" if reg.get("gate") == SAME else
               "already registered" if reg.get("gate") == SAME_VERSION else
               "passed the gate, held as challenger" if reg.get("gate") == HELD else "not promoted")
    if not reg.get("cached"):
        return f"registry: {name} version {reg.get('version')} {verdict}: {'; '.join(reg.get('reasons', []))}"
    try:
        tracking.configure(Path(root), create=False)  # a Prefect cache hit ran nothing here that set MLflow up
        now = tracking.model_aliases(name) if reg.get("version") else {}
        aliases = ", ".join(f"{a} → version {v}" for a, v in sorted(now.items())) or "none"
    except (tracking.NoStore, tracking.MlflowException) as exc:  # the line after a finished run: never its failure
        aliases = f"unknown ({str(exc).splitlines()[0][:200]})"
    return (f"registry: nothing new to register (register reused): {name} version {reg.get('version')} came from an "
            f"earlier run, {verdict} then; aliases now: {aliases}")


class PromoteRefused(RuntimeError):
    """``promote`` would put a version in champion without a gate that holds today."""


def _lineage(params: Params, root: Path, ev: dict, decision: dict, orch: dict, tags: dict, lock: dict | None, tgt_card: dict,
             src_card: dict, model_uri: str | None, tracking_uri: str, pairs: list[tuple[str, int]]) -> dict:
    """The one record that links what no single tool links: orchestrator run, code, data, MLflow, registry."""
    reports = Path(root) / params.paths.reports
    return {
        "schema": LINEAGE_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "orchestrator": orch,
        "git": {"commit": tags["git_commit"], "dirty": tags["git_dirty"]},
        "code_version": tags["code_version"],
        "params_hash": tags["params_hash"],
        "dvc_lock": lock,
        "datasets": {
            "source": {"domain": src_card["domain"], "data_hash": src_card["data_hash"], "output_digest": tags["source_output_digest"], "n_images": src_card.get("n_images")},
            "target": {"domain": tgt_card["domain"], "data_hash": tgt_card["data_hash"], "output_digest": tags["target_output_digest"], "n_images": tgt_card.get("n_images"),
                       "n_test": ev["n_test"], "n_val": ev["n_val"]},
        },
        "stage_outputs": {
            "source_model": tags["source_model_digest"],
            "evaluate": outputs.digest(reports / "evaluate"),
            **{f"finetune/{run_key(s, k)}": outputs.digest(adapted_dir(params, root, s, k)) for s, k in pairs},
        },
        "mlflow": {
            "tracking_uri": tracking_uri,
            "experiment": "adaptflow",
            "parent_run_id": decision.get("parent_run_id"),
            "run_ids": decision.get("run_ids", {}),
            "source_model_run_id": decision.get("source_model_run_id"),
            "model_uri": model_uri,
            "model_name": decision["model_name"],
            "model_version": decision.get("version"),
        },
        "decision": {k: decision.get(k) for k in ("candidate", "candidate_seed", "promoted", "alias", "reasons", "previous_champion", "champion")},
    }
