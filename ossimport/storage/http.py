"""A read-only source of plain HTTP(S) URLs: one URL, or a URL list file (ossimport's `http` source).

`Location.path` is either
- one URL (`is_dir` False): a single object whose key is the last path segment, unquoted; or
- the path of a list file (`list://PATH`): each non-empty line not starting with '#' holds
  columns; column `options.http_prefix_column` (1-based) is a URL prefix and column
  `options.http_key_column` the object's relative key. The object's URL is the prefix followed by
  the percent-quoted key. Columns are separated by tabs when the line has one, otherwise by
  whitespace; in the latter case a key column that comes after the prefix column takes the rest
  of the line, so keys may contain spaces ("http://host/dir/ my file.txt").
- a URL ending in '/' (what `Location.split_object` makes of a single URL): a base URL that keys
  are appended to; it cannot be listed. The single URL's query string (a presigned URL's
  signature) is in `Location.query` and appended to every URL requested: it is sent, never shown
  (messages name URLs through `_safe_url`, and its values are registered as log secrets).

Sizes and mtimes come from HEAD (Content-Length, Last-Modified) over one pooled keep-alive client.

A list file is in no order and may hold millions of lines: list() sorts its (key, URL) pairs in
bounded memory (sorting.py: runs spilled to temporary files), and head()/open() look a key's URL
up in a temporary on-disk index (`_UrlIndex`), so memory does not grow with the list.
"""

from __future__ import annotations

import io
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

import urllib3

from ossimport.errors import TRANSPORT_REASONS, NotFound, StorageError, transport_code
from ossimport.log import register_secret
from ossimport.storage.base import Abilities, Entry, Storage, StorageOptions, StreamReader
from ossimport.storage.sorting import Record, sorted_records

if TYPE_CHECKING:
    from ossimport.address import Location

log = logging.getLogger("ossimport")
_URL_SCHEMES = ("http://", "https://")


class HTTPListStorage(Storage):
    scheme = "http"
    abilities = Abilities(read_only=True, ranged_read=True)

    def __init__(self, location: Location, options: StorageOptions | None = None) -> None:
        super().__init__(location, options)
        # self.list_errors (base class) receives failed HEADs and malformed list lines: those
        # entries are skipped by list(), and the engine reports the listing as incomplete
        self._pool = pool_manager(self.options)
        self._index: _UrlIndex | None = None  # head()/open() look keys up here, built on first use
        self._lock = threading.Lock()
        path = location.path
        if path.startswith(_URL_SCHEMES):
            self._mode = "dir" if path.endswith("/") else "url"
            _register_query_secrets(urlsplit(path).query)
        else:
            self._mode = "list"
        self._query = f"?{location.query}" if location.query and self._mode == "dir" else ""
        _register_query_secrets(location.query)

    # ---- the list ----------------------------------------------------------------------------
    def _pairs(self, record: bool = False) -> Iterator[tuple[str, str]]:
        """(key, url) for every object the location names, in the list's order. Malformed lines
        are skipped; with `record` they are also reported in `list_errors`."""
        path = self.location.path
        if self._mode == "url":
            name = unquote(urlsplit(path).path.rstrip("/").rpartition("/")[2])
            if name:
                yield name, path
            return
        if self._mode == "dir":
            raise StorageError(f"{self.describe()}: an HTTP directory cannot be listed; give a list:// file",
                               code="NotImplemented")
        pcol, kcol = self.options.http_prefix_column, self.options.http_key_column
        if pcol < 1 or kcol < 1 or pcol == kcol:
            raise StorageError(f"{path}: prefix column {pcol} and key column {kcol} must be distinct and >= 1",
                               code="InvalidArgument")
        try:
            f = open(path, encoding="utf-8-sig")  # closed by the with below; -sig: Windows editors add a BOM
        except OSError as e:
            raise StorageError(f"cannot read URL list {path}: {e.strerror or e}", code="ListFileError") from e
        with f:
            yield from self._parse_lines(f, path, pcol, kcol, record)

    def _parse_lines(self, f: Any, path: str, pcol: int, kcol: int, record: bool) -> Iterator[tuple[str, str]]:
        lineno = 0
        try:
            for lineno, raw in enumerate(f, 1):
                line = raw.strip("\r\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                if "\t" in line:
                    cols = [c.strip() for c in line.split("\t")]
                elif kcol > pcol:
                    cols = line.split(None, kcol - 1)  # the key keeps its inner spaces
                else:
                    cols = line.split()
                key = cols[kcol - 1].strip() if len(cols) >= max(pcol, kcol) else ""
                if not key.lstrip("/"):
                    if record:
                        self._list_error(f"{path}:{lineno}: expected a URL prefix in column {pcol} "
                                         f"and a key in column {kcol}")
                    continue
                if not cols[pcol - 1].lower().startswith(_URL_SCHEMES):
                    # urllib3 would guess http:// (with a FutureWarning): a guess is no address
                    if record:
                        self._list_error(f"{path}:{lineno}: the URL prefix {cols[pcol - 1]!r} has no scheme; "
                                         "begin it with http:// or https://")
                    continue
                yield key.lstrip("/"), cols[pcol - 1] + quote(key, safe="/")
        except UnicodeDecodeError as e:
            raise StorageError(f"URL list {path}: not UTF-8 near line {lineno + 1}", code="ListFileError") from e

    def _url(self, key: str) -> str:
        if self._mode == "dir":
            return self.location.path + quote(key, safe="/") + self._query
        with self._lock:
            if self._index is None:
                ordered = sorted_records(self._pairs())
                try:
                    self._index = _UrlIndex(self.location.path, _first_of_each_key(ordered))
                finally:
                    ordered.close()
            url = self._index.get(key)
        if url is None:
            raise NotFound(f"{self.describe()}: {key!r} is not in the URL list")
        return url

    # ---- required ---------------------------------------------------------------------------
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[Entry]:
        # The list file is in no order and may hold millions of lines: its (key, URL) pairs are
        # sorted on disk in bounded memory (sorting.py). Duplicate keys: the first line wins, as
        # in head()/open() (the sort is stable, so it comes first among its equals).
        after = start_after.encode()
        wanted = ((k, url) for k, url in self._pairs(record=True)
                  if k.startswith(prefix) and not (start_after and k.encode() <= after))
        ordered = sorted_records(wanted)
        try:
            yield from self._head_all(_first_of_each_key(ordered))
        finally:
            ordered.close()  # its temporary files, when the consumer stops early

    def _head_all(self, pairs: Iterator[Record]) -> Iterator[Entry]:
        """An Entry for every (key, URL) of `pairs`, in their order."""
        # one HEAD per URL, `threads` at a time (one at a time, 100,000 URLs took 100,000 round
        # trips in a row); entries are yielded in key order, with a bounded window in flight
        threads = max(1, min(self.options.threads, self.options.max_pool))  # a connection each
        with ThreadPoolExecutor(threads, thread_name_prefix="head") as pool:
            window: deque[tuple[str, Future[Entry]]] = deque()
            try:
                for key, url in pairs:
                    window.append((key, pool.submit(self._head_url, key, url)))
                    if len(window) >= threads * 4:
                        yield from self._listed(*window.popleft())
                while window:
                    yield from self._listed(*window.popleft())
            finally:
                for _, f in window:  # a consumer that stopped early (or failed): no more HEADs
                    f.cancel()

    def _listed(self, key: str, head: Future[Entry]) -> Iterator[Entry]:
        try:
            yield head.result()
        except StorageError as e:
            self._list_error(f"{key}: {e} ({e.code})")

    def head(self, key: str) -> Entry:
        return self._head_url(key, self._url(key))

    def _head_url(self, key: str, url: str) -> Entry:
        try:
            r = self._pool.request("HEAD", url, redirect=True)
        except urllib3.exceptions.HTTPError as e:
            raise connection_error(f"HEAD {_safe_url(url)}", e) from e
        if r.status >= 300:
            raise self._status_error(f"HEAD {_safe_url(url)}", r.status)
        length = r.headers.get("Content-Length")
        if length is None:
            size = self._size_by_range(url)
        else:
            size = int(length)
        return Entry(key, size, _http_time(r.headers.get("Last-Modified")), _etag(r.headers.get("ETag")))

    def _size_by_range(self, url: str) -> int:
        """Size of a URL whose HEAD has no Content-Length: the total of a one-byte range."""
        try:
            r = self._pool.request("GET", url, headers={"Range": "bytes=0-0"}, preload_content=False)
        except urllib3.exceptions.HTTPError as e:
            raise connection_error(f"GET {_safe_url(url)}", e) from e
        try:
            total = (r.headers.get("Content-Range") or "").rpartition("/")[2]
            if r.status == 206 and total.isdigit():
                return int(total)
            if r.status == 416:  # an empty object has no byte 0
                return 0
        finally:
            r.close()
            r.release_conn()
        raise StorageError(f"{_safe_url(url)}: the server reports no size", code="UnknownSize")

    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        if start < 0 or (end is not None and end < start):
            raise StorageError(f"{self.describe()}{key}: invalid range [{start}, {end})", code="InvalidArgument")
        url = self._url(key)
        if end == start:
            self._head_url(key, url)  # still NotFound for a missing URL
            return io.BytesIO(b"")
        where = f"GET {_safe_url(url)}"

        def send(headers: dict[str, str]) -> Any:
            try:
                return self._pool.request("GET", url, headers=headers, preload_content=False, decode_content=False)
            except urllib3.exceptions.HTTPError as e:
                raise connection_error(where, e) from e

        def refused(resp: Any) -> StorageError:
            discard(resp)
            return self._status_error(where, resp.status)

        return read_range(send, where, start, end, lambda: self._head_url(key, url).size, refused)

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
        raise StorageError("http sources are read-only", code="ReadOnly")

    def delete(self, key: str) -> None:
        raise StorageError("http sources are read-only", code="ReadOnly")

    def _status_error(self, where: str, status: int) -> StorageError:
        """The error of an answer with an error status (a subclass may know more of its servers)."""
        return _status_error(where, status)

    def describe(self) -> str:
        path = self.location.path
        return _safe_url(path) if path.startswith(_URL_SCHEMES) else f"list://{path}"

    def close(self) -> None:
        self._pool.clear()
        with self._lock:
            if self._index is not None:
                self._index.close()
                self._index = None


class _UrlIndex:
    """The URL of every key of a list file, in a temporary SQLite database: memory stays at its
    page cache whatever the list's length (SQLite unlinks the file as it opens it, so a killed
    process leaves nothing). Filled in key order (sorted, each key once): appends to its B-tree."""

    def __init__(self, path: str, pairs: Iterator[Record]) -> None:
        self._path = path
        self._db = sqlite3.connect("", check_same_thread=False, isolation_level=None)  # "": temporary, on disk
        try:
            self._db.execute("CREATE TABLE url (key TEXT PRIMARY KEY, url TEXT NOT NULL) WITHOUT ROWID")
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO url VALUES (?, ?)", pairs)
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            self._db.close()
            raise self._error(e) from e
        except BaseException:
            self._db.close()
            raise

    def get(self, key: str) -> str | None:
        try:
            row = self._db.execute("SELECT url FROM url WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as e:
            raise self._error(e) from e
        return None if row is None else str(row[0])

    def close(self) -> None:
        self._db.close()

    def _error(self, e: sqlite3.Error) -> StorageError:
        return StorageError(f"indexing URL list {self._path} in a temporary file: {e}; free space in the "
                            "temp directory or point TMPDIR at a larger disk", code="TempFileError")


class _Reader(StreamReader):
    """A streaming body; `skip` bytes are dropped first and at most `limit` returned (for servers
    that ignore Range). Transport errors become retryable StorageErrors."""

    def __init__(self, resp: Any, where: str, skip: int, limit: int | None) -> None:
        super().__init__()
        self._r, self._where, self._skip, self._left = resp, where, skip, limit
        self.headers = resp.headers  # the answer's: what a caller checks the body against
        self._done = False
        self._eof = False  # the server's body was read to its end: the connection is clean

    def _raw(self, n: int) -> bytes:
        try:
            data = bytes(self._r.read(n))
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise connection_error(self._where, e) from e
        if not data:
            self._eof = True
        return data

    def _read_some(self, n: int) -> bytes:
        if self._done:
            return b""
        while self._skip:
            dropped = self._raw(min(self._skip, self.chunk))
            if not dropped:
                break
            self._skip -= len(dropped)
        if self._left is not None:
            n = min(n, self._left)
        data = self._raw(n) if n else b""
        if self._left is not None:
            self._left -= len(data)
        if not data:
            self._done = True
        return data

    def close(self) -> None:
        if not self.closed:
            try:
                if self._eof:
                    self._r.release_conn()  # read to the end: the connection can be reused
                else:
                    discard(self._r)
            finally:
                super().close()


def pool_manager(options: StorageOptions) -> urllib3.PoolManager:
    """The pooled keep-alive client of an HTTP-based source: one connection per worker thread,
    never retrying by itself (the engine decides about retries, from StorageError.retryable)."""
    return urllib3.PoolManager(
        num_pools=16,
        maxsize=max(1, options.max_pool),
        block=False,
        retries=False,
        timeout=urllib3.Timeout(connect=options.connect_timeout, read=options.read_timeout),
    )


def read_range(send: Callable[[dict[str, str]], Any], where: str, start: int, end: int | None,
               size: Callable[[], int], refused: Callable[[Any], StorageError]) -> BinaryIO:
    """A streaming reader of bytes [start, end) of one URL. `send(headers)` makes the GET (a
    urllib3 response, not preloaded); `size()` is the object's size, asked only when the server
    finds the range unsatisfiable (reading from the end yields nothing); `refused(resp)` is the
    error for an answer >= 300 (it gives the connection back)."""
    ranged = start > 0 or end is not None
    headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if ranged else {}
    r = send(headers)
    skip, limit = 0, None
    if r.status == 416 and ranged:
        discard(r)
        if start >= size():
            return io.BytesIO(b"")  # reading from the end yields nothing
        raise StorageError(f"{where}: range {headers['Range']} not satisfiable", code="InvalidRange")
    if r.status >= 300:
        raise refused(r)
    if ranged and r.status == 206:
        got = (r.headers.get("Content-Range") or "")[6:].partition("-")[0]
        if not got.isdigit() or int(got) != start:
            discard(r)
            raise StorageError(f"{where}: asked for bytes from {start}, got Content-Range "
                               f"{r.headers.get('Content-Range')!r}", code="InvalidRange", retryable=True)
    elif ranged:
        # 200 to a range request: the server ignores Range and sends everything; cut it here
        skip, limit = start, None if end is None else end - start
    elif r.status != 200:
        discard(r)
        raise StorageError(f"{where}: unexpected HTTP {r.status}", code=f"HTTP{r.status}")
    return cast(BinaryIO, _Reader(r, where, skip, limit))


def discard(resp: Any) -> None:
    """Give a response's connection back without reading the rest of its body: close it first, so
    no half-read connection is ever reused."""
    resp.close()
    resp.release_conn()


def _status_error(where: str, status: int) -> StorageError:
    if status in (404, 410):
        return NotFound(f"{where}: HTTP {status}", code="NoSuchKey")
    if status in (401, 403):
        return StorageError(f"{where}: HTTP {status}", code="AccessDenied")
    retryable = status >= 500 or status in (408, 429)
    return StorageError(f"{where}: HTTP {status}", code=f"HTTP{status}", retryable=retryable)


def connection_error(where: str, exc: BaseException) -> StorageError:
    reason = getattr(exc, "reason", None) or exc  # MaxRetryError wraps the real cause
    text = f"{type(reason).__name__}: {reason}"[:300]
    code = transport_code(exc)
    return StorageError(f"{where}: connection failed ({TRANSPORT_REASONS[code]}): {text}", code=code, retryable=True)


def _register_query_secrets(query: str) -> None:
    """A signed URL's query values are credentials: keep them out of every log line, raw and
    percent-encoded (short values such as an expiry are left alone)."""
    for _, value in parse_qsl(query):
        if len(value) >= 8:
            register_secret(value, quote(value, safe=""), quote(value))


def _safe_url(url: str) -> str:
    """The URL for messages: no password, no query string (signed URLs carry their signature there)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':')[0]}:***@{host}" if ":" in user else f"{user}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def _http_time(value: str | None) -> float:
    if not value:
        return 0.0  # unknown: older than anything, so an mtime compare always copies
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return 0.0


def _etag(value: str | None) -> str | None:
    if not value:
        return None
    return value.removeprefix("W/").strip('"') or None


def _first_of_each_key(pairs: Iterator[Record]) -> Iterator[Record]:
    """Sorted (key, URL) pairs with each key once: the first of its run of equals."""
    last: str | None = None
    for pair in pairs:
        if pair[0] != last:
            last = pair[0]
            yield pair
