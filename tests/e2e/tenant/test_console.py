"""The web console in Debian's Chromium (Playwright), against the real stack.

Log in with a key, upload a zip, start a 20-step fine-tune, watch it reach
`succeeded` with previews and the version's grid, generate in the
playground; driven with the keyboard (Enter on focused controls, labels to
find fields). A screenshot of each page goes to bench/results/ui/.

Skips (with the reason) where Chromium or the playwright package is absent;
`make test` installs Chromium when it runs as root. Playwright's own browser
download is never used.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO

from .conftest import class_folder

pytestmark = pytest.mark.e2e
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "bench" / "results" / "ui"
TIMEOUT_MS = 240_000


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - the dev extra pins it
        pytest.skip(f"the playwright package is not installed ({exc})")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` (make test does it as root)")
    return sync_playwright


def _zip(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for path in sorted(folder.rglob("*.png")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    return out


def test_console_login_upload_finetune_watch_and_generate(tenant_stack, tmp_path):
    sync_playwright = _playwright()
    key = tenant_stack.cli("tenant", "create", "console")
    archive = _zip(class_folder(tmp_path / "tones", ["dark", "light"], per_class=6), tmp_path / "tones.zip")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(60_000)
        api = tenant_stack.api

        def shot(name: str) -> None:
            page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

        # Log in: the console sends a stranger to the login page.
        page.goto(f"{api}/ui")
        page.wait_for_url(re.compile(r"/ui/login$"))
        page.get_by_label("API key", exact=True).fill("dfs_wrong")
        page.get_by_label("API key", exact=True).press("Enter")
        page.get_by_role("status").filter(has_text="not accepted").wait_for()
        page.get_by_label("API key", exact=True).fill(key)
        shot("login")
        page.get_by_label("API key", exact=True).press("Enter")
        page.wait_for_url(re.compile(r"/ui$"))

        # Upload a zip.
        page.get_by_role("link", name="Data sets").press("Enter")
        page.wait_for_url(re.compile(r"/ui/datasets$"))
        page.get_by_label("Data set archive", exact=True).set_input_files(str(archive))
        page.get_by_role("button", name="Upload").press("Enter")
        page.get_by_role("status").filter(has_text="12 images in 2 classes").wait_for()
        page.get_by_role("cell", name="tones.zip").wait_for()
        shot("datasets")

        # A 20-step fine-tune with previews.
        page.get_by_role("link", name="Fine-tune on it").press("Enter")
        page.wait_for_url(re.compile(r"/ui/finetune\?dataset=ds_"))
        page.get_by_label("Adapter name", exact=True).fill("tones")
        page.get_by_label("Steps", exact=True).fill("20")
        page.get_by_label("Batch size", exact=True).fill("8")
        page.get_by_label("Preview every (steps)", exact=True).fill("5")
        shot("finetune")
        page.get_by_role("button", name="Start fine-tune").press("Enter")
        page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f]+$"))
        page.locator("#job-state").filter(has_text="succeeded").wait_for(timeout=TIMEOUT_MS)
        grid = page.get_by_alt_text(re.compile("Sample grid of tones version 1"))
        grid.wait_for()
        preview = page.get_by_alt_text(re.compile("Preview samples at step"))
        preview.wait_for()
        page.wait_for_function("document.getElementById('grid-img').naturalWidth > 0")
        assert page.locator("#job-step").inner_text() == "20 / 20"
        assert page.locator("#loss-curve polyline").count() == 1
        shot("job")

        # Adapters list and the adapter's versions with their grid.
        page.get_by_role("link", name="Adapters", exact=True).press("Enter")
        page.get_by_role("link", name="tones", exact=True).wait_for()
        shot("adapters")
        page.get_by_role("link", name="tones", exact=True).press("Enter")
        page.get_by_role("heading", name="Version 1").wait_for()
        page.wait_for_function("[...document.images].some((i) => i.naturalWidth > 0)")
        with page.expect_download() as download:
            page.get_by_role("button", name=re.compile("Download version 1")).press("Enter")
        assert download.value.suggested_filename == "tones-v1.safetensors"
        shot("adapter")

        # The playground: two images of class "light".
        page.get_by_role("link", name="Generate with it").press("Enter")
        page.wait_for_url(re.compile(r"/ui/generate\?adapter=tones"))
        page.get_by_label("Class", exact=True).select_option("light")
        page.get_by_label("Number of images", exact=True).fill("2")
        page.get_by_label("Sampling steps", exact=True).fill("4")
        page.get_by_role("button", name="Generate", exact=True).press("Enter")
        page.get_by_role("status").filter(has_text="2 images of light").wait_for(timeout=TIMEOUT_MS)
        images = page.locator("#images img")
        assert images.count() == 2
        page.wait_for_function(
            "[...document.querySelectorAll('#images img')].every((i) => i.naturalWidth === 8)"
        )
        shot("generate")

        page.get_by_role("link", name="Jobs", exact=True).press("Enter")
        page.get_by_role("cell", name="tones", exact=True).wait_for()
        shot("jobs")
        browser.close()
    assert sorted(p.name for p in SHOTS.glob("*.png")) == sorted(
        f"{n}.png"
        for n in ("login", "datasets", "finetune", "job", "adapters", "adapter", "generate", "jobs")
    )
    assert shutil.disk_usage(SHOTS).free > 0
