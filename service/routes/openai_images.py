"""``POST /v1/images/generations``: the OpenAI images API over this service's sampler.

So the OpenAI SDKs people already use can call it::

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="dfs_...")
    img = client.images.generate(model="shades", prompt="light", size="32x32")

- ``model``: an adapter name of the tenant, or ``base`` for the base model;
- ``prompt``: a class, by name or index (these models are class-conditional:
  there is no text encoder, so free text is refused with the allowed names);
- ``n``, ``size`` (``WxH``; must be the model's resolution, square),
  ``response_format`` (``b64_json``, the default here: images are not hosted,
  so ``url`` is refused); ``quality``, ``style`` and ``user`` are accepted and
  ignored. Extensions (``extra_body`` in the SDK): ``seed``, ``steps``,
  ``guidance_scale``, ``version``.

Errors are the service's problem+json, which the SDK raises as APIStatusError.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from difffit.errors import DiffFitError, InvalidRequest
from service.deps import QueueDep, RegistryDep, SettingsDep, TenantDep
from service.errors import problem_responses, status_for
from service.routes.generate import sample
from service.schemas import NAME_PATTERN

router = APIRouter(prefix="/v1", tags=["generate"])
BASE_MODEL = "base"
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


class ImagesRequest(BaseModel):
    """Body of ``POST /v1/images/generations`` (OpenAI's fields plus a few extensions)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., min_length=1, max_length=256, description="Class name or index.")
    model: str = Field(BASE_MODEL, max_length=64, description="Adapter name, or `base`.")
    n: int = Field(1, ge=1)
    size: str | None = Field(None, max_length=16, description="`WxH`, the model's resolution.")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="Only `b64_json`.")
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    seed: int = Field(0, ge=0, le=2**32 - 1)
    steps: int = Field(50, ge=1)
    guidance_scale: float = Field(4.0, ge=1.0, le=50.0)
    version: int | None = Field(None, ge=1, le=2**31 - 1)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = Field(None, description="The class name the prompt resolved to.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


def _model_resolution(
    registry: Any, queue: Any, tenant_id: int, adapter: str | None, version: int | None
) -> int | None:
    if adapter is not None:
        return registry.get_version(tenant_id, adapter, version).resolution
    for worker in queue.live_workers(max_age_s=5.0):
        if worker.adapter_spec is not None and worker.adapter_spec.resolution:
            return worker.adapter_spec.resolution
    return None


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    summary="OpenAI-compatible image generation",
    description="`model` = adapter name or `base`, `prompt` = class name or index, `n`, `size` "
    "(the model's resolution, e.g. `32x32`), `response_format=b64_json`. Works with the OpenAI "
    "SDKs: `OpenAI(base_url=<server>/v1, api_key=<key>).images.generate(...)`.",
    responses=problem_responses(401, 404, 422, 429, 503, 504),
)
async def images_generations(
    body: ImagesRequest,
    request: Request,
    tenant: TenantDep,
    registry: RegistryDep,
    queue: QueueDep,
    settings: SettingsDep,
) -> ImagesResponse:
    try:
        return await _generate(body, request, tenant, registry, queue, settings)
    except DiffFitError as exc:
        # The SDKs show `error.message` of OpenAI-shaped errors: add that member to the
        # problem (client errors only; server-side messages stay in the log).
        if status_for(exc) < 500:
            extra = dict(getattr(exc, "problem_extra", None) or {})
            extra["error"] = {"message": exc.message, "type": exc.code, "code": exc.code, "param": None}
            exc.problem_extra = extra  # type: ignore[attr-defined]
        raise


async def _generate(
    body: ImagesRequest, request: Request, tenant: Any, registry: Any, queue: Any, settings: Any
) -> ImagesResponse:
    if body.response_format == "url":
        raise InvalidRequest("response_format: 'url' is not offered (images are not hosted); use 'b64_json'.")
    adapter = None if body.model == BASE_MODEL else body.model
    if adapter is not None and not re.fullmatch(NAME_PATTERN, adapter):
        raise InvalidRequest(f"model: {body.model!r} is neither 'base' nor a valid adapter name.")
    if body.version is not None and adapter is None:
        raise InvalidRequest("version: only valid with an adapter as model.")
    if body.size is not None:
        m = _SIZE.fullmatch(body.size.strip())
        if not m or m.group(1) != m.group(2):
            raise InvalidRequest(f"size: {body.size!r} is not a square 'WxH' size such as '32x32'.")
        resolution = await run_in_threadpool(
            _model_resolution, registry, queue, tenant.id, adapter, body.version
        )
        if resolution is not None and int(m.group(1)) != resolution:
            raise InvalidRequest(
                f"size: model {body.model!r} makes {resolution}x{resolution} images, not {body.size}."
            )
    _, _, _, class_name, _, result = await sample(
        request, tenant, registry, queue, settings, body.prompt, adapter, body.version,
        body.n, body.seed, body.steps, body.guidance_scale, "ddim",
    )  # fmt: skip
    return ImagesResponse(
        created=int(time.time()),
        data=[ImageData(b64_json=b64, revised_prompt=class_name) for b64 in result.images_png_b64],
    )
