"""GET /jobs/{id}/previews/{sha}: only grids a preview event of the tenant's job names."""

from __future__ import annotations

from adapters_store import blob_store_from_settings

from .conftest import tiny_png


def test_preview_grids_are_served_only_when_named_by_the_job(client, registry, settings, acme, other):
    blobs = blob_store_from_settings(settings)
    grid, secret = blobs.put_bytes(tiny_png(3)), blobs.put_bytes(b"someone else's blob")
    body = {"dataset_url": "https://data.example/d.zip", "adapter": "a", "preview_every": 5}
    job = client.post("/finetune", headers=acme.headers, json=body).json()
    assert job["request"]["preview_every"] == 5
    registry.add_job_event(job["id"], "preview", {"step": 5, "sha256": grid, "url": "x"})
    r = client.get(f"/jobs/{job['id']}/previews/{grid}", headers=acme.headers)
    assert r.status_code == 200 and r.content == tiny_png(3) and r.headers["content-type"] == "image/png"
    assert client.get(f"/jobs/{job['id']}/previews/{secret}", headers=acme.headers).status_code == 404
    assert client.get(f"/jobs/{job['id']}/previews/{grid}", headers=other.headers).status_code == 404
