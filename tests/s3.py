"""An S3-compatible server on loopback for tests: moto's server mode, real HTTP.

`moto_server` starts ``moto.server.ThreadedMotoServer`` on 127.0.0.1 and a
free port; clients (the stores under test, worker and API subprocesses)
reach it over HTTP like any S3 endpoint, with the dummy credentials that
`S3_ENV` puts in the environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run an S3 server for the duration; yield its endpoint URL (AWS_* set meanwhile)."""
    from moto.server import ThreadedMotoServer

    from launch.embedded import free_port

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client(endpoint: str) -> Any:
    """A plain boto3 client of the test server (for looking behind a store's back)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def new_bucket(endpoint: str) -> str:
    """Create an empty bucket with a unique name and return the name."""
    name = f"difffit-{uuid.uuid4().hex[:12]}"
    client(endpoint).create_bucket(Bucket=name)
    return name


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    """Every object key in `bucket`."""
    pages = client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents") or [])


def everything_in(store: Any) -> list[str]:
    """Every file under a folder store / every object in an S3 store's bucket, looked at directly."""
    from adapters_store import FileBlobStore

    if isinstance(store, FileBlobStore):
        return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    return bucket_keys(store.endpoint_url, store.bucket)
