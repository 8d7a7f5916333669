"""Adapters of the caller's tenant: list, read, delete, download their files.

Every lookup is scoped to the caller's tenant by the registry (another
tenant's adapter is a 404, like a missing one). Names in paths must match
the adapter-name rule (1-64 of ``a-z0-9_-``): anything else, such as
``..``, an encoded ``/`` or upper case, is a 422 before any lookup.

Deletes free the blobs nothing else references (`adapters_store.lifecycle`).
Downloads stream from the blob store, verified against their sha256 on the
way (a corrupt blob ends the response before its last chunk, so a client
never receives it whole), or, with DIFFFIT_DOWNLOAD_REDIRECT on an S3 store,
answer 307 to a presigned URL valid DIFFFIT_DOWNLOAD_URL_TTL_S seconds.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from adapters_store import lifecycle
from difffit.contract import NAME_MAX_LENGTH, NAME_PATTERN
from difffit.errors import NotFound
from service.deps import BlobStoreDep, RegistryDep, SettingsDep, TenantDep
from service.errors import problem_responses
from service.schemas import Adapter, AdapterList, AdapterSummary, AdapterVersion

router = APIRouter(prefix="/adapters", tags=["adapters"])

AdapterName = Annotated[
    str, Path(min_length=1, max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, description="Adapter name.")
]


FILE_TYPES = {".png": "image/png", ".json": "application/json", ".safetensors": "application/octet-stream"}
#: The name under which a version's adapter file (its `sha256`) is downloaded.
ADAPTER_FILE = "adapter.safetensors"


def version_out(v: Any) -> AdapterVersion:
    class_names = list(v.class_names or [])
    files = dict(v.files or {})
    return AdapterVersion(
        version=v.version,
        sha256=v.sha256,
        size_bytes=v.size_bytes,
        method=v.method,
        class_names=class_names,
        num_classes=len(class_names),
        resolution=v.resolution,
        trainable_params=v.trainable_params,
        base_model_hash=v.base_model_hash,
        job_id=v.job_id,
        created_at=v.created_at,
        files=files,
        file_urls={f: f"/adapters/{v.name}/versions/{v.version}/files/{f}" for f in [ADAPTER_FILE, *files]},
        metadata=dict(v.metadata or {}),
    )


def adapter_out(a: Any) -> Adapter:
    versions = sorted(a.versions or [], key=lambda v: v.version)
    return Adapter(
        name=a.name,
        latest_version=a.latest_version,
        created_at=a.created_at,
        versions=[version_out(v) for v in versions],
    )


def adapter_summary(a: Any) -> AdapterSummary:
    versions = list(a.versions or [])
    latest = next((v for v in versions if v.version == a.latest_version), None)
    return AdapterSummary(
        name=a.name,
        latest_version=a.latest_version,
        created_at=a.created_at,
        num_versions=len(versions),
        class_names=list(latest.class_names or []) if latest else [],
    )


@router.get(
    "",
    response_model=AdapterList,
    summary="List the tenant's adapters",
    responses=problem_responses(401),
)
def list_adapters(tenant: TenantDep, registry: RegistryDep) -> AdapterList:
    return AdapterList(adapters=[adapter_summary(a) for a in registry.list_adapters(tenant.id)])


@router.get(
    "/{name}",
    response_model=Adapter,
    summary="Read one adapter and all its versions",
    responses=problem_responses(401, 404, 422),
)
def get_adapter(name: AdapterName, tenant: TenantDep, registry: RegistryDep) -> Adapter:
    return adapter_out(registry.get_adapter(tenant.id, name))


@router.delete(
    "/{name}",
    status_code=204,
    response_class=Response,
    summary="Delete an adapter and all its versions",
    description="Its files (adapter, sample grid, loss curve) that no other version references are "
    "removed from the blob store. A new adapter of the same name starts again at version 1.",
    responses=problem_responses(401, 404, 422),
)
def delete_adapter(
    name: AdapterName, tenant: TenantDep, registry: RegistryDep, blobs: BlobStoreDep
) -> Response:
    lifecycle.delete_adapter(registry, blobs, tenant.id, name)
    return Response(status_code=204)


@router.delete(
    "/{name}/versions/{version}",
    status_code=204,
    response_class=Response,
    summary="Delete one version of an adapter",
    description="Its files that no other version references are removed from the blob store. "
    "Deleting the only version deletes the adapter. Numbers are never reused: the next "
    "fine-tune gets a number above every version the adapter ever had.",
    responses=problem_responses(401, 404, 422),
)
def delete_version(
    name: AdapterName,
    version: Annotated[int, Path(ge=1, le=2**31 - 1)],
    tenant: TenantDep,
    registry: RegistryDep,
    blobs: BlobStoreDep,
) -> Response:
    lifecycle.delete_version(registry, blobs, tenant.id, name, version)
    return Response(status_code=204)


@router.get(
    "/{name}/versions/{version}/files/{filename}",
    response_class=Response,
    summary="Download a file of an adapter version (adapter.safetensors, sample grid, loss curve)",
    description=f"`{ADAPTER_FILE}` is the adapter itself; the others are the version's `files`. "
    "The body streams from the blob store with `ETag` = the file's sha256; with "
    "DIFFFIT_DOWNLOAD_REDIRECT on an S3 store the answer is a 307 to a short-lived presigned URL.",
    responses={
        200: {"content": {"application/octet-stream": {}, "image/png": {}, "application/json": {}}},
        307: {"description": "Redirect to a presigned URL of the object store."},
    }
    | problem_responses(401, 404, 422),
)
def get_version_file(
    name: AdapterName,
    version: Annotated[int, Path(ge=1, le=2**31 - 1)],
    filename: Annotated[str, Path(min_length=1, max_length=255)],
    tenant: TenantDep,
    registry: RegistryDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
) -> Response:
    v = registry.get_version(tenant.id, name, version)
    files = dict(v.files or {})
    sha = v.sha256 if filename == ADAPTER_FILE else files.get(filename)
    if sha is None:
        raise NotFound(
            f"adapter {name!r} version {version} has no file {filename[:255]!r}; "
            f"it has {sorted([ADAPTER_FILE, *files])}"
        )
    media = FILE_TYPES.get(filename[filename.rfind(".") :], "application/octet-stream")
    headers = {"ETag": f'"{sha}"', "Cache-Control": "private, max-age=3600"}
    if settings.download_redirect:
        url = blobs.download_url(sha, ttl_s=settings.download_url_ttl_s, filename=filename, media_type=media)
        if url is not None:
            # No caching of the redirect: the URL expires, the file does not.
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    size = blobs.size(sha)
    chunks = blobs.iter_verified(sha)
    # Priming reads the first chunk here, so a missing blob (or a corrupt one
    # that fits in one chunk) is a problem response, not a cut-off body.
    first = next(chunks, b"")
    headers["Content-Length"] = str(size)
    if filename == ADAPTER_FILE:
        headers["Content-Disposition"] = f'attachment; filename="{name}-v{version}.safetensors"'

    def body() -> Any:
        yield first
        yield from chunks

    return StreamingResponse(body(), media_type=media, headers=headers)
