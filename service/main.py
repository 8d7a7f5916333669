"""The FastAPI application of DiffFit Serve.

``create_app(settings)`` builds an app; ``app_factory()`` is the entry point
for ``uvicorn service.main:app_factory --factory``. ``service.main:app`` is
also available and builds the default app on first access (so importing
this module reads no settings and opens no connection). Both entry points
configure the process's logging (JSON lines unless ``DIFFFIT_LOG_JSON=false``);
``create_app`` alone leaves logging to its caller (tests, embedding).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from difffit.logging_setup import configure_logging
from difffit.settings import Settings, get_settings
from service.errors import install_error_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.middleware import RequestContextMiddleware
from service.routes import (
    adapter_import,
    adapters,
    admin,
    datasets,
    finetune,
    generate,
    health,
    jobs,
    openai_images,
    ui,
    webhooks,
)

API_VERSION = "0.1.0"

TAGS = [
    {"name": "jobs", "description": "Fine-tune DiffFit adapters and follow the jobs."},
    {"name": "datasets", "description": "Upload data sets (zip or tar, one folder per class)."},
    {"name": "generate", "description": "Sample images from the base model or an adapter."},
    {"name": "adapters", "description": "The tenant's adapters and their immutable versions."},
    {"name": "webhooks", "description": "The secret that signs the tenant's webhooks."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
    {"name": "admin", "description": "Operators: tenants and API keys (`DIFFFIT_ADMIN_KEY`)."},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. ``settings`` defaults to :func:`difffit.settings.get_settings`."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dispatcher = None
        if settings.webhook_dispatch:
            from adapters_store import Registry
            from service.webhooks import WebhookDispatcher

            if app.state.registry is None:
                app.state.registry = Registry.from_settings(settings)
            dispatcher = WebhookDispatcher(app.state.registry, settings).start()
        yield
        if dispatcher is not None:
            dispatcher.stop()
        queue = getattr(app.state, "queue", None)
        if queue is not None and hasattr(queue, "close"):
            queue.close()

    app = FastAPI(
        title="DiffFit Serve",
        version=API_VERSION,
        description="Fine-tune and serve DiffFit adapters of one frozen diffusion transformer. "
        "Authenticate with `Authorization: Bearer <key>`; errors are `application/problem+json`.",
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = None
    app.state.blob_store = None
    app.state.queue = None
    app.state.metrics = Metrics()

    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    # Added last = outermost: its request id covers every log line of the request.
    app.add_middleware(RequestContextMiddleware)

    app.include_router(datasets.router)
    app.include_router(finetune.router)
    app.include_router(jobs.router)
    app.include_router(generate.router)
    app.include_router(openai_images.router)
    app.include_router(adapters.router)
    app.include_router(adapter_import.router)
    app.include_router(webhooks.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(ui.router)
    app.mount(ui.STATIC, ui.static_files(), name="ui-static")
    logging.getLogger("difffit").setLevel(settings.log_level.upper())
    return app


def app_factory() -> FastAPI:
    """Entry point for ``uvicorn service.main:app_factory --factory``."""
    settings = get_settings()
    configure_logging(settings.log_level, json_logs=settings.log_json)
    return create_app(settings)


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # `service.main:app` without --factory: build the default app on first use.
    global _app
    if name == "app":
        if _app is None:
            _app = app_factory()
        return _app
    raise AttributeError(name)
