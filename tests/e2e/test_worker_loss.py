"""A worker SIGKILLed mid-job: the job resumes from its checkpoint on another worker."""

from __future__ import annotations

import signal
import time

import pytest

from .conftest import class_folder_zip, running_stack

pytestmark = pytest.mark.e2e
EVERY = 10


@pytest.fixture(scope="module")
def lossy_stack(tmp_path_factory):
    # A short visibility timeout so Redis hands the dead worker's task on within seconds.
    with running_stack(tmp_path_factory.mktemp("lossy"), DIFFFIT_VISIBILITY_TIMEOUT_S="3") as st:
        yield st


def test_sigkill_mid_job_resumes_from_the_last_checkpoint(lossy_stack):
    st = lossy_stack
    key = st.cli("tenant", "create", "acme")
    class_folder_zip(st.root / "files" / "ds.zip", ["a", "b"], per_class=16)
    c = st.client(key)
    body = {
        "dataset_url": f"{st.files_url}/ds.zip",
        "adapter": "survivor",
        "steps": 400,
        "batch_size": 64,
        "checkpoint_every": EVERY,
    }
    job = c.post("/finetune", json=body).json()

    # Wait for a couple of checkpoints, then kill the worker without warning.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seen = c.get(f"/jobs/{job['id']}").json()
        if (seen["progress"]["step"] or 0) >= 2 * EVERY + 3:
            break
        time.sleep(0.05)
    st.procs["worker-w1"].send_signal(signal.SIGKILL)
    st.procs["worker-w1"].wait(10)
    killed_at = c.get(f"/jobs/{job['id']}").json()
    assert killed_at["state"] == "running" and killed_at["progress"]["step"] < 400

    st.start_worker("w2")
    done = st.wait_job(c, job["id"], timeout=240)
    assert done["state"] == "succeeded", done
    events = _events(c, job["id"])
    assert [e["data"]["attempt"] for e in events if e["event"] == "running"] == [1, 2]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1, events
    resumed_from = resumed[0]["data"]["step"]
    assert resumed_from % EVERY == 0 and resumed_from > 0
    redone = killed_at["progress"]["step"] - resumed_from
    assert 0 <= redone <= EVERY, (killed_at["progress"], resumed_from)


def _events(client, job_id: str) -> list[dict]:
    import json

    out, event = [], None
    with client.stream("GET", f"/jobs/{job_id}/events") as r:
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event:
                out.append({"event": event, "data": json.loads(line.split(":", 1)[1])})
            if event == "end":
                break
    return out
