"""/admin: tenants and API keys, behind DIFFFIT_ADMIN_KEY."""

from __future__ import annotations

import pytest

ADMIN_KEY = "test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def admin_client(settings, registry, fake_queue, make_client):
    with make_client(settings.model_copy(update={"admin_key": ADMIN_KEY}), registry, fake_queue) as c:
        yield c


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_admin_api_is_404_when_no_admin_key_is_set(client, assert_problem):
    # Disabled: every admin route answers the same 404, whatever key is sent.
    body = assert_problem(client.post("/admin/tenants", json={"name": "x"}, headers=ADMIN), 404, "not-found")
    assert "admin API is disabled" in body["detail"]
    assert_problem(client.delete("/admin/keys/dfs_abcd", headers=ADMIN), 404, "not-found")


def test_admin_routes_need_the_admin_key(admin_client, acme, assert_problem):
    for headers in ({}, _bearer("wrong"), acme.headers, {"Authorization": f"Basic {ADMIN_KEY}"}):
        resp = admin_client.post("/admin/tenants", json={"name": "x"}, headers=headers)
        assert_problem(resp, 401, "unauthorized")
        assert resp.headers["www-authenticate"] == "Bearer"
    # Non-ASCII keys are compared as bytes, not a 500.
    latin1 = {"Authorization": "Bearer é".encode("latin-1")}
    assert_problem(admin_client.post("/admin/tenants/acme/keys", headers=latin1), 401, "unauthorized")


def test_create_tenant_then_use_and_revoke_its_keys(admin_client, registry, assert_problem):
    resp = admin_client.post("/admin/tenants", json={"name": "newco"}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert created["name"] == "newco" and created["api_key"].startswith("dfs_")
    assert created["key_prefix"] == created["api_key"][:8]
    first = _bearer(created["api_key"])
    assert admin_client.get("/adapters", headers=first).json() == {"adapters": []}
    # Only the hash is stored: the plaintext is nowhere in the registry's answer.
    assert registry.tenant_for_key(created["api_key"]).name == "newco"

    second = admin_client.post("/admin/tenants/newco/keys", headers=ADMIN)
    assert second.status_code == 201 and second.json()["tenant"] == "newco"
    key2 = second.json()["api_key"]
    assert key2 != created["api_key"]

    assert admin_client.delete(f"/admin/keys/{created['key_prefix']}", headers=ADMIN).status_code == 204
    assert_problem(admin_client.get("/adapters", headers=first), 401, "unauthorized")
    assert admin_client.get("/adapters", headers=_bearer(key2)).status_code == 200
    # Revoking again is idempotent; an unknown prefix is a 404.
    assert admin_client.delete(f"/admin/keys/{created['key_prefix']}", headers=ADMIN).status_code == 204
    assert_problem(admin_client.delete("/admin/keys/dfs_zzzz", headers=ADMIN), 404, "not-found")


def test_create_tenant_errors(admin_client, acme, assert_problem):
    assert_problem(admin_client.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN), 409, "conflict")
    for bad in ("Acme", "../x", "a/b", "x" * 65, ""):
        resp = admin_client.post("/admin/tenants", json={"name": bad}, headers=ADMIN)
        assert_problem(resp, 422, "invalid-request")
    assert_problem(admin_client.post("/admin/tenants/nobody/keys", headers=ADMIN), 404, "tenant-not-found")
    assert_problem(admin_client.post("/admin/tenants/Nobody/keys", headers=ADMIN), 422, "invalid-request")


def test_disable_and_enable_a_tenant(admin_client, acme, other, assert_problem):
    resp = admin_client.post("/admin/tenants/acme/disable", headers=ADMIN)
    assert resp.status_code == 200 and resp.json()["disabled"] is True
    assert_problem(admin_client.get("/adapters", headers=acme.headers), 401, "unauthorized")
    assert admin_client.get("/adapters", headers=other.headers).status_code == 200  # others unaffected
    resp = admin_client.post("/admin/tenants/acme/enable", headers=ADMIN)
    assert resp.status_code == 200 and resp.json()["disabled"] is False
    assert admin_client.get("/adapters", headers=acme.headers).status_code == 200
    assert_problem(admin_client.post("/admin/tenants/nobody/disable", headers=ADMIN), 404, "tenant-not-found")


def test_admin_routes_are_in_the_openapi_spec(admin_client):
    paths = admin_client.get("/openapi.json").json()["paths"]
    assert {"/admin/tenants", "/admin/tenants/{name}/keys", "/admin/keys/{prefix}"} <= set(paths)
    assert {"/admin/tenants/{name}/disable", "/admin/tenants/{name}/enable"} <= set(paths)
