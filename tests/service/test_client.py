"""difffit.client.Client against the app (TestClient transport, real registry and blobs).

The same client against a real stack (redis, Celery worker, uvicorn) is in
tests/e2e/tenant/. Here: retries, polling, typed errors, SSE parsing, uploads.
"""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

import difffit.client as client_module
from adapters_store import blob_store_from_settings
from difffit.client import Client, InvalidRequestError, NotFoundError, RateLimitError, verify_webhook
from difffit.contract import GenerateResult
from difffit.errors import GenerationTimeout

from .conftest import tiny_png


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The client's sleeps, recorded instead of slept."""
    seen: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", seen.append)
    return seen


def _client(test_client, tenant, **kw) -> Client:
    return Client("http://testserver", tenant.key, http_client=test_client, **kw)


def test_upload_folder_finetune_events_and_wait(client, registry, acme, tmp_path, fake_queue):
    for name, count in (("dark", 2), ("light", 3)):
        (tmp_path / "shades" / name).mkdir(parents=True)
        for i in range(count):
            (tmp_path / "shades" / name / f"{i}.png").write_bytes(tiny_png(i))
    (tmp_path / "shades" / ".DS_Store").write_bytes(b"junk")  # hidden files are not sent
    c = _client(client, acme)
    ds = c.upload_dataset(tmp_path / "shades")
    assert ds["classes"] == ["dark", "light"] and ds["images"] == 5 and ds["filename"] == "shades.zip"
    assert [d["id"] for d in c.datasets()] == [ds["id"]]

    job = c.finetune(dataset_id=ds["id"], adapter="shades", steps=3, preview_every=None)
    assert fake_queue.finetunes == [job["id"]] and job["request"]["steps"] == 3
    registry.update_job(job["id"], state="running")
    registry.add_job_event(job["id"], "progress", {"step": 1, "total": 3, "loss": 0.5})
    registry.update_job(job["id"], state="succeeded", step=3, adapter_version=1)
    registry.add_job_event(job["id"], "succeeded", {"version": 1})
    events = list(c.events(job["id"]))
    assert [e.kind for e in events] == ["progress", "succeeded", "end"]
    assert events[0].data == {"step": 1, "total": 3, "loss": 0.5} and events[0].id is not None
    assert [e.kind for e in c.events(job["id"], after=events[0].id)] == ["succeeded", "end"]
    seen = []
    done = c.wait(job["id"], on_event=seen.append)
    assert done["state"] == "succeeded" and done["adapter_version"] == 1 and len(seen) == 3


def test_generate_decodes_images_and_bytes(client, acme):
    c = _client(client, acme)
    images = c.generate(class_="Trouser", n=2, seed=4)
    assert [im.size for im in images] == [(1, 1), (1, 1)]
    assert c.generate_png(class_=1) == [tiny_png(1)]


def test_429_is_retried_after_its_retry_after(client, acme, fake_queue, sleeps):
    fake_queue.depths = {"generate": 10_000}
    calls = {"n": 0}
    real = fake_queue.queue_depth

    def depth(queue: str) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            fake_queue.depths = {}
        return real(queue)

    fake_queue.queue_depth = depth
    assert _client(client, acme).generate_png(class_=0) == [tiny_png(0)]
    assert sleeps == [5.0, 5.0]  # the route's Retry-After, honoured twice

    fake_queue.depths = {"generate": 10_000}
    calls["n"] = -100
    with pytest.raises(RateLimitError) as info:
        _client(client, acme, max_retries=1).generate_png(class_=0)
    assert info.value.status == 429 and info.value.problem["retry_after_s"] == 5


def test_a_504_is_followed_by_polling_the_task(client, acme, fake_queue, sleeps):
    png = base64.b64encode(tiny_png(9)).decode()
    polls = {"n": 0}

    def timeout(task):
        raise GenerationTimeout("not ready", task_id=task.request_id)

    def poll(task_id: str):
        polls["n"] += 1
        return None if polls["n"] < 3 else GenerateResult(images_png_b64=[png], seconds=1.0)

    fake_queue.on_generate = timeout
    fake_queue.poll_generate = poll
    assert _client(client, acme, poll_interval_s=0.5).generate_png(class_=3) == [tiny_png(9)]
    assert polls["n"] == 3 and sleeps == [0.5, 0.5]


def test_errors_are_typed_and_carry_the_problem(client, acme):
    c = _client(client, acme)
    with pytest.raises(NotFoundError) as info:
        c.adapter("nope")
    assert info.value.code == "adapter-not-found" and info.value.problem["status"] == 404
    with pytest.raises(InvalidRequestError, match="only one class folder"):
        buf = io.BytesIO()
        Image.new("L", (2, 2)).save(buf, "PNG")
        import zipfile

        z = io.BytesIO()
        with zipfile.ZipFile(z, "w") as zf:
            zf.writestr("a/1.png", buf.getvalue())
        path = client.app.state.settings.data_dir / "one.zip"
        path.write_bytes(z.getvalue())
        c.upload_dataset(path)
    with pytest.raises(ValueError, match="API key"):
        Client("http://x", None)


def test_download_adapter_and_webhook_secret(client, registry, settings, acme, tmp_path):
    blob = b"adapter-bytes"
    sha = blob_store_from_settings(settings).put_bytes(blob)
    registry.add_version(
        acme.record.id, "shades", sha256=sha, size_bytes=len(blob), method="difffit",
        base_model_hash="b" * 64, class_names=["a", "b"], resolution=8, trainable_params=1,
        metadata={}, files={},
    )  # fmt: skip
    c = _client(client, acme)
    assert c.adapters()[0]["name"] == "shades"
    out = c.download_adapter("shades", None, tmp_path / "a.safetensors")
    assert out.read_bytes() == blob
    secret = c.webhook_secret()
    assert secret == registry.webhook_secret(acme.record.id)
    body = b'{"id": "x"}'
    assert verify_webhook(secret, body, client_module.sign_webhook(secret, body))
    assert not verify_webhook(secret, body + b" ", client_module.sign_webhook(secret, body))
    assert c.rotate_webhook_secret() != secret
