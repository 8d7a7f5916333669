"""``POST /finetune``: accept a fine-tuning job and queue it.

The finetune queue in Redis holds at most ``max_queued_finetune`` jobs; a
request above that is refused with 429 + ``Retry-After`` before any job is
recorded, so nothing is half-accepted. So is a tenant's job above
``tenant_max_queued_finetunes`` of its own jobs `queued` or `running`.
"""

from __future__ import annotations

import logging
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Header, Response

from difffit.archives import check_public_host
from difffit.contract import FINETUNE_QUEUE, FinetuneRequest
from difffit.errors import BackendUnavailable, InvalidRequest, Overloaded
from difffit.logging_setup import bind_log_context
from difffit.settings import Settings
from service.deps import QueueDep, RegistryDep, SettingsDep, TenantDep
from service.errors import problem_responses
from service.routes.jobs import job_out
from service.schemas import Job

log = logging.getLogger("difffit.service")
router = APIRouter(tags=["jobs"])

#: Retry-After (s) of the 429 when the finetune queue is full: jobs take minutes.
FINETUNE_RETRY_AFTER_S = 30


def check_dataset_url(
    url: str, settings: Settings, field: str = "dataset_url", allow_file: bool = True
) -> None:
    """Refuse schemes other than http(s) (and file:// unless allowed)."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - parses the port: "http://h:99999" raises here, not later
    except ValueError as exc:  # "http://[", a bad port...
        raise InvalidRequest(f"{field}: not a valid URL ({exc}).") from None
    scheme = parts.scheme.lower()
    allowed = ["http", "https"] + (["file"] if settings.allow_file_urls and allow_file else [])
    if scheme not in allowed:
        hint = " (file:// URLs are disabled on this server)" if scheme == "file" and allow_file else ""
        raise InvalidRequest(
            f"{field}: scheme {scheme or '(none)'!r} is not accepted{hint}; use one of {', '.join(allowed)}."
        )
    if scheme in ("http", "https") and not parts.hostname:
        raise InvalidRequest(f"{field}: the URL has no host.")
    if scheme == "file" and not parts.path:
        raise InvalidRequest(f"{field}: the file URL has no path.")


def check_webhook_url(url: str, settings: Settings) -> None:
    """http(s) only, and the same SSRF rule as data set downloads: a public host
    (checked again before every delivery, as DNS may change)."""
    check_dataset_url(url, settings, field="webhook_url", allow_file=False)
    check_public_host(url.strip(), settings, what="webhook", error=InvalidRequest)


def check_tenant_jobs(registry, tenant_id: int, settings: Settings) -> None:
    """429 when the tenant already has its limit of jobs queued or running."""
    limit = settings.tenant_max_queued_finetunes
    active = registry.count_active_jobs(tenant_id)
    if active >= limit:
        raise Overloaded(
            f"This tenant already has {active} fine-tune jobs queued or running, its limit "
            f"(DIFFFIT_TENANT_MAX_QUEUED_FINETUNES={limit}); retry in {FINETUNE_RETRY_AFTER_S} s.",
            retry_after_s=FINETUNE_RETRY_AFTER_S,
        )


@router.post(
    "/finetune",
    response_model=Job,
    status_code=202,
    summary="Start a fine-tuning job",
    description="Validates the request, records a `queued` job and sends it to the finetune "
    "queue. With an `Idempotency-Key` header, repeating the same body returns the same job "
    "(header `Idempotent-Replayed: true`) and queues nothing; the same key with a different "
    "body is a 409. 429 (with `Retry-After`) while the finetune queue is full or the tenant "
    "has its limit of jobs queued or running. The data set is "
    "`dataset_url` or an uploaded `dataset_id`; `webhook_url` gets a signed POST of the job "
    "when it ends; `preview_every` adds `preview` events (small sample grids) to the job's stream.",
    responses={202: {"headers": {"Location": {"description": "/jobs/{id}"}}}}
    | problem_responses(401, 404, 409, 422, 429, 503),
)
def create_finetune(
    body: FinetuneRequest,
    response: Response,
    tenant: TenantDep,
    registry: RegistryDep,
    queue: QueueDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
    ] = None,
) -> Job:
    if body.steps > settings.max_finetune_steps:
        raise InvalidRequest(
            f"steps: {body.steps} is above this server's limit of {settings.max_finetune_steps}."
        )
    if body.dataset_url is not None:
        check_dataset_url(body.dataset_url, settings)
    else:
        registry.get_dataset(tenant.id, body.dataset_id)  # 404 unless the tenant's
    if body.webhook_url is not None:
        check_webhook_url(body.webhook_url, settings)
    queue.check_backlog(FINETUNE_QUEUE, settings.max_queued_finetune, FINETUNE_RETRY_AFTER_S)
    check_tenant_jobs(registry, tenant.id, settings)
    job, created = registry.create_job(
        tenant.id,
        body.adapter,
        request=body.model_dump(mode="json"),
        total_steps=body.steps,
        idempotency_key=idempotency_key,
    )
    bind_log_context(job_id=str(job.id))
    if created:
        log.info("job %s accepted for adapter %r", job.id, body.adapter)
        try:
            queue.enqueue_finetune(str(job.id))
        except BackendUnavailable as exc:
            # The job would never run: record why, so a replay with the same key shows it.
            log.warning("job %s could not be queued: %s", job.id, exc.message)
            registry.update_job(job.id, state="failed", error_code=exc.code, error_message=exc.message)
            raise
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_out(job)
