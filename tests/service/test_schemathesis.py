"""Property-based fuzzing of the whole API from its own OpenAPI spec (schemathesis).

Every operation of ``/openapi.json`` gets a few generated requests that fit
the spec and a few that do not, sent in-process (ASGI) to an app with a real
SQLite registry, the fake queue and a real tenant's key (the admin key for
``/admin/...``). Whatever the input, the API must answer without a 5xx, and
every error must be ``application/problem+json`` with a stable ``type``.

Bounded so it stays a unit test: ``MAX_EXAMPLES`` per operation and mode,
no per-example deadline, derandomized (the same inputs on every run, so a
failure reproduces) and a total time budget after which the remaining
operations are skipped rather than the test running long.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation import GenerationMode  # noqa: E402

from service.errors import PROBLEM_BASE, PROBLEM_MEDIA_TYPE  # noqa: E402

MAX_EXAMPLES = 8
#: Seconds for the whole run; operations left when it is spent are not fuzzed.
BUDGET_S = 35.0
ADMIN_KEY = "admin-" + secrets.token_hex(8)


@pytest.fixture
def api(settings, registry, fake_queue, make_client):
    s = settings.model_copy(update={"admin_key": ADMIN_KEY})
    # A tenant name no generated input will hit (admin fuzzing disables random names).
    name = "fuzz-" + secrets.token_hex(8)
    registry.create_tenant(name)
    key = registry.create_api_key(name)
    with make_client(s, registry, fake_queue) as client:
        yield client.app, key


def _check(case: Any, response: Any) -> None:
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.content[:500]!r}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        # schemathesis' Response keeps every header as a list of values.
        (content_type,) = response.headers.get("content-type", [""])
        assert content_type.startswith(PROBLEM_MEDIA_TYPE), where
        body = response.json()
        assert body["type"].startswith(PROBLEM_BASE), where
        assert body["status"] == response.status_code, where


def _with_valid_dataset_url(case: Any) -> Any:
    if isinstance(case.body, dict):
        case.body = {**case.body, "dataset_url": "https://data.example/set.zip"}
    return case


def _fuzz(op: Any, headers: dict[str, str]) -> None:
    """Send MAX_EXAMPLES fitting and MAX_EXAMPLES unfitting requests to one operation."""
    positive = op.as_strategy(generation_mode=GenerationMode.POSITIVE)
    if op.label == "POST /finetune":
        # A random string is almost never an http(s) URL with a host: without this the
        # fuzzer would never get past the URL check to the registry and the queue.
        positive = st.one_of(positive, positive.map(_with_valid_dataset_url))
    strategy = st.one_of(positive, op.as_strategy(generation_mode=GenerationMode.NEGATIVE))

    @given(case=strategy)
    @settings(
        max_examples=2 * MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        # Read timeout: the event stream of a (not generated) live job would never end.
        _check(case, case.call(headers=headers, timeout=10))

    run()


def test_no_input_makes_a_5xx_and_every_error_is_a_problem(api):
    app, tenant_key = api
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 15
    start = time.monotonic()
    fuzzed = []
    for op in operations:
        if time.monotonic() - start > BUDGET_S:
            break
        key = ADMIN_KEY if op.path.startswith("/admin") else tenant_key
        _fuzz(op, {"Authorization": f"Bearer {key}"})
        fuzzed.append(op.label)
    assert len(fuzzed) == len(operations), f"budget spent; fuzzed only {fuzzed}"
