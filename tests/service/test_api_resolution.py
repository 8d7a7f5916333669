"""POST /generate samples at the adapter version's trained resolution (issue 13)."""

from __future__ import annotations

from .conftest import worker_stats


def _version(registry, tenant, name: str, resolution: int):
    return registry.add_version(
        tenant.record.id, name, sha256=f"{resolution:064x}", size_bytes=1, method="difffit",
        base_model_hash="b" * 64, class_names=["a", "b"], resolution=resolution,
        trainable_params=1, metadata={}, files={},
    )  # fmt: skip


def test_a_512_trained_adapter_samples_at_512_and_refuses_256(
    client, registry, acme, fake_queue, assert_problem
):
    _version(registry, acme, "big", 512)
    resp = client.post(
        "/generate?adapter=big&class=a", headers={**acme.headers, "Accept": "application/json"}
    )
    assert resp.status_code == 200, resp.text
    assert fake_queue.generated[-1].resolution == 512 and resp.json()["resolution"] == 512
    assert client.post("/generate?adapter=big&class=a&resolution=512", headers=acme.headers).is_success
    assert fake_queue.generated[-1].resolution == 512
    body = assert_problem(
        client.post("/generate?adapter=big&class=a&resolution=256", headers=acme.headers),
        422,
        "invalid-request",
    )
    assert body["allowed"] == [512] and "512" in body["detail"] and "256" in body["detail"]
    assert len(fake_queue.generated) == 2  # the refused one was never enqueued


def test_the_base_samples_at_its_own_resolution(client, acme, fake_queue, assert_problem):
    fake_queue.workers = [worker_stats(resolution=256)]
    assert client.post("/generate?class=1", headers=acme.headers).is_success
    assert fake_queue.generated[-1].resolution == 256 and fake_queue.generated[-1].adapter is None
    body = assert_problem(
        client.post("/generate?class=1&resolution=512", headers=acme.headers), 422, "invalid-request"
    )
    assert body["allowed"] == [256]
    # No worker alive to tell the base's side: the request goes on, the worker checks it.
    fake_queue.workers = []
    assert client.post("/generate?class=1&resolution=512", headers=acme.headers).is_success
    assert fake_queue.generated[-1].resolution == 512
