"""Load test: many concurrent clients against a real stack on loopback.

Starts redis-server, a Celery worker and uvicorn (the end-to-end tests'
``running_stack``, tiny random base), creates a tenant, fine-tunes one small
adapter, then fires ``--requests`` POST /generate requests (n=1, steps 4..10,
known seeds and classes, half on the base and half on the adapter) from
``--clients`` concurrent clients, within a hard ``--deadline-s``.

Every answer is checked: a 200 must be a PNG of the expected size; a 429 is
retried after its Retry-After (counted apart); a 504 is polled at
GET /generate/{task_id}. A request with no answer by the deadline is *lost*.
Afterwards a sample of the requests is re-issued one at a time: the engine is
deterministic per request, so an image made in a mixed batch must equal the
one made alone (*wrong* otherwise; images off by one grey level, which float
rounding in a different batch shape can cause, are counted apart).

    python bench/load_test.py [--requests 500] [--clients 50] [--deadline-s 900]

Writes bench/results/load.json and bench/results/load.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difffit.contract import WORKER_STATS_INTERVAL_S  # noqa: E402
from launch.embedded import stop_process  # noqa: E402
from tests.e2e.conftest import class_folder_zip, running_stack  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTER = "loadtest"
CLASSES = ["a", "b", "c", "d"]
BASE_CLASSES = 10  # the tiny base's class count
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BATCH_METRIC = re.compile(r"^difffit_engine_last_batch_rows(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", re.M)
ACTIVE_METRIC = re.compile(r"^difffit_engine_active_requests(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", re.M)


@dataclass
class Spec:
    """One generate request: what to ask for (and what to ask again when verifying)."""

    index: int
    adapter: str | None
    cls: str
    seed: int
    steps: int

    def params(self) -> dict:
        p = {"class": self.cls, "seed": self.seed, "steps": self.steps, "n": 1}
        if self.adapter:
            p["adapter"] = self.adapter
        return p


@dataclass
class Outcome:
    """What happened to one request."""

    index: int
    status: int | str | None = None  # final HTTP status, a transport error name, or None (lost)
    ok: bool = False
    problem: str | None = None  # why a 200 was not acceptable, or the error's problem type
    retries_429: int = 0
    polled_504: bool = False
    latency_s: float | None = None  # first attempt -> final answer, Retry-After waits included
    attempt_s: float | None = None  # the answering attempt alone
    png: bytes | None = field(default=None, repr=False)


def make_specs(count: int, seed: int) -> list[Spec]:
    """Half base, half adapter, in a shuffled order, with steps 4..10 and distinct seeds."""
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        on_adapter = i % 2 == 1
        cls = rng.choice(CLASSES) if on_adapter else str(rng.randrange(BASE_CLASSES))
        specs.append(Spec(i, ADAPTER if on_adapter else None, cls, 1000 + i, rng.randint(4, 10)))
    rng.shuffle(specs)
    return specs


def check_png(content: bytes, size: tuple[int, int]) -> str | None:
    """None when `content` is a PNG of `size`, else what is wrong with it."""
    if not content.startswith(PNG_MAGIC):
        return "not a PNG"
    try:
        with Image.open(io.BytesIO(content)) as img:
            img.load()
            return None if img.size == size else f"size {img.size}, expected {size}"
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the finding
        return f"undecodable PNG ({type(exc).__name__})"


def run_one(client: httpx.Client, spec: Spec, size: tuple[int, int], deadline: float) -> Outcome:
    """Issue one request until it has a final answer or the deadline passes (then it is lost)."""
    out = Outcome(spec.index)
    started = time.monotonic()
    while time.monotonic() < deadline:
        attempt = time.monotonic()
        try:
            r = client.post("/generate", params=spec.params(), timeout=max(1.0, deadline - attempt))
        except httpx.TimeoutException:
            return out  # no answer within the deadline: lost
        except httpx.HTTPError as exc:
            out.status = type(exc).__name__
            out.latency_s = time.monotonic() - started
            return out
        if r.status_code == 429:
            out.retries_429 += 1
            time.sleep(min(float(r.headers.get("retry-after", "1")), max(0.0, deadline - time.monotonic())))
            continue
        if r.status_code == 504 and r.json().get("task_id"):
            out.polled_504 = True
            content = poll(client, r.json()["task_id"], deadline)
            if content is None:
                return out
            out.status, out.png = 200, content
        else:
            out.status, out.png = r.status_code, r.content
        out.latency_s = time.monotonic() - started
        out.attempt_s = time.monotonic() - attempt
        if out.status == 200:
            out.problem = check_png(out.png, size)
            out.ok = out.problem is None
        else:
            out.png = None
            try:
                out.problem = r.json().get("type", "").rsplit("/", 1)[-1]
            except ValueError:
                out.problem = "non-JSON error body"
        return out
    return out


def poll(client: httpx.Client, task_id: str, deadline: float) -> bytes | None:
    """The PNG of a request that outlived the server's wait, or None at the deadline."""
    while time.monotonic() < deadline:
        status = client.get(f"/generate/{task_id}").json()
        if status.get("state") == "succeeded":
            return base64.b64decode(status["images"][0])
        time.sleep(0.5)
    return None


class MetricsSampler(threading.Thread):
    """Reads /metrics every `interval` s during the firing phase.

    Workers publish their engine stats every ``WORKER_STATS_INTERVAL_S``, so a
    read in the first such interval may still show the setup's last batch (the
    fine-tune's sample grid): samples start one interval after the firing does.
    """

    def __init__(self, api: str, interval: float = 1.0):
        super().__init__(daemon=True, name="metrics-sampler")
        self.api, self.interval = api, interval
        self.batch_rows: list[float] = []
        self.active: list[float] = []
        self.stop = threading.Event()
        self.not_before = time.monotonic() + WORKER_STATS_INTERVAL_S

    def run(self) -> None:
        with httpx.Client(base_url=self.api, timeout=5) as client:
            while not self.stop.wait(self.interval):
                if time.monotonic() < self.not_before:
                    continue
                try:
                    text = client.get("/metrics").text
                except httpx.HTTPError:
                    continue
                self.batch_rows += [float(v) for v in BATCH_METRIC.findall(text)]
                self.active += [float(v) for v in ACTIVE_METRIC.findall(text)]


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def prepare(st) -> tuple[str, tuple[int, int]]:
    """Tenant, adapter and the expected image size; also warms the worker up."""
    key = st.cli("tenant", "create", "load")
    class_folder_zip(st.root / "files" / "ds.zip", CLASSES, per_class=8)
    with st.client(key) as c:
        body = {"dataset_url": f"{st.files_url}/ds.zip", "adapter": ADAPTER, "steps": 20, "batch_size": 8}
        job = c.post("/finetune", json=body).json()
        job = st.wait_job(c, job["id"], timeout=300)
        if job["state"] != "succeeded":
            raise RuntimeError(f"fine-tune failed: {job}")
        warm = Outcome(-1)
        for spec in (Spec(-1, None, "0", 1, 4), Spec(-2, ADAPTER, "a", 1, 4)):
            warm = run_one(c, spec, (0, 0), time.monotonic() + 300)
            if warm.status != 200:
                raise RuntimeError(f"warm-up request failed: {warm}")
        with Image.open(io.BytesIO(warm.png)) as img:
            return key, img.size


def fire(st, key: str, specs: list[Spec], clients: int, size, deadline: float):
    """All requests from `clients` threads sharing one connection pool; outcomes in spec order."""
    outcomes: dict[int, Outcome] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    pending = iter(specs)
    lock = threading.Lock()

    def client_loop(c: httpx.Client) -> None:
        while time.monotonic() < deadline:
            with lock:
                spec = next(pending, None)
            if spec is None:
                return
            outcomes[spec.index] = run_one(c, spec, size, deadline)

    auth = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(base_url=st.api, headers=auth, limits=limits) as c,
        ThreadPoolExecutor(clients) as pool,
    ):
        loops = [pool.submit(client_loop, c) for _ in range(clients)]
        for loop in loops:
            loop.result()  # a bug in the client must not pass for requests "not started"
    return outcomes


def verify(st, key: str, specs: list[Spec], outcomes: dict[int, Outcome], sample: int, deadline: float):
    """Re-issue a sample of succeeded requests one at a time and compare the images."""
    done = [s for s in specs if outcomes.get(s.index) and outcomes[s.index].ok]
    chosen = random.Random(7).sample(done, min(sample, len(done)))
    same = off_by_one = wrong = 0
    details = []
    with st.client(key) as c:
        for spec in chosen:
            alone = run_one(c, spec, (0, 0), deadline)
            if alone.status != 200 or alone.png is None:
                wrong += 1
                details.append({"spec": asdict(spec), "alone_status": alone.status})
                continue
            if alone.png == outcomes[spec.index].png:
                same += 1
                continue
            diff = np.abs(_pixels(alone.png) - _pixels(outcomes[spec.index].png)).max()
            if diff <= 1:
                off_by_one += 1
            else:
                wrong += 1
            details.append({"spec": asdict(spec), "max_pixel_diff": int(diff)})
    return {
        "checked": len(chosen),
        "identical": same,
        "off_by_one": off_by_one,
        "wrong": wrong,
        "details": details,
    }


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img, dtype=np.int16)


def summarize(args, specs, outcomes, wall_s, sampler, verified, setup_s) -> dict:
    finals = [outcomes.get(s.index) for s in specs]
    answered = [o for o in finals if o is not None and o.status is not None]
    ok = [o for o in answered if o.ok]
    latencies = [o.latency_s for o in ok]
    attempts = [o.attempt_s for o in ok]
    errors = Counter(f"{o.status} {o.problem or ''}".strip() for o in answered if not o.ok)
    rows = sampler.batch_rows
    return {
        "config": {
            "requests": args.requests,
            "clients": args.clients,
            "deadline_s": args.deadline_s,
            "engine_threads": args.engine_threads,
            "max_queued_generate": args.max_queued,
            "verify_sample": args.verify,
            "mix": "half base (class 0..9), half adapter (class a..d); n=1; steps 4..10; seed 1000+i",
        },
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": _cpus()},
        "setup_s": round(setup_s, 1),
        "total": len(specs),
        "started": sum(1 for o in finals if o is not None),
        "not_started": sum(1 for o in finals if o is None),
        "succeeded": len(ok),
        "retried_429": sum(o.retries_429 for o in finals if o is not None),
        "requests_that_got_429": sum(1 for o in finals if o is not None and o.retries_429),
        "polled_after_504": sum(1 for o in finals if o is not None and o.polled_504),
        "errors_by_status": dict(errors),
        "lost": sum(1 for o in finals if o is not None and o.status is None),
        "wrong": verified["wrong"],
        "verification": verified,
        "latency_s": {q: _r(percentile(latencies, p)) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))},
        "attempt_latency_s": {
            q: _r(percentile(attempts, p)) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))
        },
        "latency_max_s": _r(max(latencies) if latencies else None),
        "throughput_rps": _r(len(ok) / wall_s if wall_s else None),
        "wall_s": _r(wall_s),
        "engine_batch_rows": {
            "samples": len(rows),
            "max": max(rows) if rows else None,
            "mean": _r(statistics.fmean(rows) if rows else None),
            "histogram": {str(int(k)): v for k, v in sorted(Counter(rows).items())},
        },
        "engine_active_requests_max": max(sampler.active) if sampler.active else None,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _cpus() -> int | None:
    import os

    return os.cpu_count()


def render(res: dict) -> str:
    """The results as markdown."""
    cfg, lat, att, rows, ver = (
        res["config"],
        res["latency_s"],
        res["attempt_latency_s"],
        res["engine_batch_rows"],
        res["verification"],
    )
    errors = ", ".join(f"{k}: {v}" for k, v in res["errors_by_status"].items()) or "none"
    return "\n".join(
        [
            "# Load test: POST /generate against a real stack on loopback",
            "",
            f"{cfg['requests']} requests from {cfg['clients']} concurrent clients ({cfg['mix']}); "
            f"one Celery worker with {cfg['engine_threads']} task threads, tiny random base on CPU; "
            f"hard deadline {cfg['deadline_s']} s. Machine: {res['machine']['cpus']} CPUs, "
            f"{res['machine']['platform']}. Produced by `python bench/load_test.py`.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| requests (started / not started by the deadline) | {res['total']} ({res['started']} / {res['not_started']}) |",
            f"| succeeded (200 + valid PNG of the right size) | {res['succeeded']} |",
            f"| 429 answers retried after Retry-After (requests affected) | {res['retried_429']} ({res['requests_that_got_429']}) |",
            f"| 504s polled to completion | {res['polled_after_504']} |",
            f"| errors by status | {errors} |",
            f"| **lost** (no answer by the deadline) | **{res['lost']}** |",
            f"| **wrong** (image differs from the same request alone, > 1 grey level) | **{res['wrong']}** of {ver['checked']} re-checked |",
            f"| identical bytes / off by one grey level | {ver['identical']} / {ver['off_by_one']} |",
            f"| latency p50 / p95 / p99 (incl. 429 waits) | {lat['p50']} / {lat['p95']} / {lat['p99']} s |",
            f"| answering attempt p50 / p95 / p99 | {att['p50']} / {att['p95']} / {att['p99']} s |",
            f"| throughput | {res['throughput_rps']} req/s |",
            f"| wall time of the firing phase (setup: fine-tune, warm-up) | {res['wall_s']} s ({res['setup_s']} s) |",
            f"| engine batch rows sampled from /metrics: max / mean ({rows['samples']} samples) | {rows['max']} / {rows['mean']} |",
            f"| batch-rows histogram (rows: samples; guidance doubles rows) | {rows['histogram']} |",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="generate requests to fire")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--deadline-s", type=float, default=900.0, help="hard limit of the firing phase")
    parser.add_argument("--verify", type=int, default=30, help="requests re-issued alone afterwards")
    parser.add_argument("--engine-threads", type=int, default=32, help="Celery task threads of the worker")
    parser.add_argument(
        "--max-queued", type=int, default=None, help="DIFFFIT_MAX_QUEUED_GENERATE (default: the server's)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for load.json and load.md")
    args = parser.parse_args()

    env = {"DIFFFIT_ENGINE_THREADS": str(args.engine_threads), "DIFFFIT_GENERATE_TIMEOUT_S": "60"}
    if args.max_queued:
        env["DIFFFIT_MAX_QUEUED_GENERATE"] = str(args.max_queued)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="difffit-load-") as tmp, running_stack(Path(tmp), **env) as st:
        # The stack's worker has the tests' 4 task threads; replace it with a wider one so
        # that many requests can share the engine's batch.
        stop_process(st.procs.pop("worker-w1"), timeout_s=30)
        st.settings = st.settings.model_copy(update={"engine_threads": args.engine_threads})
        st.start_worker("load")
        key, size = prepare(st)
        setup_s = time.monotonic() - t0
        specs = make_specs(args.requests, seed=0)
        sampler = MetricsSampler(st.api)
        sampler.start()
        started = time.monotonic()
        deadline = started + args.deadline_s
        outcomes = fire(st, key, specs, args.clients, size, deadline)
        wall_s = time.monotonic() - started
        sampler.stop.set()
        verified = verify(st, key, specs, outcomes, args.verify, time.monotonic() + 300)
        results = summarize(args, specs, outcomes, wall_s, sampler, verified, setup_s)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(results, indent=2))
    (args.out / "load.md").write_text(render(results))
    print(render(results))
    return 0 if results["lost"] == 0 and results["wrong"] == 0 and not results["errors_by_status"] else 1


if __name__ == "__main__":
    sys.exit(main())
