"""Uploaded data sets: ``POST /datasets`` (multipart field ``file``), list, read, delete.

An upload is streamed to a temporary file under ``data_dir/uploads``
(refused with 413 past ``DIFFFIT_DATASET_MAX_BYTES``), unpacked into a
scratch folder under the same caps a job's intake applies, checked (class
folders, images), and only then stored: blob first, registry row second.
A refused upload leaves nothing behind: no blob, no row, no temporary file.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from adapters_store import lifecycle
from difffit.errors import DatasetNotFound
from service.dataset_check import inspect_archive
from service.deps import BlobStoreDep, RegistryDep, SettingsDep, TenantDep
from service.errors import problem_responses
from service.schemas import Dataset, DatasetList
from service.uploads import receive_upload, upload_openapi

log = logging.getLogger("difffit.service")
router = APIRouter(prefix="/datasets", tags=["datasets"])

DatasetId = Annotated[str, Path(min_length=1, max_length=64, description="Dataset id (`ds_...`).")]


def dataset_out(d: Any) -> Dataset:
    return Dataset(
        id=d.id,
        sha256=d.sha256,
        filename=d.filename,
        size_bytes=d.size_bytes,
        classes=list(d.class_names),
        class_counts=list(d.class_counts),
        images=d.images,
        created_at=d.created_at,
    )


def _store(registry: Any, blobs: Any, tenant_id: int, upload: Any) -> Any:
    """Blob, then row; undo the blob when the row cannot be written."""
    sha = blobs.put_file(upload.path)
    try:
        record = registry.add_dataset(
            tenant_id,
            sha256=sha,
            size_bytes=upload.size,
            class_names=upload.summary.class_names,
            class_counts=upload.summary.class_counts,
            filename=upload.filename,
        )
    except BaseException:
        lifecycle.release(registry, blobs, [sha])
        raise
    # A concurrent delete of a blob with the same content may have removed it
    # between put and row: the row now references it, so put it back.
    lifecycle.ensure_stored(blobs, {sha: upload.path})
    return record


@router.post(
    "",
    response_model=Dataset,
    status_code=201,
    summary="Upload a data set (zip or tar(.gz), one folder per class)",
    description="Multipart field `file` (or the archive as the raw body). The archive is checked "
    "with the limits a job's download has (`DIFFFIT_DATASET_MAX_BYTES` -> 413, file count, "
    "unpacked size and compression ratio -> 422) and its layout (at least two class folders, "
    "every file an image -> 422) before anything is stored. Answers the data set with its `id`, "
    "to pass as `dataset_id` to `POST /finetune`.",
    responses={
        201: {"headers": {"Location": {"description": "/datasets/{id}"}}},
    }
    | problem_responses(401, 413, 422, 503),
    openapi_extra=upload_openapi("application/zip"),
)
async def upload_dataset(
    request: Request,
    response: Response,
    tenant: TenantDep,
    registry: RegistryDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
) -> Dataset:
    scratch = settings.data_dir / "uploads"
    upload = await receive_upload(
        request, folder=scratch, max_bytes=settings.dataset_max_bytes, what="dataset archive"
    )
    try:
        upload.summary = await run_in_threadpool(inspect_archive, upload.path, settings, scratch)
        record = await run_in_threadpool(_store, registry, blobs, tenant.id, upload)
    finally:
        upload.path.unlink(missing_ok=True)
    log.info("dataset %s stored: %d images in %d classes", record.id, record.images, len(record.class_names))
    response.headers["Location"] = f"/datasets/{record.id}"
    return dataset_out(record)


@router.get(
    "",
    response_model=DatasetList,
    summary="List the tenant's data sets, newest first",
    responses=problem_responses(401, 422),
)
def list_datasets(
    tenant: TenantDep, registry: RegistryDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> DatasetList:
    return DatasetList(datasets=[dataset_out(d) for d in registry.list_datasets(tenant.id, limit=limit)])


@router.get(
    "/{dataset_id}",
    response_model=Dataset,
    summary="Read one data set",
    responses=problem_responses(401, 404),
)
def get_dataset(dataset_id: DatasetId, tenant: TenantDep, registry: RegistryDep) -> Dataset:
    return dataset_out(registry.get_dataset(tenant.id, dataset_id))


@router.delete(
    "/{dataset_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a data set",
    description="Its archive is removed from the store unless another data set (of any tenant) "
    "has the same content. 409 while a queued or running job trains on it.",
    responses=problem_responses(401, 404, 409),
)
def delete_dataset(
    dataset_id: DatasetId, tenant: TenantDep, registry: RegistryDep, blobs: BlobStoreDep
) -> Response:
    if not dataset_id.startswith("ds_"):
        raise DatasetNotFound(f"dataset {dataset_id[:64]!r} not found")
    record, _ = registry.delete_dataset(tenant.id, dataset_id)
    lifecycle.release(registry, blobs, [record.sha256])
    return Response(status_code=204)
