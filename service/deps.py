"""FastAPI dependencies: settings, registry, blob store, queue, current tenant.

Each shared object is created once per app, lazily, and kept on
``app.state``; tests swap any of them with ``app.dependency_overrides``
(for example ``app.dependency_overrides[get_queue] = lambda: fake``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adapters_store import BlobStore, Registry, TenantRecord, blob_store_from_settings
from difffit.errors import Unauthorized
from difffit.settings import Settings
from service.queue import QueueClient

T = TypeVar("T")
_lock = threading.Lock()


def _lazy(request: Request, attr: str, build: Callable[[], T]) -> T:
    state = request.app.state
    value = getattr(state, attr, None)
    if value is None:
        with _lock:
            value = getattr(state, attr, None)
            if value is None:
                value = build()
                setattr(state, attr, value)
    return value


def get_settings(request: Request) -> Settings:
    """The app's settings (given to ``create_app`` or read once from the environment)."""
    return request.app.state.settings


def get_registry(request: Request) -> Registry:
    """The SQL registry of tenants, keys, adapters and jobs."""

    def build() -> Any:
        return Registry.from_settings(request.app.state.settings)

    return _lazy(request, "registry", build)


def get_blob_store(request: Request) -> BlobStore:
    """The content-addressed blob store DIFFFIT_BLOB_URL names (a folder or an S3 bucket)."""

    def build() -> Any:
        return blob_store_from_settings(request.app.state.settings)

    return _lazy(request, "blob_store", build)


def get_queue(request: Request) -> QueueClient:
    """The Celery client that reaches the workers."""

    def build() -> Any:
        return QueueClient(request.app.state.settings)

    return _lazy(request, "queue", build)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
BlobStoreDep = Annotated[BlobStore, Depends(get_blob_store)]
QueueDep = Annotated[QueueClient, Depends(get_queue)]

_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`.")


def get_current_tenant(
    registry: RegistryDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TenantRecord:
    """The tenant owning the request's API key; 401 problem when absent or unknown."""
    if credentials is None or not credentials.credentials:
        raise Unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
    if credentials.scheme.lower() != "bearer":
        raise Unauthorized("Use the Bearer scheme: `Authorization: Bearer <key>`.")
    tenant = registry.tenant_for_key(credentials.credentials)
    if tenant is None:
        raise Unauthorized("Invalid API key.")
    return tenant


TenantDep = Annotated[TenantRecord, Depends(get_current_tenant)]
