"""The tenant's side against a real stack: client, re-import, webhooks, OpenAI SDK, CLI verbs."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import openai
import pytest
from PIL import Image

from difffit.client import Client, verify_webhook
from tests.e2e.conftest import REPO

from .conftest import class_folder

pytestmark = pytest.mark.e2e


def test_upload_finetune_wait_generate_download_and_reimport_same_bytes(tenant_stack, trained, tmp_path):
    assert trained.dataset["classes"] == ["dark", "light", "mid"] and trained.dataset["images"] == 18
    job = trained.job
    assert job["state"] == "succeeded", job
    assert job["request"]["dataset_id"] == trained.dataset["id"] and job["adapter_version"] == 1
    kinds = [e.kind for e in trained.events]
    assert kinds[-1] == "end" and "succeeded" in kinds and "progress" in kinds
    previews = [e.data for e in trained.events if e.kind == "preview"]
    assert previews and previews[-1]["step"] == 12
    assert trained.client.request("GET", previews[-1]["url"]).content.startswith(b"\x89PNG")
    losses = [x for e in trained.events if e.kind == "progress" for x in e.data["losses"]]
    assert len(losses) == 12

    c = trained.client
    images = c.generate("shades", class_="light", n=2, seed=5, steps=4)
    assert [im.size for im in images] == [(8, 8), (8, 8)]
    pngs = c.generate_png("shades", class_="light", n=2, seed=5, steps=4)
    path = c.download_adapter("shades", 1, tmp_path / "shades.safetensors")
    assert [a["name"] for a in c.adapters()] == ["shades"]

    key_b = tenant_stack.cli("tenant", "create", "beta")
    with Client(tenant_stack.api, key_b) as b:
        version = b.import_adapter("shades-copy", path)
        assert version["version"] == 1 and version["job_id"] is None
        assert version["class_names"] == ["dark", "light", "mid"]
        assert version["sha256"] == c.adapter("shades")["versions"][0]["sha256"]
        assert b.generate_png("shades-copy", class_="light", n=2, seed=5, steps=4) == pngs
        assert b.version_file("shades-copy", 1, "adapter.safetensors") == path.read_bytes()


def test_one_signed_webhook_per_terminal_state_with_a_retry_after_500(tenant_stack, trained, receiver):
    c = trained.client
    # A failed job (the URL serves nothing) and a cancelled one (cancelled at once).
    failed = c.finetune(
        dataset_url=f"{tenant_stack.files_url}/missing.zip", adapter="nope", steps=2, webhook_url=receiver.url
    )
    cancelled = c.finetune(
        dataset_id=trained.dataset["id"], adapter="long", steps=5000, webhook_url=receiver.url
    )
    c.cancel(cancelled["id"])
    assert c.wait(failed["id"], timeout=120)["state"] == "failed"
    assert c.wait(cancelled["id"], timeout=120)["state"] == "cancelled"
    calls = receiver.wait_for(4, timeout=60)
    secret = c.webhook_secret()
    by_job: dict[str, list[dict]] = {}
    for call in calls:
        assert verify_webhook(secret, call["body"], call["headers"]["X-DiffFit-Signature"])
        job = json.loads(call["body"])
        assert call["headers"]["X-DiffFit-Event"] == f"job.{job['state']}"
        by_job.setdefault(job["id"], []).append(call)
    ok = trained.job["id"]
    assert [c_["status"] for c_ in by_job[ok]] == [500, 204]
    assert by_job[ok][0]["headers"]["X-DiffFit-Delivery"] == by_job[ok][1]["headers"]["X-DiffFit-Delivery"]
    assert json.loads(by_job[ok][1]["body"])["state"] == "succeeded"
    assert [json.loads(x["body"])["state"] for x in by_job[failed["id"]]] == ["failed"]
    assert [json.loads(x["body"])["state"] for x in by_job[cancelled["id"]]] == ["cancelled"]
    assert len(calls) == 4


def test_the_openai_package_gets_images(tenant_stack, trained):
    sdk = openai.OpenAI(base_url=f"{tenant_stack.api}/v1", api_key=trained.key, max_retries=0)
    resp = sdk.images.generate(
        model="shades", prompt="dark", n=2, size="8x8", response_format="b64_json", extra_body={"steps": 3}
    )
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in resp.data]
    assert [im.size for im in images] == [(8, 8), (8, 8)] and resp.data[0].revised_prompt == "dark"
    base = sdk.images.generate(model="base", prompt="3", extra_body={"steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(base.data[0].b64_json))).size == (8, 8)
    with pytest.raises(openai.UnprocessableEntityError, match="allowed: dark, light, mid"):
        sdk.images.generate(model="shades", prompt="a dog")


def test_cli_finetune_a_folder_then_generate(tenant_stack, trained, tmp_path):
    env = {**tenant_stack.env, "DIFFFIT_URL": tenant_stack.api, "DIFFFIT_API_KEY": trained.key}
    folder = class_folder(tmp_path / "two", ["a", "b"], per_class=4)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "launch.cli", *args], env=env, cwd=REPO, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip

    out = cli("finetune", str(folder), "--adapter", "cli-two", "--steps", "4", "--batch-size", "4")
    assert out.returncode == 0, out.stderr
    assert "job " in out.stdout and "succeeded" in out.stdout and "adapter cli-two version 1" in out.stdout
    png = tmp_path / "out.png"
    out = cli("generate", "--adapter", "cli-two", "--class", "b", "-o", str(png), "--steps", "3")
    assert out.returncode == 0, out.stderr
    assert Image.open(png).size == (8, 8)
    out = cli("generate", "--adapter", "cli-two", "--class", "zebra", "-o", str(png))
    assert out.returncode == 2 and "allowed: a, b" in out.stderr
    env.pop("DIFFFIT_API_KEY")
    os.environ.pop("DIFFFIT_API_KEY", None)
    assert cli("generate", "--class", "1", "-o", str(png)).returncode != 0
