"""Blob stores: one interface (`BlobStore`), a folder and an S3 implementation.

`DIFFFIT_BLOB_URL` chooses: ``file:///path`` (the default, under the data
folder) or ``s3://bucket/prefix`` (``DIFFFIT_S3_ENDPOINT_URL`` for non-AWS
services). boto3 is imported only when an S3 store is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from adapters_store.blobstore.base import BlobInfo, BlobStore, check_sha
from adapters_store.blobstore.file import FileBlobStore
from difffit.errors import InvalidRequest

if TYPE_CHECKING:
    from difffit.settings import Settings

__all__ = [
    "BlobInfo",
    "BlobStore",
    "FileBlobStore",
    "blob_store_from_settings",
    "check_sha",
    "open_blob_store",
]


def open_blob_store(
    url: str, *, endpoint_url: str | None = None, public_endpoint_url: str | None = None
) -> BlobStore:
    """The store at `url`: ``file:///absolute/path`` or ``s3://bucket[/prefix]``.

    InvalidRequest names the URL and the accepted forms when it is neither.
    """
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path.startswith("/"):
        return FileBlobStore(Path(unquote(parts.path)))
    if parts.scheme == "s3" and parts.netloc and not parts.query and not parts.fragment:
        from adapters_store.blobstore.s3 import S3BlobStore

        return S3BlobStore(
            parts.netloc,
            unquote(parts.path),
            endpoint_url=endpoint_url,
            public_endpoint_url=public_endpoint_url,
        )
    raise InvalidRequest(
        f"blob store URL {url!r} is not supported: use file:///absolute/path or s3://bucket/prefix"
    )


def blob_store_from_settings(settings: Settings) -> BlobStore:
    """The store `DIFFFIT_BLOB_URL` names (default: the folder `DIFFFIT_BLOB_DIR`)."""
    return open_blob_store(
        settings.resolved_blob_url,
        endpoint_url=settings.s3_endpoint_url,
        public_endpoint_url=settings.s3_public_endpoint_url,
    )
