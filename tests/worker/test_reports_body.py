"""The worker builds its reports body by hand (each report serialised once,
joined into the envelope) instead of through `wire.ReportBatch`: the bytes
it sends must still be a `ReportBatch` that carries the very same reports.
"""

from __future__ import annotations

import json
import uuid

from fastapi_bgtasks.client import reports_body
from fastapi_bgtasks.wire import ErrorInfo, Report, ReportBatch
from fastapi_bgtasks.worker.reporter import ReportQueue


def _reports() -> list[Report]:
    lease = uuid.uuid4().hex
    return [
        Report(run_id=uuid.uuid4(), lease_token=lease, state="RUNNING"),
        Report(
            run_id=uuid.uuid4(),
            lease_token=lease,
            state="COMPLETED",
            result={"text": '語 \u2028 "quoted" \\ \x00 ☃', "n": [1, 2.5, None, True]},
        ),
        Report(
            run_id=uuid.uuid4(),
            lease_token=lease,
            state="FAILED",
            error=ErrorInfo(type="ValueError", message="bad: ü", traceback="Traceback…\n"),
        ),
        Report(run_id=uuid.uuid4(), lease_token=lease, state="CANCELLED"),
        Report(run_id=uuid.uuid4(), lease_token=lease, state="RELEASED"),
    ]


def _sent(worker_id: str, reports: list[Report]) -> bytes:
    """The body the reporter posts: the queue's own bytes, one batch."""
    queue = ReportQueue()
    for report in reports:
        queue.enqueue(report)
    batch = queue.take_batch(max_body_bytes=1 << 20)
    assert [q.report for q in batch] == reports
    return reports_body(worker_id, [q.encoded for q in batch])


def test_the_hand_built_reports_body_validates_as_a_report_batch_with_the_same_reports() -> None:
    reports = _reports()
    body = _sent('host:42:"ab\\c"', reports)
    batch = ReportBatch.model_validate_json(body)
    assert batch.worker_id == 'host:42:"ab\\c"'
    assert batch.reports == reports


def test_the_hand_built_reports_body_is_the_json_of_the_report_batch() -> None:
    reports = _reports()
    body = _sent("w1", reports)
    expected = ReportBatch(worker_id="w1", reports=reports).model_dump(mode="json")
    assert json.loads(body) == expected


def test_each_report_is_sent_as_the_bytes_the_batch_budget_measured() -> None:
    reports = _reports()
    queue = ReportQueue()
    for report in reports:
        queue.enqueue(report)
    batch = queue.take_batch(max_body_bytes=1 << 20)
    body = reports_body("w1", [q.encoded for q in batch])
    assert all(q.encoded in body for q in batch)
    assert len(body) == sum(len(q.encoded) for q in batch) + len(batch) - 1 + len(
        b'{"worker_id":"w1","reports":[]}'
    )
