"""Webhooks: /finetune's webhook_url rules, and the dispatcher posting to a loopback receiver.

The receiver is a real HTTP server on 127.0.0.1 (private URLs allowed for
it); the dispatcher is the app's own thread, started by the app's lifespan.
The same against a real stack (job ended by a Celery worker) is in
tests/e2e/tenant/.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from difffit.client import verify_webhook
from service.webhooks import backoff_s
from tests.webhook_receiver import Receiver, running_receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as rec:
        yield rec


@pytest.fixture
def hook_settings(settings):
    return settings.model_copy(
        update={
            "allow_private_urls": True,
            "webhook_backoff_s": 0.3,
            "webhook_poll_s": 0.1,
            "webhook_max_attempts": 3,
        }
    )


def test_each_terminal_state_is_posted_once_signed_and_retried_after_a_500(
    make_client, hook_settings, registry, fake_queue, acme, receiver
):
    receiver.script = [500]  # the first call fails; the retry must come
    body = {"dataset_url": "https://data.example/d.zip", "adapter": "shades", "webhook_url": receiver.url}
    with make_client(hook_settings, registry, fake_queue) as client:
        jobs = [client.post("/finetune", headers=acme.headers, json=body).json() for _ in range(3)]
        ok, bad, stop = (j["id"] for j in jobs)
        registry.update_job(ok, state="running")
        registry.update_job(ok, state="succeeded", step=200, adapter_version=1)
        registry.update_job(bad, state="failed", error_code="invalid-dataset", error_message="one class")
        assert client.post(f"/jobs/{stop}/cancel", headers=acme.headers).json()["state"] == "cancelled"
        calls = receiver.wait_for(4)
        time.sleep(3 * hook_settings.webhook_poll_s + 0.5)  # nothing else may come: no duplicates
    assert len(receiver.calls) == 4
    secret = registry.webhook_secret(acme.record.id)
    by_job: dict[str, list[dict]] = {}
    for call in calls:
        assert verify_webhook(secret, call["body"], call["headers"]["X-DiffFit-Signature"])
        job = json.loads(call["body"])
        by_job.setdefault(job["id"], []).append(call)
        assert call["headers"]["X-DiffFit-Event"] == f"job.{job['state']}"
    # The first delivery (the succeeded job's) met the 500 and was retried with the same id.
    assert [c["status"] for c in by_job[ok]] == [500, 204]
    assert [c["status"] for c in by_job[bad]] == [204] and [c["status"] for c in by_job[stop]] == [204]
    assert by_job[ok][0]["body"] == by_job[ok][1]["body"]
    assert by_job[ok][0]["headers"]["X-DiffFit-Delivery"] == by_job[ok][1]["headers"]["X-DiffFit-Delivery"]
    assert {json.loads(cs[0]["body"])["state"] for cs in by_job.values()} == {
        "succeeded",
        "failed",
        "cancelled",
    }
    assert json.loads(by_job[ok][0]["body"])["adapter_version"] == 1
    deliveries = [d for j in (ok, bad, stop) for d in registry.webhook_deliveries(j)]
    assert sorted(d.state for d in deliveries) == ["delivered"] * 3
    assert sorted(d.attempts for d in deliveries) == [1, 1, 2]


def test_a_receiver_that_keeps_failing_is_given_up_after_max_attempts(
    make_client, hook_settings, registry, fake_queue, acme, receiver
):
    receiver.script = [503] * 10
    body = {"dataset_url": "https://data.example/d.zip", "adapter": "shades", "webhook_url": receiver.url}
    with make_client(hook_settings, registry, fake_queue) as client:
        job = client.post("/finetune", headers=acme.headers, json=body).json()
        registry.update_job(job["id"], state="failed")
        receiver.wait_for(3)
        deadline = time.monotonic() + 20
        while registry.webhook_deliveries(job["id"])[0].state != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
    [d] = registry.webhook_deliveries(job["id"])
    assert (d.state, d.attempts, d.last_status) == ("failed", 3, 503)
    assert len(receiver.calls) == 3
    assert backoff_s(hook_settings, 1) == 0.3 and backoff_s(hook_settings, 2) == 0.6


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:9/hook", "non-public address"),
        ("http://169.254.169.254/latest", "non-public address"),
        ("file:///etc/passwd", "scheme 'file' is not accepted"),
        ("ftp://example.com/x", "scheme 'ftp'"),
        ("http:///nohost", "no host"),
    ],
)
def test_webhook_urls_follow_the_dataset_url_ssrf_rules(client, acme, assert_problem, url, words):
    body = {"dataset_url": "https://data.example/d.zip", "adapter": "a", "webhook_url": url}
    problem = assert_problem(
        client.post("/finetune", headers=acme.headers, json=body), 422, "invalid-request"
    )
    assert words in problem["detail"] and "webhook" in problem["detail"]
