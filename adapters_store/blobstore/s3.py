"""The object-storage store (``s3://bucket/prefix``) on any S3-compatible service.

A blob is the object ``<prefix>/ab/cd/<sha256>``. Atomicity comes from S3
itself: a PUT makes the object visible whole or not at all, and a multipart
upload (files above `multipart_threshold`) becomes visible only when it is
completed; an upload whose writer died leaves invisible parts that
`remove_stale_uploads` aborts. Every read re-hashes the bytes, as in the
folder store.

Credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role...), the region
from ``AWS_DEFAULT_REGION`` / ``AWS_REGION``. `endpoint_url` points at a
non-AWS service (MinIO, Ceph, R2...); `public_endpoint_url` is the address
presigned download URLs name, for when clients reach the service by another
name than the API does (``http://minio:9000`` inside compose).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from adapters_store.blobstore.base import (
    CHUNK,
    SHA256,
    BlobInfo,
    BlobStore,
    check_sha,
    fan_out,
    verified_chunks,
)
from difffit.errors import BackendUnavailable, NotFound

MULTIPART_THRESHOLD = 64 * 1024**2
DELETE_BATCH = 1000  # DeleteObjects' limit
SPOOL_IN_MEMORY = 64 * 1024**2
_MISSING = {"404", "NoSuchKey", "NotFound"}


def _client_config(endpoint_url: str | None) -> Config:
    options: dict[str, Any] = {
        "signature_version": "s3v4",
        "retries": {"mode": "standard", "max_attempts": 5},
        "connect_timeout": 10,
        "read_timeout": 120,
        # Celery task threads, the API's thread pool and transfer threads share it.
        "max_pool_connections": 32,
    }
    if endpoint_url:
        # Non-AWS services: bucket in the path (no wildcard DNS needed), and
        # checksums only where S3 requires them. boto3 >= 1.36 otherwise sends
        # aws-chunked bodies with trailing CRC32 headers that several
        # S3-compatible servers reject; the sha256 check on every read stays.
        options["s3"] = {"addressing_style": "path"}
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    return Config(**options)


class S3BlobStore(BlobStore):
    """Blobs as objects ``<prefix>/ab/cd/<sha256>`` in `bucket`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
    ) -> None:
        """Use `bucket` (which must exist: deployments create it, see docker-compose.yml)."""
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # A client is thread-safe and keeps a connection pool: one per store.
        self._client = boto3.client("s3", endpoint_url=endpoint_url, config=_client_config(endpoint_url))
        presign_endpoint = public_endpoint_url or endpoint_url
        self._presigner = (
            self._client
            if presign_endpoint == endpoint_url
            else boto3.client("s3", endpoint_url=presign_endpoint, config=_client_config(presign_endpoint))
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=max(multipart_threshold, 5 * 1024**2),  # S3's smallest part
            max_concurrency=4,
        )

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3BlobStore({self.url!r}{where})"

    def key_for(self, sha256: str) -> str:
        """The object key of blob `sha256`; InvalidRequest for a bad hash."""
        name = fan_out(check_sha(sha256))
        return f"{self.prefix}/{name}" if self.prefix else name

    # -- writing ---------------------------------------------------------------
    def put_bytes(self, data: bytes) -> str:
        data = bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        # Always upload, even when the object exists: a PUT replaces it
        # atomically, repairs a damaged copy and refreshes LastModified (gc).
        self._upload(io.BytesIO(data), sha, len(data))
        return sha

    def put_file(self, path: Path) -> str:
        """See `BlobStore.put_file`: hashed while copied to a private spool, uploaded from it."""
        src = Path(path)
        if not src.is_file():
            raise NotFound(f"file to store {str(src)!r} does not exist")
        digest = hashlib.sha256()
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            # The spool is ours alone, so the bytes uploaded are the bytes hashed.
            with src.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    digest.update(chunk)
                    spool.write(chunk)
            size = spool.tell()
            spool.seek(0)
            sha = digest.hexdigest()
            self._upload(spool, sha, size)
        return sha

    def _upload(self, body: IO[bytes], sha: str, size: int) -> None:
        key = self.key_for(sha)
        with self._errors(f"upload of blob {sha}"):
            if size < self._transfer.multipart_threshold:
                # One PUT: no transfer-manager threads for the common, small case.
                self._client.put_object(Bucket=self.bucket, Key=key, Body=body)
            else:
                self._client.upload_fileobj(body, self.bucket, key, Config=self._transfer)

    def delete(self, sha256: str) -> None:
        key = self.key_for(sha256)
        with self._errors(f"delete of blob {sha256}"):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def delete_many(self, shas: Iterable[str]) -> None:
        keys = [self.key_for(s) for s in shas]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start : start + DELETE_BATCH]]
            with self._errors(f"delete of {len(batch)} blobs"):
                answer = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise BackendUnavailable(
                    f"{len(errors)} of {len(batch)} deletes failed in {self.url}, e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    # -- reading ---------------------------------------------------------------
    def _read(self, sha256: str) -> tuple[bytes, str]:
        key = self.key_for(sha256)
        with self._errors(f"blob {sha256}"):
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read(), f"{self.bucket}/{key}"

    def iter_verified(self, sha256: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        key = self.key_for(sha256)

        def chunks() -> Iterator[bytes]:
            with self._errors(f"blob {sha256}"):
                body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
                try:
                    yield from body.iter_chunks(chunk_size)
                finally:
                    body.close()

        return verified_chunks(sha256, chunks(), f"{self.bucket}/{key}")

    def exists(self, sha256: str) -> bool:
        try:
            self._head(sha256)
        except NotFound:
            return False
        return True

    def size(self, sha256: str) -> int:
        return int(self._head(sha256)["ContentLength"])

    def _head(self, sha256: str) -> dict[str, Any]:
        key = self.key_for(sha256)
        with self._errors(f"blob {sha256}"):
            return self._client.head_object(Bucket=self.bucket, Key=key)

    def iter_blobs(self) -> Iterator[BlobInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors(f"listing of {self.url}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root):
                for obj in page.get("Contents") or []:
                    name = obj["Key"][len(root) :]
                    sha = name.rsplit("/", 1)[-1]
                    if SHA256.fullmatch(sha) and name == fan_out(sha):
                        modified = obj["LastModified"].astimezone(UTC)
                        yield BlobInfo(sha, int(obj["Size"]), modified)

    def download_url(self, sha256: str, *, ttl_s: int, filename: str, media_type: str) -> str | None:
        # Signing is local (no request): the URL works for ttl_s seconds, for anyone holding it.
        return self._presigner.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self.key_for(sha256),
                "ResponseContentType": media_type,
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
            },
            ExpiresIn=int(ttl_s),
        )

    # -- maintenance -------------------------------------------------------------
    def remove_stale_uploads(self, older_than: datetime) -> int:
        root = f"{self.prefix}/" if self.prefix else ""
        aborted = 0
        paginator = self._client.get_paginator("list_multipart_uploads")
        with self._errors(f"multipart listing of {self.url}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root):
                for upload in page.get("Uploads") or []:
                    if upload["Initiated"].astimezone(UTC) < older_than:
                        self._client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        aborted += 1
        return aborted

    def ping(self) -> None:
        with self._errors(f"bucket {self.bucket}", bucket_level=True):
            self._client.head_bucket(Bucket=self.bucket)

    # -- errors ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, what: str, *, bucket_level: bool = False) -> Iterator[None]:
        """botocore errors -> NotFound, or BackendUnavailable naming the store and the endpoint."""
        where = self.url + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket" or (bucket_level and code in _MISSING):
                raise BackendUnavailable(f"bucket {self.bucket!r} does not exist ({where})") from exc
            if code in _MISSING:
                raise NotFound(f"{what} not found in {where}") from None
            raise BackendUnavailable(f"{what} failed in {where}: {exc}") from exc
        except BotoCoreError as exc:
            raise BackendUnavailable(f"{what} failed: {where} unreachable: {exc}") from exc
        except S3UploadFailedError as exc:  # boto3's transfer manager wraps a ClientError in it
            raise BackendUnavailable(f"{what} failed in {where}: {exc}") from exc
