"""After a failed stage the flow stops queued tasks and waits for running ones before leaving the lock."""

from __future__ import annotations

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
