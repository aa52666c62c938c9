"""Object bodies from a bucket's download domain, while the S3 API lists (Qiniu's isDownloadFromCdn).

A Qiniu bucket is served at a download domain (a CDN or the bucket's own web domain); reading
from there is faster and often cheaper than the S3 API. `S3Storage` keeps listing and HEAD on the
S3 API and hands body reads to a `DownloadDomain`: `GET <domain>/<quoted prefix+key>` with Range
for ranged reads. With credentials every URL is signed as Qiniu documents for private buckets
(developer.qiniu.com/kodo/manual/1202): `?e=<deadline>` is appended, then
`&token=AK:urlsafe_base64(HMAC-SHA1(SK, url_with_e))`; a public bucket ignores the token. The
signed URL is never shown: messages name URLs without their query string (http.py `_safe_url`).

A domain may serve a stale or truncated copy (a CDN cache): every answer is checked against the
bucket's own HEAD of the object: its size; its mtime (a Last-Modified older than the bucket's is
a cached copy of an older version, which ranged reads could not otherwise tell); its MD5 where the
bucket proves one, handed to the engine as the reader's checksums, so a whole body of the right
size but other bytes fails too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote

from ossimport.address import Location
from ossimport.errors import StorageError
from ossimport.storage.base import Entry, StorageOptions
from ossimport.storage.http import HTTPListStorage, _http_time

if TYPE_CHECKING:
    from collections.abc import Mapping

# how long a signed URL stays valid: it is made just before its request, so only clock skew
# between this machine and the domain has to fit in it
URL_LIFETIME = 3600


class DownloadDomain(HTTPListStorage):
    """Reads `location`'s objects through `location.download` (the HTTP source's requests,
    Range handling and error mapping, with Qiniu's URL signing on top)."""

    def __init__(self, location: Location, options: StorageOptions | None = None) -> None:
        base = f"{location.download}/{quote(location.prefix, safe='/')}"
        super().__init__(Location(backend="http", flavour="http", path=base, is_dir=True), options)
        anonymous = options is not None and options.anonymous
        self._ak, self._sk = ("", "") if anonymous else (location.access_key, location.secret_key)

    def _url(self, key: str) -> str:
        url = super()._url(key)
        if not (self._ak and self._sk):
            return url
        url += f"?e={int(time.time()) + URL_LIFETIME}"
        sign = hmac.new(self._sk.encode(), url.encode(), hashlib.sha1).digest()
        return f"{url}&token={self._ak}:{base64.urlsafe_b64encode(sign).decode()}"

    def _status_error(self, where: str, status: int) -> StorageError:
        if status == 401:
            # Qiniu answers 401 to a missing or wrong token: the keys are wrong for every object
            # (a fatal code: the run stops after one clear line instead of failing each file)
            code = "SignatureDoesNotMatch" if self._sk else "AccessDenied"
            hint = ("check the access and secret keys (and this machine's clock: signed URLs expire)"
                    if self._sk else "the bucket is private: put AK:SK in the address to sign the URLs")
            return StorageError(f"{where}: HTTP 401 from the download domain; {hint}", code=code)
        return super()._status_error(where, status)

    def read(self, key: str, start: int, end: int | None, listed: Entry) -> BinaryIO:
        """Bytes [start, end) of `key` from the domain; `listed` is the bucket's own HEAD of it."""
        reader = self.open(key, start, end)
        headers: Mapping[str, str] = getattr(reader, "headers", {})
        total = _total(headers, ranged=start > 0 or end is not None)
        if total is not None and total != listed.size:
            reader.close()
            raise StorageError(
                f"{self.describe()}{quote(key)}: the download domain serves {total} bytes, the bucket holds "
                f"{listed.size}: a stale or truncated copy at the domain (refresh it there)",
                code="SIZE_NOT_MATCH", retryable=True)
        served = _http_time(headers.get("Last-Modified"))
        if served and int(served) < int(listed.mtime):
            # a cached copy of an older version: ranged reads are never hashed as one stream, so
            # this is what catches one there (whole reads are also checked by MD5 where known)
            reader.close()
            raise StorageError(
                f"{self.describe()}{quote(key)}: the download domain serves a copy last modified "
                f"{_iso(served)}, the bucket's object is of {_iso(listed.mtime)}: a stale copy at the domain "
                "(refresh it there)", code="STALE_COPY", retryable=True)
        if start == 0 and end is None:
            reader.checksums = dict(listed.checksums)  # type: ignore[attr-defined]
        return reader


def _total(headers: Mapping[str, str], ranged: bool) -> int | None:
    """The whole object's size as an answer states it (None: it does not say)."""
    content_range = headers.get("Content-Range") or ""
    if ranged and content_range:
        total = content_range.rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = headers.get("Content-Length") or ""
    return int(length) if length.isdigit() and not content_range else None


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
