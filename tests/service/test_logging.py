"""Structured logs: JSON lines, request ids from the middleware, job ids in job routes."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator

import pytest

from difffit.logging_setup import (
    ContextFilter,
    JsonFormatter,
    bind_log_context,
    configure_logging,
    current_request_id,
    log_context,
)

BODY = {"dataset_url": "https://data.example/fungi.zip", "adapter": "fungi", "steps": 20}


@pytest.fixture
def lines() -> Iterator[list[dict]]:
    """Every difffit.* record of the test, formatted by the JSON formatter and parsed back."""
    out: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.append(json.loads(self.format(record)))

    handler = Collect(level=logging.DEBUG)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("difffit")
    logger.addHandler(handler)
    try:
        yield out
    finally:
        logger.removeHandler(handler)


def test_json_line_fields_and_context():
    log = logging.getLogger("difffit.test")
    record = log.makeRecord("difffit.test", logging.WARNING, __file__, 1, "hello %s", ("x",), None)
    with log_context(request_id="r-1"):
        bind_log_context(job_id="j-1")
        assert current_request_id() == "r-1"
        ContextFilter().filter(record)
        line = JsonFormatter().format(record)
    assert "\n" not in line
    got = json.loads(line)
    assert got["level"] == "WARNING" and got["logger"] == "difffit.test" and got["msg"] == "hello x"
    assert got["request_id"] == "r-1" and got["job_id"] == "j-1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", got["ts"])
    assert current_request_id() is None  # the context ended with the block


def test_exceptions_and_odd_extras_stay_one_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info(), extra={"obj": object()}
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    got = json.loads(line)
    assert "ValueError: boom" in got["exc"] and got["obj"].startswith("<object")
    assert "request_id" not in got  # absent, not null, outside a request


def test_configure_logging_is_idempotent():
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        configure_logging("debug")
        handler = configure_logging("info", json_logs=False)
        mine = [h for h in root.handlers if h.get_name() == handler.get_name()]
        assert mine == [handler] and root.level == logging.INFO
        assert not isinstance(handler.formatter, JsonFormatter)
    finally:
        for h in list(root.handlers):
            if h not in before[0]:
                root.removeHandler(h)
        root.setLevel(before[1])


def test_request_id_is_echoed_and_on_every_line(client, acme, lines):
    resp = client.post("/finetune", headers={**acme.headers, "X-Request-ID": "abc-123"}, json=BODY)
    assert resp.status_code == 202 and resp.headers["x-request-id"] == "abc-123"
    job_id = resp.json()["id"]
    assert lines, "the request wrote no log line"
    assert all(line.get("request_id") == "abc-123" for line in lines), lines
    accepted = [line for line in lines if "accepted" in line["msg"]]
    assert accepted and accepted[0]["job_id"] == job_id
    (access,) = [line for line in lines if line["logger"] == "difffit.access"]
    assert access["status"] == 202 and access["method"] == "POST" and access["path"] == "/finetune"
    assert access["job_id"] == job_id  # bound in the route's thread, seen by the middleware


def test_missing_or_unsafe_request_id_is_replaced(client, lines):
    made = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    forged = client.get("/healthz", headers={"X-Request-ID": 'x" level=ERROR ' + "y" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["x-request-id"])
    assert client.get("/healthz").headers["x-request-id"] != made  # one per request


def test_job_routes_tag_job_id(client, acme, registry, lines):
    job, _ = registry.create_job(acme.record.id, "fungi", request={}, total_steps=5)
    client.get(f"/jobs/{job.id}", headers={**acme.headers, "X-Request-ID": "r-jobs"})
    (access,) = [line for line in lines if line["logger"] == "difffit.access"]
    assert access["job_id"] == job.id and access["request_id"] == "r-jobs"


def test_generate_tags_task_id_and_header(client, acme, lines):
    resp = client.post("/generate?class=0", headers=acme.headers)
    task_id = resp.headers["x-task-id"]
    assert task_id.startswith(f"{acme.record.id}-") and resp.headers["x-request-id"] != task_id
    (access,) = [line for line in lines if line["logger"] == "difffit.access"]
    assert access["task_id"] == task_id


def test_a_crash_is_logged_with_its_request_id_and_answered_500(
    settings, registry, fake_queue, acme, make_client, lines, assert_problem
):
    def boom(job_id: str) -> None:
        raise RuntimeError("secret detail")

    fake_queue.enqueue_finetune = boom
    with make_client(settings, registry, fake_queue) as c:
        resp = c.post("/finetune", headers={**acme.headers, "X-Request-ID": "r-crash"}, json=BODY)
    assert_problem(resp, 500, "internal")
    assert resp.headers["x-request-id"] == "r-crash" and "secret" not in resp.text
    (crash,) = [line for line in lines if line["level"] == "ERROR"]
    assert crash["request_id"] == "r-crash" and "RuntimeError: secret detail" in crash["exc"]
