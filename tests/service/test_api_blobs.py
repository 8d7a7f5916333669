"""Blobs over HTTP, on both stores: downloads (stream or presigned redirect), deletes, tenant purge.

Each case runs with DIFFFIT_BLOB_URL on a folder and on a bucket of the moto
S3 server (tests/s3.py); what the store holds afterwards is looked at behind
its back.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from adapters_store import BlobStore, blob_store_from_settings
from adapters_store.blobstore.base import CHUNK
from tests.s3 import client as s3_client
from tests.s3 import everything_in

from .conftest import tiny_png

ADMIN_KEY = "test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(params=["file", "s3"])
def store_settings(request: pytest.FixtureRequest, settings: Any) -> Any:
    update: dict[str, Any] = {"admin_key": ADMIN_KEY}
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        update |= {"blob_url": f"s3://{request.getfixturevalue('s3_bucket')}/p", "s3_endpoint_url": endpoint}
    return settings.model_copy(update=update)


@pytest.fixture
def store(store_settings: Any) -> BlobStore:
    return blob_store_from_settings(store_settings)


@pytest.fixture
def api(store_settings: Any, registry: Any, fake_queue: Any, make_client: Any) -> Any:
    with make_client(store_settings, registry, fake_queue) as c:
        yield c


def _register(registry: Any, store: BlobStore, tenant: Any, name: str, adapter: bytes, **files: bytes) -> Any:
    return registry.add_version(
        tenant.record.id, name, sha256=store.put_bytes(adapter), size_bytes=len(adapter),
        method="difffit", base_model_hash="b" * 64, class_names=["a", "b"], resolution=32,
        trainable_params=1, metadata={}, files={k: store.put_bytes(v) for k, v in files.items()},
    )  # fmt: skip


def _raw_overwrite(store: BlobStore, sha: str, data: bytes) -> None:
    if hasattr(store, "path_for"):
        store.path_for(sha).write_bytes(data)
    else:
        s3_client(store.endpoint_url).put_object(Bucket=store.bucket, Key=store.key_for(sha), Body=data)


def test_adapter_file_streams_from_the_store(api: Any, registry: Any, store: BlobStore, acme: Any) -> None:
    adapter = os.urandom(2 * CHUNK + 123)  # several chunks
    v = _register(registry, store, acme, "fungi", adapter, **{"samples.png": tiny_png(3)})
    out = api.get("/adapters/fungi", headers=acme.headers).json()["versions"][0]
    url = out["file_urls"]["adapter.safetensors"]
    assert url == "/adapters/fungi/versions/1/files/adapter.safetensors"
    r = api.get(url, headers=acme.headers)
    assert r.status_code == 200 and r.content == adapter
    assert hashlib.sha256(r.content).hexdigest() == v.sha256
    assert r.headers["etag"] == f'"{v.sha256}"' and r.headers["content-length"] == str(len(adapter))
    assert r.headers["content-type"] == "application/octet-stream"
    assert 'filename="fungi-v1.safetensors"' in r.headers["content-disposition"]
    grid = api.get(out["file_urls"]["samples.png"], headers=acme.headers)
    assert grid.status_code == 200 and grid.content == tiny_png(3)


def test_redirect_to_a_presigned_url_on_s3_and_stream_on_a_folder(
    store_settings: Any,
    registry: Any,
    fake_queue: Any,
    make_client: Any,
    store: BlobStore,
    acme: Any,
    other: Any,
) -> None:
    adapter = b"safetensors bytes" * 100
    _register(registry, store, acme, "fungi", adapter)
    redirecting = store_settings.model_copy(update={"download_redirect": True, "download_url_ttl_s": 90})
    with make_client(redirecting, registry, fake_queue, follow_redirects=False) as c:
        r = c.get("/adapters/fungi/versions/1/files/adapter.safetensors", headers=acme.headers)
        if store.url.startswith("file://"):
            assert r.status_code == 200 and r.content == adapter  # nothing to redirect to
            return
        assert r.status_code == 307 and r.headers["cache-control"] == "no-store"
        location = r.headers["location"]
        assert location.startswith(store_settings.s3_endpoint_url) and "X-Amz-Expires=90" in location
        direct = httpx.get(location, timeout=30)
        assert direct.status_code == 200 and direct.content == adapter
        # Still scoped: another tenant gets no URL.
        r = c.get("/adapters/fungi/versions/1/files/adapter.safetensors", headers=other.headers)
        assert r.status_code == 404


def test_corrupt_blobs_are_never_served_whole(
    store_settings: Any, registry: Any, fake_queue: Any, make_client: Any, store: BlobStore, acme: Any,
    assert_problem: Any,
) -> None:  # fmt: skip
    small = _register(registry, store, acme, "small", b"tiny adapter")
    big_bytes = os.urandom(3 * CHUNK)
    big = _register(registry, store, acme, "big", big_bytes)
    _raw_overwrite(store, small.sha256, b"tiny adaptor")
    _raw_overwrite(store, big.sha256, big_bytes[:-1] + b"\x00")
    with make_client(store_settings, registry, fake_queue, raise_server_exceptions=False) as c:
        # One chunk: checked before the answer starts, a problem response.
        r = c.get("/adapters/small/versions/1/files/adapter.safetensors", headers=acme.headers)
        assert_problem(r, 500, "corrupt-blob")
        # Several chunks: the body breaks off before its last chunk, short of its Content-Length,
        # which an HTTP client reports as an incomplete response.
        r = c.get("/adapters/big/versions/1/files/adapter.safetensors", headers=acme.headers)
        assert int(r.headers["content-length"]) == len(big_bytes)
        assert 0 < len(r.content) < len(big_bytes) and big_bytes.startswith(r.content)


def test_deletes_free_unshared_blobs(
    api: Any, registry: Any, store: BlobStore, acme: Any, other: Any
) -> None:
    shared = tiny_png(9)
    v1 = _register(registry, store, acme, "fungi", b"v1", **{"samples.png": shared, "loss.json": b"[1]"})
    v2 = _register(registry, store, acme, "fungi", b"v2", **{"samples.png": shared})
    theirs = _register(registry, store, other, "moss", b"theirs", **{"samples.png": shared})
    assert api.delete("/adapters/fungi/versions/1", headers=acme.headers).status_code == 204
    assert not store.exists(v1.sha256) and not store.exists(v1.files["loss.json"])
    assert api.get("/adapters/fungi/versions/1/files/samples.png", headers=acme.headers).status_code == 404
    assert api.delete("/adapters/fungi/versions/7", headers=acme.headers).status_code == 404
    assert api.delete("/adapters/fungi/versions/2", headers=other.headers).status_code == 404
    assert api.delete("/adapters/fungi", headers=acme.headers).status_code == 204
    assert not store.exists(v2.sha256)
    assert {n.rsplit("/", 1)[-1] for n in everything_in(store)} == {
        theirs.sha256,
        theirs.files["samples.png"],
    }


def test_admin_purges_a_tenant_from_registry_and_store(
    api: Any, registry: Any, store: BlobStore, acme: Any, other: Any, assert_problem: Any
) -> None:
    shared = tiny_png(5)
    _register(registry, store, acme, "fungi", b"a1", **{"samples.png": shared})
    _register(registry, store, acme, "moss", b"a2", **{"loss.json": b"[0.5]"})
    job, _ = registry.create_job(acme.record.id, "fungi", {"steps": 3}, 3)
    registry.update_job(job.id, checkpoint_sha256=store.put_bytes(b"ckpt"), checkpoint_step=1)
    registry.add_job_event(job.id, "checkpoint", {"step": 1})
    theirs = _register(registry, store, other, "fungi", b"o1", **{"samples.png": shared})

    assert_problem(api.delete("/admin/tenants/acme", headers=acme.headers), 401, "unauthorized")
    r = api.delete("/admin/tenants/acme", headers=ADMIN)
    assert r.status_code == 204, r.text
    assert_problem(api.get("/adapters", headers=acme.headers), 401, "unauthorized")
    assert_problem(api.delete("/admin/tenants/acme", headers=ADMIN), 404, "tenant-not-found")
    with registry._db.engine.connect() as conn:
        for table in ("api_keys", "adapters", "jobs"):
            query = text(f"SELECT count(*) FROM {table} WHERE tenant_id = :t")
            assert conn.execute(query, {"t": acme.record.id}).scalar() == 0, table
        assert conn.execute(text("SELECT count(*) FROM job_events")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM tenants")).scalar() == 1
    kept = {theirs.sha256, theirs.files["samples.png"]}
    assert {n.rsplit("/", 1)[-1] for n in everything_in(store)} == kept
    assert api.get("/adapters/fungi/versions/1/files/samples.png", headers=other.headers).content == shared


def test_readyz_reports_a_missing_bucket(
    settings: Any, registry: Any, fake_queue: Any, make_client: Any, s3_endpoint: str, assert_problem: Any
) -> None:
    broken = settings.model_copy(update={"blob_url": "s3://no-such-bucket/p", "s3_endpoint_url": s3_endpoint})
    with make_client(broken, registry, fake_queue) as c:
        body = assert_problem(c.get("/readyz"), 503, "backend-unavailable")
    assert body["checks"]["blobs"] == "down" and body["failed"] == ["blobs"]
