"""POST /generate: adapter and class resolution, PNG vs JSON, timeouts."""

from __future__ import annotations

import base64

import pytest

from difffit import errors as E

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fungi(acme, add_version):
    add_version(acme, "fungi")
    return add_version(acme, "fungi", classes=["amanita", "boletus", "chanterelle", "morel"])


def test_class_name_resolves_to_index(client, acme, fungi, fake_queue):
    resp = client.post("/generate?adapter=fungi&class=chanterelle", headers=acme.headers)
    assert resp.status_code == 200, resp.text
    (task,) = fake_queue.generated
    assert task.class_labels == [2]
    assert task.adapter is not None
    assert (task.adapter.name, task.adapter.version, task.adapter.sha256) == (
        "fungi",
        2,
        fungi.sha256,
    )
    assert resp.headers["x-class"] == "2" and resp.headers["x-adapter-version"] == "2"


def test_class_index_and_parameters(client, acme, fungi, fake_queue):
    q = "adapter=fungi&class=3&n=3&seed=7&steps=20&guidance_scale=2.5&scheduler=dpm%2B%2B"
    resp = client.post(f"/generate?{q}", headers=acme.headers)
    assert resp.status_code == 200, resp.text
    (task,) = fake_queue.generated
    assert task.class_labels == [3, 3, 3]
    assert (task.seed, task.steps, task.guidance_scale, task.scheduler) == (7, 20, 2.5, "dpm++")
    assert task.request_id.startswith(f"{acme.record.id}-")


def test_named_version(client, acme, fungi, fake_queue, assert_problem):
    assert client.post("/generate?adapter=fungi&class=0&version=1", headers=acme.headers).is_success
    assert fake_queue.generated[-1].adapter.version == 1
    # "morel" only exists in version 2.
    body = assert_problem(
        client.post("/generate?adapter=fungi&class=morel&version=1", headers=acme.headers),
        422,
        "invalid-request",
    )
    assert body["allowed"] == ["amanita", "boletus", "chanterelle"]
    assert_problem(
        client.post("/generate?adapter=fungi&class=0&version=9", headers=acme.headers),
        404,
        "adapter-not-found",
    )


def test_unknown_class_lists_allowed(client, acme, fungi, fake_queue, assert_problem):
    body = assert_problem(
        client.post("/generate?adapter=fungi&class=truffle", headers=acme.headers),
        422,
        "invalid-request",
    )
    assert body["allowed"] == ["amanita", "boletus", "chanterelle", "morel"]
    assert "morel" in body["detail"]
    assert fake_queue.generated == []


def test_class_index_out_of_range(client, acme, fungi, assert_problem):
    body = assert_problem(
        client.post("/generate?adapter=fungi&class=4", headers=acme.headers), 422, "invalid-request"
    )
    assert "0..3" in body["detail"]


def test_numeric_class_names_win_over_indices(client, acme, add_version, fake_queue):
    add_version(acme, "digits", classes=["1", "0"])
    assert client.post("/generate?adapter=digits&class=0", headers=acme.headers).is_success
    assert fake_queue.generated[-1].class_labels == [1]


def test_missing_or_foreign_adapter_is_404(client, acme, other, fungi, assert_problem):
    assert_problem(
        client.post("/generate?adapter=nope&class=0", headers=acme.headers), 404, "adapter-not-found"
    )
    assert_problem(
        client.post("/generate?adapter=fungi&class=0", headers=other.headers),
        404,
        "adapter-not-found",
    )


def test_base_model_without_live_worker_takes_indices_only(client, acme, fake_queue, assert_problem):
    # No worker alive: nobody can tell the base's class names, so only an index is accepted
    # (the worker bound-checks it) and the 422 says why.
    fake_queue.workers = []
    assert client.post("/generate?class=12", headers=acme.headers).is_success
    (task,) = fake_queue.generated
    assert task.adapter is None and task.class_labels == [12]
    body = assert_problem(client.post("/generate?class=cat", headers=acme.headers), 422, "invalid-request")
    assert "no worker is alive" in body["detail"]
    assert_problem(client.post("/generate?class=1&version=1", headers=acme.headers), 422, "invalid-request")
    # Unicode digits are not indices (str.isdigit() would let "²" through to int()).
    assert_problem(client.post("/generate?class=%C2%B2", headers=acme.headers), 422, "invalid-request")


def test_base_model_class_name_from_worker_stats(client, acme, fake_queue, assert_problem):
    # The live worker publishes the base's class names: a name resolves, an index is
    # bound-checked, and an unknown name lists what is allowed.
    h = {**acme.headers, "Accept": "application/json"}
    body = client.post("/generate?class=Ankle%20boot", headers=h).json()
    assert body["class"] == 9 and body["class_name"] == "Ankle boot" and body["adapter"] is None
    assert fake_queue.generated[-1].class_labels == [9]
    assert client.post("/generate?class=3", headers=h).json()["class_name"] == "Dress"
    bad = assert_problem(client.post("/generate?class=cat", headers=acme.headers), 422, "invalid-request")
    assert bad["allowed"][0] == "T-shirt/top" and len(bad["allowed"]) == 10
    out_of_range = client.post("/generate?class=12", headers=acme.headers)
    assert_problem(out_of_range, 422, "invalid-request")
    assert len(fake_queue.generated) == 2


def test_class_is_required(client, acme, assert_problem):
    body = assert_problem(client.post("/generate", headers=acme.headers), 422, "invalid-request")
    assert [e["field"] for e in body["errors"]] == ["query.class"]


@pytest.mark.parametrize(
    "query",
    ["class=0&n=5", "class=0&steps=101", "class=0&steps=0", "class=0&guidance_scale=0.5",
     "class=0&scheduler=euler", "class=0&seed=-1"],
)  # fmt: skip
def test_out_of_bounds_parameters_are_422(client, acme, query, fake_queue, assert_problem):
    assert_problem(client.post(f"/generate?{query}", headers=acme.headers), 422, "invalid-request")
    assert fake_queue.generated == []


def test_n1_returns_png(client, acme, fungi):
    resp = client.post("/generate?adapter=fungi&class=1", headers=acme.headers)
    assert resp.headers["content-type"] == "image/png"
    assert resp.content.startswith(PNG_MAGIC)
    assert resp.headers["x-request-id"]


def test_n1_png_when_accept_prefers_png(client, acme, fungi):
    h = {**acme.headers, "Accept": "image/png, application/json;q=0.5"}
    resp = client.post("/generate?adapter=fungi&class=1", headers=h)
    assert resp.headers["content-type"] == "image/png"


def test_n_gt_1_returns_json(client, acme, fungi):
    resp = client.post("/generate?adapter=fungi&class=boletus&n=2", headers=acme.headers)
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert len(body["images"]) == 2
    assert all(base64.b64decode(i).startswith(PNG_MAGIC) for i in body["images"])
    assert body["adapter"] == "fungi" and body["version"] == 2
    assert body["class"] == 1 and body["class_name"] == "boletus"
    assert body["seconds"] == 0.25 and body["n"] == 2


def test_accept_json_forces_json(client, acme, fungi):
    h = {**acme.headers, "Accept": "application/json"}
    body = client.post("/generate?adapter=fungi&class=0", headers=h).json()
    assert len(body["images"]) == 1 and body["class"] == 0


def test_base_model_json(client, acme):
    h = {**acme.headers, "Accept": "application/json"}
    body = client.post("/generate?class=5&n=2", headers=h).json()
    assert body["adapter"] is None and body["version"] is None and body["class"] == 5


def test_timeout_is_504_with_task_id(client, acme, fungi, fake_queue, assert_problem):
    def slow(task):
        raise E.GenerationTimeout("not ready", task_id=task.request_id)

    fake_queue.on_generate = slow
    body = assert_problem(
        client.post("/generate?adapter=fungi&class=0", headers=acme.headers),
        504,
        "generation-timeout",
    )
    (task,) = fake_queue.generated
    assert body["task_id"] == task.request_id
    assert body["poll"] == f"/generate/{task.request_id}"


def test_worker_error_is_mapped(client, acme, fungi, fake_queue, assert_problem):
    def bad(task):
        raise E.IncompatibleAdapter("adapter was trained on another base model")

    fake_queue.on_generate = bad
    body = assert_problem(
        client.post("/generate?adapter=fungi&class=0", headers=acme.headers),
        422,
        "incompatible-adapter",
    )
    assert "another base model" in body["detail"]


def test_queue_down_is_503(client, acme, fake_queue, assert_problem):
    fake_queue.down = True
    assert_problem(client.post("/generate?class=0", headers=acme.headers), 503, "backend-unavailable")


def test_poll_endpoint(client, acme, other, fake_queue, assert_problem):
    rid = f"{acme.record.id}-abc"
    assert client.get(f"/generate/{rid}", headers=acme.headers).json() == {
        "request_id": rid,
        "state": "pending",
        "images": [],
        "seconds": None,
    }
    assert_problem(client.get(f"/generate/{rid}", headers=other.headers), 404, "not-found")
