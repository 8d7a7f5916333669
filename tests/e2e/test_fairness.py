"""A real Celery worker at its fine-tune cap: the next job is given back (stays queued,
untouched), generates are served meanwhile, and the job runs once the cap frees."""

from __future__ import annotations

import time

import pytest

from .conftest import class_folder_zip, running_stack

pytestmark = pytest.mark.e2e
DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def capped_stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("capped"), DIFFFIT_MAX_CONCURRENT_FINETUNES="1") as st:
        yield st


def _wait_state(client, job_id: str, states: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job {job_id} never reached {states}: {job}"
        time.sleep(0.2)


def test_a_job_over_the_cap_waits_queued_while_generates_are_served(capped_stack):
    st = capped_stack
    client = st.client(st.cli("tenant", "create", "acme"))
    class_folder_zip(st.root / "files" / "shades.zip", ["dark", "light"], per_class=6)
    body = {"dataset_url": f"{st.files_url}/shades.zip", "batch_size": 8}
    long = client.post("/finetune", json={**body, "adapter": "long", "steps": 100_000}).json()
    _wait_state(client, long["id"], ("running",))
    short = client.post("/finetune", json={**body, "adapter": "short", "steps": 10}).json()

    # The worker has 8 task threads and the one fine-tune it may run: generates still run.
    for seed in range(3):
        r = client.post("/generate", params={"class": 1, "steps": 4, "seed": seed})
        assert r.status_code == 200, r.text
    # The worker logs each give-back; wait for the first one, then look at both jobs.
    log = st.root / "worker-w1.log"
    deadline = time.monotonic() + DEADLINE_S
    while f"job {short['id']} requeued" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the short job was never given back"
        time.sleep(0.2)
    assert client.get(f"/jobs/{long['id']}").json()["state"] == "running"
    queued = client.get(f"/jobs/{short['id']}").json()
    assert queued["state"] == "queued" and queued["attempts"] == 0 and queued["started_at"] is None

    assert client.post(f"/jobs/{long['id']}/cancel").status_code in (200, 202)
    assert st.wait_job(client, long["id"])["state"] == "cancelled"
    done = st.wait_job(client, short["id"])
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 1  # giving the message back cost no attempt
