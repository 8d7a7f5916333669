"""The tenant's webhook signing secret.

Every webhook POST (see :mod:`service.webhooks`) carries
``X-DiffFit-Signature: sha256=<hex>``, the HMAC-SHA256 of the raw body under
this secret. It is made on first use (or when the admin API creates the
tenant) and can be rotated; deliveries use the secret current at send time.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from service.deps import RegistryDep, TenantDep
from service.errors import problem_responses
from service.schemas import WebhookSecret

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


@router.get(
    "/secret",
    response_model=WebhookSecret,
    summary="The secret that signs this tenant's webhooks",
    responses=problem_responses(401),
)
async def get_secret(tenant: TenantDep, registry: RegistryDep) -> WebhookSecret:
    return WebhookSecret(secret=await run_in_threadpool(registry.webhook_secret, tenant.id))


@router.post(
    "/secret/rotate",
    response_model=WebhookSecret,
    summary="Replace the webhook secret (the old one stops signing at once)",
    responses=problem_responses(401),
)
async def rotate_secret(tenant: TenantDep, registry: RegistryDep) -> WebhookSecret:
    return WebhookSecret(secret=await run_in_threadpool(registry.rotate_webhook_secret, tenant.id))
