"""`difffit gc`: orphans go after the grace period and not before; references always stay.

The pass itself (`collect_garbage`, with an injected clock) runs on both
registry backends and both stores. The command runs as operators run it,
after a real crash: a process killed between its blob upload and its
registry commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from adapters_store import BlobStore, FileBlobStore, Registry
from adapters_store.blobstore.s3 import S3BlobStore
from adapters_store.gc import collect_garbage
from tests.s3 import everything_in

REPO = Path(__file__).resolve().parents[2]
GRACE = 3600.0
RETENTION = 86400.0


def _gc(registry: Registry, store: BlobStore, now: datetime, **kw: Any) -> Any:
    return collect_garbage(registry, store, grace_s=GRACE, checkpoint_retention_s=RETENTION, now=now, **kw)


def test_orphans_go_after_the_grace_period_and_references_stay(
    registry: Registry, blob_store: BlobStore, vkw: Any
) -> None:
    t = registry.create_tenant("acme").id
    adapter = blob_store.put_bytes(b"adapter")
    grid = blob_store.put_bytes(b"grid")
    registry.add_version(t, "fungi", **vkw(sha256=adapter, files={"samples.png": grid}))
    job, _ = registry.create_job(t, "fungi", {}, 100)
    ckpt = blob_store.put_bytes(b"checkpoint of a running job")
    registry.update_job(job.id, state="running", checkpoint_sha256=ckpt, checkpoint_step=50)
    # The crash: uploaded, never registered.
    orphan = blob_store.put_bytes(b"uploaded, then the writer died")
    now = datetime.now(UTC)

    dry = _gc(registry, blob_store, now + timedelta(seconds=GRACE + 1), dry_run=True)
    assert (dry.deleted, dry.dry_run) == (1, True) and blob_store.exists(orphan)

    early = _gc(registry, blob_store, now)
    assert (early.blobs, early.referenced, early.young, early.deleted) == (4, 3, 1, 0)
    assert blob_store.exists(orphan)
    almost = _gc(registry, blob_store, now + timedelta(seconds=GRACE - 5))
    assert almost.deleted == 0 and blob_store.exists(orphan)

    late = _gc(registry, blob_store, now + timedelta(seconds=GRACE + 1))
    size = len(b"uploaded, then the writer died")
    assert (late.deleted, late.deleted_bytes, late.referenced) == (1, size, 3)
    assert not blob_store.exists(orphan)
    # Referenced blobs are never collected, however old.
    years = _gc(registry, blob_store, now + timedelta(days=3650))
    assert years.deleted == 0
    assert all(blob_store.exists(s) for s in (adapter, grid, ckpt))


def test_checkpoints_of_ended_jobs_expire(registry: Registry, blob_store: BlobStore) -> None:
    t = registry.create_tenant("acme").id
    failed, _ = registry.create_job(t, "fungi", {"n": 1}, 100)
    kept = blob_store.put_bytes(b"last checkpoint of a failed job")
    registry.update_job(failed.id, checkpoint_sha256=kept, checkpoint_step=40)
    registry.update_job(failed.id, state="failed", error_code="oom", error_message="out of memory")
    # A succeeded job that still holds one (its worker died before freeing it, or an old registry).
    done, _ = registry.create_job(t, "fungi", {"n": 2}, 100)
    stale = blob_store.put_bytes(b"checkpoint of a succeeded job")
    registry.update_job(done.id, checkpoint_sha256=stale, checkpoint_step=100)
    registry.update_job(done.id, state="succeeded")
    finished = registry.get_job_unscoped(failed.id).finished_at

    first = _gc(registry, blob_store, finished + timedelta(seconds=RETENTION - 60))
    assert first.checkpoints_expired == 1 and not blob_store.exists(stale)  # no grace for known blobs
    assert blob_store.exists(kept) and registry.get_job_unscoped(failed.id).checkpoint_sha256 == kept

    second = _gc(registry, blob_store, finished + timedelta(seconds=RETENTION + 1))
    assert second.checkpoints_expired == 1 and not blob_store.exists(kept)
    job = registry.get_job_unscoped(failed.id)
    assert (job.state, job.checkpoint_sha256, job.checkpoint_step) == ("failed", None, None)
    assert everything_in(blob_store) == []


def test_upload_debris_is_removed_after_the_grace_period(tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    registry.create_schema()
    store = FileBlobStore(tmp_path / "blobs")
    sha = store.put_bytes(b"x")
    debris = store.path_for(sha).parent / f".{sha}.0123456789ab.tmp"
    debris.write_bytes(b"half")
    now = datetime.now(UTC)
    assert _gc(registry, store, now).stale_uploads == 0 and debris.exists()
    report = _gc(registry, store, now + timedelta(seconds=GRACE + 1))
    assert (report.stale_uploads, report.deleted) == (1, 1) and not debris.exists()


# -- the command, after a real crash -----------------------------------------------------

CRASH = """
import os, signal, sys
from adapters_store import blob_store_from_settings
from difffit.settings import get_settings
sha = blob_store_from_settings(get_settings()).put_bytes(sys.argv[1].encode())
print(sha, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # dies before any registry commit
"""


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_difffit_gc_removes_a_crash_orphan_after_the_grace_period(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, vkw: Any
) -> None:
    env = {**os.environ, "DIFFFIT_DATA_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("DIFFFIT_DATABASE_URL", None)
    if kind == "file":
        store: BlobStore = FileBlobStore(tmp_path / "blobs")
        env.pop("DIFFFIT_BLOB_URL", None)
        env["DIFFFIT_BLOB_DIR"] = str(store.root)
    else:
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
        store = S3BlobStore(bucket, "pre", endpoint_url=endpoint)
        env.update({"DIFFFIT_BLOB_URL": f"s3://{bucket}/pre", "DIFFFIT_S3_ENDPOINT_URL": endpoint})
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.create_schema()
    kept = store.put_bytes(b"a registered adapter")
    registry.add_version(registry.create_tenant("acme").id, "fungi", **vkw(sha256=kept))

    crashed = _run(env, "-c", CRASH, "bytes of a half-finished job")
    assert crashed.returncode == -9, crashed.stderr
    orphan = crashed.stdout.strip()
    assert store.exists(orphan) and not registry.blob_in_use(orphan)
    written = time.time()

    env["DIFFFIT_GC_GRACE_S"] = "600"
    gc = _run(env, "-m", "launch.cli", "gc")
    assert gc.returncode == 0, gc.stderr
    report = json.loads(gc.stdout)
    assert (report["young"], report["deleted"], report["referenced"]) == (1, 0, 1)
    assert store.exists(orphan)

    if kind == "file":
        # Age the orphan past the same grace period.
        old = time.time() - 601
        os.utime(store.path_for(orphan), (old, old))
    else:
        # S3 timestamps cannot be set: let a short grace period pass for real.
        env["DIFFFIT_GC_GRACE_S"] = "2"
        while time.time() < written + 3.5:  # + LastModified's whole-second rounding
            time.sleep(0.2)
    gc = _run(env, "-m", "launch.cli", "gc")
    assert gc.returncode == 0, gc.stderr
    assert json.loads(gc.stdout)["deleted"] == 1
    assert not store.exists(orphan) and store.exists(kept)
