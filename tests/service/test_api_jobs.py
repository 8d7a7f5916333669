"""GET /jobs, GET /jobs/{id}, POST /jobs/{id}/cancel, GET /jobs/{id}/events."""

from __future__ import annotations

import json

BODY = {"dataset_url": "https://data.example/fungi.zip", "adapter": "fungi", "steps": 10}


def _new_job(client, tenant) -> dict:
    resp = client.post("/finetune", headers=tenant.headers, json=BODY)
    assert resp.status_code == 202, resp.text
    return resp.json()


def test_get_job_shape(client, acme, registry):
    job = _new_job(client, acme)
    registry.update_job(job["id"], state="running", step=4, loss=0.5, eta_s=12.0)
    got = client.get(f"/jobs/{job['id']}", headers=acme.headers).json()
    assert got["state"] == "running"
    assert got["progress"] == {"step": 4, "total": 10, "loss": 0.5, "eta_s": 12.0}
    assert got["started_at"] is not None and got["finished_at"] is None
    assert got["adapter_version"] is None


def test_failed_job_has_error(client, acme, registry):
    job = _new_job(client, acme)
    registry.update_job(
        job["id"], state="failed", error_code="invalid-dataset", error_message="no class folders"
    )
    got = client.get(f"/jobs/{job['id']}", headers=acme.headers).json()
    assert got["error"] == {"code": "invalid-dataset", "message": "no class folders"}
    assert got["finished_at"] is not None


def test_list_jobs_newest_first_and_filter(client, acme, registry):
    a = _new_job(client, acme)
    b = _new_job(client, acme)
    registry.update_job(a["id"], state="running")
    jobs = client.get("/jobs", headers=acme.headers).json()["jobs"]
    assert [j["id"] for j in jobs] == [b["id"], a["id"]]
    running = client.get("/jobs?state=running", headers=acme.headers).json()["jobs"]
    assert [j["id"] for j in running] == [a["id"]]
    assert len(client.get("/jobs?limit=1", headers=acme.headers).json()["jobs"]) == 1


def test_list_jobs_bad_state_is_422(client, acme, assert_problem):
    assert_problem(client.get("/jobs?state=bogus", headers=acme.headers), 422, "invalid-request")


def test_jobs_are_tenant_isolated(client, acme, other, assert_problem):
    job = _new_job(client, acme)
    assert_problem(client.get(f"/jobs/{job['id']}", headers=other.headers), 404, "job-not-found")
    assert_problem(client.post(f"/jobs/{job['id']}/cancel", headers=other.headers), 404, "job-not-found")
    assert_problem(client.get(f"/jobs/{job['id']}/events", headers=other.headers), 404, "job-not-found")
    assert client.get("/jobs", headers=other.headers).json()["jobs"] == []


def test_unknown_job_is_404(client, acme, assert_problem):
    assert_problem(client.get("/jobs/nope", headers=acme.headers), 404, "job-not-found")


def test_cancel_queued_job_is_immediate(client, acme):
    job = _new_job(client, acme)
    resp = client.post(f"/jobs/{job['id']}/cancel", headers=acme.headers)
    assert resp.status_code == 200
    assert resp.json()["state"] == "cancelled"


def test_cancel_running_job_is_202(client, acme, registry):
    job = _new_job(client, acme)
    registry.update_job(job["id"], state="running")
    resp = client.post(f"/jobs/{job['id']}/cancel", headers=acme.headers)
    assert resp.status_code == 202
    assert resp.json()["state"] == "running"
    assert resp.json()["cancel_requested"] is True


def _parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        ev: dict = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            ev[key] = value[1:] if value.startswith(" ") else value
        if ev:
            events.append(ev)
    return events


def test_events_replay_then_end(client, acme, registry):
    job = _new_job(client, acme)
    registry.add_job_event(job["id"], "state", {"state": "running"})
    registry.add_job_event(job["id"], "progress", {"step": 5, "loss": 0.25})
    registry.update_job(job["id"], state="succeeded", step=10, adapter_version=1)
    with client.stream("GET", f"/jobs/{job['id']}/events", headers=acme.headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = "".join(resp.iter_text())
    events = _parse_sse(text)
    assert [e["event"] for e in events] == ["state", "progress", "end"]
    assert json.loads(events[1]["data"]) == {"step": 5, "loss": 0.25}
    assert int(events[1]["id"]) > int(events[0]["id"])
    end = json.loads(events[2]["data"])
    assert end["state"] == "succeeded" and end["adapter_version"] == 1


def test_events_resume_after_last_event_id(client, acme, registry):
    job = _new_job(client, acme)
    first = registry.add_job_event(job["id"], "state", {"state": "running"})
    registry.add_job_event(job["id"], "progress", {"step": 1})
    registry.request_cancel(acme.record.id, job["id"])
    headers = {**acme.headers, "Last-Event-ID": str(first.id)}
    with client.stream("GET", f"/jobs/{job['id']}/events", headers=headers) as resp:
        events = _parse_sse("".join(resp.iter_text()))
    assert [e["event"] for e in events] == ["progress", "end"]
