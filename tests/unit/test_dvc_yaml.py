"""dvc.yaml lists, for each stage, exactly the params sections and the upstream outputs that the stage's own
identity (``input_key``) reads — the two ways of deciding "nothing changed" must agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from adaptflow import orchestrate, outputs
from adaptflow.params import load

REPO = Path(__file__).resolve().parents[2]
# deps that are records rather than stage outputs with a manifest: what the identity reads in their place
RECORDS = {"pretrain": {"reports/augment_overlap.json"}}
# keys a stage's key leaves out but DVC must still track: finetune's DVC stage makes every run, so which
# strategies and seeds run changes its outputs, while each run's own key leaves the list out
DVC_ONLY = {"finetune": {"finetune.strategies", "finetune.seeds"}}
STRATEGIES = ["scratch", "source_only", "linear_probe", "finetune", "dann"]  # between them every upstream finetune reads


def _resolve(text: str, context: dict) -> str:
    def value(match: re.Match) -> str:
        v = context
        for part in match.group(1).split("."):
            v = v[part]
        return str(v)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def _stages() -> dict[str, dict]:
    """dvc.yaml's stages with ``${...}`` resolved from params.yaml (the ingest foreach expanded)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    out = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        if "foreach" in stage:
            for key in stage["foreach"]:
                ctx = {**raw, "key": key, "item": raw[key]}
                out[f"{name}@{key}"] = {f: [_resolve(str(x), ctx) for x in stage["do"].get(f, [])] for f in ("deps", "params")}
        else:
            out[name] = {f: [_resolve(str(x if isinstance(x, str) else next(iter(x))), raw) for x in stage.get(f, [])] for f in ("deps", "params")}
    return out


def _tracked(entries: list[str], read: dict, params) -> tuple[set[str], set[str]]:
    """What DVC tracks that the stage does not read, and what it reads that DVC does not track. ``entries``:
    dvc.yaml's params (a section, "augment.source", or one key of a section, "pretrain.model"); ``read``:
    the sections the stage's key holds, with any key it leaves out already gone."""
    untracked = {name for name, value in read.items() if name not in entries
                 and not (isinstance(value, dict) and all(f"{name}.{k}" in entries for k in value))}
    unread = set()
    for entry in entries:
        section, _, key = entry.rpartition(".")
        if entry in read:  # a whole section: every key of it must be read
            whole = params.sections(entry)[entry]
            if isinstance(whole, dict):
                unread |= {f"{entry}.{k}" for k in whole if k not in read[entry]}
        elif not (section in read and isinstance(read[section], dict) and key in read[section]):
            unread.add(entry)
    return unread, untracked


def _captured(monkeypatch, stage: str) -> tuple[dict, set[str]]:
    """The params sections (as the key holds them) and upstream outputs (relative to the project) the stage's
    identity reads."""
    seen: list[tuple[dict, list]] = []

    def capture(name, params, upstream=None, raw=""):
        seen.append((params, list(upstream or [])))
        return outputs.Key(name, params, {}, {})

    monkeypatch.setattr(outputs, "input_key", capture)
    p, root = load(REPO / "params.yaml"), Path("/project")
    base, _, role = stage.partition("@")
    if base == "finetune":
        for s in STRATEGIES:
            orchestrate.identity(base, p, root, strategy=s, seed=0)
    elif role:
        orchestrate.identity(base, p, REPO, role=role)
        root = REPO
    else:
        orchestrate.identity(base, p, root)
    sections = {name: value for params, _ in seen for name, value in params.items()}
    upstream = {str(Path(u).relative_to(root)) for _, ups in seen for u in ups}
    return sections, upstream


@pytest.mark.parametrize("stage", list(_stages()))
def test_dvc_yaml_lists_what_the_stage_reads(monkeypatch, stage):
    dvc = _stages()[stage]
    sections, upstream = _captured(monkeypatch, stage)
    unread, untracked = _tracked(dvc["params"], sections, load(REPO / "params.yaml"))
    assert unread == DVC_ONLY.get(stage.partition("@")[0], set()), f"{stage}: dvc.yaml tracks {sorted(unread)}, which the stage does not read"
    assert not untracked, f"{stage}: the stage reads {sorted(untracked)}, which dvc.yaml does not track"
    data_deps = {d for d in dvc["deps"] if d.split("/")[0] in ("data", "models", "reports")}
    # one run's output (models/adapted/<strategy>/seed<k>) is inside the directory dvc.yaml names
    read = {next((d for d in data_deps if u == d or u.startswith(d + "/")), u) for u in upstream}
    assert data_deps - RECORDS.get(stage, set()) == read, f"{stage}: dvc.yaml deps {sorted(data_deps)}, the stage reads {sorted(read)}"
