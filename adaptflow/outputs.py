"""Stage outputs that are either complete or absent.

A stage writes into a temporary sibling directory, then promotes it with a rename. The manifest inside
(``_manifest.json``: the stage, its input key and a digest of every file) is written before the rename,
so a directory at the final path with a manifest is always whole, and a stage killed midway leaves only
a temporary directory that nothing reads. The input key — the stage's params sections, the digests of
its upstream outputs and the code version — lets a re-run with nothing changed skip the work.

Temporary names carry the writer's PID (``.NAME.tmp-PID``, ``.NAME.old-PID``): a run killed with SIGKILL
leaves them behind, and the next writer of the same output (or :func:`remove_stale` over a whole tree)
deletes those whose process is gone — never a live writer's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
_PKG = Path(__file__).resolve().parent
# ``.NAME.tmp-PID`` (being written) and ``.NAME.old-PID`` (the previous output, during the swap).
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


# Modules that decide how stages are run, never what they compute: editing them re-runs nothing.
_ORCHESTRATION_ONLY = ("cli.py", "orchestrate.py")


def code_version() -> str:
    """Hash of the core's source: a code change invalidates every stage's key."""
    h = hashlib.sha256()
    for p in sorted(_PKG.rglob("*.py")):
        if str(p.relative_to(_PKG)) in _ORCHESTRATION_ONLY:
            continue
        h.update(str(p.relative_to(_PKG)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_digest(value: object) -> str:
    """A short content hash of a JSON-able value (key order does not count)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class Key(str):
    """A stage's input key — the string manifests and Prefect's cache compare — that also remembers what it
    was computed from: the params sections' values, each upstream output with its digest, and the raw
    data's fingerprint by the stage that read it (``{"ingest:target": fingerprint}``). The manifest records
    them, so a later stage run on its own can tell whether this output still follows from the current
    params and data (:func:`inconsistent_upstream`)."""

    params: dict
    upstream: dict[Path, str]
    raw: dict[str, str]

    def __new__(cls, value: str, params: dict, upstream: dict[Path, str], raw: dict[str, str] | None = None) -> "Key":
        key = super().__new__(cls, value)
        key.params, key.upstream, key.raw = params, upstream, raw or {}
        return key

    def __reduce__(self):  # pickles (Prefect may) as what it is
        return (Key, (str(self), self.params, self.upstream, self.raw))


def input_key(stage: str, params: dict, upstream: list[Path] | None = None, raw: str = "") -> Key:
    """The key of ``stage`` given its params sections (:meth:`Params.sections`), its upstream outputs and
    ``raw``, a fingerprint of raw data it reads. Raises :class:`MissingOutput` if an upstream is incomplete."""
    digests = {Path(p): digest(p) for p in upstream or []}
    parts = [stage, json_digest(params) + raw, code_version()] + list(digests.values())
    value = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return Key(value, params, digests, {stage: raw} if raw else {})


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


_ABSENT = object()


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (as params' paths are written)."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


CHANGED_SINCE = " that has changed since"  # ends the problem for changed raw data ("X was made from raw data" + this)


def inconsistent_upstream(key: Key, sections: Callable[..., dict], raw_now: Callable[[str], str] | None = None) -> list[str]:
    """Why the outputs ``key`` was computed from would not be made as they are from the current params and data.

    Walks up from each upstream output through the ones it was made from, and reports an output made with
    a params value other than ``sections`` (:meth:`Params.sections`) gives now, made from an output that
    has changed since, or made from raw data whose fingerprint ``raw_now(stage)`` (the stage that read it,
    e.g. ``ingest:target``) now differs. Empty when all follow. The code version is not compared (DVC and
    ``adaptflow run`` track it); outputs whose manifest has no record are skipped.
    """
    problems: list[str] = []
    seen: set[Path] = set()
    todo = [Path(p).resolve() for p in key.upstream]
    while todo:
        d = todo.pop(0)
        if d in seen:
            continue
        seen.add(d)
        record = (read_manifest(d) or {}).get("inputs")
        if record is None:
            continue
        now: dict[str, object] = {}
        for name in record["params"]:
            try:
                now.update(_flat(sections(name)))
            except AttributeError:  # a section the params no longer have: each of its keys shows as absent
                pass
        differ = [f"{_shown(d)} was made with {dotted}={json.dumps(then)}, params now give "
                  + ("absent" if now.get(dotted, _ABSENT) is _ABSENT else json.dumps(now[dotted]))
                  for dotted, then in _flat(record["params"]).items() if now.get(dotted, _ABSENT) != then]
        problems += differ
        # the raw data is compared only under the same params: with another domain (or data path) it is other data
        changed = [stage for stage, then in record.get("raw", {}).items() if not differ and raw_now is not None and raw_now(stage) != then]
        if changed:
            what = "a weights file" if changed == ["pretrain"] else "raw data"  # pretrain's raw input is what it starts from
            problems.append(f"{_shown(d)} was made from {what}{CHANGED_SINCE}")
        for rel, then in record["upstream"].items():
            up = (d / rel).resolve()
            m = read_manifest(up)
            if m is None:
                problems.append(f"{_shown(d)} was made from {_shown(up)}, which is missing or incomplete now")
                continue
            if m["digest"] != then:
                problems.append(f"{_shown(d)} was made from {_shown(up)} as it was before; that output has changed since")
            todo.append(up)
    return problems


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class MissingOutput(FileNotFoundError):
    """A stage's input is not there, or not complete: the stage that writes it has to run first."""


def digest(directory: Path) -> str:
    """The content digest of a complete output; raises :class:`MissingOutput` if it is missing or incomplete."""
    m = read_manifest(directory)
    if m is None:
        raise MissingOutput(f"{directory}: no complete stage output here (run the upstream stage first)")
    return m["digest"]


def is_current(directory: Path, key: str) -> bool:
    m = read_manifest(directory)
    return m is not None and m.get("key") == key


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a killed child its parent has not reaped yet still answers kill(0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def remove_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Delete the temporary siblings in ``parent`` (of ``name`` only, if given) left by dead writers.

    A ``.NAME.old-PID`` whose ``NAME`` is missing is the last complete output of a writer killed between the
    two renames of the swap: it is put back rather than deleted. Returns the paths removed or restored.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    done = []
    for p in sorted(parent.iterdir()):
        m = _TEMP.match(p.name)
        if not m or (name is not None and m["name"] != name) or pid_alive(int(m["pid"])):
            continue
        final = parent / m["name"]
        if m["kind"] == "old" and not final.exists() and read_manifest(p) is not None:
            p.rename(final)
            log.warning("restored %s from %s (its writer, pid %s, died mid-swap)", final, p.name, m["pid"])
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s: left by pid %s, which is no longer running", p, m["pid"])
        else:
            p.unlink(missing_ok=True)
            log.info("removed %s: left by pid %s, which is no longer running", p, m["pid"])
        done.append(p)
    return done


def remove_stale_tree(top: Path) -> list[Path]:
    """:func:`remove_stale` in ``top`` and every directory below it (stage output trees are small)."""
    top = Path(top)
    if not top.is_dir():
        return []
    done = []
    for d in [top] + sorted(p for p in top.rglob("*") if p.is_dir() and not _TEMP.match(p.name)):
        if d.is_dir():  # an earlier removal may have taken it
            done += remove_stale(d)
    return done


@contextmanager
def atomic_dir(directory: Path, stage: str, key: str) -> Iterator[Path]:
    """Yield a temporary directory; on success write its manifest and promote it to ``directory``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(directory.parent, directory.name)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        files = {
            str(p.relative_to(tmp)): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST
        }
        content = json_digest(files)
        # nothing time- or machine-dependent: the same inputs and files give the same manifest bytes, so DVC
        # sees a re-run that changed nothing as unchanged and re-runs nothing after it
        manifest = {"stage": stage, "key": str(key), "digest": content, "files": files}
        if isinstance(key, Key):
            here = directory.resolve()
            manifest["inputs"] = {"params": key.params,
                                  "upstream": {os.path.relpath(p.resolve(), here): d for p, d in key.upstream.items()}}
            if key.raw:
                manifest["inputs"]["raw"] = key.raw
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        old = directory.parent / f".{directory.name}.old-{os.getpid()}"
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
