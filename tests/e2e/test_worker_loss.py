"""A worker SIGKILLed mid-job: the job resumes from its checkpoint on another worker."""

from __future__ import annotations

import json
import signal

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
        "batch_size": 8,
        "checkpoint_every": EVERY,
    }
    job = c.post("/finetune", json=body).json()

    # Kill the worker without warning as soon as its first checkpoint is recorded.
    with c.stream("GET", f"/jobs/{job['id']}/events") as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            if event in ("checkpoint", "end"):
                break
    assert event == "checkpoint", f"the job ended before its first checkpoint; logs in {st.root}"
    st.procs["worker-w1"].send_signal(signal.SIGKILL)
    st.procs["worker-w1"].wait(30)
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
    # It resumes from the last checkpoint the first worker recorded: only the steps since are redone.
    second_run = next(
        i for i, e in enumerate(events) if e["event"] == "running" and e["data"]["attempt"] == 2
    )
    recorded = [e["data"]["step"] for e in events[:second_run] if e["event"] == "checkpoint"]
    assert recorded and resumed_from == recorded[-1] and resumed_from % EVERY == 0, (recorded, resumed_from)
    assert resumed_from <= killed_at["progress"]["step"] + EVERY, (killed_at["progress"], resumed_from)


def _events(client, job_id: str) -> list[dict]:
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
