"""Tenant scoping of names: no adapter name can reach outside the caller's namespace.

Adapter names are 1-64 characters of ``a-z0-9_-`` starting with a letter or
digit. Anything else (``../``, ``/``, upper case, too long) is a 422 on
/finetune and /generate and on the adapter paths; a well-formed name of
another tenant's adapter is a 404, exactly like a missing one.
"""

from __future__ import annotations

import pytest

from adapters_store import FileBlobStore

from .conftest import tiny_png

BAD_NAMES = ["../other", "a/b", "Fungi", "x" * 65, "..", "-lead", "fun gi"]
BODY = {"dataset_url": "https://data.example/fungi.zip", "steps": 20}


@pytest.fixture
def others_fungi(other, registry, settings):
    """`other` owns adapter "fungi" with a sample grid file."""
    blobs = FileBlobStore(settings.resolved_blob_dir)
    registry.add_version(
        other.record.id, "fungi", sha256="d" * 64, size_bytes=1, method="difffit",
        base_model_hash="b" * 64, class_names=["a", "b"], resolution=32, trainable_params=1,
        metadata={}, files={"samples.png": blobs.put_bytes(tiny_png(9))},
    )  # fmt: skip
    return "/adapters/fungi/versions/1/files/samples.png"


# One test per route family, looping over the names (a fixture setup per name costs more
# than the requests).
def test_bad_adapter_names_are_422_on_finetune(client, acme, fake_queue, registry, assert_problem):
    for name in BAD_NAMES:
        resp = client.post("/finetune", headers=acme.headers, json={**BODY, "adapter": name})
        body = assert_problem(resp, 422, "invalid-request")
        assert [e["field"] for e in body["errors"]] == ["body.adapter"], name
    assert fake_queue.finetunes == [] and registry.list_jobs(acme.record.id) == []


def test_bad_adapter_names_are_422_on_generate(client, acme, fake_queue, others_fungi, assert_problem):
    for name in BAD_NAMES:
        resp = client.post("/generate", params={"adapter": name, "class": "0"}, headers=acme.headers)
        assert_problem(resp, 422, "invalid-request")
    assert fake_queue.generated == []


MALFORMED_PATHS = [
    "/adapters/FUNGI",
    "/adapters/" + "x" * 65,
    "/adapters/%2E%2E",  # ".." once decoded
    "/adapters/-fungi",
    "/adapters/FUNGI/versions/1/files/samples.png",
    "/adapters/fungi/versions/0/files/samples.png",
]
ENCODED_SLASH_PATHS = [
    "/adapters/..%2Fother%2Ffungi",  # an encoded "/" does not match {name}: no route
    "/adapters/..%2F..%2Fadapters%2Ffungi/versions/1/files/samples.png",
    "/adapters/fungi/versions/1/files/..%2F..%2Fsamples.png",
]


def test_malformed_names_in_paths_are_422(client, acme, others_fungi, assert_problem):
    for path in MALFORMED_PATHS:
        assert_problem(client.get(path, headers=acme.headers), 422, "invalid-request")
        if "/versions/" not in path:
            assert_problem(client.delete(path, headers=acme.headers), 422, "invalid-request")


def test_encoded_slashes_reach_no_adapter(client, acme, others_fungi):
    for path in ENCODED_SLASH_PATHS:
        resp = client.get(path, headers=acme.headers)
        assert resp.status_code in (404, 422), (path, resp.text)
        assert resp.headers["content-type"].startswith("application/problem+json")


def test_another_tenants_adapter_is_404_everywhere(client, acme, other, others_fungi, assert_problem):
    assert_problem(client.get("/adapters/fungi", headers=acme.headers), 404, "adapter-not-found")
    assert_problem(client.get(others_fungi, headers=acme.headers), 404, "adapter-not-found")
    assert_problem(client.delete("/adapters/fungi", headers=acme.headers), 404, "adapter-not-found")
    assert_problem(
        client.post("/generate?adapter=fungi&class=a", headers=acme.headers), 404, "adapter-not-found"
    )
    # Still there for its owner.
    assert client.get(others_fungi, headers=other.headers).content == tiny_png(9)


def test_same_name_in_two_tenants_is_two_adapters(client, acme, other, others_fungi, add_version):
    add_version(acme, "fungi", classes=["x"])
    assert client.get("/adapters/fungi", headers=acme.headers).json()["versions"][0]["class_names"] == ["x"]
    assert client.get("/adapters/fungi", headers=other.headers).json()["versions"][0]["class_names"] == [
        "a",
        "b",
    ]
