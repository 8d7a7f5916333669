"""``POST /adapters/{name}/versions``: import an adapter file as a new immutable version.

For adapters made elsewhere (another deployment's
``GET /adapters/{name}/versions/{v}/files/adapter.safetensors``). The file is
received into a temporary file (413 past ``DIFFFIT_ADAPTER_MAX_BYTES``),
checked against the resident base that the live workers publish
(:mod:`service.adapter_import`), stored, and registered; a refused file
leaves nothing behind.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from adapters_store import lifecycle
from difffit.errors import BackendUnavailable
from service.adapter_import import check_adapter, read_adapter_header
from service.deps import BlobStoreDep, QueueDep, RegistryDep, SettingsDep, TenantDep
from service.errors import problem_responses
from service.routes.adapters import AdapterName, version_out
from service.schemas import AdapterVersion
from service.uploads import receive_upload, upload_openapi

router = APIRouter(prefix="/adapters", tags=["adapters"])


def _resident_base(queue: Any) -> tuple[str, Any]:
    for worker in queue.live_workers(max_age_s=5.0):
        if worker.base_hash and worker.adapter_spec is not None:
            return worker.base_hash, worker.adapter_spec
    raise BackendUnavailable(
        "No live worker has published the resident base yet, so an imported adapter cannot be "
        "checked against it; retry once a worker runs."
    )


def _import(registry: Any, blobs: Any, queue: Any, tenant_id: int, name: str, data: bytes) -> Any:
    read_adapter_header(data)  # a file that is no adapter at all is a 422 even without workers
    base_hash, spec = _resident_base(queue)
    checked = check_adapter(data, base_hash, spec)
    sha = blobs.put_bytes(data)
    try:
        return registry.add_version(
            tenant_id,
            name,
            sha256=sha,
            size_bytes=len(data),
            method=checked.method,
            base_model_hash=checked.base_hash,
            class_names=checked.class_names,
            resolution=checked.resolution,
            trainable_params=checked.trainable_params,
            metadata=checked.metadata,
            files={},
            job_id=None,
        )
    except BaseException:
        lifecycle.release(registry, blobs, [sha])
        raise


@router.post(
    "/{name}/versions",
    response_model=AdapterVersion,
    status_code=201,
    summary="Import an adapter file as a new version",
    description="Multipart field `file` (or the raw body): a `.safetensors` adapter in this "
    "project's format, e.g. downloaded from another deployment. Checked against the resident "
    "base (content hash, every tensor's name, shape and dtype, finite values, class count); "
    "422 says what does not match, 413 above `DIFFFIT_ADAPTER_MAX_BYTES`, 503 while no worker "
    "has published the base. Creates the adapter if needed; versions stay immutable.",
    responses={201: {"headers": {"Location": {"description": "/adapters/{name}"}}}}
    | problem_responses(401, 413, 422, 503),
    openapi_extra=upload_openapi("application/octet-stream"),
)
async def import_adapter(
    name: AdapterName,
    request: Request,
    response: Response,
    tenant: TenantDep,
    registry: RegistryDep,
    blobs: BlobStoreDep,
    queue: QueueDep,
    settings: SettingsDep,
) -> AdapterVersion:
    upload = await receive_upload(
        request,
        folder=settings.data_dir / "uploads",
        max_bytes=settings.adapter_max_bytes,
        what="adapter file",
    )
    try:
        data = upload.path.read_bytes()
    finally:
        upload.path.unlink(missing_ok=True)
    version = await run_in_threadpool(_import, registry, blobs, queue, tenant.id, name, data)
    response.headers["Location"] = f"/adapters/{name}"
    return version_out(version)
