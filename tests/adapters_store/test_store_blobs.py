"""Blob stores: content addressing, atomic writes, corruption detection, listing.

Every case of the interface runs against both implementations: the folder
store and the S3 store against a moto server over HTTP on loopback (tests/s3.py).
A `Raw` helper reaches behind a store's back (the file on disk, the object in
the bucket) to damage or inspect what it wrote.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import EndpointConnectionError

from adapters_store import BlobStore, FileBlobStore, open_blob_store
from adapters_store.blobstore.s3 import S3BlobStore
from difffit.errors import BackendUnavailable, CorruptBlob, InvalidRequest, NotFound
from tests.s3 import bucket_keys, client

PREFIX = "tenant-blobs/v1"


@dataclass
class Raw:
    """Direct access to what a store holds, bypassing the store."""

    store: BlobStore
    endpoint: str | None = None

    def names(self) -> list[str]:
        """Everything stored, relative to the store's root (file paths or object keys)."""
        if isinstance(self.store, FileBlobStore):
            root = self.store.root
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        keys = bucket_keys(self.endpoint, self.store.bucket)
        return sorted(k.removeprefix(f"{PREFIX}/") for k in keys)

    def write(self, sha: str, data: bytes) -> None:
        """Overwrite the stored bytes of `sha` (damage)."""
        if isinstance(self.store, FileBlobStore):
            self.store.path_for(sha).write_bytes(data)
        else:
            client(self.endpoint).put_object(Bucket=self.store.bucket, Key=self.store.key_for(sha), Body=data)

    def read(self, sha: str) -> bytes:
        if isinstance(self.store, FileBlobStore):
            return self.store.path_for(sha).read_bytes()
        obj = client(self.endpoint).get_object(Bucket=self.store.bucket, Key=self.store.key_for(sha))
        return obj["Body"].read()

    def where(self, sha: str) -> str:
        """What error messages name as the blob's location."""
        if isinstance(self.store, FileBlobStore):
            return str(self.store.path_for(sha))
        return f"{self.store.bucket}/{self.store.key_for(sha)}"


@pytest.fixture(params=["file", "s3"])
def raw(request: pytest.FixtureRequest, tmp_path: Path) -> Raw:
    if request.param == "file":
        return Raw(FileBlobStore(tmp_path / "blobs"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return Raw(S3BlobStore(bucket, PREFIX, endpoint_url=endpoint), endpoint)


def _name(sha: str) -> str:
    return f"{sha[:2]}/{sha[2:4]}/{sha}"


def test_put_get_roundtrip_and_layout(raw: Raw) -> None:
    store = raw.store
    data = b"hello adapter" * 1000
    sha = store.put_bytes(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert raw.names() == [_name(sha)]
    assert raw.read(sha) == data
    assert store.exists(sha) and store.size(sha) == len(data)
    assert store.get_bytes(sha) == data
    assert b"".join(store.iter_verified(sha, chunk_size=4096)) == data


def test_put_is_idempotent_and_leaves_no_temp_files(raw: Raw) -> None:
    store = raw.store
    sha = store.put_bytes(b"x" * 10)
    assert store.put_bytes(b"x" * 10) == sha
    empty = store.put_bytes(b"")
    assert store.get_bytes(empty) == b""
    assert raw.names() == sorted([_name(sha), _name(empty)])


def test_put_file_streams_and_matches_put_bytes(raw: Raw, tmp_path: Path) -> None:
    store = raw.store
    src = tmp_path / "adapter.safetensors"
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one read chunk
    src.write_bytes(data)
    sha = store.put_file(src)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.get_bytes(sha) == data
    assert store.put_bytes(data) == sha
    assert raw.names() == [_name(sha)]
    with pytest.raises(NotFound, match=r"missing\.bin"):
        store.put_file(tmp_path / "missing.bin")


def test_corruption_detected_after_flipping_a_byte(raw: Raw) -> None:
    store = raw.store
    data = b"important weights" * 100
    sha = store.put_bytes(data)
    damaged = bytearray(data)
    damaged[5] ^= 0x01
    raw.write(sha, bytes(damaged))
    with pytest.raises(CorruptBlob) as err:
        store.get_bytes(sha)
    assert sha in err.value.message and raw.where(sha) in err.value.message
    # A stream stops before its last chunk: the consumer never holds the corrupt blob whole.
    received = []
    with pytest.raises(CorruptBlob):
        for chunk in store.iter_verified(sha, chunk_size=256):
            received.append(chunk)
    assert 0 < len(b"".join(received)) < len(data)
    # Putting the true content again repairs the damaged copy.
    assert store.put_bytes(data) == sha
    assert store.get_bytes(sha) == data


def test_get_parsed_hashes_beside_the_parse_and_corruption_wins(raw: Raw) -> None:
    store = raw.store
    data = os.urandom(1024 * 1024)
    sha = store.put_bytes(data)
    assert store.get_parsed(sha, lambda content: (len(content), content[:4])) == (len(data), data[:4])
    damaged = bytearray(data)
    damaged[-1] ^= 0x01
    raw.write(sha, bytes(damaged))
    # The parse succeeds on the damaged bytes, the hash does not: CorruptBlob, not the result.
    with pytest.raises(CorruptBlob, match=sha):
        store.get_parsed(sha, len)

    # A parse that fails on damaged content still reports the damage, not the parse error.
    def refuse(_: bytes) -> None:
        raise ValueError("not an adapter")

    with pytest.raises(CorruptBlob):
        store.get_parsed(sha, refuse)
    assert store.put_bytes(data) == sha  # repaired
    with pytest.raises(ValueError, match="not an adapter"):
        store.get_parsed(sha, refuse)
    with pytest.raises(NotFound):
        store.get_parsed("0" * 64, len)


def test_truncated_blob_is_corrupt(raw: Raw) -> None:
    sha = raw.store.put_bytes(b"abcdef")
    raw.write(sha, b"abc")
    with pytest.raises(CorruptBlob):
        raw.store.get_bytes(sha)
    # One chunk: refused before anything is handed out.
    with pytest.raises(CorruptBlob):
        next(raw.store.iter_verified(sha))


def test_missing_blob(raw: Raw) -> None:
    store = raw.store
    sha = "0" * 64
    assert not store.exists(sha)
    for fn in (store.get_bytes, store.size, lambda s: next(store.iter_verified(s))):
        with pytest.raises(NotFound, match=sha):
            fn(sha)
    store.delete(sha)  # missing is fine
    store.delete_many([sha, "1" * 64])


def test_delete_and_delete_many(raw: Raw) -> None:
    store = raw.store
    shas = [store.put_bytes(f"blob {i}".encode()) for i in range(5)]
    store.delete(shas[0])
    assert not store.exists(shas[0])
    with pytest.raises(NotFound):
        store.get_bytes(shas[0])
    store.delete_many(shas[1:3])
    assert raw.names() == sorted(_name(s) for s in shas[3:])


@pytest.mark.parametrize(
    "bad",
    ["", "A" * 64, "a" * 63, "a" * 65, "../" + "a" * 61, "/etc/passwd".ljust(64, "a"), "a" * 64 + "\n", None],
)
def test_bad_hash_refused(raw: Raw, bad: object) -> None:
    store = raw.store
    for fn in (store.get_bytes, store.exists, store.delete, store.size, store.iter_verified):
        with pytest.raises(InvalidRequest):
            fn(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        store.delete_many(["a" * 64, bad])  # type: ignore[list-item]


def test_concurrent_puts_of_same_content(raw: Raw) -> None:
    store = raw.store
    data = os.urandom(256 * 1024)
    shas: list[str] = []
    threads = [threading.Thread(target=lambda: shas.append(store.put_bytes(data))) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(shas)) == 1 and len(shas) == 6
    assert store.get_bytes(shas[0]) == data
    assert raw.names() == [_name(shas[0])]


def test_iter_blobs_lists_blobs_with_size_and_time(raw: Raw) -> None:
    store = raw.store
    before = datetime.now(UTC) - timedelta(seconds=2)  # S3 LastModified has 1 s resolution
    shas = {store.put_bytes(b"a" * 3), store.put_bytes(b"b" * 7)}
    # Things that are not blobs of this store are not listed.
    if isinstance(store, FileBlobStore):
        (store.root / "README").write_text("not a blob")
        (store.root / "ab" / "cd").mkdir(parents=True, exist_ok=True)
        (store.root / "ab" / "cd" / ("e" * 64)).write_bytes(b"misplaced")
    else:
        s3 = client(raw.endpoint)
        s3.put_object(Bucket=store.bucket, Key="outside-the-prefix/" + "f" * 64, Body=b"x")
        s3.put_object(Bucket=store.bucket, Key=f"{PREFIX}/notes.txt", Body=b"x")
    listed = {b.sha256: b for b in store.iter_blobs()}
    assert set(listed) == shas
    assert sorted(b.size for b in listed.values()) == [3, 7]
    for info in listed.values():
        assert info.modified.tzinfo is not None
        assert before <= info.modified <= datetime.now(UTC) + timedelta(seconds=2)


def test_download_url(raw: Raw) -> None:
    store = raw.store
    sha = store.put_bytes(b"\x00adapter bytes")
    url = store.download_url(sha, ttl_s=60, filename="adapter.safetensors", media_type="application/x-test")
    if isinstance(store, FileBlobStore):
        assert url is None  # nothing to redirect to: the API streams
        return
    assert url is not None and "X-Amz-Expires=60" in url
    resp = httpx.get(url, timeout=30)
    assert resp.status_code == 200 and resp.content == b"\x00adapter bytes"
    assert resp.headers["content-type"] == "application/x-test"
    assert 'filename="adapter.safetensors"' in resp.headers["content-disposition"]
    # The signature covers the key: another blob's name with this signature is refused.
    other = store.put_bytes(b"other")
    assert httpx.get(url.replace(sha, other), timeout=30).status_code == 403


def test_ping(raw: Raw, tmp_path: Path) -> None:
    raw.store.ping()
    if isinstance(raw.store, FileBlobStore):
        gone = FileBlobStore(tmp_path / "gone")
        gone.root.rmdir()
        broken: BlobStore = gone
    else:
        broken = S3BlobStore("no-such-bucket-here", endpoint_url=raw.endpoint)
    with pytest.raises(BackendUnavailable):
        broken.ping()


# -- folder store only ------------------------------------------------------------


def test_file_layout_path_and_open_verified(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    sha = store.put_bytes(b"weights")
    path = tmp_path / "blobs" / sha[:2] / sha[2:4] / sha
    assert store.path_for(sha) == path and store.open_verified(sha) == path
    assert store.url == (tmp_path / "blobs").resolve().as_uri()
    path.write_bytes(b"weightz")
    with pytest.raises(CorruptBlob):
        store.open_verified(sha)


def test_file_put_keeps_an_intact_copy_but_refreshes_its_time(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    sha = store.put_bytes(b"x" * 10)
    path = store.path_for(sha)
    inode = path.stat().st_ino
    old = time.time() - 3 * 86400
    os.utime(path, (old, old))
    store.put_bytes(b"x" * 10)
    # Not rewritten, but young again: gc's grace period restarts for a writer about to register it.
    assert path.stat().st_ino == inode and path.stat().st_mtime > old + 86400


def test_file_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileBlobStore(tmp_path)

    def boom(src: object, dst: object) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk went away"):
        store.put_bytes(b"payload")
    monkeypatch.undo()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert not store.exists(hashlib.sha256(b"payload").hexdigest())


def test_file_stale_temp_files_are_removed_after_the_cutoff(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    sha = store.put_bytes(b"kept")
    debris = store.path_for(sha).parent / f".{'9' * 64}.abcdef123456.tmp"
    debris.write_bytes(b"half a blob")
    assert store.remove_stale_uploads(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert debris.exists()
    assert store.remove_stale_uploads(datetime.now(UTC) + timedelta(seconds=5)) == 1
    assert not debris.exists() and store.get_bytes(sha) == b"kept"  # blobs are never touched


# -- S3 store only -----------------------------------------------------------------


def test_s3_multipart_upload_is_whole_and_leaves_no_parts(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    store = S3BlobStore(s3_bucket, PREFIX, endpoint_url=s3_endpoint, multipart_threshold=5 * 1024**2)
    src = tmp_path / "big.bin"
    data = os.urandom(11 * 1024**2)  # three parts
    src.write_bytes(data)
    sha = store.put_file(src)
    assert store.get_bytes(sha) == data and store.size(sha) == len(data)
    assert client(s3_endpoint).list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_s3_upload_failing_half_way_leaves_no_object(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    store = S3BlobStore(s3_bucket, PREFIX, endpoint_url=s3_endpoint, multipart_threshold=5 * 1024**2)
    calls = {"n": 0}

    def second_part_fails(**_: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise EndpointConnectionError(endpoint_url=s3_endpoint)

    store._client.meta.events.register("before-call.s3.UploadPart", second_part_fails)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * 1024**2))
    with pytest.raises(BackendUnavailable):
        store.put_file(src)
    assert calls["n"] >= 2
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert not store.exists(sha) and bucket_keys(s3_endpoint, s3_bucket) == []


def test_s3_abandoned_multipart_upload_is_aborted_after_the_cutoff(s3_endpoint: str, s3_bucket: str) -> None:
    # What a writer killed mid-upload leaves: parts, no object.
    store = S3BlobStore(s3_bucket, PREFIX, endpoint_url=s3_endpoint)
    s3 = client(s3_endpoint)
    key = store.key_for("7" * 64)
    upload = s3.create_multipart_upload(Bucket=s3_bucket, Key=key)
    s3.upload_part(Bucket=s3_bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)
    assert not store.exists("7" * 64) and list(store.iter_blobs()) == []
    # Cutoffs around the upload's start as the server reports it (moto reports a fixed date).
    initiated = s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"][0]["Initiated"]
    assert store.remove_stale_uploads(initiated - timedelta(seconds=1)) == 0
    assert store.remove_stale_uploads(initiated + timedelta(seconds=1)) == 1
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_s3_without_prefix_and_missing_bucket(s3_endpoint: str, s3_bucket: str) -> None:
    store = S3BlobStore(s3_bucket, endpoint_url=s3_endpoint)
    sha = store.put_bytes(b"top level")
    assert bucket_keys(s3_endpoint, s3_bucket) == [_name(sha)]
    assert store.url == f"s3://{s3_bucket}"
    with pytest.raises(BackendUnavailable, match="does not exist"):
        S3BlobStore("absent-bucket", endpoint_url=s3_endpoint).put_bytes(b"x")


# -- choosing a store by URL ----------------------------------------------------------


def test_open_blob_store_by_url(tmp_path: Path, s3_endpoint: str) -> None:
    store = open_blob_store((tmp_path / "b").as_uri())
    assert isinstance(store, FileBlobStore) and store.root == tmp_path / "b"
    s3 = open_blob_store("s3://my-bucket/some/prefix/", endpoint_url=s3_endpoint)
    assert isinstance(s3, S3BlobStore)
    assert (s3.bucket, s3.prefix, s3.url) == ("my-bucket", "some/prefix", "s3://my-bucket/some/prefix")
    for bad in ("gs://bucket", "file://relative/path", "s3://", "/plain/path", "s3://b/p?x=1"):
        with pytest.raises(InvalidRequest, match="file:///absolute/path or s3://bucket/prefix"):
            open_blob_store(bad)
