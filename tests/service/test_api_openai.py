"""POST /v1/images/generations through the official `openai` package (TestClient transport).

The same SDK against a real stack (uvicorn, Celery worker) is in tests/e2e/tenant/.
"""

from __future__ import annotations

import base64

import openai
import pytest

from difffit.contract import AdapterSpec

from .conftest import tiny_png, worker_stats


@pytest.fixture
def sdk(client, acme) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=acme.key, http_client=client, max_retries=0)


def test_images_generate_returns_b64_pngs_of_the_named_class(sdk, acme, add_version, fake_queue):
    add_version(acme, "fungi", ["amanita", "boletus"])
    resp = sdk.images.generate(model="fungi", prompt="boletus", n=2, size="32x32", response_format="b64_json")
    assert [base64.b64decode(d.b64_json) for d in resp.data] == [tiny_png(1), tiny_png(1)]
    assert resp.data[0].revised_prompt == "boletus" and resp.created > 0
    task = fake_queue.generated[-1]
    assert task.adapter.name == "fungi" and task.class_labels == [1, 1]
    # The base model by class name; seed and steps through extra_body; no size given.
    resp = sdk.images.generate(model="base", prompt="Trouser", extra_body={"seed": 7, "steps": 3})
    assert base64.b64decode(resp.data[0].b64_json) == tiny_png(1)
    assert fake_queue.generated[-1].adapter is None
    assert (fake_queue.generated[-1].seed, fake_queue.generated[-1].steps) == (7, 3)


def test_sdk_errors_carry_the_problem(sdk, acme, add_version, fake_queue):
    add_version(acme, "fungi", ["amanita", "boletus"])
    with pytest.raises(openai.NotFoundError):
        sdk.images.generate(model="nope", prompt="x")
    with pytest.raises(openai.UnprocessableEntityError, match="allowed: amanita, boletus"):
        sdk.images.generate(model="fungi", prompt="a cat on a sofa")
    with pytest.raises(openai.UnprocessableEntityError, match="makes 32x32 images"):
        sdk.images.generate(model="fungi", prompt="amanita", size="1024x1024")
    with pytest.raises(openai.UnprocessableEntityError, match="'url' is not offered"):
        sdk.images.generate(model="fungi", prompt="amanita", response_format="url")
    fake_queue.workers = [worker_stats(adapter_spec=AdapterSpec(resolution=32))]
    with pytest.raises(openai.UnprocessableEntityError, match="makes 32x32"):
        sdk.images.generate(model="base", prompt="Bag", size="256x256")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url="http://testserver/v1", api_key="wrong", http_client=sdk._client
        ).images.generate(prompt="Bag")
