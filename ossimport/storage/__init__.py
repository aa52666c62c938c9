"""Backend registry: a scheme name maps to the module and class that implement it.

Modules are imported on first use, so `ossimport --version` does not pay for boto3 or paramiko.
Adding a backend is one module plus one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ossimport.storage.base import Abilities, Entry, Part, Storage, StorageOptions, Writer, check_key

if TYPE_CHECKING:
    from ossimport.address import Location

REGISTRY: dict[str, str] = {
    "local": "ossimport.storage.local:LocalStorage",
    "s3": "ossimport.storage.s3:S3Storage",
    "oss": "ossimport.storage.oss:OSSStorage",
    "sftp": "ossimport.storage.sftp:SFTPStorage",
    "http": "ossimport.storage.http:HTTPListStorage",
    "azure": "ossimport.storage.azure:AzureStorage",
    "upyun": "ossimport.storage.upyun:UpYunStorage",
}


def storage_class(scheme: str) -> type[Storage]:
    try:
        target = REGISTRY[scheme]
    except KeyError:
        raise ValueError(f"unknown storage type {scheme!r}; known: {', '.join(sorted(REGISTRY))}") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def open_storage(location: Location, options: StorageOptions | None = None) -> Storage:
    """The Storage for a parsed `Location` (its `backend` names the registry entry)."""
    return storage_class(location.backend)(location, options)


__all__ = [
    "REGISTRY",
    "Abilities",
    "Entry",
    "Part",
    "Storage",
    "StorageOptions",
    "Writer",
    "check_key",
    "open_storage",
    "storage_class",
]
