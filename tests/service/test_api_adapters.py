"""GET /adapters, GET /adapters/{name}, DELETE /adapters/{name}."""

from __future__ import annotations


def test_list_and_get(client, acme, add_version):
    add_version(acme, "fungi")
    add_version(acme, "fungi")
    add_version(acme, "birds", classes=["crow", "finch"])
    listed = client.get("/adapters", headers=acme.headers).json()["adapters"]
    by_name = {a["name"]: a for a in listed}
    assert set(by_name) == {"fungi", "birds"}
    assert by_name["fungi"]["latest_version"] == 2 and by_name["fungi"]["num_versions"] == 2
    assert by_name["birds"]["class_names"] == ["crow", "finch"]

    got = client.get("/adapters/fungi", headers=acme.headers).json()
    assert got["name"] == "fungi" and got["latest_version"] == 2
    assert [v["version"] for v in got["versions"]] == [1, 2]
    v = got["versions"][0]
    assert v["class_names"] == ["amanita", "boletus", "chanterelle"]
    assert v["num_classes"] == 3
    assert v["method"] == "difffit" and v["resolution"] == 32 and v["trainable_params"] == 4321
    assert len(v["sha256"]) == 64 and v["files"] == {} and v["created_at"]


def test_missing_adapter_is_404(client, acme, assert_problem):
    assert_problem(client.get("/adapters/none", headers=acme.headers), 404, "adapter-not-found")
    assert_problem(client.delete("/adapters/none", headers=acme.headers), 404, "adapter-not-found")


def test_adapters_are_tenant_isolated(client, acme, other, add_version, assert_problem):
    add_version(acme, "fungi")
    assert client.get("/adapters", headers=other.headers).json()["adapters"] == []
    assert_problem(client.get("/adapters/fungi", headers=other.headers), 404, "adapter-not-found")
    assert_problem(client.delete("/adapters/fungi", headers=other.headers), 404, "adapter-not-found")
    assert client.get("/adapters/fungi", headers=acme.headers).status_code == 200


def test_delete_is_204(client, acme, add_version, assert_problem):
    add_version(acme, "fungi")
    resp = client.delete("/adapters/fungi", headers=acme.headers)
    assert resp.status_code == 204 and resp.content == b""
    assert_problem(client.get("/adapters/fungi", headers=acme.headers), 404, "adapter-not-found")


def test_version_files_are_linked_and_served_to_their_tenant_only(
    client, acme, other, registry, settings, assert_problem
):
    from adapters_store import FileBlobStore

    from .conftest import tiny_png

    blobs = FileBlobStore(settings.resolved_blob_dir)
    grid = tiny_png(7)
    files = {"samples.png": blobs.put_bytes(grid), "loss.json": blobs.put_bytes(b"[1.0, 0.5]")}
    registry.add_version(
        acme.record.id, "fungi", sha256="c" * 64, size_bytes=1, method="difffit",
        base_model_hash="b" * 64, class_names=["a", "b"], resolution=32, trainable_params=1,
        metadata={}, files=files,
    )  # fmt: skip
    version = client.get("/adapters/fungi", headers=acme.headers).json()["versions"][0]
    url = version["file_urls"]["samples.png"]
    assert url == "/adapters/fungi/versions/1/files/samples.png"
    r = client.get(url, headers=acme.headers)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == grid
    r = client.get(version["file_urls"]["loss.json"], headers=acme.headers)
    assert r.json() == [1.0, 0.5]
    assert_problem(client.get(url, headers=other.headers), 404, "adapter-not-found")
    body = assert_problem(
        client.get("/adapters/fungi/versions/1/files/nope.png", headers=acme.headers), 404, "not-found"
    )
    assert "samples.png" in body["detail"]
