"""After a failed stage the flow stops queued tasks and waits for running ones before leaving the lock."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from prefect.futures import PrefectConcurrentFuture

from flows.transfer_pipeline import settle


def test_settle_waits_for_the_running_task_and_cancels_the_queued_one():
    log: list[str] = []
    started = threading.Event()

    def slow():
        started.set()
        time.sleep(0.5)
        log.append("running task finished")

    with ThreadPoolExecutor(max_workers=1) as pool:  # the sequential runner: one at a time, the rest queued
        running = PrefectConcurrentFuture(uuid.uuid4(), pool.submit(slow))
        queued = PrefectConcurrentFuture(uuid.uuid4(), pool.submit(log.append, "queued task ran"))
        failed = PrefectConcurrentFuture(uuid.uuid4(), pool.submit(lambda: 1 / 0))
        assert started.wait(5)
        settle([running, queued, failed])
        assert log == ["running task finished"]  # done before settle returned, not after
        assert queued.wrapped_future.cancelled() and failed.wrapped_future.cancelled()


def test_settle_returns_for_tasks_that_already_failed():
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [PrefectConcurrentFuture(uuid.uuid4(), pool.submit(lambda: 1 / 0)) for _ in range(2)]
        time.sleep(0.1)
        settle(futures)
        assert all(f.wrapped_future.done() for f in futures)


def test_settle_stops_a_stage_training_in_several_processes():
    """A task waiting on launched training processes (orchestrate.launch_training) ends once settle has stopped
    them: the flow leaves the lock with nothing of that stage still running."""
    import subprocess
    import sys

    from adaptflow import orchestrate

    # a stand-in for torchrun: it starts a worker in a session of its own (as torchrun does) and, on SIGTERM,
    # stops it and exits (as torchrun does)
    import psutil

    code = ("import signal, subprocess, sys, time\n"
            "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
            "signal.signal(signal.SIGTERM, lambda *a: (w.terminate(), w.wait(), sys.exit(1)))\n"
            "print(w.pid, flush=True)\n"  # (after the handler: a SIGTERM before it would orphan the worker)
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    worker = psutil.Process(int(proc.stdout.readline()))
    orchestrate._LAUNCHES.add(proc)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = PrefectConcurrentFuture(uuid.uuid4(), pool.submit(proc.wait))
            t0 = time.monotonic()
            settle([waiting])
            assert waiting.wrapped_future.result() != 0 and time.monotonic() - t0 < 30
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    finally:
        orchestrate._LAUNCHES.discard(proc)
        orchestrate.allow_launches()
        for p in (proc, worker):
            with contextlib.suppress(Exception):
                p.kill()


def test_settle_ends_a_stage_training_in_this_process_at_its_next_step():
    """The sequential and threads runners run a stage in a thread, which nothing can interrupt from outside:
    training checks between steps, so a run that fails, is interrupted or cancelled ends in a step's time,
    not the stage's; afterwards stages run again."""
    import contextvars

    from adaptflow import orchestrate, stopping

    steps: list[int] = []

    def training():
        for step in range(10_000):  # ~100 s if nothing stopped it
            stopping.check("pretrain")
            steps.append(step)
            time.sleep(0.01)

    orchestrate.allow_launches()  # the run begins (its own stop request), as the flow does
    with ThreadPoolExecutor(max_workers=1) as pool:  # Prefect's thread runner: the task runs in a copy of the context
        running = PrefectConcurrentFuture(uuid.uuid4(), pool.submit(contextvars.copy_context().run, training))
        time.sleep(0.1)
        t0 = time.monotonic()
        settle([running])
        assert time.monotonic() - t0 < 5
        try:
            running.wrapped_future.result()
            raise AssertionError("the stage ran to its end")
        except stopping.Stopped as exc:
            assert str(exc) == "pretrain: stopped, the run is stopping"
    assert 0 < len(steps) < 10_000 and not stopping.requested()
    stopping.check("the next stage")  # no longer stopping


def test_one_run_stopping_stops_no_stage_of_another_run_in_the_process():
    """Two flow runs in one process (threads, a notebook): each has its own stop request."""
    import contextvars

    from adaptflow import orchestrate, stopping

    def a_run(stop: bool, out: list) -> None:
        orchestrate.allow_launches()  # the run begins
        ctx = contextvars.copy_context()  # what its tasks see
        if stop:
            orchestrate.stop_launches()
        time.sleep(0.2)
        out.append(ctx.run(stopping.requested))

    results: dict[bool, list] = {True: [], False: []}
    runs = [threading.Thread(target=contextvars.copy_context().run, args=(a_run, stop, results[stop])) for stop in (True, False)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert results == {True: [True], False: [False]}
