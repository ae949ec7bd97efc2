"""Compare-and-set for registry aliases, and an append-only history of every move.

MLflow's ``set_registered_model_alias`` is last-writer-wins and keeps no history (mlflow#2169): two
pipelines that gate at the same time can both read "champion = v3", both decide to promote, and the
slower one silently overwrites the faster one's decision; afterwards nobody can say which version was
champion last Tuesday. adaptflow adds both missing pieces on top of any alias store:

* **compare-and-set** — :func:`move` changes an alias only if it still points where the caller read it
  (``expected``), checked and written under a lock, so a gate decision made against v3 never overwrites v4;
* **history** — every move is appended as a registered-model tag ``adaptflow.alias_history.<seq>`` (a
  JSON :class:`AliasMove`: alias, from, to, UTC time, reason, who, which runs), so the history travels with
  the registry itself (sqlite file or server) and :func:`holder_at` answers "which version was champion at
  time T, and why".

The lock comes from the store: a file lock next to a local database, or, for a tracking server (which
offers no atomic primitive), :class:`TagLease` — a lease written as a registered-model tag and re-read after
a settle delay. This module is pure logic over the :class:`AliasStore` protocol (``adaptflow.tracking``
implements it with MLflow), so it is tested without MLflow.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, ContextManager, Iterator, Protocol

__all__ = ["ANY", "AliasConflict", "AliasMove", "AliasStore", "TagLease", "actor", "drift", "history", "holder_at", "move", "parse_time"]

HISTORY_PREFIX = "adaptflow.alias_history."
LEASE_TAG = "adaptflow.alias_lease"
ANY = object()  # ``expected=ANY``: move unconditionally (still locked and recorded)
_REASON_MAX = 20_000  # a history entry stays well inside MLflow's registry tag limit


class AliasConflict(RuntimeError):
    """The alias no longer points where the caller read it: someone else moved it in between."""

    def __init__(self, name: str, alias: str, expected: str | None, found: str | None):
        self.name, self.alias, self.expected, self.found = name, alias, expected, found
        super().__init__(f"{name}@{alias} moved while the decision was being made: expected version {expected or 'none'}, found {found or 'none'}")


class AliasStore(Protocol):
    """The few registry operations compare-and-set needs."""

    def get_alias(self, name: str, alias: str) -> str | None: ...

    def set_alias(self, name: str, alias: str, version: str) -> None: ...

    def delete_alias(self, name: str, alias: str) -> None: ...

    def get_model_tags(self, name: str) -> dict[str, str]: ...

    def set_model_tag(self, name: str, key: str, value: str) -> None: ...

    def lock(self, name: str) -> ContextManager[None]: ...


@dataclass(frozen=True)
class AliasMove:
    """One move of one alias, as stored in the history."""

    seq: int
    alias: str
    from_version: str | None
    to_version: str | None  # None: the alias was removed
    time: float  # seconds since the epoch (UTC)
    reason: str
    actor: str  # user@host:pid
    context: dict = field(default_factory=dict)  # run ids, flow run id, gate outcome, ...

    @property
    def iso_time(self) -> str:
        return datetime.fromtimestamp(self.time, tz=timezone.utc).isoformat(timespec="seconds")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AliasMove":
        d = json.loads(text)
        return cls(**{k: d[k] for k in ("seq", "alias", "from_version", "to_version", "time", "reason", "actor")}, context=d.get("context") or {})


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def history(store: AliasStore, name: str, alias: str | None = None) -> list[AliasMove]:
    """Every recorded move of ``name``'s aliases (or of one alias), oldest first."""
    moves = []
    for key, value in store.get_model_tags(name).items():
        if key.startswith(HISTORY_PREFIX):
            try:
                moves.append(AliasMove.from_json(value))
            except (ValueError, KeyError, TypeError):
                continue  # a hand-edited tag: skip it rather than hide the rest
    moves.sort(key=lambda m: m.seq)
    return [m for m in moves if alias is None or m.alias == alias]


def holder_at(moves: list[AliasMove], alias: str, when: float) -> AliasMove | None:
    """The move that put ``alias`` where it pointed at ``when`` (None: it pointed nowhere we recorded; a move
    whose ``to_version`` is None: it had been removed)."""
    last = None
    for m in moves:
        if m.alias == alias and m.time <= when:
            last = m
    return last


def drift(moves: list[AliasMove], alias: str, current: str | None) -> str | None:
    """Why the history cannot be trusted for ``alias`` after its last recorded move, or None: the alias points
    at ``current`` (as read from the registry now), not where that move left it, so someone moved it outside
    adaptflow (MLflow's ``set_registered_model_alias``, the MLflow UI), and when and why were not recorded."""
    last = next((m for m in reversed(moves) if m.alias == alias), None)
    left = last.to_version if last else None
    if current == left:
        return None
    since = f"its last recorded move (#{last.seq}, {last.iso_time}) left it at {left or 'none'}" if last else "no move of it is recorded"
    now = f"points at version {current} now" if current is not None else "is removed now"
    return (f"{alias} {now}, but {since}: it was moved outside adaptflow "
            "(MLflow's set_registered_model_alias or UI), and when and why are not recorded")


def parse_time(text: str) -> float:
    """A date or ISO time (``2026-11-22``, ``2026-11-22T15:00``, with or without a zone; no zone = UTC) →
    epoch seconds. A bare date means the end of that day: "champion on date D" is who held it that evening."""
    t = datetime.fromisoformat(text.strip())
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    if len(text.strip()) == 10:  # a date alone
        t = t.replace(hour=23, minute=59, second=59)
    return t.timestamp()


def move(store: AliasStore, name: str, alias: str, version: str | None, *, expected: object, reason: str,
         context: dict | None = None, clock: Callable[[], float] = time.time) -> AliasMove | None:
    """Point ``name@alias`` at ``version`` (``None``: remove the alias) if it still points at ``expected``
    (``None``: nowhere; ``ANY``: no check), and append the move to the history. Returns the recorded move, or
    None when the alias already pointed at ``version`` (nothing moved, nothing recorded). Raises
    :class:`AliasConflict` otherwise.

    The alias is written first and the history entry second; if the history write fails the alias is put
    back, so the history never misses a move that stuck. An alias found where its history did not leave it
    (:func:`drift`) gets that outside move recorded first, as noticed now, so the history agrees with the
    registry from here on.
    """
    with store.lock(name):
        current = store.get_alias(name, alias)
        if expected is not ANY and current != expected:
            raise AliasConflict(name, alias, expected if isinstance(expected, str) or expected is None else str(expected), current)
        version = None if version is None else str(version)
        if current == version:
            return None
        moves = history(store, name)
        seq = (moves[-1].seq + 1) if moves else 1
        outside = drift(moves, alias, current)
        if outside:
            left = next((m.to_version for m in reversed(moves) if m.alias == alias), None)
            noticed = AliasMove(seq=seq, alias=alias, from_version=left, to_version=current, time=clock(),
                                reason=f"noticed, not made, here: {outside}", actor=f"outside adaptflow (noticed by {actor()})",
                                context={"outside": True})
            store.set_model_tag(name, f"{HISTORY_PREFIX}{noticed.seq:06d}", noticed.to_json())
            seq += 1
        entry = AliasMove(seq=seq, alias=alias, from_version=current, to_version=version,
                          time=clock(), reason=reason[:_REASON_MAX], actor=actor(), context=dict(context or {}))
        if version is None:
            store.delete_alias(name, alias)
        else:
            store.set_alias(name, alias, version)
        try:
            store.set_model_tag(name, f"{HISTORY_PREFIX}{entry.seq:06d}", entry.to_json())
        except BaseException:
            if current is None:
                store.delete_alias(name, alias)
            else:
                store.set_alias(name, alias, current)
            raise
        return entry


class TagLease:
    """A lock for a registry without one: a lease written as a registered-model tag.

    Acquire: read the lease tag; if another holder's lease has not expired, wait; otherwise write
    ``{token, expires}``, wait ``settle`` seconds, and re-read — the lease is held only if the tag still
    carries our token (a concurrent writer that wrote later wins and we retry). Release deletes the tag if
    it is still ours. A lease left by a killed process expires after ``ttl`` seconds.

    This narrows the race to one request round trip within the settle delay, which is what an HTTP API
    with last-writer-wins tags allows; :func:`move` re-reads the alias under the lease, so the worst a lost
    race can do is fail a compare-and-set, never overwrite a newer decision unseen.
    """

    def __init__(self, get_tags: Callable[[], dict[str, str]], set_tag: Callable[[str], None], delete_tag: Callable[[], None], *,
                 ttl: float = 120.0, settle: float = 0.3, timeout: float = 300.0,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        self._get, self._set, self._delete = get_tags, set_tag, delete_tag
        self.ttl, self.settle, self.timeout, self.clock, self.sleep = ttl, settle, timeout, clock, sleep
        self.token = uuid.uuid4().hex

    def _holder(self) -> tuple[str | None, float]:
        raw = self._get().get(LEASE_TAG)
        if not raw:
            return None, 0.0
        try:
            d = json.loads(raw)
            return d["token"], float(d["expires"])
        except (ValueError, KeyError, TypeError):
            return None, 0.0  # unreadable: treat as free

    def acquire(self) -> None:
        deadline = self.clock() + self.timeout
        while True:
            token, expires = self._holder()
            if token is None or token == self.token or expires <= self.clock():
                self._set(json.dumps({"token": self.token, "expires": self.clock() + self.ttl, "actor": actor()}))
                self.sleep(self.settle)
                if self._holder()[0] == self.token:
                    return
            if self.clock() > deadline:
                raise TimeoutError(f"alias lease still held by another writer after {self.timeout:.0f} s")
            self.sleep(self.settle)

    def release(self) -> None:
        if self._holder()[0] == self.token:
            self._delete()

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()
