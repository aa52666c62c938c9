"""Alibaba Cloud OSS through oss2.

The root is `location.bucket` + `location.prefix`; every key this class takes or yields is relative
to it. oss2 checks CRC64 end to end on PUT, UploadPart and CompleteMultipartUpload (enable_crc stays
on); full-object reads are checked here against the server's x-oss-hash-crc64ecma.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, BinaryIO

import oss2
import requests
import urllib3.exceptions
from oss2 import exceptions as oss_exc
from oss2.models import PartInfo

from ossimport.errors import TRANSPORT_REASONS, NotFound, StorageError, VerifyFailed, transport_code
from ossimport.log import register_secret
from ossimport.storage.base import (
    CRC64,
    Abilities,
    Entry,
    Part,
    Storage,
    StorageOptions,
    StreamReader,
    Upload,
)

if TYPE_CHECKING:
    from ossimport.address import Location

KiB, MiB, GiB = 1024, 1024**2, 1024**3
DEFAULT_ENDPOINT = "oss-cn-hangzhou.aliyuncs.com"  # oss2's and ossimport's documented default region
COPY_OBJECT_LIMIT = 1 * GiB  # CopyObject's limit on OSS; larger objects are copied part by part
COPY_PART_SIZE = 256 * MiB
# Server error codes worth retrying even though their HTTP status is below 500.
_RETRYABLE_CODES = frozenset({"RequestTimeout", "SlowDown", "ServiceUnavailable", "InternalError", "Throttling"})


class OSSStorage(Storage):
    scheme = "oss"
    list_page_size = 1000  # keys per ListObjectsV2 request (the OSS maximum)
    abilities = Abilities(
        multipart=True,
        ranged_read=True,
        server_side_copy=True,
        # CRC64 from head/put/complete/whole reads. No MD5: an OSS ETag is no MD5 for multipart
        # and appendable objects, and a listing does not say which an object is
        hashes=frozenset({CRC64}),
        min_part_size=100 * KiB,
        max_part_size=5 * GiB,
        max_parts=10000,
    )

    def __init__(self, location: Location, options: StorageOptions | None = None) -> None:
        super().__init__(location, options)
        prefix = location.prefix
        # the root is a directory: "" or ending in "/", as join_key() would make it
        self._root = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        default = dataclasses.replace(location, endpoint=DEFAULT_ENDPOINT)
        self._endpoint = location.endpoint_url(self.options.https) or str(default.endpoint_url(self.options.https))
        self._access_key_id, auth = self._auth()
        self._session = oss2.Session(pool_size=max(1, self.options.max_pool))
        try:
            self._bucket = oss2.Bucket(
                auth,
                self._endpoint,
                location.bucket,
                session=self._session,
                # requests accepts (connect, read); oss2 passes this through unchanged
                connect_timeout=(self.options.connect_timeout, self.options.read_timeout),  # type: ignore[arg-type]
                enable_crc=True,
                is_path_style=location.path_style,
            )
        except oss_exc.ClientError as e:
            raise StorageError(f"{self.describe()}: {e.body}", code="InvalidArgument") from None
        # CRC64 of each uploaded part, so complete_multipart can have oss2 check the whole object.
        # Only parts uploaded through this instance are known; otherwise oss2 skips that check.
        self._part_crcs: dict[tuple[str, int], tuple[int, int]] = {}
        self._lock = threading.Lock()

    def _auth(self) -> tuple[str, Any]:
        """(access key id, oss2 auth): the address first, then the environment, then anonymous."""
        loc = self.location
        ak, sk, token = loc.access_key, loc.secret_key, loc.token
        if not (ak and sk):
            ak = os.environ.get("OSS_ACCESS_KEY_ID", "")
            sk = os.environ.get("OSS_ACCESS_KEY_SECRET", "")
            token = os.environ.get("OSS_SESSION_TOKEN", "")
        if ak and sk:
            # keys from the environment never pass through the CLI's address parsing, which
            # registers address secrets: register all of them here so no log line shows them
            register_secret(sk, token)
            return ak, (oss2.StsAuth(ak, sk, token) if token else oss2.Auth(ak, sk))
        if self.options.anonymous:
            return "", oss2.AnonymousAuth()
        raise StorageError(
            f"{self.describe()}: no OSS credentials; write oss://ACCESS_KEY:SECRET_KEY@BUCKET.ENDPOINT/, "
            "set OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET, or use --anonymous",
            code="MissingCredentials",
        )

    def _full(self, key: str) -> str:
        if not key:
            raise StorageError(f"{self.describe()}: empty object key", code="InvalidObjectName")
        return self._root + key

    def _where(self, key: str) -> str:
        return self.describe() + key

    # ---- required ---------------------------------------------------------------------------
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[Entry]:
        it = oss2.ObjectIteratorV2(
            self._bucket,
            prefix=self._root + prefix,
            start_after=self._root + start_after if start_after else "",
            max_keys=self.list_page_size,
        )
        for obj in self._listed(it, prefix):
            if obj.key.endswith("/") and obj.size == 0:
                continue  # a "directory" marker made by consoles and tools, not a file
            yield self._entry(obj)

    def _listed(self, it: Iterator[Any], prefix: str) -> Iterator[Any]:
        """The objects (and common prefixes) of an oss2 listing iterator, its errors ours."""
        while True:
            try:
                obj = next(it)
            except StopIteration:
                return
            except Exception as e:
                raise self._error(e, "list", prefix) from e
            yield obj

    def _entry(self, obj: Any) -> Entry:
        return Entry(obj.key[len(self._root):], obj.size, float(obj.last_modified), _etag(obj.etag))

    def list_dirs(self, prefix: str = "") -> list[str]:
        it = oss2.ObjectIteratorV2(self._bucket, prefix=self._root + prefix, delimiter="/",
                                   max_keys=self.list_page_size)
        cut = len(self._root)
        try:
            dirs = [obj.key[cut:] for obj in it if obj.is_prefix()]
        except Exception as e:
            raise self._error(e, "list", prefix) from e
        return sorted(dirs, key=lambda k: k.encode())

    def list_level(self, prefix: str = "", limit: int | None = None) -> Iterator[Entry]:
        if limit is not None:  # a small page (one key more, for the directory's own marker)
            cut = len(self._root)
            try:
                result = self._bucket.list_objects_v2(prefix=self._root + prefix, delimiter="/",
                                                      max_keys=limit + 1, encoding_type="url")
            except Exception as e:
                raise self._error(e, "list", prefix) from e
            found = [Entry(p[cut:], 0, 0.0) for p in result.prefix_list] + [
                self._entry(o) for o in result.object_list if not (o.key.endswith("/") and o.size == 0)]
            yield from found[:limit]
            return
        it = oss2.ObjectIteratorV2(self._bucket, prefix=self._root + prefix, delimiter="/",
                                   max_keys=self.list_page_size)
        cut = len(self._root)
        for obj in self._listed(it, prefix):
            if obj.is_prefix():
                yield Entry(obj.key[cut:], 0, 0.0)
            elif not (obj.key.endswith("/") and obj.size == 0):  # markers are not files
                yield self._entry(obj)

    def head(self, key: str) -> Entry:
        try:
            r = self._bucket.head_object(self._full(key))
        except Exception as e:
            raise self._error(e, "head", key) from e
        return Entry(
            key,
            r.content_length or 0,
            float(r.last_modified or 0),
            _etag(r.etag),
            {CRC64: str(r.server_crc)} if r.server_crc is not None else {},
        )

    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        if start < 0 or (end is not None and end < start):
            raise StorageError(f"{self._where(key)}: invalid range [{start}, {end})", code="InvalidArgument")
        if end == start:
            self.head(key)  # an empty range of a missing key is still NotFound
            return io.BytesIO(b"")
        whole = start == 0 and end is None
        byte_range = None if whole else (start, end - 1 if end is not None else None)
        # without this header OSS answers an unsatisfiable range with the whole object (200)
        headers = {"x-oss-range-behavior": "standard"}
        try:
            r = self._bucket.get_object(self._full(key), byte_range=byte_range, headers=headers)
        except oss_exc.ServerError as e:
            if e.status == 416 and start >= self.head(key).size:
                return io.BytesIO(b"")  # reading from the end (or past it) yields nothing
            raise self._error(e, "open", key) from e
        except Exception as e:
            raise self._error(e, "open", key) from e
        if not whole:
            got_start = _range_start(r.content_range)
            if r.status != 206 or got_start != start:
                r.close()
                raise StorageError(
                    f"{self._where(key)}: asked for bytes from {start}, server answered {r.status} "
                    f"{r.content_range or 'without Content-Range'}",
                    code="InvalidRange",
                    retryable=True,
                )
        return _Reader(r, verify_crc=whole, where=self._where(key), on_error=lambda e: self._error(e, "read", key))

    def put(
        self,
        key: str,
        data: BinaryIO,
        size: int,
        *,
        mtime: float | None = None,
        mode: int | None = None,
        content_md5: str | None = None,
    ) -> Entry:
        full = self._full(key)
        body = _ExactReader(data, size, self._where(key))
        if size == 0:
            body.check_end()  # nothing will be read for an empty body: look for extra bytes now
        try:
            r = self._bucket.put_object(full, body if size else b"")
        except Exception as e:
            raise self._error(e, "put", key) from e
        return Entry(key, size, _response_time(r.headers), _etag(r.etag),
                     {CRC64: str(r.crc)} if r.crc is not None else {})

    def delete(self, key: str) -> None:
        try:
            self._bucket.delete_object(self._full(key))
        except oss_exc.NoSuchKey:
            pass
        except Exception as e:
            raise self._error(e, "delete", key) from e

    # ---- multipart ---------------------------------------------------------------------------
    def create_multipart(self, key: str, *, mtime: float | None = None, mode: int | None = None,
                         content_md5: str | None = None) -> str:
        try:
            return str(self._bucket.init_multipart_upload(self._full(key)).upload_id)
        except Exception as e:
            raise self._error(e, "create multipart upload", key) from e

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> Part:
        try:
            r = self._bucket.upload_part(self._full(key), upload_id, number, data)
        except Exception as e:
            raise self._error(e, f"upload part {number} of", key) from e
        if r.crc is not None:
            with self._lock:
                self._part_crcs[(upload_id, number)] = (r.crc, len(data))
        return Part(number, r.etag, len(data))

    def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> Entry:
        infos = []
        with self._lock:
            for p in sorted(parts, key=lambda p: p.number):
                crc, size = self._part_crcs.get((upload_id, p.number), (None, p.size))
                infos.append(PartInfo(p.number, p.etag, size=size or p.size or None, part_crc=crc))
        try:
            r = self._bucket.complete_multipart_upload(self._full(key), upload_id, infos)
        except Exception as e:
            raise self._error(e, "complete multipart upload of", key) from e
        finally:
            with self._lock:
                for p in parts:
                    self._part_crcs.pop((upload_id, p.number), None)
        if all(p.size > 0 for p in parts):
            size = sum(p.size for p in parts)
        else:  # the caller did not record part sizes: ask the store
            size = self.head(key).size
        return Entry(key, size, _response_time(r.headers), _etag(r.etag),
                     {CRC64: str(r.crc)} if r.crc is not None else {})

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self._bucket.abort_multipart_upload(self._full(key), upload_id)
        except oss_exc.NoSuchUpload:
            pass  # already aborted or completed: aborting is idempotent, like delete
        except Exception as e:
            raise self._error(e, "abort multipart upload of", key) from e
        finally:
            with self._lock:
                for k in [k for k in self._part_crcs if k[0] == upload_id]:
                    del self._part_crcs[k]

    def list_uploads(self, prefix: str = "") -> Iterator[Upload]:
        it = oss2.MultipartUploadIterator(self._bucket, prefix=self._root + prefix)
        cut = len(self._root)
        while True:
            try:
                upload = next(it)
            except StopIteration:
                return
            except Exception as e:
                raise self._error(e, "list multipart uploads", prefix) from e
            if upload.upload_id:  # prefix entries have none
                yield Upload(upload.key[cut:], upload.upload_id, float(upload.initiation_date or 0))

    # ---- server-side copy --------------------------------------------------------------------
    def copy(self, src_key: str, dst_key: str, *, src_root: Storage | None = None,
             size: int | None = None) -> Entry:
        src = src_root if src_root is not None else self
        if not isinstance(src, OSSStorage):
            raise StorageError(f"cannot copy server-side from {src.describe()} to {self.describe()}",
                               code="NotImplemented")
        source = src.head(src_key)  # always: it brings the CRC64 the engine verifies against
        src_bucket, src_full, dst_full = src.location.bucket, src._full(src_key), self._full(dst_key)
        try:
            if source.size <= COPY_OBJECT_LIMIT:
                r = self._bucket.copy_object(src_bucket, src_full, dst_full)
                etag = r.etag
            else:
                etag = self._copy_parts(src_bucket, src_full, dst_full, source.size)
        except StorageError:
            raise
        except Exception as e:
            raise self._error(e, f"copy {src.describe()}{src_key} to", dst_key) from e
        # the content is the source's, so is its CRC64
        return Entry(dst_key, source.size, time.time(), _etag(etag), dict(source.checksums))

    def _copy_parts(self, src_bucket: str, src_full: str, dst_full: str, size: int) -> str:
        part = max(COPY_PART_SIZE, math.ceil(size / self.abilities.max_parts))
        upload_id = self._bucket.init_multipart_upload(dst_full).upload_id
        try:
            infos = []
            for number, offset in enumerate(range(0, size, part), start=1):
                last = min(offset + part, size) - 1
                r = self._bucket.upload_part_copy(src_bucket, src_full, (offset, last), dst_full, upload_id, number)
                infos.append(PartInfo(number, r.etag, size=last - offset + 1))
            return str(self._bucket.complete_multipart_upload(dst_full, upload_id, infos).etag)
        except BaseException:
            try:
                self._bucket.abort_multipart_upload(dst_full, upload_id)
            except oss_exc.OssError:
                pass  # the original error matters more; a stale upload is listed by list_multipart
            raise

    def same_server(self, other: Storage) -> bool:
        return (
            isinstance(other, OSSStorage)
            and other._endpoint.lower() == self._endpoint.lower()
            and other._access_key_id == self._access_key_id
        )

    def close(self) -> None:
        self._session.session.close()

    # ---- errors ------------------------------------------------------------------------------
    def _error(self, exc: BaseException, what: str, key: str) -> StorageError:
        return map_error(exc, f"{what} {self._where(key)}")


def map_error(exc: BaseException, context: str) -> StorageError:
    """The one place oss2, requests and urllib3 exceptions become StorageError codes.
    Messages carry the OSS code, message and request id, never a credential."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, oss_exc.InconsistentError):
        return VerifyFailed(f"{context}: CRC64 of the data differs between client and server "
                            f"(request {exc.request_id or '?'})")
    if isinstance(exc, oss_exc.RequestError):
        return _transport_error(context, exc, exc.exception)
    if isinstance(exc, oss_exc.ServerError):
        code = exc.code or _STATUS_CODES.get(exc.status, f"HTTP{exc.status}")
        text = f"{context}: {code} (HTTP {exc.status})"
        if exc.message:
            text += f": {exc.message}"
        if exc.request_id:
            text += f" [request {exc.request_id}]"
        if exc.status == 404:
            return NotFound(text, code=code)
        retryable = exc.status >= 500 or exc.status == 429 or code in _RETRYABLE_CODES
        return StorageError(text, code=code, retryable=retryable)
    if isinstance(exc, oss_exc.OssError):  # ClientError and friends: our request was wrong
        return StorageError(f"{context}: {exc.body}", code="ClientError")
    if isinstance(exc, requests.RequestException | urllib3.exceptions.HTTPError | OSError):
        return _transport_error(context, exc, exc)
    return StorageError(f"{context}: {type(exc).__name__}: {exc}", code="StorageError")


def _transport_error(context: str, exc: BaseException, cause: BaseException) -> StorageError:
    code = transport_code(exc)
    return StorageError(f"{context}: connection failed ({TRANSPORT_REASONS[code]}): {_short(cause)}", code=code,
                        retryable=True)


_STATUS_CODES = {403: "AccessDenied", 404: "NoSuchKey", 412: "PreconditionFailed", 416: "InvalidRange"}


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _etag(etag: str | None) -> str | None:
    # OSS sends upper-case hex; the contract compares ETags with lower-case md5 hex
    return etag.strip('"').lower() if etag else None


def _response_time(headers: Any) -> float:
    """The server's Date of a write answer: the object's mtime to the second, without a HEAD."""
    try:
        return parsedate_to_datetime(headers["Date"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return time.time()


def _range_start(content_range: str | None) -> int | None:
    """First byte of 'bytes FIRST-LAST/TOTAL', None when absent or malformed."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    try:
        return int(content_range[6:].split("-", 1)[0])
    except ValueError:
        return None


class _ExactReader:
    """Feeds exactly `size` bytes of `data` to the HTTP body, raising SIZE_NOT_MATCH *before* the
    last byte goes out when the source is shorter or longer, so the server never sees a complete
    body and stores nothing. `len` gives requests the Content-Length."""

    def __init__(self, data: BinaryIO, size: int, where: str) -> None:
        self._data, self.len, self._left, self._where = data, size, size, where

    def read(self, amt: int | None = None) -> bytes:
        if self._left == 0:
            return b""
        want = self._left if amt is None or amt < 0 else min(amt, self._left)
        # oss2's adapter assumes a read returns all it asked for (it counts offsets that way)
        chunks = []
        while want:
            chunk = self._data.read(want)
            if not chunk:
                raise StorageError(f"{self._where}: source ended {self._left} bytes before the expected "
                                   f"size {self.len}", code="SIZE_NOT_MATCH")
            chunks.append(chunk)
            want -= len(chunk)
            self._left -= len(chunk)
        if self._left == 0:
            self.check_end()
        return b"".join(chunks)

    def check_end(self) -> None:
        if self._data.read(1):
            raise StorageError(f"{self._where}: source is longer than the expected size {self.len}",
                               code="SIZE_NOT_MATCH")


class _Reader(StreamReader):
    """A streaming object body. A whole-object read is checked at EOF against the length and the
    server's CRC64; errors come out as StorageError."""

    def __init__(self, result: Any, *, verify_crc: bool, where: str,
                 on_error: Callable[[BaseException], StorageError]) -> None:
        super().__init__()
        self._r = result
        self._verify = verify_crc
        self._where = where
        self._on_error = on_error
        self._expected = result.content_length
        # what the engine compares with the bytes it hashed (this reader checks it too, at EOF)
        self.checksums = {CRC64: str(result.server_crc)} if verify_crc and result.server_crc is not None else {}
        self._got = 0
        self._eof = False

    def _read_some(self, n: int) -> bytes:
        if self._eof:
            return b""
        try:
            data = self._r.read(n)
        except Exception as e:
            raise self._on_error(e) from e
        if data:
            self._got += len(data)
            return bytes(data)
        self._eof = True
        if self._expected is not None and self._got != self._expected:
            raise StorageError(f"{self._where}: body ended after {self._got} of {self._expected} bytes",
                               code="IncompleteBody", retryable=True)
        if self._verify and self._r.server_crc is not None and self._r.client_crc != self._r.server_crc:
            raise VerifyFailed(f"{self._where}: CRC64 of the bytes read differs from the server's "
                               f"(request {self._r.request_id or '?'})")
        return b""

    def close(self) -> None:
        if not self.closed:
            try:
                self._r.close()
            finally:
                super().close()
