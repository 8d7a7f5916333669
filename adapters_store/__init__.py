"""Registry (SQL) and blob store shared by the HTTP service and the workers.

Torch-free on purpose: the service imports this package and must not need
torch. Functions return frozen records, never ORM objects. The adapter file
format (``read_header``, ``read_header_file``) is :mod:`difffit.adapter_format`'s,
re-exported here for the store's callers.
"""

from adapters_store.blobstore import BlobStore, FileBlobStore, blob_store_from_settings, open_blob_store
from adapters_store.records import (
    AdapterRecord,
    DatasetRecord,
    JobEvent,
    JobRecord,
    TenantRecord,
    VersionRecord,
    WebhookDeliveryRecord,
)
from adapters_store.registry import Registry
from difffit.adapter_format import read_header, read_header_file

__all__ = [
    "AdapterRecord",
    "BlobStore",
    "DatasetRecord",
    "FileBlobStore",
    "JobEvent",
    "JobRecord",
    "Registry",
    "TenantRecord",
    "VersionRecord",
    "blob_store_from_settings",
    "open_blob_store",
    "WebhookDeliveryRecord",
    "read_header",
    "read_header_file",
]
