"""Blob store: content addressing, atomic writes, corruption detection."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from adapters_store import BlobStore
from difffit.errors import CorruptBlob, InvalidRequest, NotFound


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_get_roundtrip_and_layout(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = b"hello adapter" * 1000
    sha = store.put_bytes(data)
    assert sha == hashlib.sha256(data).hexdigest()
    path = tmp_path / "blobs" / sha[:2] / sha[2:4] / sha
    assert path.read_bytes() == data
    assert store.path_for(sha) == path
    assert store.exists(sha) and store.size(sha) == len(data)
    assert store.get_bytes(sha) == data
    assert store.open_verified(sha) == path


def test_put_is_idempotent_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sha = store.put_bytes(b"x" * 10)
    before = store.path_for(sha).stat()
    assert store.put_bytes(b"x" * 10) == sha
    # An intact copy is kept as is, not rewritten.
    assert store.path_for(sha).stat().st_ino == before.st_ino
    store.put_bytes(b"")
    assert all(not p.name.endswith(".tmp") for p in _all_files(tmp_path))
    assert len(_all_files(tmp_path)) == 2


def test_put_file_streams_and_matches_put_bytes(tmp_path: Path) -> None:
    src = tmp_path / "adapter.safetensors"
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one read chunk
    src.write_bytes(data)
    store = BlobStore(tmp_path / "blobs")
    sha = store.put_file(src)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.get_bytes(sha) == data
    assert store.put_bytes(data) == sha
    assert [p.name for p in _all_files(tmp_path / "blobs")] == [sha]
    with pytest.raises(NotFound, match=r"missing\.bin"):
        store.put_file(tmp_path / "missing.bin")


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path)

    def boom(src: object, dst: object) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk went away"):
        store.put_bytes(b"payload")
    monkeypatch.undo()
    assert _all_files(tmp_path) == []
    assert not store.exists(hashlib.sha256(b"payload").hexdigest())


def test_corruption_detected_after_flipping_a_byte(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sha = store.put_bytes(b"important weights" * 100)
    path = store.path_for(sha)
    raw = bytearray(path.read_bytes())
    raw[5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlob) as err:
        store.get_bytes(sha)
    assert sha in err.value.message and str(path) in err.value.message
    with pytest.raises(CorruptBlob):
        store.open_verified(sha)
    # Putting the true content again repairs the damaged copy.
    assert store.put_bytes(b"important weights" * 100) == sha
    assert store.get_bytes(sha) == b"important weights" * 100


def test_truncated_blob_is_corrupt(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sha = store.put_bytes(b"abcdef")
    store.path_for(sha).write_bytes(b"abc")
    with pytest.raises(CorruptBlob):
        store.get_bytes(sha)


def test_missing_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sha = "0" * 64
    assert not store.exists(sha)
    for fn in (store.get_bytes, store.open_verified, store.size):
        with pytest.raises(NotFound, match=sha):
            fn(sha)
    store.delete(sha)  # missing is fine


def test_delete(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sha = store.put_bytes(b"bye")
    store.delete(sha)
    assert not store.exists(sha)
    with pytest.raises(NotFound):
        store.get_bytes(sha)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "A" * 64,
        "a" * 63,
        "a" * 65,
        "../" + "a" * 61,
        "/etc/passwd".ljust(64, "a"),
        "a" * 64 + "\n",
        "g" * 64,
        None,
    ],
)
def test_bad_hash_refused(tmp_path: Path, bad: object) -> None:
    store = BlobStore(tmp_path)
    for fn in (store.get_bytes, store.open_verified, store.exists, store.delete, store.size):
        with pytest.raises(InvalidRequest):
            fn(bad)  # type: ignore[arg-type]


def test_concurrent_puts_of_same_content(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(256 * 1024)
    shas: list[str] = []
    threads = [threading.Thread(target=lambda: shas.append(store.put_bytes(data))) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(shas)) == 1 and len(shas) == 6
    assert store.get_bytes(shas[0]) == data
    assert [p.name for p in _all_files(tmp_path)] == [shas[0]]
