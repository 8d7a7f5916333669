"""Registry: tenants, API keys, schema and connectivity."""

from __future__ import annotations

import hashlib
from datetime import UTC

import pytest
from sqlalchemy import text

from adapters_store import Registry, TenantRecord
from difffit.errors import BackendUnavailable, Conflict, InvalidRequest, NotFound, TenantNotFound
from difffit.settings import Settings


def test_create_and_get_tenant(registry: Registry) -> None:
    t = registry.create_tenant("acme")
    assert isinstance(t, TenantRecord)
    assert t.name == "acme" and t.id > 0 and not t.disabled
    assert t.created_at.tzinfo is not None and t.created_at.utcoffset() == UTC.utcoffset(None)
    assert registry.get_tenant("acme") == t
    with pytest.raises(Conflict, match="acme"):
        registry.create_tenant("acme")


@pytest.mark.parametrize("name", ["", "Acme", "-x", "a b", "a/b", "x" * 65, "../etc"])
def test_tenant_name_validated(registry: Registry, name: str) -> None:
    with pytest.raises(InvalidRequest):
        registry.create_tenant(name)


def test_get_missing_tenant(registry: Registry) -> None:
    with pytest.raises(TenantNotFound, match="nobody"):
        registry.get_tenant("nobody")


def test_records_are_frozen(registry: Registry) -> None:
    t = registry.create_tenant("acme")
    with pytest.raises(ValueError):
        t.name = "other"  # type: ignore[misc]


def test_api_key_stored_only_as_hash(registry: Registry) -> None:
    t = registry.create_tenant("acme")
    key = registry.create_api_key("acme")
    assert key.startswith("dfs_") and len(key) > 40
    assert registry.tenant_for_key(key) == t
    with registry._db.engine.connect() as conn:
        rows = conn.execute(text("SELECT key_hash, prefix FROM api_keys")).all()
    assert rows == [(hashlib.sha256(key.encode()).hexdigest(), key[:8])]
    # The plaintext (or any long piece of it) appears nowhere in the row.
    assert key not in repr(rows) and key[8:] not in repr(rows)


def test_unknown_and_empty_keys(registry: Registry) -> None:
    registry.create_tenant("acme")
    key = registry.create_api_key("acme")
    assert registry.tenant_for_key(key + "x") is None
    assert registry.tenant_for_key("") is None
    assert registry.tenant_for_key(hashlib.sha256(key.encode()).hexdigest()) is None
    with pytest.raises(TenantNotFound):
        registry.create_api_key("nobody")


def test_keys_map_to_their_tenant(registry: Registry) -> None:
    a = registry.create_tenant("a")
    b = registry.create_tenant("b")
    ka, kb = registry.create_api_key("a"), registry.create_api_key("b")
    assert ka != kb
    assert registry.tenant_for_key(ka) == a
    assert registry.tenant_for_key(kb) == b


def test_revoke_full_key(registry: Registry) -> None:
    registry.create_tenant("acme")
    k1, k2 = registry.create_api_key("acme"), registry.create_api_key("acme")
    registry.revoke_key(k1)
    assert registry.tenant_for_key(k1) is None
    assert registry.tenant_for_key(k2) is not None
    registry.revoke_key(k1)  # already revoked: a no-op
    with pytest.raises(NotFound):
        registry.revoke_key("dfs_not-a-real-key")


def test_revoke_by_prefix(registry: Registry) -> None:
    registry.create_tenant("acme")
    key = registry.create_api_key("acme")
    registry.revoke_key(key[:8])
    assert registry.tenant_for_key(key) is None
    with pytest.raises(NotFound):
        registry.revoke_key("dfs_zzzz" if not key.startswith("dfs_zzzz") else "dfs_yyyy")


def test_revoke_ambiguous_prefix_refused(registry: Registry) -> None:
    registry.create_tenant("acme")
    k1, k2 = registry.create_api_key("acme"), registry.create_api_key("acme")
    with registry._db.engine.begin() as conn:
        conn.execute(text("UPDATE api_keys SET prefix = 'dfs_same'"))
    with pytest.raises(Conflict, match="full key"):
        registry.revoke_key("dfs_same")
    assert registry.tenant_for_key(k1) is not None and registry.tenant_for_key(k2) is not None


def test_disabled_tenant_keys_stop_working(registry: Registry) -> None:
    registry.create_tenant("acme")
    key = registry.create_api_key("acme")
    assert registry.set_tenant_disabled("acme", True).disabled
    assert registry.tenant_for_key(key) is None
    registry.set_tenant_disabled("acme", False)
    assert registry.tenant_for_key(key) is not None


def test_create_schema_is_idempotent_and_ping(registry: Registry) -> None:
    registry.create_tenant("acme")
    registry.create_schema()
    registry.ping()
    assert registry.get_tenant("acme").name == "acme"


def test_ping_unreachable_raises_backend_unavailable() -> None:
    reg = Registry("postgresql+psycopg2://postgres:secret@127.0.0.1:1/nothing")
    with pytest.raises(BackendUnavailable) as err:
        reg.ping()
    assert "secret" not in err.value.message and "127.0.0.1:1" in err.value.message


def test_from_settings_uses_sqlite_under_data_dir(tmp_path) -> None:
    data_dir = tmp_path / "state" / "nested"
    reg = Registry.from_settings(Settings(data_dir=data_dir))
    reg.create_schema()
    reg.create_tenant("acme")
    assert (data_dir / "registry.db").is_file()
    with reg._db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    reg.close()


def test_in_memory_sqlite_works() -> None:
    reg = Registry("sqlite://")
    reg.create_schema()
    assert reg.create_tenant("acme").name == "acme"
    assert reg.get_tenant("acme").name == "acme"
