"""Issue 14 benchmark: no starvation and fair tenants, measured side by side in one run.

One real worker Runtime in this process (the bundled base, SQLite registry and
file blob store in a temporary data dir, CPU), with real fine-tune jobs
(intake of a small class-folder zip, training on the engine) and real
generate requests (Runtime.generate: engine batch, PNG encoding on the task
thread).

(a) Starvation. The Celery thread pool of one worker is modelled by a
    ThreadPoolExecutor of DIFFFIT_ENGINE_THREADS (8) threads fed in FIFO
    order (the broker queue as the worker's prefetch sees it) that runs the
    real task bodies, worker.tasks.finetune and worker.tasks.generate; a
    fine-tune that the cap gives back (Celery's retry) is offered again after
    FINETUNE_REQUEUE_S, as Celery's ETA would. Arms, interleaved per round:
      idle    - no fine-tune; K generates one after another;
      capped  - 8 long fine-tunes sent first, cap DIFFFIT_MAX_CONCURRENT_FINETUNES=2
                (2 train, 6 are given back), then the same K generates;
      nocap   - the same 8 fine-tunes with the cap at 8 (the old behaviour): they
                take all 8 threads; one generate is sent and waited for up to
                NOCAP_WAIT_S (it cannot start while the jobs run).
    Measured: seconds from sending a generate to its result, per generate.
    Ratio per round: median(capped) / median(idle).

(b) Tenant fairness. Tenant A's 100 one-image requests are all in the
    engine's waiting list (one task thread each: what the engine decides,
    not the broker queue in front of a worker), then tenant B sends one.
    Arms, interleaved per round:
      idle - B's request alone;
      rr   - B after A's 100 (round-robin admission by tenant);
      fifo - the same with no tenant on any request (first come, first served:
             the engine's order before this change).
    Measured: seconds from B's Runtime.generate call to its PNGs (idle: median
    of 5; round-robin: median of B_REPS sent one after another while A's
    backlog lasts; FIFO: one, as it drains A's backlog). A's requests left when B is done are cancelled (they leave
    the batch at the next step).
    Run twice: with the default batch cap (64 rows: on a CPU a forward's cost
    grows with its rows, so B's own steps in A's full batch are many times
    slower than alone) and with a cap of 2 rows (one request per forward, which
    isolates the admission order from the batch cost).

    python bench/bench_fairness.py [--rounds 3]

Writes bench/results/fairness.json and bench/results/fairness.md.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from celery.exceptions import Retry
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import worker.celery_app as celery_app  # noqa: E402
from bench.timing import machine, paired_ratio, spread  # noqa: E402
from difffit.contract import GenerateTask  # noqa: E402
from difffit.settings import Settings  # noqa: E402
from worker import tasks  # noqa: E402
from worker.cancellation import CancelWatcher  # noqa: E402
from worker.finetune_slots import FinetuneSlots  # noqa: E402
from worker.runtime import Runtime  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 8  # DIFFFIT_ENGINE_THREADS' default
CAP = 2  # DIFFFIT_MAX_CONCURRENT_FINETUNES' default
FINETUNES = 8
GENERATES_PER_ARM = 5
NOCAP_WAIT_S = 10.0
STEPS = 25  # generate sampling steps (DDIM, guidance 4, one image)
BURST = 100
B_CAPS = (64, 2)  # engine batch caps (rows) of part (b)
B_REPS = {64: 1, 2: 3}  # B's requests per round-robin arm (one after another; A's backlog lasts)
DEADLINE_S = 300.0


def _zip(path: Path, per_class: int = 16) -> Path:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for c, name in enumerate(["dark", "light"]):
            for i in range(per_class):
                pixels = np.clip(rng.normal(40 + 180 * c, 20, (32, 32)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels, mode="L").save(buf, format="PNG")
                zf.writestr(f"{name}/{i}.png", buf.getvalue())
    return path


class PoolModel:
    """One worker's Celery thread pool: FIFO intake, fine-tunes given back are re-sent later."""

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="celery-task")
        self.timers: list[threading.Timer] = []
        self.given_back = 0

    def send(self, fn, payload: dict, done: Future | None = None) -> Future:
        done = done or Future()

        def run():
            try:
                done.set_result(fn(payload))
            except Retry:
                self.given_back += 1
                timer = threading.Timer(tasks.FINETUNE_REQUEUE_S, self.send, (fn, payload, done))
                self.timers.append(timer)
                timer.start()
            except BaseException as exc:  # noqa: BLE001 - reported to the waiter
                done.set_exception(exc)

        self.pool.submit(run)
        return done

    def close(self) -> None:
        for t in self.timers:
            t.cancel()
        self.pool.shutdown(wait=True)


def _wait(predicate, what: str, limit: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


class Bench:
    def __init__(self, data_dir: Path):
        self.settings = Settings(
            data_dir=data_dir, allow_file_urls=True, max_classes=10, engine_threads=THREADS, log_json=False
        )
        self.rt = Runtime(self.settings)
        self.tenant = self.rt.registry.create_tenant("bench")
        self.url = _zip(data_dir / "ds.zip").as_uri()
        celery_app._runtime = self.rt
        # A's requests left when B is done are flagged; the worker's watcher cancels them.
        self.flagged: set[str] = set()
        self.rt.cancel_watcher = CancelWatcher(lambda ids: [i for i in ids if i in self.flagged]).start()
        self.seq = 0

    def _task(self, tenant: str | None = "b", seed: int = 0) -> GenerateTask:
        self.seq += 1
        return GenerateTask(
            request_id=f"g{self.seq}", tenant=tenant, class_labels=[1], seed=seed, steps=STEPS
        )

    # -- (a) ------------------------------------------------------------------
    def _timed_generate(self, pool: PoolModel, wait_s: float = DEADLINE_S) -> tuple[float, bool]:
        t0 = time.perf_counter()
        future = pool.send(tasks.generate, self._task().model_dump(mode="json"))
        try:
            result = future.result(timeout=wait_s)
        except TimeoutError:
            return time.perf_counter() - t0, False
        assert result["ok"], result
        return time.perf_counter() - t0, True

    def _start_jobs(self, pool: PoolModel) -> tuple[list[str], list[Future]]:
        ids, futures = [], []
        for i in range(FINETUNES):
            body = {
                "dataset_url": self.url,
                "adapter": f"long-{self.seq}-{i}",
                "steps": 100_000,
                "batch_size": 8,
            }
            self.seq += 1
            job, _ = self.rt.registry.create_job(
                self.tenant.id, body["adapter"], body, total_steps=body["steps"]
            )
            ids.append(job.id)
            futures.append(pool.send(tasks.finetune, {"job_id": job.id}))
        return ids, futures

    def _training(self, ids: list[str]) -> int:
        jobs = [self.rt.registry.get_job_unscoped(i) for i in ids]
        return sum(j.state == "running" and j.step > 0 for j in jobs)

    def _stop_jobs(self, pool: PoolModel, ids: list[str]) -> None:
        for i in ids:
            self.rt.registry.request_cancel(self.tenant.id, i)
        for t in pool.timers:
            t.cancel()
        pool.close()
        _wait(lambda: self.rt.engine.stats()["training_runs"] == 0, "training runs to end")

    def arm_idle(self) -> list[float]:
        pool = PoolModel(THREADS)
        try:
            return [self._timed_generate(pool)[0] for _ in range(GENERATES_PER_ARM)]
        finally:
            pool.close()

    def arm_capped(self) -> tuple[list[float], dict]:
        celery_app._finetune_slots = FinetuneSlots(CAP)
        pool = PoolModel(THREADS)
        ids, _ = self._start_jobs(pool)
        try:
            _wait(
                lambda: self._training(ids) == CAP and pool.given_back >= FINETUNES - CAP,
                "capped jobs to train",
            )
            times = [self._timed_generate(pool)[0] for _ in range(GENERATES_PER_ARM)]
            info = {"training": self._training(ids), "given_back": pool.given_back}
        finally:
            self._stop_jobs(pool, ids)
        return times, info

    def arm_nocap(self) -> tuple[float, bool]:
        celery_app._finetune_slots = FinetuneSlots(FINETUNES)
        pool = PoolModel(THREADS)
        ids, _ = self._start_jobs(pool)
        try:
            _wait(lambda: self._training(ids) == FINETUNES, "uncapped jobs to train")
            return self._timed_generate(pool, wait_s=NOCAP_WAIT_S)
        finally:
            self._stop_jobs(pool, ids)

    # -- (b) ------------------------------------------------------------------
    def _b_request(self, tenant: str | None) -> tuple[float, int]:
        """Seconds of B's request and the most rows it shared a forward with."""
        t0 = time.perf_counter()
        result = self.rt.generate(self._task(tenant, seed=7))
        return time.perf_counter() - t0, max(result.batch_sizes)

    def arm_idle_b(self, reps: int = 5) -> float:
        return statistics.median(self._b_request("b")[0] for _ in range(reps))

    def arm_burst(self, tenants: bool, reps: int) -> tuple[float, dict]:
        """Median seconds of B's `reps` requests, one after another, behind A's burst."""
        engine = self.rt.engine
        a_tenant, b_tenant = ("a", "b") if tenants else (None, None)
        with ThreadPoolExecutor(BURST) as pool:
            a_tasks = [self._task(a_tenant, seed=i) for i in range(BURST)]
            burst = [pool.submit(self.rt.generate, t) for t in a_tasks]
            in_engine = lambda: engine.queue_depth() + engine.stats()["active_requests"]  # noqa: E731
            _wait(lambda: in_engine() + sum(f.done() for f in burst) >= BURST, "A's burst queued")
            runs = [self._b_request(b_tenant) for _ in range(reps)]
            seconds, rows = statistics.median(s for s, _ in runs), max(r for _, r in runs)
            done_before = sum(f.done() for f in burst)
            self.flagged.update(t.request_id for t in a_tasks)  # A's rest leave the batch
            for f in burst:
                f.exception(timeout=DEADLINE_S)
        _wait(lambda: engine.stats()["active_requests"] == 0 and engine.queue_depth() == 0, "engine idle")
        return seconds, {"a_done_before_b": done_before, "b_max_rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    before = machine()
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        bench.arm_idle()  # warm-up: base, schedulers, registry
        a = {"idle": [], "capped": [], "nocap": [], "capped_info": [], "nocap_done": []}
        arms = ["idle", "capped", "nocap"]
        for r in range(args.rounds):
            for name in arms[r % 3 :] + arms[: r % 3]:
                if name == "idle":
                    a["idle"].append(statistics.median(bench.arm_idle()))
                elif name == "capped":
                    times, info = bench.arm_capped()
                    a["capped"].append(statistics.median(times))
                    a["capped_info"].append(info)
                else:
                    seconds, done = bench.arm_nocap()
                    a["nocap"].append(seconds)
                    a["nocap_done"].append(done)
            print(f"(a) round {r}: " + ", ".join(f"{k} {a[k][-1]:.3f}s" for k in arms), flush=True)
        b_by_cap = {}
        for cap in B_CAPS:
            bench.rt.engine.max_batch_size = cap  # read at every admission
            b = b_by_cap[cap] = {"idle": [], "rr": [], "fifo": [], "rr_info": [], "fifo_info": []}
            barms = ["idle", "rr", "fifo"]
            for r in range(args.rounds):
                for name in barms[r % 3 :] + barms[: r % 3]:
                    if name == "idle":
                        b["idle"].append(bench.arm_idle_b())
                    else:
                        # FIFO: B's first request drains A's backlog, so only one counts.
                        reps = B_REPS[cap] if name == "rr" else 1
                        seconds, info = bench.arm_burst(tenants=name == "rr", reps=reps)
                        b[name].append(seconds)
                        b[f"{name}_info"].append(info)
                line = ", ".join(f"{k} {b[k][-1]:.3f}s" for k in barms)
                print(f"(b) cap {cap} round {r}: {line}", flush=True)
        bench.rt.engine.stop()
    after = machine()
    report = {
        "machine": before,
        "loadavg_after": after["loadavg"],
        "settings": {
            "threads": THREADS,
            "finetune_cap": CAP,
            "finetunes": FINETUNES,
            "generate_steps": STEPS,
            "max_batch_size": bench.settings.max_batch_size,
            "train_share": bench.settings.train_share,
            "requeue_s": tasks.FINETUNE_REQUEUE_S,
            "nocap_wait_s": NOCAP_WAIT_S,
            "burst": BURST,
            "rounds": args.rounds,
        },
        "a": {
            "idle_s": spread(a["idle"]),
            "capped_s": spread(a["capped"]),
            "capped_over_idle": paired_ratio(a["capped"], a["idle"]),
            "nocap_s": spread(a["nocap"]),
            "nocap_completed_within_wait": a["nocap_done"],
            "capped_info": a["capped_info"],
        },
        "b": {
            str(cap): {
                "idle_s": spread(b["idle"]),
                "rr_s": spread(b["rr"]),
                "fifo_s": spread(b["fifo"]),
                "rr_over_idle": paired_ratio(b["rr"], b["idle"]),
                "fifo_over_idle": paired_ratio(b["fifo"], b["idle"]),
                "rr_info": b["rr_info"],
                "fifo_info": b["fifo_info"],
            }
            for cap, b in b_by_cap.items()
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fairness.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "fairness.md").write_text(render(report))
    print(render(report))


def _row(name: str, s: dict, unit: str = "s") -> str:
    return (
        f"| {name} | {s['median']:.3f} {unit} | {s['min']:.3f} | {s['p25']:.3f} | {s['p75']:.3f} "
        f"| {s['max']:.3f} | {s['n']} |"
    )


def _render_b(cap: str, b: dict, head: str) -> str:
    rr = [i["a_done_before_b"] for i in b["rr_info"]]
    fifo = [i["a_done_before_b"] for i in b["fifo_info"]]
    rows = [i["b_max_rows"] for i in b["rr_info"]]
    return f"""### Batch cap {cap} rows

{head}
{_row("B alone (idle)", b["idle_s"])}
{_row("B after A's burst, round-robin", b["rr_s"])}
{_row("B after A's burst, FIFO (no tenants)", b["fifo_s"])}
{_row("**round-robin / idle**", b["rr_over_idle"], "x")}
{_row("FIFO / idle", b["fifo_over_idle"], "x")}

A's requests finished before B's last, per round: round-robin {rr}, FIFO {fifo}. Most rows B shared
a forward with (round-robin): {rows}.
"""


def render(r: dict) -> str:
    m, s, a = r["machine"], r["settings"], r["a"]
    head = "| | median | min | p25 | p75 | max | n |\n|---|---|---|---|---|---|---|"
    nocap_done = sum(a["nocap_completed_within_wait"])
    b_sections = "\n".join(_render_b(cap, b, head) for cap, b in r["b"].items())
    return f"""# Fairness: no starvation, fair tenants (issue 14)

`python bench/bench_fairness.py --rounds {s["rounds"]}` on {m["processor"]}, {m["cpus"]} CPUs,
torch {m["torch"]} ({m["threads"]} thread), device {m["device"]}; load average
{m["loadavg"]} before, {r["loadavg_after"]} after. One real worker Runtime in-process
(bundled base, SQLite, file blobs); arms interleaved per round in rotating order;
ratios are per-round pairs. Generates: 1 image, DDIM {s["generate_steps"]} steps, guidance 4
(2 rows per forward); train share {s["train_share"]}.

## (a) A generate while 8 long fine-tunes are sent to the worker

The worker's Celery thread pool is modelled by {s["threads"]} threads fed FIFO, running the real
task bodies (`worker.tasks`); a fine-tune given back at the cap is re-sent after
{s["requeue_s"]} s (Celery's retry countdown). Measured: seconds from sending a generate
task to its result (median of {GENERATES_PER_ARM} per arm and round). Engine batch cap
{s["max_batch_size"]} rows.

{head}
{_row("idle (no fine-tunes)", a["idle_s"])}
{_row(f"cap {s['finetune_cap']} (2 train, 6 given back)", a["capped_s"])}
{_row("**capped / idle**", a["capped_over_idle"], "x")}
{_row(f"no cap (cap = {s['finetunes']}), waited up to {s['nocap_wait_s']:g} s", a["nocap_s"])}

Without the cap the 8 jobs hold all 8 threads: the generate completed within
{s["nocap_wait_s"]:g} s in {nocap_done} of {len(a["nocap_completed_within_wait"])} rounds (its wait was
cut there). With the cap it completes in {a["capped_over_idle"]["median"]:.2f}x its idle
latency (median of per-round ratios; target < 2x).

## (b) Tenant B's one image behind tenant A's {s["burst"]} queued requests

All of A's requests (1 image each) are in the engine's waiting list (one task thread each)
before B's request is sent; measured: seconds from B's `Runtime.generate` call to its PNGs
(idle: median of 5 per round; round-robin: median of {{1 at cap 64, 3 at cap 2}} sent one
after another while A's backlog lasts; FIFO: one, as it waits for all of A's).
A's requests left when B is done are cancelled. This is the engine's admission order only:
the broker queue in front of a worker is FIFO, so a tenant's messages ahead of another's
are taken first by the worker's task threads (bounded per tenant by
DIFFFIT_TENANT_MAX_QUEUED_GENERATES).

{b_sections}"""


if __name__ == "__main__":
    main()
