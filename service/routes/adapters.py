"""Adapters of the caller's tenant: list, read, delete.

Every lookup is scoped to the caller's tenant by the registry (another
tenant's adapter is a 404, like a missing one). Names in paths must match
the adapter-name rule (1-64 of ``a-z0-9_-``): anything else, such as
``..``, an encoded ``/`` or upper case, is a 422 before any lookup.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from difffit.contract import NAME_MAX_LENGTH, NAME_PATTERN
from difffit.errors import NotFound
from service.deps import BlobStoreDep, RegistryDep, TenantDep
from service.errors import problem_responses
from service.schemas import Adapter, AdapterList, AdapterSummary, AdapterVersion

router = APIRouter(prefix="/adapters", tags=["adapters"])

AdapterName = Annotated[
    str, Path(min_length=1, max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN, description="Adapter name.")
]


FILE_TYPES = {".png": "image/png", ".json": "application/json", ".safetensors": "application/octet-stream"}
#: The version's adapter file itself, downloadable like its other files.
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
    description="Blobs no other version references are removed by the store.",
    responses=problem_responses(401, 404, 422),
)
def delete_adapter(name: AdapterName, tenant: TenantDep, registry: RegistryDep) -> Response:
    registry.delete_adapter(tenant.id, name)
    return Response(status_code=204)


@router.get(
    "/{name}/versions/{version}/files/{filename}",
    response_class=Response,
    summary="Download a file of an adapter version (adapter.safetensors, sample grid, loss curve)",
    responses={200: {"content": {"image/png": {}, "application/json": {}}}}
    | problem_responses(401, 404, 422),
)
def get_version_file(
    name: AdapterName,
    version: Annotated[int, Path(ge=1, le=2**31 - 1)],
    filename: Annotated[str, Path(min_length=1, max_length=255)],
    tenant: TenantDep,
    registry: RegistryDep,
    blobs: BlobStoreDep,
) -> Response:
    v = registry.get_version(tenant.id, name, version)
    sha = v.sha256 if filename == ADAPTER_FILE else (v.files or {}).get(filename)
    if sha is None:
        raise NotFound(
            f"adapter {name!r} version {version} has no file {filename[:255]!r}; "
            f"it has {sorted([ADAPTER_FILE, *(v.files or {})])}"
        )
    media = FILE_TYPES.get(filename[filename.rfind(".") :], "application/octet-stream")
    headers = {"Content-Disposition": f'attachment; filename="{name}-v{version}.safetensors"'}
    return Response(
        content=blobs.get_bytes(sha),
        media_type=media,
        headers=headers if filename == ADAPTER_FILE else None,
    )
