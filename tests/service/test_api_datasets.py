"""POST/GET/DELETE /datasets and /finetune with dataset_id, on a real registry and blob store."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from .conftest import tiny_png


def make_zip(classes: dict[str, int], extra: dict[str, bytes] | None = None) -> bytes:
    """A zip with one folder per class of tiny PNGs, plus any extra members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, count in classes.items():
            for i in range(count):
                zf.writestr(f"shades/{name}/{i}.png", tiny_png(i * 20))
        for member, data in (extra or {}).items():
            zf.writestr(member, data)
    return buf.getvalue()


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def assert_nothing_left(settings, registry, tenant) -> None:
    assert _files(settings.resolved_blob_dir) == []
    assert registry.list_datasets(tenant.record.id) == []
    assert _files(settings.data_dir / "uploads") == []


def test_upload_validates_and_stores_then_finetune_uses_it(
    client, registry, settings, acme, other, fake_queue
):
    data = make_zip({"dark": 3, "light": 2})
    r = client.post(
        "/datasets", headers=acme.headers, files={"file": ("shades.zip", data, "application/zip")}
    )
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["id"].startswith("ds_") and r.headers["location"] == f"/datasets/{ds['id']}"
    assert ds["sha256"] == hashlib.sha256(data).hexdigest()
    assert ds["classes"] == ["dark", "light"] and ds["class_counts"] == [3, 2] and ds["images"] == 5
    assert ds["filename"] == "shades.zip" and ds["size_bytes"] == len(data)
    assert (
        settings.resolved_blob_dir / ds["sha256"][:2] / ds["sha256"][2:4] / ds["sha256"]
    ).read_bytes() == data
    assert _files(settings.data_dir / "uploads") == []

    assert client.get("/datasets", headers=acme.headers).json()["datasets"] == [ds]
    assert client.get(f"/datasets/{ds['id']}", headers=acme.headers).json() == ds
    # Tenant-scoped: another tenant can neither see, use nor delete it.
    assert client.get(f"/datasets/{ds['id']}", headers=other.headers).status_code == 404
    assert client.get("/datasets", headers=other.headers).json()["datasets"] == []
    r = client.post("/finetune", headers=other.headers, json={"dataset_id": ds["id"], "adapter": "x"})
    assert r.status_code == 404 and r.json()["type"].endswith("/dataset-not-found")
    assert client.delete(f"/datasets/{ds['id']}", headers=other.headers).status_code == 404

    r = client.post("/finetune", headers=acme.headers, json={"dataset_id": ds["id"], "adapter": "shades"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["request"]["dataset_id"] == ds["id"] and job["request"]["dataset_url"] is None
    assert fake_queue.finetunes == [job["id"]]
    # In use by a queued job: refused, kept.
    r = client.delete(f"/datasets/{ds['id']}", headers=acme.headers)
    assert r.status_code == 409 and r.json()["type"].endswith("/conflict")
    client.post(f"/jobs/{job['id']}/cancel", headers=acme.headers)
    assert client.delete(f"/datasets/{ds['id']}", headers=acme.headers).status_code == 204
    assert client.get(f"/datasets/{ds['id']}", headers=acme.headers).status_code == 404
    assert _files(settings.resolved_blob_dir) == []


def test_both_or_neither_dataset_field_is_422(client, acme, assert_problem):
    both = {"dataset_id": "ds_" + "a" * 32, "dataset_url": "https://x.example/d.zip", "adapter": "a"}
    body = assert_problem(client.post("/finetune", headers=acme.headers, json=both), 422, "invalid-request")
    assert "exactly one of dataset_url and dataset_id" in body["errors"][0]["message"]


def test_same_content_twice_shares_one_blob_until_both_are_deleted(client, settings, acme, other):
    data = make_zip({"a": 1, "b": 1})
    ids = []
    for tenant in (acme, other):
        r = client.post("/datasets", headers=tenant.headers, files={"file": ("d.zip", data)})
        assert r.status_code == 201
        ids.append(r.json()["id"])
    assert len(_files(settings.resolved_blob_dir)) == 1
    assert client.delete(f"/datasets/{ids[0]}", headers=acme.headers).status_code == 204
    assert len(_files(settings.resolved_blob_dir)) == 1  # still the other tenant's
    assert client.delete(f"/datasets/{ids[1]}", headers=other.headers).status_code == 204
    assert _files(settings.resolved_blob_dir) == []


def test_raw_body_upload_is_accepted(client, acme):
    data = make_zip({"x": 1, "y": 2})
    r = client.post("/datasets", headers={**acme.headers, "Content-Type": "application/zip"}, content=data)
    assert r.status_code == 201, r.text
    assert r.json()["images"] == 3 and r.json()["filename"] is None


@pytest.mark.parametrize(
    ("limits", "archive", "status", "code", "words"),
    [
        (
            {"dataset_max_bytes": 2000},
            make_zip({"a": 20, "b": 20}),
            413,
            "payload-too-large",
            "limit of 2000",
        ),
        ({"dataset_max_files": 5}, make_zip({"a": 3, "b": 3}), 422, "invalid-dataset", "more than 5 files"),
        (
            {"dataset_max_unpacked_bytes": 10_000},
            make_zip({"a": 1, "b": 1}, {"shades/a/big.png": tiny_png() + b"\0" * 20_000}),
            422,
            "invalid-dataset",
            "unpacks to more than 10000 bytes",
        ),
        (
            {},
            make_zip({"a": 2, "b": 1}, {"shades/b/notes.txt": b"hello"}),
            422,
            "invalid-dataset",
            "notes.txt",
        ),
        ({}, make_zip({"only": 3}), 422, "invalid-dataset", "only one class folder"),
        ({}, b"this is not an archive at all", 422, "invalid-dataset", "neither a zip nor a tar"),
        (
            {},
            make_zip({}, {"../evil/x.png": tiny_png(), "b/1.png": tiny_png()}),
            422,
            "invalid-dataset",
            "'..'",
        ),
    ],
    ids=["size", "files", "unpacked", "not-an-image", "one-class", "not-an-archive", "dotdot"],
)
def test_refused_uploads_are_problems_and_leave_nothing_behind(
    make_client, settings, registry, fake_queue, acme, assert_problem, limits, archive, status, code, words
):
    limited = settings.model_copy(update=limits)
    with make_client(limited, registry, fake_queue) as client:
        r = client.post("/datasets", headers=acme.headers, files={"file": ("d.zip", archive)})
    body = assert_problem(r, status, code)
    assert words in body["detail"], body
    assert_nothing_left(limited, registry, acme)


def test_a_body_declared_too_large_is_refused_before_it_is_read(
    make_client, settings, registry, fake_queue, acme
):
    limited = settings.model_copy(update={"dataset_max_bytes": 1000})
    with make_client(limited, registry, fake_queue) as client:
        headers = {**acme.headers, "Content-Type": "application/zip", "Content-Length": str(10**9)}
        r = client.post("/datasets", headers=headers, content=b"x" * 100)
    assert r.status_code == 413


def test_multipart_without_the_file_field_is_422(client, acme, assert_problem):
    r = client.post("/datasets", headers=acme.headers, files={"other": ("d.zip", b"PK")})
    body = assert_problem(r, 422, "invalid-request")
    assert "no field named 'file'" in body["detail"]


def test_upload_needs_a_key(client, assert_problem):
    assert_problem(client.post("/datasets", files={"file": ("d.zip", b"x")}), 401, "unauthorized")
