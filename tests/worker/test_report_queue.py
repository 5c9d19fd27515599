"""The report queue without I/O: what a batch takes, how a refusal for size
shrinks batches and replaces the one report that can never be accepted, and
what the worker's frozen configuration accepts."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from fastapi_bgtasks.errors import ConfigurationError, PayloadTooLarge
from fastapi_bgtasks.states import Outcome
from fastapi_bgtasks.wire import Report
from fastapi_bgtasks.worker.config import WorkerConfig
from fastapi_bgtasks.worker.reporter import MAX_BATCH, ReportQueue


def _completed(result: object = 1) -> Report:
    return Report(run_id=uuid.uuid4(), lease_token="t", state="COMPLETED", result=result)


def test_a_batch_takes_the_oldest_reports_that_fit_the_body() -> None:
    queue = ReportQueue()
    reports = [_completed("x" * 300) for _ in range(10)]
    for report in reports:
        queue.enqueue(report)
    batch = queue.take_batch(max_body_bytes=2000)
    assert [q.report for q in batch] == reports[: len(batch)]
    assert 1 <= len(batch) < 10
    assert sum(len(q.encoded) + 1 for q in batch) <= 2000 * 0.9 - 200


def test_a_report_larger_than_the_body_still_goes_alone() -> None:
    queue = ReportQueue()
    queue.enqueue(_completed("x" * 5000))
    assert len(queue.take_batch(max_body_bytes=1000)) == 1


def test_settled_reports_leave_the_queue_and_hear_their_outcomes() -> None:
    heard: list[Outcome] = []
    queue = ReportQueue()
    queue.enqueue(_completed(), heard.append)
    queue.enqueue(_completed(), heard.append)
    queue.take_batch(max_body_bytes=1 << 20)
    queue.settle([Outcome.ACCEPTED, Outcome.STALE])
    assert (queue.queued, queue.in_flight, heard) == ((), 0, [Outcome.ACCEPTED, Outcome.STALE])


def test_unsent_reports_stay_queued_first() -> None:
    queue = ReportQueue()
    first, second = _completed(), _completed()
    queue.enqueue(first)
    queue.take_batch(max_body_bytes=1 << 20)
    queue.enqueue(second)
    queue.unsend()
    assert [q.report for q in queue.queued] == [first, second]
    assert queue.in_flight == 0


def test_a_batch_refused_for_size_halves_the_next_batches_then_they_grow_back() -> None:
    queue = ReportQueue()
    for _ in range(8):
        queue.enqueue(_completed())
    queue.refused_too_large(len(queue.take_batch(max_body_bytes=1 << 20)), PayloadTooLarge())
    assert len(queue.take_batch(max_body_bytes=1 << 20)) == 4
    queue.settle([Outcome.ACCEPTED] * 4)
    assert queue.batch_cap == 8
    for _ in range(3 * MAX_BATCH):
        queue.enqueue(_completed())
    for _ in range(10):
        queue.take_batch(max_body_bytes=1 << 30)
        queue.settle([Outcome.ACCEPTED] * queue.in_flight)
    assert queue.batch_cap == MAX_BATCH


def test_a_lone_report_refused_for_size_becomes_a_failed_report_saying_why() -> None:
    queue = ReportQueue()
    original = _completed("x" * 100)
    queue.enqueue(original)
    queue.take_batch(max_body_bytes=1 << 20)
    queue.refused_too_large(1, PayloadTooLarge("too big"))
    [replacement] = queue.queued
    assert (replacement.report.run_id, replacement.report.state) == (original.run_id, "FAILED")
    assert replacement.report.result is None
    assert replacement.report.error is not None
    assert replacement.report.error.type == "ResultTooLarge"
    assert "(413): too big" in replacement.report.error.message


def test_a_replacement_refused_again_is_dropped_as_stale() -> None:
    heard: list[Outcome] = []
    queue = ReportQueue()
    queue.enqueue(_completed(), heard.append)
    for _ in range(2):
        queue.take_batch(max_body_bytes=1 << 20)
        queue.refused_too_large(1, PayloadTooLarge())
    assert (queue.queued, heard) == ((), [Outcome.STALE])


def test_the_worker_config_is_frozen_and_validated_once() -> None:
    config = WorkerConfig(url="http://127.0.0.1:1/tasks", concurrency=3)
    assert (config.prefetch, config.slots) == (None, 15)  # 3 + 4 x 3 ready
    assert WorkerConfig(url="http://h/tasks", concurrency=3, prefetch=0).slots == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.concurrency = 4  # type: ignore[misc]
    for bad in ({"concurrency": 0}, {"prefetch": -1}, {"url": "ftp://h/tasks"}):
        with pytest.raises(ConfigurationError):
            WorkerConfig(**{"url": "http://h/tasks", **bad})  # type: ignore[arg-type]
