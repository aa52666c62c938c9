"""UpYun (又拍云) cloud storage, a read-only source, over its REST API.

What is sent and read (docs.upyun.com/api/rest_api/ and /api/authorization/):
- every request carries `Date` (RFC 1123, GMT) and `Authorization: UPYUN <operator>:<signature>`,
  the signature Base64(HMAC-SHA1(key = MD5 hex of the password, "METHOD&URI&DATE")) where URI is
  the percent-encoded request path `/<service>/<path>` (no body: no Content-MD5 part). The
  service (the "bucket") refuses a Date more than 30 minutes off its clock;
- a directory is listed page by page: GET /<service>/<dir>/ with `Accept: application/json`,
  `x-list-limit` and `x-list-iter` (the previous page's `iter`; END_ITER marks the last page),
  answered with {"files": [{"name", "type" ("folder" for a directory), "length",
  "last_modified" (unix seconds)}], "iter"};
- HEAD /<service>/<path>: x-upyun-file-type ("file" or "folder"), x-upyun-file-size,
  x-upyun-file-date (unix seconds);
- GET of a file, with Range for a part (206);
- errors: the HTTP status and a JSON body {"msg", "code", "id"}.

UpYun lists a directory in its own order, so each directory is read whole and sorted (a
directory `d` sorts as `d/`) before it is walked: the listing comes out in byte order. The sort
holds at most `sorting.RUN_SIZE` names per level of depth in memory; a larger directory is sorted
in runs spilled to temporary files and merged (sorting.py).

Checksums: the API documents none of a stored file's content, so none is reported; the engine
hashes what it reads.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import io
import json
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn
from urllib.parse import quote

import urllib3

from ossimport.address import is_ip_or_localhost
from ossimport.errors import NotFound, StorageError
from ossimport.log import register_secret
from ossimport.retry import with_retries
from ossimport.storage.base import Abilities, Entry, Storage, StorageOptions
from ossimport.storage.http import connection_error, discard, pool_manager, read_range
from ossimport.storage.sorting import sorted_entries

if TYPE_CHECKING:
    from ossimport.address import Location

DEFAULT_ENDPOINT = "v0.api.upyun.com"
END_ITER = "g2gCZAAEbmV4dGQAA2VvZg"  # the `iter` of the last page
PAGE = 1000  # entries asked for per listing page
MAX_PAGES = 10_000_000  # bounds a listing loop whose server never says "last page"
FOLDER = "folder"


class UpYunStorage(Storage):
    scheme = "upyun"
    abilities = Abilities(read_only=True, ranged_read=True)

    def __init__(self, location: Location, options: StorageOptions | None = None) -> None:
        super().__init__(location, options)
        prefix = location.prefix
        self.root = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.service = location.bucket
        self.operator = location.access_key
        if not self.operator or not location.secret_key:
            raise StorageError(f"{self.describe()}: UpYun needs the operator and its password: write "
                               "upyun://OPERATOR:PASSWORD@SERVICE[.ENDPOINT]/PREFIX/", code="MissingCredentials")
        register_secret(location.secret_key)
        self._key = hashlib.md5(location.secret_key.encode()).hexdigest()  # the signing key
        endpoint = location.endpoint or DEFAULT_ENDPOINT
        secure = location.https if location.https is not None else not is_ip_or_localhost(endpoint)
        self._base = f"{'https' if secure else 'http'}://{endpoint}"
        self._pool = pool_manager(self.options)

    # ---- requests ----------------------------------------------------------------------------
    def _request(self, method: str, key: str, headers: dict[str, str] | None = None,
                 stream: bool = False, under: str | None = None) -> Any:
        """One signed request for `key` (a directory's ends with '/') under the root, or under
        `under` of the service when given."""
        path = quote(f"/{self.service}/{self.root if under is None else under}{key}", safe="/~")
        date = email.utils.formatdate(usegmt=True)
        sent = {"Date": date, "Authorization": f"UPYUN {self.operator}:{signature(self._key, method, path, date)}",
                **(headers or {})}
        try:
            return self._pool.request(method, self._base + path, headers=sent, redirect=False,
                                      preload_content=not stream, decode_content=False)
        except urllib3.exceptions.HTTPError as e:
            raise connection_error(self._where(method, key), e) from e

    def _where(self, method: str, key: str) -> str:
        return f"{method} {self.describe()}{key}"

    def _refused(self, method: str, key: str, resp: Any, streamed: bool = False) -> StorageError:
        """The error for an answer >= 300 (UpYun's JSON body names it); gives a streamed
        answer's connection back."""
        if streamed:
            try:
                body = resp.read(4096)
            except (urllib3.exceptions.HTTPError, OSError):
                body = b""
            discard(resp)
        else:
            body = resp.data or b""
        try:
            fields = json.loads(body.decode("utf-8", "replace")) if body else {}
        except ValueError:
            fields = {}
        if not isinstance(fields, dict):
            fields = {}
        status = resp.status
        said = " ".join(str(fields[k]) for k in ("code", "msg") if fields.get(k))[:200]
        where = f"{self._where(method, key)}: HTTP {status}{' ' + said if said else ''}"
        if status == 404:
            return NotFound(where, code="NoSuchKey")
        if status == 401:
            return StorageError(f"{where}: check the operator name and password, that the operator is "
                                f"authorized on the service {self.service!r}, and this machine's clock "
                                "(UpYun refuses a Date more than 30 minutes off)", code="AuthenticationFailed")
        if status == 403:
            return StorageError(f"{where}: the operator may not read the service {self.service!r}; grant it "
                                "read permission in the UpYun console", code="AuthorizationFailure")
        retryable = status >= 500 or status in (408, 429)
        return StorageError(where, code=f"HTTP{status}", retryable=retryable)

    # ---- listing -----------------------------------------------------------------------------
    def _pages(self, directory: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """The raw entries of one directory (key "" or ending in '/'), page by page; at most
        `limit` of them. A missing directory raises NotFound."""
        headers = {"Accept": "application/json", "x-list-limit": str(min(limit or PAGE, PAGE))}
        seen: set[str] = set()
        given = 0
        for _ in range(MAX_PAGES):
            # a page is asked for again after a transient failure (5xx, a broken connection), not
            # the whole listing: a listing of millions of files is thousands of pages
            files, after = with_retries(lambda: self._page(directory, headers), what=f"listing {directory or '/'}")
            for item in files:
                yield item
                given += 1
                if limit is not None and given >= limit:
                    return
            if after == END_ITER or not files:
                return
            if after in seen:
                raise StorageError(f"{self._where('GET', directory)}: the listing repeats a page (iter {after!r})",
                                   code="InvalidResponse")
            seen.add(after)
            headers["x-list-iter"] = after
        raise StorageError(f"{self._where('GET', directory)}: more than {MAX_PAGES} pages", code="InvalidResponse")

    def _page(self, directory: str, headers: dict[str, str]) -> tuple[list[dict[str, Any]], str]:
        """One listing page: its entries and the next page's `iter` (END_ITER after the last)."""
        r = self._request("GET", directory, headers)
        if r.status != 200:
            raise self._refused("GET", directory, r)
        try:
            answer = json.loads(r.data)
            files, after = answer.get("files") or [], str(answer.get("iter") or END_ITER)
            if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
                raise ValueError("files")
        except (ValueError, AttributeError):
            raise StorageError(f"{self._where('GET', directory)}: the listing is not UpYun's JSON",
                               code="InvalidResponse", retryable=True) from None
        return files, after

    def _entry(self, directory: str, item: dict[str, Any]) -> Entry | None:
        """A listed item as an Entry: a subdirectory's key ends with '/' (size 0). None for a
        name no key can be made of (reported in `list_errors`)."""
        name = str(item.get("name", ""))
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            name = ""
        if not name or "/" in name or name in (".", ".."):
            self._list_error(f"{self.describe()}{directory}: an entry named {name!r} was left out")
            return None
        mtime = float(_int(item.get("last_modified")))
        if item.get("type") == FOLDER:
            return Entry(f"{directory}{name}/", 0, mtime)
        return Entry(directory + name, _int(item.get("length")), mtime)

    def _directory(self, directory: str) -> Generator[Entry, None, None]:
        """One directory's entries (subdirectories' keys end with '/') as their keys sort in byte
        order: read whole, then sorted in bounded memory (on disk beyond a run: sorting.py).
        A missing directory has none; a missing root is checked (`_missing_root`)."""
        items = (self._entry(directory, item) for item in self._pages(directory))
        try:
            # every page is read before the first entry comes out: a NotFound is the listing's
            yield from sorted_entries(e for e in items if e)
        except NotFound:
            if not directory:
                self._missing_root()
            return  # removed while we listed, or never there

    def _missing_root(self) -> None:
        """The root is not there: an empty prefix of a service that exists, or no service at all."""
        if not self.root:
            _no_service(self)
        r = self._request("GET", "", {"Accept": "application/json", "x-list-limit": "1"}, under="")
        if r.status == 404:
            _no_service(self)
        if r.status != 200:
            raise self._refused("GET", "", r)

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[Entry]:
        after = start_after.encode("utf-8", "surrogateescape")
        start = prefix.rpartition("/")[0]
        start = start + "/" if start else ""
        stack = [self._directory(start)]
        try:
            while stack:
                entry = next(stack[-1], None)
                if entry is None:
                    stack.pop()
                    continue
                key = entry.key
                raw = key.encode()
                if key.endswith("/"):  # a directory: walk it if it can hold keys we want
                    if not (key.startswith(prefix) or prefix.startswith(key)):
                        continue
                    if start_after and raw < after and not start_after.startswith(key):
                        continue  # every key under it sorts before start_after
                    stack.append(self._directory(key))
                elif key.startswith(prefix) and raw > after:
                    yield entry
        finally:
            for directory in stack:  # a consumer that stopped early: their temporary files
                directory.close()

    def list_dirs(self, prefix: str = "") -> list[str]:
        return [e.key for e in self._directory(prefix) if e.key.endswith("/")]

    def list_level(self, prefix: str = "", limit: int | None = None) -> Iterator[Entry]:
        try:
            for item in self._pages(prefix, limit):
                if entry := self._entry(prefix, item):
                    yield entry
        except NotFound:
            return

    # ---- objects -----------------------------------------------------------------------------
    def head(self, key: str) -> Entry:
        r = self._request("HEAD", key)
        if r.status != 200:
            raise self._refused("HEAD", key, r)
        if r.headers.get("x-upyun-file-type") == FOLDER:
            raise NotFound(f"{self._where('HEAD', key)}: a directory, not a file", code="NoSuchKey")
        size = r.headers.get("x-upyun-file-size")
        if size is None or not size.isdigit():
            raise StorageError(f"{self._where('HEAD', key)}: the answer has no x-upyun-file-size",
                               code="InvalidResponse", retryable=True)
        return Entry(key, int(size), float(_int(r.headers.get("x-upyun-file-date"))))

    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        if start < 0 or (end is not None and end < start):
            raise StorageError(f"{self.describe()}{key}: invalid range [{start}, {end})", code="InvalidArgument")
        if end == start:
            self.head(key)  # still NotFound for a missing file
            return io.BytesIO(b"")
        return read_range(lambda headers: self._request("GET", key, headers, stream=True), self._where("GET", key),
                          start, end, lambda: self.head(key).size, lambda r: self._refused("GET", key, r, streamed=True))

    def put(self, key: str, data: BinaryIO, size: int, *, mtime: float | None = None, mode: int | None = None,
            content_md5: str | None = None) -> Entry:
        _read_only()

    def delete(self, key: str) -> None:
        _read_only()

    def close(self) -> None:
        self._pool.clear()


def signature(password_md5: str, method: str, uri: str, date: str, content_md5: str = "") -> str:
    """UpYun's request signature: Base64(HMAC-SHA1(key = the password's MD5 in lower-case hex,
    METHOD&URI&DATE[&Content-MD5])), the Content-MD5 part left out (with its '&') when empty."""
    text = f"{method}&{uri}&{date}" + (f"&{content_md5}" if content_md5 else "")
    return base64.b64encode(hmac.new(password_md5.encode(), text.encode(), hashlib.sha1).digest()).decode()


def _read_only() -> NoReturn:
    raise StorageError("UpYun is a read-only source here: copy from it, not to it or within it", code="ReadOnly")


def _no_service(st: UpYunStorage) -> NoReturn:
    raise StorageError(f"{st.describe()}: the UpYun service {st.service!r} does not exist (or the operator "
                       "cannot see it): check the service name", code="NoSuchBucket")


def _int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0
