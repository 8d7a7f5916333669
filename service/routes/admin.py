"""Operator endpoints: tenants and their API keys, and purging a tenant.

Authenticated by ``Authorization: Bearer <DIFFFIT_ADMIN_KEY>`` (compared in
constant time); tenant keys never work here. When ``DIFFFIT_ADMIN_KEY`` is
unset every admin route answers 404 (``not-found``, "admin API disabled"):
404 rather than 403 so a server without an admin key does not advertise an
attack surface, and the detail still tells an operator what to set.

API keys are returned once, at creation; the registry stores only their
sha256 and an 8-character display prefix, which is what revocation takes.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adapters_store import TenantRecord, lifecycle
from difffit.contract import NAME_MAX_LENGTH, NAME_PATTERN
from difffit.errors import NotFound, Unauthorized
from service.deps import BlobStoreDep, RegistryDep, SettingsDep
from service.errors import problem_responses
from service.schemas import KeyCreated, TenantCreate, TenantCreated, TenantOut

DISPLAY_PREFIX_LEN = 8  # adapters_store.registry_tenants.DISPLAY_PREFIX_LEN

_admin_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminKey",
    description="The operator key: `Authorization: Bearer <DIFFFIT_ADMIN_KEY>`.",
)


def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)],
) -> None:
    """404 when the admin API is disabled, 401 unless the admin key is presented."""
    expected = settings.admin_key
    if not expected:
        raise NotFound("The admin API is disabled on this server (set DIFFFIT_ADMIN_KEY to enable it).")
    given = credentials.credentials if credentials is not None else ""
    if credentials is None or credentials.scheme.lower() != "bearer" or not given:
        raise Unauthorized("Admin routes need `Authorization: Bearer <admin key>`.")
    # Constant time, on bytes (compare_digest refuses non-ASCII str).
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise Unauthorized("Invalid admin key.")


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])

TenantName = Annotated[
    str, Path(min_length=1, max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, description="Tenant name.")
]


def _tenant_out(record: TenantRecord) -> TenantOut:
    return TenantOut(name=record.name, disabled=bool(record.disabled), created_at=record.created_at)


@router.post(
    "/tenants",
    response_model=TenantCreated,
    status_code=201,
    summary="Create a tenant and its first API key",
    description="The key is in the answer only; store it. 409 when the name is taken.",
    responses=problem_responses(401, 404, 409, 422),
)
async def create_tenant(body: TenantCreate, registry: RegistryDep, response: Response) -> TenantCreated:
    tenant = await run_in_threadpool(registry.create_tenant, body.name)
    key = await run_in_threadpool(registry.create_api_key, body.name)
    secret = await run_in_threadpool(registry.webhook_secret, tenant.id)
    response.headers["Location"] = f"/admin/tenants/{body.name}"
    return TenantCreated(
        name=body.name, api_key=key, key_prefix=key[:DISPLAY_PREFIX_LEN], webhook_secret=secret
    )


@router.post(
    "/tenants/{name}/keys",
    response_model=KeyCreated,
    status_code=201,
    summary="Create another API key for a tenant",
    description="Keys of a tenant are independent: rotate by creating a new one, then revoking the old one.",
    responses=problem_responses(401, 404, 422),
)
async def create_key(name: TenantName, registry: RegistryDep) -> KeyCreated:
    key = await run_in_threadpool(registry.create_api_key, name)
    return KeyCreated(tenant=name, api_key=key, key_prefix=key[:DISPLAY_PREFIX_LEN])


@router.delete(
    "/keys/{prefix}",
    status_code=204,
    response_class=Response,
    summary="Revoke an API key",
    description="Takes the key's 8-character prefix (or the full key). 404 when nothing "
    "matches; 409 when the prefix matches several live keys (pass the full key then). "
    "Revoking a revoked key again is a 204.",
    responses=problem_responses(401, 404, 409, 422),
)
async def revoke_key(
    prefix: Annotated[str, Path(min_length=1, max_length=256, description="Key prefix or full key.")],
    registry: RegistryDep,
) -> Response:
    await run_in_threadpool(registry.revoke_key, prefix)
    return Response(status_code=204)


@router.post(
    "/tenants/{name}/disable",
    response_model=TenantOut,
    summary="Disable a tenant: its keys stop authenticating",
    description="Its adapters and jobs stay; jobs already queued still run.",
    responses=problem_responses(401, 404, 422),
)
async def disable_tenant(name: TenantName, registry: RegistryDep) -> TenantOut:
    return _tenant_out(await run_in_threadpool(registry.set_tenant_disabled, name, True))


@router.post(
    "/tenants/{name}/enable",
    response_model=TenantOut,
    summary="Re-enable a disabled tenant",
    responses=problem_responses(401, 404, 422),
)
async def enable_tenant(name: TenantName, registry: RegistryDep) -> TenantOut:
    return _tenant_out(await run_in_threadpool(registry.set_tenant_disabled, name, False))


@router.delete(
    "/tenants/{name}",
    status_code=204,
    response_class=Response,
    summary="Purge a tenant: its keys, jobs, adapters and their blobs",
    description="Irreversible. Deletes the tenant's API keys, jobs (with their events and "
    "checkpoints) and adapters (with every version), then removes from the blob store each "
    "file no other tenant's version references. A job of the tenant still running stops at its "
    "next progress write; anything it stores after the purge is removed by `difffit gc`. "
    "To only lock a tenant out, disable it instead.",
    responses=problem_responses(401, 404, 422),
)
async def purge_tenant(name: TenantName, registry: RegistryDep, blobs: BlobStoreDep) -> Response:
    await run_in_threadpool(lifecycle.purge_tenant, registry, blobs, name)
    return Response(status_code=204)
