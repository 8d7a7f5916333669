"""Authentication and the problem+json error contract."""

from __future__ import annotations

import json

import pytest

from difffit import errors as E
from service.errors import domain_error_response


def test_missing_key_is_401_problem(client, assert_problem):
    resp = client.get("/adapters")
    body = assert_problem(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"] == "Bearer"
    assert "Bearer" in body["detail"]


def test_bad_key_is_401(client, acme, assert_problem):
    assert_problem(client.get("/adapters", headers={"Authorization": "Bearer nope"}), 401, "unauthorized")
    basic = {"Authorization": f"Basic {acme.key}"}
    assert_problem(client.get("/adapters", headers=basic), 401, "unauthorized")


def test_valid_key_passes(client, acme):
    assert client.get("/adapters", headers=acme.headers).status_code == 200


def test_revoked_key_is_401(client, registry, acme, assert_problem):
    registry.revoke_key(acme.key)
    assert_problem(client.get("/jobs", headers=acme.headers), 401, "unauthorized")


def test_malformed_body_is_422_naming_the_field(client, acme, assert_problem):
    resp = client.post("/finetune", headers=acme.headers, json={"adapter": "Bad Name!", "steps": 0})
    body = assert_problem(resp, 422, "invalid-request")
    fields = {e["field"] for e in body["errors"]}
    assert {"body.adapter", "body.steps"} <= fields
    assert "body.adapter" in body["detail"]
    # Without field errors, the missing data set is named (dataset_url or dataset_id).
    resp = client.post("/finetune", headers=acme.headers, json={"adapter": "ok", "steps": 1})
    body = assert_problem(resp, 422, "invalid-request")
    assert "exactly one of dataset_url and dataset_id" in body["errors"][0]["message"]


def test_bad_query_param_is_422(client, acme, assert_problem):
    resp = client.post("/generate?class=1&n=0", headers=acme.headers)
    body = assert_problem(resp, 422, "invalid-request")
    assert [e["field"] for e in body["errors"]] == ["query.n"]


def test_unknown_route_is_404_problem(client, assert_problem):
    assert_problem(client.get("/nope"), 404, "not-found")


def test_wrong_method_is_405_problem(client, assert_problem):
    assert_problem(client.delete("/healthz"), 405, "method-not-allowed")


def test_unexpected_error_is_500_without_internals(
    settings, registry, fake_queue, acme, assert_problem, make_client
):
    def boom(job_id: str) -> None:
        raise RuntimeError("secret /etc/passwd stack detail")

    fake_queue.enqueue_finetune = boom
    with make_client(settings, registry, fake_queue, raise_server_exceptions=False) as c:
        resp = c.post(
            "/finetune",
            headers=acme.headers,
            json={"dataset_url": "https://x.test/d.zip", "adapter": "a"},
        )
    body = assert_problem(resp, 500, "internal")
    assert "secret" not in resp.text and "passwd" not in resp.text
    assert body["detail"] == "Internal server error."


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (E.AdapterNotFound("x"), 404),
        (E.JobNotFound("x"), 404),
        (E.NotFound("x"), 404),
        (E.TenantNotFound("x"), 404),
        (E.Unauthorized("x"), 401),
        (E.Forbidden("x"), 403),
        (E.InvalidRequest("x"), 422),
        (E.InvalidDataset("x"), 422),
        (E.IncompatibleAdapter("x"), 422),
        (E.Conflict("x"), 409),
        (E.Overloaded("x", retry_after_s=7), 429),
        (E.BackendUnavailable("x"), 503),
        (E.GenerationTimeout("x", task_id="t-1"), 504),
        (E.CorruptBlob("x"), 500),
        (E.TrainingFailed("x"), 500),
        (E.DiffFitError("x"), 500),
    ],
)
def test_domain_error_mapping(exc, status):
    resp = domain_error_response(exc)
    assert resp.status_code == status
    assert resp.media_type == "application/problem+json"
    body = json.loads(resp.body)
    assert body["type"] == f"https://difffit.dev/problems/{exc.code}"
    assert body["status"] == status
    if isinstance(exc, E.Overloaded):
        assert resp.headers["retry-after"] == "7"
    if isinstance(exc, E.GenerationTimeout):
        assert body["task_id"] == "t-1"
    if status in (500, 503):
        assert body["detail"] != "x"  # server-side messages are not echoed
    else:
        assert body["detail"] == "x"


def test_openapi_is_complete(client):
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) >= {
        "/finetune",
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/cancel",
        "/jobs/{job_id}/events",
        "/generate",
        "/adapters",
        "/adapters/{name}",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), (method, path)
            assert op.get("tags"), (method, path)
    assert "Job" in spec["components"]["schemas"]
    assert "Problem" in spec["components"]["schemas"]
