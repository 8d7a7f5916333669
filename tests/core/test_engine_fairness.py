"""Admission is round-robin across tenants; a cancelled request leaves the batch at the next step."""

from __future__ import annotations

import time

import pytest
import torch

from core.base_model import load_base
from core.engine.engine import Engine
from core.engine.sampling import SampleRequest

DEADLINE_S = 60.0


def _request(rid: str, tenant: str | None, n: int = 2, steps: int = 2, seed: int = 0) -> SampleRequest:
    # guidance 1: rows == n, so a batch cap of 2 rows holds exactly one request
    labels = [i % 3 for i in range(n)]
    return SampleRequest(rid, None, None, labels, seed, steps, 1.0, "ddim", 8, tenant=tenant)


def _admission_order(engine: Engine, requests: list[SampleRequest]) -> list[str]:
    """Drive the engine's loop body by hand (no thread): the order requests became active."""
    engine._waiting.extend(requests)
    order: list[str] = []
    while engine._waiting or engine._active:
        engine._admit()
        order += [r.request_id for r in engine._active if r.request_id not in order]
        engine._sample_step()
    assert all(r.future.done() for r in requests)
    return order


@pytest.fixture
def engine(tiny_base):
    return Engine(load_base(tiny_base), slots=3, max_classes=10, max_batch_size=2)  # not started


def test_a_single_request_is_admitted_before_another_tenants_backlog_drains(engine):
    burst = [_request(f"a{i}", "a") for i in range(5)]
    order = _admission_order(engine, [*burst, _request("b0", "b"), _request("c0", "c")])
    # FIFO would serve a0..a4 first; round-robin gives b and c the next turns.
    assert order == ["a0", "b0", "c0", "a1", "a2", "a3", "a4"]


def test_a_running_tenant_keeps_its_turn_when_its_next_request_arrives_later(engine):
    engine._waiting.append(_request("a0", "a"))
    engine._admit()  # a0 runs; nothing else of a's waits
    engine._waiting.extend([_request("a1", "a"), _request("b0", "b")])  # a1 came first
    while engine._active:
        engine._sample_step()
    engine._admit()
    assert [r.request_id for r in engine._active] == ["b0"]


def test_one_tenant_keeps_fifo_order(engine):
    requests = [_request(f"r{i}", None) for i in range(4)]
    assert _admission_order(engine, requests) == ["r0", "r1", "r2", "r3"]


def test_a_tenant_that_comes_back_is_not_penalised_for_its_past(engine):
    _admission_order(engine, [_request("b-old", "b")])
    order = _admission_order(engine, [*(_request(f"a{i}", "a") for i in range(3)), _request("b1", "b")])
    assert order == ["a0", "b1", "a1", "a2"]


def _wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_a_cancelled_active_request_leaves_the_batch_next_step_and_others_are_unchanged(tiny_base):
    base = load_base(tiny_base)
    engine = Engine(base, slots=3, max_classes=10, max_batch_size=64).start()
    try:
        steps = 1000  # long enough that the cancel lands mid-run on a slow, shared machine
        keep = _request("keep", "a", n=2, steps=steps, seed=1)
        drop = _request("drop", "b", n=3, steps=steps, seed=2)
        kept, dropped = engine.submit(keep), engine.submit(drop)
        _wait_until(lambda: drop.step_index >= 2 and keep.step_index >= 2, "both requests to run")
        assert dropped.cancel()  # what Runtime.generate does when its caller gives up
        seen = len(keep.batch_sizes)  # steps of `keep` started before the cancel
        images = kept.result(timeout=DEADLINE_S)
        assert drop.step_index < steps, "the cancelled request ran to its end"
        assert 5 in keep.batch_sizes[:seen]  # they shared forwards before the cancel
        # At most the step in flight at the cancel (index `seen`) still carried drop's 3 rows.
        assert set(keep.batch_sizes[seen + 1 :]) == {2}
        _wait_until(lambda: engine.stats()["active_requests"] == 0, "the batch to empty")

        alone = engine.submit(_request("alone", "a", n=2, steps=steps, seed=1)).result(timeout=DEADLINE_S)
        assert images.shape == alone.shape == (2, 1, 8, 8) and images.dtype == torch.float32
        # Same seed, same maths; only the batch's fp32 summation order differs (see
        # test_engine_sampling): 1e-5 of the largest value (~60 here); another request's
        # rows or noise leaking in would differ by O(1).
        tol = 1e-4 + 1e-5 * alone.abs().max().item()
        assert (images - alone).abs().max().item() <= tol
    finally:
        engine.stop()
