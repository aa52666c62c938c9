"""Azure Blob Storage (block blobs) through azure-storage-blob.

The root is a container plus a prefix; every key in and out is relative to it.

Multipart uploads are block uploads: each part is a block staged on the destination blob
(Put Block, its MD5 checked by the service on arrival) and completing commits the block list
(Put Block List), which makes the whole blob visible at once. Azure has no "upload" object to
list or abort, so create_multipart writes an empty marker blob
`.ossimport-uploads/<container key>/<upload id>` that lists the upload (its creation time is the
server's) and holds what the commit sets (mtime, the content's MD5); completing and aborting
remove it. Listings never show that prefix. Staged blocks that are never committed are dropped
by the service after 7 days (or by the blob's next commit).

Content-MD5: Put Blob has the service compute and keep it; a blob committed from blocks has one
only where we set it at commit (the MD5 of the bytes we staged, each block checked on arrival, or
the MD5 the engine knew up front). head(), listings and whole reads report it as MD5.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import formatdate, parsedate_to_datetime
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, unquote, urlencode
from xml.etree import ElementTree

import requests
import urllib3
from azure.core import exceptions as az_exc
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.transport import RequestsTransport
from azure.core.rest import HttpRequest
from azure.storage.blob import BlobBlock, BlobPrefix, BlobServiceClient, ContainerClient, ContentSettings

from ossimport.errors import TRANSPORT_REASONS, NotFound, StorageError, transport_code
from ossimport.log import register_secret
from ossimport.storage.base import MD5, Abilities, Entry, Part, Storage, StorageOptions, StreamReader, Upload
from ossimport.storage.feed import Feed

if TYPE_CHECKING:
    from ossimport.address import Location

MiB, GiB = 1024**2, 1024**3
DEFAULT_SUFFIX = "core.windows.net"
# a put of fewer bytes is one Put Blob from memory; a larger one streams as blocks of BLOCK bytes
PUT_BUFFER = 8 * MiB
BLOCK = 8 * MiB
# ranged GETs of at most 4 MiB: the most the service hashes for a read (x-ms-range-get-content-md5)
GET_CHUNK = 4 * MiB
LIST_PAGE = 5000  # blobs per List Blobs page: the service's maximum
MARKERS = ".ossimport-uploads/"
META_MTIME = "mtime"  # the source's mtime, as rclone keeps it (Last-Modified cannot be set)
META_MD5 = "md5"  # on a marker: the content MD5 (hex) to set at commit
_RETRYABLE = frozenset({"ServerBusy", "OperationTimedOut", "InternalError", "IncrementalCopyOfEarlierVersionSnapshotNotAllowed"})
_HINTS = {
    "AuthenticationFailed": "check the account name and key (escape '/' in the key as %2F)",
    "AuthorizationFailure": "check the account key, the account's firewall and the key's or SAS's permissions",
    "AuthorizationPermissionMismatch": "the key or SAS does not allow this operation on the container",
    "InvalidBlockList": "a staged block is missing (expired or discarded by another writer's commit)",
}
_ACCESS_DENIED = frozenset({"AuthorizationPermissionMismatch",
                            "AuthorizationResourceTypeMismatch", "InsufficientAccountPermissions"})

# the SDK logs every request and answer header at INFO: keep --verbose output ours
logging.getLogger("azure").setLevel(logging.WARNING)


class AzureStorage(Storage):
    scheme = "azure"
    abilities = Abilities(
        multipart=True,
        ranged_read=True,
        server_side_copy=True,
        hashes=frozenset({MD5}),
        md5_up_front_from=PUT_BUFFER,
        min_part_size=1 * MiB,  # Azure has no minimum block size; this keeps part counts sane
        max_part_size=4000 * MiB,
        max_parts=50000,
    )

    def __init__(self, location: Location, options: StorageOptions | None = None) -> None:
        super().__init__(location, options)
        prefix = location.prefix
        self.root = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.container = location.bucket
        account, key, conn = self._credentials()
        self.account = account
        self._key = key  # the account key or a SAS token: what same_server compares
        self._session = session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=max(self.options.max_pool, 10))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        config: dict[str, Any] = {
            "transport": RequestsTransport(session=session, session_owner=True,
                                           connection_timeout=self.options.connect_timeout,
                                           read_timeout=self.options.read_timeout,
                                           connection_verify=_ca_bundle()),
            "retry_total": 0,  # the engine retries (with_retries), with our codes and backoff
            "max_single_put_size": PUT_BUFFER,
            "max_block_size": BLOCK,
            "max_single_get_size": GET_CHUNK,
            "max_chunk_get_size": GET_CHUNK,
        }
        with self._errors("connect"):
            if conn:
                self._service = BlobServiceClient.from_connection_string(conn, **config)
                self.account = self._service.account_name or account
            else:
                credential: Any = None
                if location.token:
                    credential = location.token  # a SAS token
                elif key:
                    credential = {"account_name": account, "account_key": key}
                self._service = BlobServiceClient(self._account_url(account), credential=credential, **config)
        self.url = self._service.url.partition("?")[0].rstrip("/")  # without a SAS token
        # requests reads the proxies (and CA bundle) from os.environ at every request, a scan of
        # the whole environment that cost an eighth of a small download's CPU: once is enough,
        # every request goes to this one URL
        session.proxies = requests.utils.get_environ_proxies(self.url)
        session.verify = _ca_bundle()
        session.trust_env = False
        self._container: ContainerClient = self._service.get_container_client(self.container)

    def _credentials(self) -> tuple[str, str, str]:
        """(account, key or SAS token, connection string): the address first, then AZURE_STORAGE_ACCOUNT +
        AZURE_STORAGE_KEY, then AZURE_STORAGE_CONNECTION_STRING; no key with --anonymous."""
        loc = self.location
        if loc.access_key and loc.token:
            return loc.access_key, loc.token, ""
        if loc.access_key and loc.secret_key:
            return loc.access_key, loc.secret_key, ""
        account = loc.access_key or os.environ.get("AZURE_STORAGE_ACCOUNT", "")
        key = os.environ.get("AZURE_STORAGE_KEY", "")
        if account and key:
            register_secret(key)  # not from the address, which the CLI registers
            return account, key, ""
        conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
        if conn and not loc.access_key:
            for part in conn.split(";"):
                name, _, value = part.partition("=")
                if name.strip().lower() in ("accountkey", "sharedaccesssignature"):
                    register_secret(value.strip())
            return "", "", conn
        if account and self.options.anonymous:
            return account, "", ""
        raise StorageError(
            f"{self.describe()}: no Azure credentials; write azure://ACCOUNT:KEY@CONTAINER[.ENDPOINT]/, set "
            "AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY or AZURE_STORAGE_CONNECTION_STRING",
            code="MissingCredentials",
        )

    def _account_url(self, account: str) -> str:
        """Azure's https://ACCOUNT.blob.SUFFIX, or the emulator's path style at an IP or localhost."""
        loc = self.location
        if loc.path_style:
            secure = loc.https if loc.https is not None else self.options.https
            return f"{'https' if secure else 'http'}://{loc.endpoint}/{account}"
        return f"{'http' if loc.https is False else 'https'}://{account}.blob.{loc.endpoint or DEFAULT_SUFFIX}"

    def _blob(self, full: str) -> Any:
        return self._container.get_blob_client(full)

    def _full(self, key: str) -> str:
        if not key:
            raise StorageError(f"{self.describe()}: empty blob name", code="InvalidObjectName")
        return self.root + key

    def _where(self, key: str = "") -> str:
        return f"azure://{self.account}@{self.container}/{self.root}{key} at {self.url}"

    # ---- required ---------------------------------------------------------------------------
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[Entry]:
        cut = len(self.root)
        after = (self.root + start_after).encode() if start_after else b""
        last = b""
        with self._errors("list", prefix):
            for blob in byte_ordered(self.root + prefix, self._listed):
                name = blob.name
                if (name.startswith(MARKERS) or len(name) <= cut or (name.endswith("/") and not blob.size)
                        or _is_folder(blob)):
                    continue  # our upload markers; directory markers made by tools and by ADLS Gen2
                raw = name.encode()
                if raw <= after:
                    continue  # Azure lists from a marker of its own only: skip up to start_after
                if raw <= last:
                    # the engine's merge of two listings needs byte order: never guess past this
                    raise StorageError(f"list {self._where(prefix)}: the service listed {name!r} after a name "
                                       "that sorts later in UTF-8 byte order", code="ListOrder")
                last = raw
                yield Entry(name[cut:], blob.size, blob.mtime, blob.etag, {MD5: blob.md5} if blob.md5 else {})

    def list_dirs(self, prefix: str = "") -> list[str]:
        cut = len(self.root)
        with self._errors("list", prefix):
            dirs = [item.name[cut:] for item in self._container.walk_blobs(name_starts_with=self.root + prefix,
                                                                            delimiter="/")
                    if isinstance(item, BlobPrefix) and item.name != MARKERS]
        return sorted(dirs, key=lambda k: k.encode())

    def head(self, key: str) -> Entry:
        with self._errors("head", key):
            p = self._blob(self._full(key)).get_blob_properties()
        return Entry(key, p.size, _seconds(p.last_modified), _etag(p.etag), _checksums(p.content_settings))

    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        if start < 0 or (end is not None and end < start):
            raise StorageError(f"get {self._where(key)}: invalid range [{start}, {end})", code="InvalidArgument")
        if end == start:
            self.head(key)  # an empty range of a missing key is still NotFound
            return io.BytesIO(b"")
        reader = _Reader(self, key, start, end)
        try:
            reader.fetch()  # the first GET: a missing blob fails here, not at the first read
        except StorageError as exc:
            # a range from the end of the blob on (416) is simply no bytes, as a file read past EOF;
            # an empty blob answers any range so (a whole read still reports its checksums)
            if exc.code != "InvalidRange":
                raise
            entry = self.head(key)
            if start < entry.size:
                raise
            return _Empty(dict(entry.checksums) if start == 0 and end is None else {})  # type: ignore[return-value]
        return reader  # type: ignore[return-value]

    def _get(self, key: str, first: int, last: int, etag: str | None) -> requests.Response:
        """One GET of bytes first..last (at most GET_CHUNK) of a blob, with the MD5 the service
        computes of them; the body is left to stream."""
        headers = {"x-ms-range": f"bytes={first}-{last}", "x-ms-range-get-content-md5": "true"}
        if etag:
            headers["If-Match"] = etag  # every range from one version of the blob
        return self._send("GET", key, "get", headers, stream=True)

    def _send(self, method: str, key: str, op: str, headers: dict[str, str], body: bytes | None = None,
              stream: bool = False, query: dict[str, str] | None = None) -> requests.Response:
        """One request about a blob (about the container where `query` is given: `key` then only
        names the request in errors), sent beside the SDK over its session and signed by its
        credential, for the calls made per file, per range or per listing page (GET, Put Blob,
        List Blobs): the SDK's pipeline cost ~1 ms of CPU per call, read bodies in 10 KiB pieces,
        hashed each downloaded range three times and took 0.17 ms per listed blob to deserialize.
        Raises the StorageError of an error answer."""
        url = f"{self.url}/{quote(self.container)}"
        if query is None:
            url += "/" + quote(self._full(key), safe="~/")
        params = urlencode(query or {}, quote_via=quote)
        if sas := self._service.url.partition("?")[2]:
            params = f"{params}&{sas}" if params else sas
        headers = {"x-ms-version": self._service.api_version, "x-ms-date": formatdate(usegmt=True), **headers}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        request = HttpRequest(method, f"{url}?{params}" if params else url, headers=headers)
        credential = self._service.credential
        if hasattr(credential, "on_request"):  # the account key (SharedKey): what the SDK signs with
            credential.on_request(PipelineRequest(request, PipelineContext(None)))
        resp = self._session.request(method, request.url, headers=dict(request.headers), data=body, stream=stream,
                                     timeout=(self.options.connect_timeout, self.options.read_timeout))
        if resp.status_code >= 300:
            with contextlib.suppress(requests.RequestException):
                resp.content  # noqa: B018 - the error body, read so the connection is reused
            resp.close()
            code = resp.headers.get("x-ms-error-code") or _STATUS_CODES.get(resp.status_code, "")
            raise self._status_error(resp.status_code, code, op, key)
        return resp

    def _listed(self, prefix: str) -> Iterator[_Listed]:
        """Every blob whose name starts with `prefix` (with its metadata), page by page."""
        marker = ""
        while True:  # page after page until the service gives no NextMarker
            query = {"restype": "container", "comp": "list", "include": "metadata", "prefix": prefix,
                     "maxresults": str(LIST_PAGE)}
            if marker:
                query["marker"] = marker
            answer = self._send("GET", prefix, "list", {}, query=query).content
            try:
                page = ElementTree.fromstring(answer)
                blobs = [_Listed.parse(blob) for blob in page.iterfind("Blobs/Blob")]
            except (ElementTree.ParseError, ValueError) as exc:
                raise StorageError(f"list {self._where(prefix)}: the service's answer is no blob listing ({exc})",
                                   code="BadResponse", retryable=True) from exc
            yield from blobs
            marker, last = page.findtext("NextMarker") or "", marker
            if not marker:
                return
            if marker == last:
                raise StorageError(f"list {self._where(prefix)}: the service gave the same page marker twice",
                                   code="BadResponse", retryable=True)

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
        feed = Feed(data, size, content_md5, f"put {self._where(key)}")
        if size > PUT_BUFFER:
            return self._put_blocks(key, full, feed, mtime)
        body = feed.read(size)
        md5 = feed.md5()
        headers = {"x-ms-blob-type": "BlockBlob", "Content-MD5": base64.b64encode(bytes.fromhex(md5)).decode()}
        for name, value in (_meta(mtime) or {}).items():
            headers[f"x-ms-meta-{name}"] = value
        with self._errors("put", key):
            # Put Blob with Content-MD5: the service checks the bytes and keeps their MD5
            r = self._send("PUT", key, "put", headers, body)
        return Entry(key, size, _http_seconds(r.headers.get("Last-Modified")), _etag(r.headers.get("ETag")), {MD5: md5})

    def _put_blocks(self, key: str, full: str, feed: Feed, mtime: float | None) -> Entry:
        """A large put streamed as blocks (each checked on arrival), committed at once with the
        MD5 of all that was staged, once the source proved to have exactly `size` bytes."""
        upload_id = _new_upload_id()
        blob = self._blob(full)
        ids = []
        with self._errors("put", key):
            while chunk := feed.read(BLOCK):  # raises before the last block if the size is wrong
                ids.append(_block_id(upload_id, len(ids) + 1))
                blob.stage_block(ids[-1], chunk, length=len(chunk), validate_content=True)
            md5 = feed.md5()
            r = blob.commit_block_list([BlobBlock(block_id=i) for i in ids], metadata=_meta(mtime),
                                       content_settings=ContentSettings(content_md5=bytearray.fromhex(md5)))
        return Entry(key, feed.len, _seconds(r.get("last_modified")), _etag(r.get("etag")), {MD5: md5})

    def delete(self, key: str) -> None:
        try:
            with self._errors("delete", key):
                self._blob(self._full(key)).delete_blob()
        except NotFound as exc:
            if exc.code == "NoSuchBucket":
                raise

    # ---- multipart: staged blocks ----------------------------------------------------------------
    def _marker(self, key: str, upload_id: str) -> str:
        return f"{MARKERS}{self._full(key)}/{upload_id}"

    def create_multipart(self, key: str, *, mtime: float | None = None, mode: int | None = None,
                         content_md5: str | None = None) -> str:
        upload_id = _new_upload_id()
        meta = _meta(mtime) or {}
        if content_md5:
            meta[META_MD5] = content_md5
        with self._errors("create multipart upload", key):
            self._blob(self._marker(key, upload_id)).upload_blob(b"", overwrite=True, metadata=meta)
        return upload_id

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> Part:
        block_id = _block_id(upload_id, number)
        with self._errors(f"upload part {number}", key):
            # Content-MD5: the service checks the block on arrival
            self._blob(self._full(key)).stage_block(block_id, data, length=len(data), validate_content=True)
        return Part(number, block_id, len(data))

    def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> Entry:
        ordered = sorted(parts, key=lambda p: p.number)
        ids = [_block_id(upload_id, p.number) for p in ordered]
        blob, marker = self._blob(self._full(key)), self._blob(self._marker(key, upload_id))
        try:
            with self._errors("complete multipart upload", key):
                meta = dict(marker.get_blob_properties().metadata or {})
        except NotFound as exc:
            if exc.code == "NoSuchBucket":
                raise
            return self._completed_before(key, upload_id, ids, exc)
        md5 = meta.pop(META_MD5, None)
        settings = ContentSettings(content_md5=bytearray.fromhex(md5)) if md5 else None
        with self._errors("complete multipart upload", key):
            # a block is taken from the uncommitted ones, else the committed: committing again
            # after an answer that was lost gives the same blob
            r = blob.commit_block_list([BlobBlock(block_id=i) for i in ids], metadata=meta or None,
                                       content_settings=settings)
        # after the commit, and only tidying: a marker left (a kill, a failed delete) lists the
        # upload as unfinished until an abort or the next sweep removes it
        with contextlib.suppress(az_exc.AzureError):
            marker.delete_blob()
        if any(p.size <= 0 for p in ordered):  # parts rebuilt without sizes: ask the store
            return self.head(key)
        return Entry(key, sum(p.size for p in ordered), _seconds(r.get("last_modified")), _etag(r.get("etag")),
                     {MD5: md5} if md5 else {})

    def _completed_before(self, key: str, upload_id: str, ids: list[str], exc: NotFound) -> Entry:
        """No marker: the upload was aborted, or completed by an earlier try whose answer was
        lost. The blob's committed blocks tell which."""
        with self._errors("complete multipart upload", key):
            try:
                committed, _ = self._blob(self._full(key)).get_block_list("committed")
            except az_exc.ResourceNotFoundError:
                committed = []
        if [b.id for b in committed] != ids:
            raise NotFound(f"complete multipart upload {self._where(key)}: no upload {upload_id} "
                           "(aborted, or the blob was written since)", code="NoSuchUpload") from exc
        return self.head(key)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        # the staged blocks cannot be removed one by one: the service drops them after 7 days
        # or at the blob's next commit; without the marker the upload is gone for us
        try:
            with self._errors("abort multipart upload", key):
                self._blob(self._marker(key, upload_id)).delete_blob()
        except NotFound as exc:
            if exc.code == "NoSuchBucket":
                raise

    def list_uploads(self, prefix: str = "") -> Iterator[Upload]:
        cut = len(MARKERS) + len(self.root)
        with self._errors("list multipart uploads", prefix):
            for blob in self._container.list_blobs(name_starts_with=MARKERS + self.root + prefix):
                key, _, upload_id = blob.name[cut:].rpartition("/")
                if key and upload_id:
                    yield Upload(key, upload_id, _seconds(blob.creation_time or blob.last_modified))

    # ---- server-side copy --------------------------------------------------------------------
    def copy(self, src_key: str, dst_key: str, *, src_root: Storage | None = None,
             size: int | None = None) -> Entry:
        src = src_root if src_root is not None else self
        if not isinstance(src, AzureStorage) or not self.same_server(src):
            raise StorageError(f"copy {src.describe()} to {self.describe()}: not in the same Azure account",
                               code="NotImplemented")
        source = src.head(src_key)  # its Content-MD5 is copied with it: what the engine compares
        dst = self._blob(self._full(dst_key))
        with self._errors(f"copy {src._where(src_key)} to", dst_key):
            dst.start_copy_from_url(src._blob(src._full(src_key)).url)
            props = self._await_copy(dst, dst_key)
        return Entry(dst_key, props.size, _seconds(props.last_modified), _etag(props.etag), dict(source.checksums))

    def _await_copy(self, dst: Any, dst_key: str) -> Any:
        """Poll a started copy (within an account it is usually done at once) until it ends; one
        that makes no progress for read_timeout seconds is aborted and fails."""
        delay, progress, since = 0.05, None, time.monotonic()
        while True:
            props = dst.get_blob_properties()
            status = props.copy.status
            if status in (None, "success"):
                return props
            if status != "pending":
                raise StorageError(f"copy to {self._where(dst_key)}: {status}: {props.copy.status_description}",
                                   code="CopyFailed", retryable=True)
            if props.copy.progress != progress:
                progress, since = props.copy.progress, time.monotonic()
            elif time.monotonic() - since > self.options.read_timeout:
                with contextlib.suppress(az_exc.AzureError):
                    dst.abort_copy(props.copy.id)
                raise StorageError(f"copy to {self._where(dst_key)}: no progress in {self.options.read_timeout:.0f} s",
                                   code="CopyTimeout", retryable=True)
            time.sleep(delay)  # bounded above by the no-progress deadline
            delay = min(delay * 2, 2.0)

    def same_server(self, other: Storage) -> bool:
        return (isinstance(other, AzureStorage) and other.url == self.url and other.account == self.account
                and other._key == self._key)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._service.close()

    # ---- errors ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, op: str, key: str = "") -> Iterator[None]:
        """Every azure-core failure inside the block, as a StorageError with a code users know."""
        try:
            yield
        except StorageError:
            raise
        except az_exc.AzureError as exc:
            raise self._scrub(self._map_error(exc, op, key)) from exc
        except (requests.RequestException, OSError) as exc:
            raise self._scrub(self._transport_error(exc, op, key)) from exc

    def _map_error(self, exc: az_exc.AzureError, op: str, key: str) -> StorageError:
        where = self._where(key)
        if isinstance(exc, az_exc.HttpResponseError) and exc.status_code is not None:
            given = getattr(exc, "error_code", None)  # a StorageErrorCode (a str enum) or a plain str
            return self._status_error(exc.status_code, str(getattr(given, "value", given) or ""), op, key)
        if isinstance(exc, az_exc.ClientAuthenticationError):
            return StorageError(f"{op} {where}: {exc.message}; {_HINTS['AuthenticationFailed']}",
                                code="AuthenticationFailed")
        if isinstance(exc, az_exc.ServiceRequestError | az_exc.ServiceResponseError):
            return self._transport_error(exc, op, key)
        if type(exc).__name__ == "AzureSigningError" or isinstance(exc, ValueError):
            return StorageError(f"{op} {where}: the account key is not valid base64; copy it again from the "
                                "portal (escape '/' as %2F)", code="AuthenticationFailed")
        if "md5" in str(exc).lower() and "mismatch" in str(exc).lower():
            return StorageError(f"{op} {where}: the MD5 of the bytes read differs from the service's",
                                code="CHECKSUM_NOT_MATCH", retryable=True)
        return StorageError(f"{op} {where}: {type(exc).__name__}: {str(exc)[:300]}", code=type(exc).__name__)

    def _status_error(self, status: int, code: str, op: str, key: str) -> StorageError:
        """An answer with an error status, as a StorageError (code: the service's x-ms-error-code)."""
        where = self._where(key)
        code = code or _STATUS_CODES.get(status, f"HTTP{status}")
        if code == "ContainerNotFound":
            return NotFound(f"{op} {where}: container {self.container!r} does not exist in account "
                            f"{self.account!r}; create it or fix the container name in the address",
                            code="NoSuchBucket")
        if status == 404:
            return NotFound(f"{op} {where}: {code}", code="NoSuchKey" if code == "BlobNotFound" else code)
        hint = _HINTS.get(code)
        text = f"{op} {where}: {code} (HTTP {status}){'; ' + hint if hint else ''}"
        if code in _ACCESS_DENIED:
            code = "AccessDenied"
        elif code == "InvalidRange" or status == 416:
            code = "InvalidRange"
        elif code == "Md5Mismatch":
            return StorageError(text, code="CHECKSUM_NOT_MATCH", retryable=True)
        return StorageError(text, code=code, retryable=status >= 500 or status == 429 or code in _RETRYABLE)

    def _transport_error(self, exc: BaseException, op: str, key: str) -> StorageError:
        code = transport_code(exc)
        return StorageError(f"{op} {self._where(key)}: cannot reach {self.url} ({TRANSPORT_REASONS[code]}); "
                            "check the endpoint and the network", code=code, retryable=True)

    def _scrub(self, err: StorageError) -> StorageError:
        """No secret may reach a message, even one a server or the SDK echoes."""
        text = str(err)
        if self._key and len(self._key) >= 4 and self._key in text:
            err.args = (text.replace(self._key, "***"),)
        return err


_STATUS_CODES = {403: "AuthenticationFailed", 404: "BlobNotFound", 409: "Conflict", 412: "ConditionNotMet",
                 416: "InvalidRange"}


class _Empty(io.BytesIO):
    """No bytes, and the checksums a whole read of an empty blob reports."""

    def __init__(self, checksums: dict[str, str]) -> None:
        super().__init__(b"")
        self.checksums = checksums


class _Reader(StreamReader):
    """Bytes [start, end) of a blob (to its end when `end` is None), GET by GET of at most
    GET_CHUNK bytes, each hashed as it streams and checked against the MD5 the service sent for
    it. Every GET after the first names the first one's ETag: a blob replaced mid-read fails
    instead of mixing two versions. `checksums`: the blob's stored MD5, for a whole read."""

    def __init__(self, storage: AzureStorage, key: str, start: int, end: int | None) -> None:
        self._storage, self._key = storage, key
        self._pos, self._end = start, end  # the next byte to fetch; the end, once known
        self._whole = start == 0 and end is None
        self._resp: requests.Response | None = None
        self._left = 0  # bytes of the current GET not yet read
        self._md5: Any = None
        self._want = ""  # the current GET's Content-MD5
        self._etag: str | None = None
        self.checksums: dict[str, str] = {}

    def fetch(self) -> bool:
        """Send the next GET; False once every byte of the range has been fetched."""
        if self._end is not None and self._pos >= self._end:
            return False
        last = self._pos + GET_CHUNK - 1
        if self._end is not None:
            last = min(last, self._end - 1)
        st = self._storage
        try:
            with st._errors("get", self._key):
                resp = st._get(self._key, self._pos, last, self._etag)
        except StorageError as exc:
            if exc.code == "ConditionNotMet":  # If-Match: the blob was written since the first GET
                raise StorageError(f"read {st._where(self._key)}: the blob changed while it was read",
                                   code="SOURCE_CHANGED", retryable=True) from exc
            raise
        total = int(resp.headers.get("Content-Range", "/0").rpartition("/")[2])
        length = int(resp.headers.get("Content-Length", -1))
        want = resp.headers.get("Content-MD5", "")
        if length != min(last + 1, total) - self._pos or not want:
            resp.close()
            raise StorageError(f"get {st._where(self._key)}: the service answered bytes {self._pos}-{last} with "
                               f"{length} bytes{'' if want else ' and no Content-MD5'}", code="BadResponse",
                               retryable=True)
        if self._etag is None:  # the first GET: the blob's version, size and stored MD5
            self._etag = resp.headers.get("ETag")
            self._end = total if self._end is None else min(self._end, total)
            if self._whole and (md5 := resp.headers.get("x-ms-blob-content-md5")):
                self.checksums = {MD5: base64.b64decode(md5).hex()}
        self._resp, self._left, self._want, self._md5 = resp, length, want, hashlib.md5()
        self._pos += length
        return True

    def _read_some(self, n: int) -> bytes:
        # n bytes unless the range ends first, as an HTTP body gives them (part reads count on it)
        out: list[bytes] = []
        while n > 0:
            if self._resp is None and not self.fetch():
                break
            chunk = self._read_body(min(n, self._left))
            out.append(chunk)
            n -= len(chunk)
        return b"".join(out) if len(out) != 1 else out[0]

    def _read_body(self, n: int) -> bytes:
        assert self._resp is not None
        st = self._storage
        try:
            chunk = self._resp.raw.read(n)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            self.close()
            raise st._transport_error(exc, "read", self._key) from exc
        if not chunk and n:
            self.close()
            raise StorageError(f"read {st._where(self._key)}: the answer broke off {self._left} bytes short",
                               code="ConnectionError", retryable=True)
        self._md5.update(chunk)
        self._left -= len(chunk)
        if not self._left:
            self._resp.close()  # the body is read: the connection goes back to the pool
            self._resp = None
            if base64.b64encode(self._md5.digest()).decode() != self._want:
                raise StorageError(f"read {st._where(self._key)}: the MD5 of the bytes read differs from the "
                                   "service's", code="CHECKSUM_NOT_MATCH", retryable=True)
        return chunk

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()  # a body not read to its end: the connection is dropped
            self._resp = None
        super().close()


def _ca_bundle() -> bool | str:
    """What to verify TLS with, as requests takes it from the environment."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True


def byte_ordered(prefix: str, list_from: Callable[[str], Iterable[Any]]) -> Iterator[Any]:
    """The blobs `list_from(prefix)` yields, in UTF-8 byte order. Azure (and Azurite) sort names
    by UTF-16 code units, which differs from byte order only where a character beyond U+FFFF (a
    surrogate pair: emoji, rare CJK) meets one in U+E000-U+FFFF (fullwidth forms such as '（').
    A name whose first such character past `prefix` is c at position i belongs to the group P + c
    (P: its first i characters); the group is skipped here and listed on its own once the listing
    has left P, where byte order puts it. Memory: the distinct characters of pending groups."""
    pending: list[tuple[str, set[str]]] = []  # (P, the characters c of the groups P + c), nested

    def flush(before: str | None) -> Iterator[Any]:
        while pending and (before is None or not before.startswith(pending[-1][0])):
            head, chars = pending.pop()
            for c in sorted(chars):  # one character each: code point order is byte order
                yield from byte_ordered(head + c, list_from)

    for blob in list_from(prefix):
        name: str = blob.name
        yield from flush(name)
        i = next((j for j in range(len(prefix), len(name)) if ord(name[j]) > 0xFFFF), None)
        if i is None:
            yield blob
        elif pending and pending[-1][0] == name[:i]:
            pending[-1][1].add(name[i])
        else:
            pending.append((name[:i], {name[i]}))
    yield from flush(None)


@dataclass(slots=True)
class _Listed:
    """One blob of a List Blobs page."""

    name: str
    size: int
    mtime: float
    etag: str | None
    md5: str  # hex, or "" where the blob has none
    metadata: dict[str, str]

    @classmethod
    def parse(cls, blob: ElementTree.Element) -> _Listed:
        node = blob.find("Name")
        name = (node.text or "") if node is not None else ""
        if node is not None and node.get("Encoded") == "true":  # a name with characters XML cannot hold
            name = unquote(name)
        props = blob.find("Properties")
        get = props.findtext if props is not None else (lambda _tag, default="": default)
        md5 = get("Content-MD5", "") or ""
        raw_md5 = base64.b64decode(md5) if md5 else b""
        meta = blob.find("Metadata")
        return cls(name, int(get("Content-Length", "0") or 0), _http_seconds(get("Last-Modified", "")),
                   _etag(get("Etag", "")), raw_md5.hex() if len(raw_md5) == 16 else "",
                   {m.tag: m.text or "" for m in meta} if meta is not None else {})


def _is_folder(blob: Any) -> bool:
    """A directory of an account with a hierarchical namespace (ADLS Gen2): the blob API lists it
    as an empty blob named like the directory (no '/'), with metadata hdi_isfolder=true."""
    meta = blob.metadata or {}
    return not blob.size and str(meta.get("hdi_isfolder", "")).lower() == "true"


def _new_upload_id() -> str:
    """32 characters that sort by creation (ns clock, then random): a key's uploads list oldest
    first, which abort_older_uploads falls back on where the server's times tie."""
    return f"{time.time_ns():016x}{uuid.uuid4().hex[:16]}"


def _block_id(upload_id: str, number: int) -> str:
    # every block ID of a blob must have the same length: 32 + 1 + 5 characters
    return f"{upload_id}-{number:05d}"


def _meta(mtime: float | None) -> dict[str, str] | None:
    return {META_MTIME: repr(float(mtime))} if mtime is not None else None


def _checksums(settings: Any) -> dict[str, str]:
    """The Content-MD5 the service reports (a blob committed from blocks has one only if set)."""
    md5 = getattr(settings, "content_md5", None)
    return {MD5: bytes(md5).hex()} if md5 and len(md5) == 16 else {}


def _seconds(when: datetime | None) -> float:
    return when.timestamp() if when else time.time()


def _http_seconds(value: str | None) -> float:
    try:
        return parsedate_to_datetime(value).timestamp() if value else time.time()
    except (TypeError, ValueError):
        return time.time()


def _etag(value: str | None) -> str | None:
    value = (value or "").strip('"')
    return value or None

