"""Registry (SQL) and blob store shared by the HTTP service and the workers.

Torch-free on purpose: the service imports this package and must not need
torch. Functions return frozen records, never ORM objects.
"""

from adapters_store.adapter_file import read_header, read_header_file
from adapters_store.blobstore import BlobStore, FileBlobStore, blob_store_from_settings, open_blob_store
from adapters_store.records import (
    AdapterRecord,
    JobEvent,
    JobRecord,
    TenantRecord,
    VersionRecord,
)
from adapters_store.registry import Registry

__all__ = [
    "AdapterRecord",
    "BlobStore",
    "FileBlobStore",
    "JobEvent",
    "JobRecord",
    "Registry",
    "TenantRecord",
    "VersionRecord",
    "blob_store_from_settings",
    "open_blob_store",
    "read_header",
    "read_header_file",
]
