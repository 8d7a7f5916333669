"""POST /finetune: validation, 202 + Location, idempotency, URL schemes."""

from __future__ import annotations

import pytest

from difffit import errors as E

BODY = {"dataset_url": "https://data.example/fungi.zip", "adapter": "fungi", "steps": 20}


def test_finetune_202_with_location(client, acme, fake_queue):
    resp = client.post("/finetune", headers=acme.headers, json=BODY)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/jobs/{job['id']}"
    assert job["state"] == "queued"
    assert job["adapter"] == "fungi"
    assert job["progress"] == {"step": 0, "total": 20, "loss": None, "eta_s": None}
    assert job["error"] is None
    assert job["request"]["dataset_url"] == BODY["dataset_url"]
    assert fake_queue.finetunes == [job["id"]]
    # The Location answers.
    assert client.get(resp.headers["location"], headers=acme.headers).json()["id"] == job["id"]


def test_idempotency_key_same_job_enqueued_once(client, acme, fake_queue):
    h = {**acme.headers, "Idempotency-Key": "k-1"}
    first = client.post("/finetune", headers=h, json=BODY)
    second = client.post("/finetune", headers=h, json=BODY)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    assert fake_queue.finetunes == [first.json()["id"]]
    # Without a key every call is a new job.
    third = client.post("/finetune", headers=acme.headers, json=BODY)
    assert third.json()["id"] != first.json()["id"]
    assert len(fake_queue.finetunes) == 2


def test_idempotency_key_different_body_is_409(client, acme, fake_queue, assert_problem):
    h = {**acme.headers, "Idempotency-Key": "k-2"}
    assert client.post("/finetune", headers=h, json=BODY).status_code == 202
    assert_problem(client.post("/finetune", headers=h, json={**BODY, "steps": 21}), 409, "conflict")
    assert len(fake_queue.finetunes) == 1


def test_idempotency_keys_are_per_tenant(client, acme, other):
    a = client.post("/finetune", headers={**acme.headers, "Idempotency-Key": "same"}, json=BODY)
    b = client.post("/finetune", headers={**other.headers, "Idempotency-Key": "same"}, json=BODY)
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


def test_steps_above_server_limit_is_422(client, acme, fake_queue, assert_problem):
    body = assert_problem(
        client.post("/finetune", headers=acme.headers, json={**BODY, "steps": 1001}),
        422,
        "invalid-request",
    )
    assert "1000" in body["detail"]
    assert fake_queue.finetunes == []


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://x.test/d.zip", "s3://bucket/d.zip", "data.zip", "https:///nohost"],
)
def test_dataset_url_schemes_refused(client, acme, fake_queue, url, assert_problem):
    resp = client.post("/finetune", headers=acme.headers, json={**BODY, "dataset_url": url})
    body = assert_problem(resp, 422, "invalid-request")
    assert "dataset_url" in body["detail"]
    assert fake_queue.finetunes == []


def test_file_url_accepted_when_allowed(settings, registry, fake_queue, acme, make_client):
    allowed = settings.model_copy(update={"allow_file_urls": True})
    with make_client(allowed, registry, fake_queue) as c:
        resp = c.post("/finetune", headers=acme.headers, json={**BODY, "dataset_url": "file:///tmp/d.zip"})
    assert resp.status_code == 202, resp.text


def test_http_url_accepted(client, acme):
    body = {**BODY, "dataset_url": "http://data.example/d.tar.gz"}
    assert client.post("/finetune", headers=acme.headers, json=body).status_code == 202


def test_unknown_field_is_422(client, acme, assert_problem):
    body = assert_problem(
        client.post("/finetune", headers=acme.headers, json={**BODY, "epochs": 3}),
        422,
        "invalid-request",
    )
    assert "body.epochs" in {e["field"] for e in body["errors"]}


def test_queue_down_is_503_and_no_job_recorded(client, acme, fake_queue, registry, assert_problem):
    # Redis is down before anything is recorded (the backlog check reads it first).
    fake_queue.down = True
    h = {**acme.headers, "Idempotency-Key": "k-down"}
    resp = client.post("/finetune", headers=h, json=BODY)
    assert_problem(resp, 503, "backend-unavailable")
    assert resp.headers["retry-after"]
    assert registry.list_jobs(acme.record.id) == []


def test_enqueue_failure_after_recording_marks_job_failed(client, acme, fake_queue, registry, assert_problem):
    # Redis goes away between the backlog check and the enqueue: the job is recorded as failed.
    def down(job_id: str) -> None:
        raise E.BackendUnavailable("redis down")

    fake_queue.enqueue_finetune = down
    h = {**acme.headers, "Idempotency-Key": "k-down"}
    assert_problem(client.post("/finetune", headers=h, json=BODY), 503, "backend-unavailable")
    (job,) = registry.list_jobs(acme.record.id)
    assert job.state == "failed"
    assert job.error_code == "backend-unavailable"
