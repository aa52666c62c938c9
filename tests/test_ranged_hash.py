"""A parallel ranged download is checked against the source's checksum by hashing its ranges in
file order as they are written (engine/behind.py), not by reading the whole file back after the
commit; where a range had to be written again after part of it was hashed, the file is read back
as before. Azure (Azurite) as the source: it reports every blob's MD5; a local destination."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from azure.storage.blob import ContentSettings
from backends import azure as azurite
from servers.faultproxy import FaultProxy, Headers

from ossimport.address import parse_address
from ossimport.engine.stats import Stats
from ossimport.engine.transfer import Transfer, TransferOptions
from ossimport.errors import VerifyFailed
from ossimport.storage import open_storage
from ossimport.storage.base import MD5
from ossimport.storage.local import LocalStorage

MiB = 1024 * 1024
DATA = random.Random(11).randbytes(13 * MiB)  # three ranges of 5, 5 and 3 MiB
RANGED = TransferOptions(multipart_threshold=4 * MiB, part_size=5 * MiB, part_threads=3)


class CountingLocal(LocalStorage):
    """A local destination that counts the reads of its files."""

    reads = 0

    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        self.reads += 1
        return super().open(key, start, end)


class DamageFirstRange:
    """Flips a byte in the answer to the first GET of bytes 0-..., once: the range is refused
    after all of its bytes were written (and hashed), then read again."""

    def __init__(self) -> None:
        self.done = 0

    def response(self, method: str, path: str, headers: Headers, body: bytes) -> tuple[Headers, bytes]:
        ranges = [v for k, v in headers if k.lower() == "content-range"]
        if method == "GET" and ranges and ranges[0].startswith("bytes 0-") and body and not self.done:
            self.done += 1
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        return headers, body


@pytest.fixture
def azure(backend_factory: Any) -> Any:
    return backend_factory("azure")


def _copy(src: Any, tmp_path: Path) -> CountingLocal:
    dst = CountingLocal(parse_address(f"{tmp_path / 'dst'}/"))
    tr = Transfer(src, dst, RANGED, Stats())
    try:
        entry = next(e for e in src.list() if e.key == "big.bin")
        assert entry.checksums.get(MD5)  # what the download is checked against
        tr.copy(entry, "big.bin")
    finally:
        tr.close()
    return dst


def test_a_ranged_download_is_checked_without_reading_the_file_back(azure: Any, tmp_path: Path) -> None:
    root = azure.new_root()
    azure.seed(root, {"big.bin": DATA})
    dst = _copy(azure.storage(root), tmp_path)
    assert (tmp_path / "dst" / "big.bin").read_bytes() == DATA
    assert dst.reads == 0


def test_a_range_written_again_after_it_was_hashed_has_the_file_read_back(azure: Any, tmp_path: Path) -> None:
    root = azure.new_root()
    azure.seed(root, {"big.bin": DATA})
    damage = DamageFirstRange()
    proxy = FaultProxy("127.0.0.1", azure.handle.port, shape_response=damage.response).start()
    try:
        key = azurite.KEY.replace("/", "%2F")
        src = open_storage(parse_address(
            f"azure://{azurite.ACCOUNT}:{key}@{azure.handle.container}.127.0.0.1:{proxy.port}/{root}/"))
        try:
            dst = _copy(src, tmp_path)
        finally:
            src.close()
    finally:
        proxy.stop()
    assert damage.done == 1
    assert (tmp_path / "dst" / "big.bin").read_bytes() == DATA
    assert dst.reads == 1, "the hash of the first try's bytes is not trusted"


def test_bytes_that_differ_from_the_source_checksum_never_appear(azure: Any, tmp_path: Path) -> None:
    root = azure.new_root()
    azure.seed(root, {"big.bin": DATA})
    blob = azurite.container_client(azure.handle).get_blob_client(f"{root}/big.bin")
    blob.set_http_headers(content_settings=ContentSettings(content_md5=bytearray(16)))  # a wrong MD5
    src = azure.storage(root)
    dst = CountingLocal(parse_address(f"{tmp_path / 'dst'}/"))
    tr = Transfer(src, dst, RANGED, Stats())
    try:
        entry = next(iter(src.list()))
        with pytest.raises(VerifyFailed, match="differs from the source's"):
            tr.copy(entry, "big.bin")
    finally:
        tr.close()
    assert not any((tmp_path / "dst").rglob("*.bin*")), "nothing left, not even a temp file"
    assert dst.reads == 0, "refused before the commit"
