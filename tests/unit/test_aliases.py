"""Alias compare-and-set, history and the registry lease, against an in-memory alias store."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest

from adaptflow import aliases
from adaptflow.aliases import ANY, AliasConflict, AliasMove, TagLease, history, holder_at, move, parse_time


class MemoryStore:
    """What MLflow offers: last-writer-wins aliases and registered-model tags; plus an optional lock."""

    def __init__(self, locked: bool = True, fail_tag_writes: bool = False):
        self.aliases: dict[tuple[str, str], str] = {}
        self.tags: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock() if locked else None
        self.fail_tag_writes = fail_tag_writes

    def get_alias(self, name, alias):
        return self.aliases.get((name, alias))

    def set_alias(self, name, alias, version):
        self.aliases[(name, alias)] = version

    def delete_alias(self, name, alias):
        self.aliases.pop((name, alias), None)

    def get_model_tags(self, name):
        return dict(self.tags.get(name, {}))

    def set_model_tag(self, name, key, value):
        if self.fail_tag_writes:
            raise ConnectionError("registry went away")
        self.tags.setdefault(name, {})[key] = value

    @contextmanager
    def lock(self, name):
        if self._lock is None:
            yield
        else:
            with self._lock:
                yield


def test_first_move_records_history():
    s = MemoryStore()
    m = move(s, "m", "champion", "1", expected=None, reason="gate passed", context={"parent_run_id": "abc"}, clock=lambda: 100.0)
    assert s.get_alias("m", "champion") == "1"
    assert (m.seq, m.from_version, m.to_version, m.time) == (1, None, "1", 100.0)
    [h] = history(s, "m")
    assert h == m and h.context == {"parent_run_id": "abc"}


def test_move_only_if_alias_still_points_where_it_was_read():
    s = MemoryStore()
    move(s, "m", "champion", "1", expected=None, reason="first")
    move(s, "m", "champion", "2", expected="1", reason="better")
    with pytest.raises(AliasConflict) as exc:
        move(s, "m", "champion", "3", expected="1", reason="gated against v1, but v2 is champion now")
    assert (exc.value.expected, exc.value.found) == ("1", "2")
    assert s.get_alias("m", "champion") == "2"
    assert [(h.from_version, h.to_version) for h in history(s, "m")] == [(None, "1"), ("1", "2")]


def test_expected_none_fails_when_alias_exists():
    s = MemoryStore()
    move(s, "m", "champion", "1", expected=None, reason="first")
    with pytest.raises(AliasConflict):
        move(s, "m", "champion", "2", expected=None, reason="thought there was none")


def test_removing_an_alias_is_a_recorded_move():
    s = MemoryStore()
    move(s, "m", "challenger", "2", expected=None, reason="held", clock=lambda: 100.0)
    with pytest.raises(AliasConflict):
        move(s, "m", "challenger", None, expected="1", reason="promoted")
    removed = move(s, "m", "challenger", None, expected="2", reason="promoted", clock=lambda: 200.0)
    assert s.get_alias("m", "challenger") is None and (removed.from_version, removed.to_version) == ("2", None)
    assert move(s, "m", "challenger", None, expected=None, reason="again") is None  # already nowhere: nothing recorded
    assert [AliasMove.from_json(h.to_json()).to_version for h in history(s, "m")] == ["2", None]
    assert holder_at(history(s, "m"), "challenger", 150.0).to_version == "2"
    assert holder_at(history(s, "m"), "challenger", 250.0).to_version is None
    failing = MemoryStore()
    move(failing, "m", "challenger", "2", expected=None, reason="held")
    failing.fail_tag_writes = True
    with pytest.raises(ConnectionError):
        move(failing, "m", "challenger", None, expected="2", reason="promoted")
    assert failing.get_alias("m", "challenger") == "2"  # the history could not say so: put back


def test_any_moves_unconditionally_but_records():
    s = MemoryStore()
    move(s, "m", "challenger", "1", expected=ANY, reason="rejected")
    move(s, "m", "challenger", "2", expected=ANY, reason="rejected too")
    assert [h.to_version for h in history(s, "m", "challenger")] == ["1", "2"]


def test_no_op_move_is_not_recorded():
    s = MemoryStore()
    move(s, "m", "champion", "1", expected=None, reason="first")
    assert move(s, "m", "champion", "1", expected="1", reason="again") is None
    assert len(history(s, "m")) == 1


def test_history_filters_alias_and_orders_by_sequence():
    s = MemoryStore()
    move(s, "m", "champion", "1", expected=None, reason="a")
    move(s, "m", "challenger", "2", expected=ANY, reason="b")
    move(s, "m", "champion", "3", expected="1", reason="c")
    s.tags["m"]["adaptflow.alias_history.999999"] = "not json"  # hand-edited: skipped, the rest still read
    s.tags["m"]["unrelated"] = "x"
    assert [h.seq for h in history(s, "m")] == [1, 2, 3]
    assert [h.to_version for h in history(s, "m", "champion")] == ["1", "3"]


def test_failed_history_write_puts_the_alias_back():
    s = MemoryStore()
    move(s, "m", "champion", "1", expected=None, reason="first")
    s.fail_tag_writes = True
    with pytest.raises(ConnectionError):
        move(s, "m", "champion", "2", expected="1", reason="lost")
    assert s.get_alias("m", "champion") == "1"
    s2 = MemoryStore(fail_tag_writes=True)
    with pytest.raises(ConnectionError):
        move(s2, "m", "champion", "1", expected=None, reason="lost")
    assert s2.get_alias("m", "champion") is None


def test_holder_at_answers_which_version_when():
    s = MemoryStore()
    for t, (v, exp) in zip((10.0, 20.0, 30.0), (("1", None), ("2", "1"), ("3", "2"))):
        move(s, "m", "champion", v, expected=exp, reason=f"promote {v}", clock=lambda t=t: t)
    move(s, "m", "challenger", "4", expected=ANY, reason="rejected", clock=lambda: 25.0)
    h = history(s, "m")
    assert holder_at(h, "champion", 5.0) is None
    assert holder_at(h, "champion", 10.0).to_version == "1"
    assert holder_at(h, "champion", 25.0).to_version == "2"
    assert holder_at(h, "champion", 99.0).reason == "promote 3"
    assert holder_at(h, "challenger", 26.0).to_version == "4"


def test_alias_move_json_round_trip():
    m = AliasMove(3, "champion", "1", "2", 1.5, "why", "me@host:1", {"run": "r"})
    assert AliasMove.from_json(m.to_json()) == m
    assert m.iso_time.startswith("1970-01-01T00:00:01")


def test_parse_time():
    assert parse_time("1970-01-02") == 86400 + 86399  # a bare date: the end of that day, UTC
    assert parse_time("1970-01-01T01:00") == 3600
    assert parse_time("1970-01-01T01:00+01:00") == 0
    with pytest.raises(ValueError):
        parse_time("yesterday")


def _race(store: MemoryStore, n: int = 8) -> tuple[list[str], list[AliasConflict]]:
    """n writers read the champion, then all try to promote their own version against what they read."""
    move(store, "m", "champion", "0", expected=None, reason="seed")
    barrier = threading.Barrier(n)
    won, lost = [], []

    def writer(i: int) -> None:
        seen = store.get_alias("m", "champion")
        barrier.wait()  # everyone has read v0 before anyone writes
        try:
            move(store, "m", "champion", str(i + 1), expected=seen, reason=f"writer {i}")
            won.append(str(i + 1))
        except AliasConflict as exc:
            lost.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, lost


def test_concurrent_gates_exactly_one_wins_and_history_is_complete():
    store = MemoryStore(locked=True)
    won, lost = _race(store)
    assert len(won) == 1 and len(lost) == 7
    assert store.get_alias("m", "champion") == won[0]
    assert [(h.from_version, h.to_version) for h in history(store, "m")] == [(None, "0"), ("0", won[0])]


# --- the registry lease ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt


def _lease(tags: dict, clock: FakeClock, **kw) -> TagLease:
    return TagLease(lambda: dict(tags), lambda v: tags.__setitem__(aliases.LEASE_TAG, v), lambda: tags.pop(aliases.LEASE_TAG, None),
                    clock=clock, sleep=clock.sleep, **kw)


def test_lease_excludes_a_second_holder_until_released():
    tags, clock = {}, FakeClock()
    a, b = _lease(tags, clock, timeout=5), _lease(tags, clock, timeout=5)
    a.acquire()
    with pytest.raises(TimeoutError):
        b.acquire()
    a.release()
    assert aliases.LEASE_TAG not in tags
    b.acquire()
    assert b.token in tags[aliases.LEASE_TAG]


def test_expired_lease_of_a_dead_writer_is_taken_over():
    tags, clock = {}, FakeClock()
    dead = _lease(tags, clock, ttl=10)
    dead.acquire()  # never released
    clock.t += 11
    alive = _lease(tags, clock, ttl=10, timeout=1)
    alive.acquire()
    assert alive.token in tags[aliases.LEASE_TAG]
    dead.release()  # no longer its lease: leaves the new holder alone
    assert alive.token in tags[aliases.LEASE_TAG]


def test_lease_lost_to_a_later_writer_is_retried():
    tags, clock = {}, FakeClock()
    other = _lease(tags, clock)
    lease = _lease(tags, clock, timeout=100, ttl=30)
    calls = {"n": 0}
    real_sleep = clock.sleep

    def sleep(dt: float) -> None:
        # during our first settle delay another writer overwrites the tag (last writer wins)
        calls["n"] += 1
        if calls["n"] == 1:
            tags[aliases.LEASE_TAG] = '{"token": "%s", "expires": %f}' % (other.token, clock.t + 5)
        real_sleep(dt)

    lease.sleep = sleep
    lease.acquire()  # waits the other's 5 s lease out, then holds it
    assert lease.token in tags[aliases.LEASE_TAG] and clock.t > 1005


def test_an_alias_moved_outside_adaptflow_is_said_and_recorded_at_the_next_move():
    s = MemoryStore()
    move(s, "m", "champion", "1", expected=None, reason="gate passed", clock=lambda: 100.0)
    move(s, "m", "champion", "2", expected="1", reason="gate passed", clock=lambda: 200.0)
    assert aliases.drift(history(s, "m"), "champion", "2") is None
    s.set_alias("m", "champion", "1")  # MLflow's set_registered_model_alias: no history
    why = aliases.drift(history(s, "m"), "champion", "1")
    assert why.startswith("champion points at version 1 now, but its last recorded move (#2, 1970-01-01T00:03:20+00:00) left it at 2")
    assert aliases.drift([], "champion", "1").startswith("champion points at version 1 now, but no move of it is recorded")
    assert aliases.drift(history(s, "m"), "champion", None).startswith("champion is removed now, but its last recorded move (#2")
    move(s, "m", "champion", "3", expected="1", reason="gate passed", clock=lambda: 300.0)
    noticed, made = history(s, "m")[-2:]
    assert (noticed.seq, noticed.from_version, noticed.to_version, noticed.time) == (3, "2", "1", 300.0)
    assert noticed.actor.startswith("outside adaptflow (noticed by ") and noticed.context == {"outside": True}
    assert (made.seq, made.from_version, made.to_version) == (4, "1", "3")
    assert aliases.drift(history(s, "m"), "champion", "3") is None
    assert holder_at(history(s, "m"), "champion", 250.0).to_version == "2"  # before it was noticed: what was recorded
