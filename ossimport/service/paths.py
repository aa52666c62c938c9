"""Where a dataflow's files are: file systems, object stores and the path rules of REFERENCE 3a.

A dataflow maps a file system (`FileSystemId`: an id declared in `conf/filesystems` as
`id = location`, a local directory or an SFTP address; or an absolute local directory) plus
`FileSystemPath` to an object store (`SourceStorage`, any object-store address) plus
`SourceStoragePath`. A subtask's source key is Directory + SrcFilePath under the source root,
its destination key DstDirectory + DstFilePath under the destination root, except that a
DstFilePath already beginning with DstDirectory is not prefixed twice.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from ossimport.address import Location, parse_address
from ossimport.errors import UsageError
from ossimport.jobs.config import read_properties
from ossimport.service.errors import ApiError, invalid

MAX_PATH = 1023
MAX_NAME = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_path(name: str, value: str, *, directory: bool) -> str:
    """A Directory (starts and ends with '/') or a file path (starts with '/', ends in a name)."""
    if _CONTROL.search(value):
        raise ApiError("IllegalCharacters", f"{name} holds a NUL or control character")
    if ".." in value.split("/"):
        raise ApiError("IllegalCharacters", f"{name}={value!r}: '..' is not allowed in a path")
    if len(value) > MAX_PATH:
        raise invalid(name, f"at most {MAX_PATH} characters")
    if not value.startswith("/"):
        raise invalid(name, f"{value!r} must start with '/'")
    if directory and not value.endswith("/"):
        raise invalid(name, f"{value!r} must end with '/' (a directory)")
    if not directory and value.endswith("/"):
        raise invalid(name, f"{value!r} must end in a file name")
    if any(len(part.encode()) > MAX_NAME for part in value.split("/")):
        raise invalid(name, f"a name in {value!r} is over {MAX_NAME} bytes")
    return value


def source_key(directory: str, src_file: str) -> str:
    return (directory + src_file.lstrip("/")).lstrip("/")


def destination_key(dst_directory: str, dst_file: str) -> str:
    if dst_file.startswith(dst_directory):
        return dst_file.lstrip("/")
    return (dst_directory + dst_file.lstrip("/")).lstrip("/")


def file_systems(conf_dir: Path) -> dict[str, str]:
    """The ids declared in `conf/filesystems` (id = location)."""
    path = conf_dir / "filesystems"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    return {k.strip(): v.strip() for k, v in read_properties(text, str(path)).items() if k.strip()}


def file_system_root(conf_dir: Path, fs_id: str, fs_path: str) -> Location:
    """The directory Location of FileSystemId + FileSystemPath; it must exist when local."""
    if _CONTROL.search(fs_id):
        raise ApiError("IllegalCharacters", "FileSystemId holds a NUL or control character")
    declared = file_systems(conf_dir)
    if fs_id in declared:
        text = declared[fs_id]
    elif fs_id.startswith("/"):
        text = fs_id
    else:
        raise ApiError("InvalidFileSystem.NotFound", f"FileSystemId {fs_id!r} is neither declared in "
                       f"{conf_dir / 'filesystems'} (id = location) nor an absolute local directory")
    try:
        loc = parse_address(text if text.endswith("/") else text + "/")
    except UsageError as exc:
        raise invalid("FileSystemId", f"{fs_id!r} names an unusable location: {exc}") from None
    if loc.backend not in ("local", "sftp"):
        raise invalid("FileSystemId", f"{fs_id!r} must be a local directory or an SFTP address")
    root = replace(loc, path=loc.path.rstrip("/") + fs_path, is_dir=True)
    if root.backend == "local" and not os.path.isdir(root.path):
        raise invalid("FileSystemPath", f"{fs_path!r} is not an existing directory of {fs_id!r}; create it first")
    return root


def object_store(text: str) -> Location:
    """SourceStorage: an object-store address of our grammar (s3://, oss://, minio://, ...)."""
    try:
        loc = parse_address(text if text.endswith("/") else text + "/")
    except UsageError as exc:
        raise invalid("SourceStorage", str(exc)) from None
    if loc.backend not in ("s3", "oss"):
        raise invalid("SourceStorage", "use an object-store address such as oss://bucket or "
                      "s3://AK:SK@bucket.host:port")
    return loc


def object_root(store: Location, storage_path: str) -> Location:
    return replace(store, prefix=store.prefix + storage_path.lstrip("/"), is_dir=True)


def shown(store: Location) -> str:
    """SourceStorage as answers show it: the address without credentials."""
    return replace(store, access_key="", secret_key="", token="").display().rstrip("/")
