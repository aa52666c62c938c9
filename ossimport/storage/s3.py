"""S3 and the S3-compatible clouds (COS, OBS, BOS, KS3, Kodo, US3, AOSS, MinIO).

The clouds differ only in endpoint and signing-region rules, kept in the `FLAVOURS` table; one
class serves them all. The root is `bucket` + `prefix`; every key in and out is relative to it.

Two clients sit behind the one contract:
  lean    the data path: PUT, GET, HEAD, LIST, DELETE, CopyObject and multipart uploads
          (create, UploadPart, complete, abort, list), sent by `s3wire.WireClient` (SigV4 signed
          by hand over keep-alive HTTP/1.1 connections; its docstring says why it exists).
  boto3   everything else (UploadPartCopy and the metadata of copies above 5 GiB), every
          request where the lean path does not apply: no endpoint in the address (AWS's default
          endpoint), credentials that only boto3 can find (profiles, instance roles), a proxy
          from the environment, OSSIMPORT_S3_CLIENT=boto3; and a storage whose lean request was
          answered with a wrong-region redirect (botocore follows those). It is created on first
          use (import and set-up cost ~0.25 s of CPU).
Both go through the same error mapping (`_map_error`), so codes and messages do not depend on
which client sent a request. A Location with a `download` domain (qiniu://...?download=) has its
object bodies read from there (storage/download.py); everything else still goes to the S3 API.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import io
import math
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import quote, unquote_plus

from ossimport.errors import (
    TRANSPORT_REASONS,
    NotFound,
    StorageError,
    VerifyFailed,
    transport_code,
)
from ossimport.storage.base import MD5, Abilities, Entry, Part, Storage, StorageOptions, StreamReader, Upload
from ossimport.storage.feed import Feed
from ossimport.storage.s3wire import (
    RETRYABLE,
    S3_NS,
    ServerError,
    WireClient,
    answer_fields,
    date_seconds,
    is_tls_error,
    iso_seconds,
    local_name,
    md5_b64,
    whole_seconds,
    xml_escape,
    xml_root,
)

if TYPE_CHECKING:
    from ossimport.address import Location
    from ossimport.storage.download import DownloadDomain

GiB = 1024**3
MiB = 1024**2
# A single PUT of fewer bytes is read into memory and sent with the Content-MD5 of that buffer
# (the hot path of small files: one write to the socket); a larger one
# streams 1 MiB at a time, so a copy thread holds at most this much whatever the multipart
# threshold (README: memory).
PUT_BUFFER = 8 * MiB
STREAM_CHUNK = 1 * MiB
# rclone's metadata key for the content MD5 (base64), written where the ETag cannot be one
META_MD5 = "md5chksum"
_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")


# ---- provider rules ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Flavour:
    """How one provider's endpoints look. `region` is matched against the endpoint host; its
    first group is the SigV4 signing region. `host_prefix` is put in front of a bare
    "<region>.<domain>" endpoint, the short form the ads-cli docs use for COS."""

    domain: str = ""
    region: str = ""
    host_prefix: str = ""


FLAVOURS: dict[str, Flavour] = {
    "s3": Flavour("amazonaws.com", r"^s3[.-]([a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com(?:\.cn)?$"),
    "cos": Flavour("myqcloud.com", r"^cos\.([a-z0-9-]+)\.myqcloud\.com$", host_prefix="cos."),
    "obs": Flavour("myhuaweicloud.com", r"^obs\.([a-z0-9-]+)\.myhuaweicloud\.com$"),
    "bos": Flavour("bcebos.com", r"^(?:s3\.)?([a-z0-9]+)\.bcebos\.com$"),
    "ks3": Flavour("ksyuncs.com", r"^ks3-([a-z0-9-]+?)(?:-internal)?\.ksyuncs\.com$"),
    "qiniu": Flavour("qiniucs.com", r"^s3[.-]([a-z0-9-]+)\.qiniucs\.com$"),
    "ufile": Flavour("ufileos.com", r"^s3-([a-z0-9-]+)\.ufileos\.com$"),
    "aoss": Flavour("sensecoreapi-oss.cn", r"^aoss(?:-internal)?\.([a-z0-9-]+)\.sensecoreapi-oss\.cn$"),
    "minio": Flavour(),
}


def resolve_endpoint(location: Location) -> tuple[str, str | None]:
    """(endpoint host[:port] after provider fixes, signing region derived from it or None).

    The rules are matched by the endpoint's domain, not only by the address NAME, because users
    write s3:// for every S3-compatible cloud (the ads-cli docs do so for AOSS)."""
    endpoint = location.endpoint
    host = endpoint.rsplit(":", 1)[0] if endpoint.count(":") == 1 else endpoint
    flavour = next(
        (f for f in FLAVOURS.values() if f.domain and (host == f.domain or host.endswith("." + f.domain))),
        FLAVOURS.get(location.flavour, Flavour()),
    )
    if flavour.host_prefix and host.endswith("." + flavour.domain) and not host.startswith(flavour.host_prefix):
        if host.count(".") == flavour.domain.count(".") + 1:  # exactly "<region>.<domain>"
            endpoint, host = flavour.host_prefix + endpoint, flavour.host_prefix + host
    m = re.match(flavour.region, host) if flavour.region else None
    return endpoint, (m.group(1) if m else None)


# ---- errors -----------------------------------------------------------------------------------
_HINTS = {
    "AccessDenied": "check the access and secret keys, the bucket's permissions and the endpoint",
    "SignatureDoesNotMatch": "check the secret key (escape '/' '@' ':' in it as %2F %40 %3A)",
    "InvalidAccessKeyId": "check the access key and that it belongs to this endpoint",
    "RequestTimeTooSkewed": "this machine's clock is off: synchronise it (e.g. with NTP)",
    "PermanentRedirect": "the bucket is in another region: use that region's endpoint",
    "AuthorizationHeaderMalformed": "the bucket is in another region: use that region's endpoint",
}
# Status-only answers (HEAD has no body) carry the HTTP status as the code.
_STATUS_CODES = {"403": "AccessDenied", "301": "PermanentRedirect", "400": "BadRequest", "416": "InvalidRange"}


class _Body(StreamReader):
    """The GET response body (either client's), with transport errors turned into StorageError
    like every call."""

    def __init__(self, body: Any, storage: S3Storage, key: str) -> None:
        self._body, self._storage, self._key = body, storage, key
        self.checksums: dict[str, str] = {}

    def _read_some(self, n: int) -> bytes:
        with self._storage._errors("read", self._key):
            return self._body.read(n)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):  # closing a broken connection is not an error
                self._body.close()
        super().close()


_HEADER_SAFE = re.compile(r"^[\x21-\x7e]*$")
_DNS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


def _lean_for(location: Location, options: StorageOptions, endpoint_url: str | None, region: str,
              path_style: bool) -> WireClient | None:
    """The lean client for this address, or None where boto3 must do the work."""
    if os.environ.get("OSSIMPORT_S3_CLIENT", "").lower() == "boto3" or not endpoint_url:
        return None
    if options.anonymous:
        ak = sk = token = ""
    elif location.access_key:
        ak, sk, token = location.access_key, location.secret_key, location.token
    elif os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # what botocore's first credential provider (the environment) would find
        ak, sk = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        token = os.environ.get("AWS_SESSION_TOKEN") or os.environ.get("AWS_SECURITY_TOKEN") or ""
    else:
        return None  # profiles, SSO, instance roles: boto3's credential chain
    if not all(_HEADER_SAFE.match(v) for v in (ak, token)):
        return None  # not a value a header can carry as it is
    scheme, _, netloc = endpoint_url.partition("://")
    if any(name.lower().endswith("_proxy") for name in os.environ):
        import urllib.request  # ~10 ms to import: only when a proxy may be set

        host = netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc
        if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
            return None  # botocore honours HTTP(S)_PROXY; these sockets do not
    if not path_style and not _DNS_BUCKET.match(location.bucket):
        path_style = True  # as botocore does for a bucket that cannot be a host name
    return WireClient(
        secure=scheme == "https", netloc=netloc, bucket=location.bucket, path_style=path_style,
        region=region, access_key=ak, secret_key=sk, token=token,
        connect_timeout=options.connect_timeout, read_timeout=options.read_timeout,
        max_idle=max(options.max_pool, 10),
    )


F = TypeVar("F", bound=Callable[..., Any])
# answers to a request signed for the wrong region, which botocore follows (S3RegionRedirector)
_REDIRECTS = {"PermanentRedirect", "AuthorizationHeaderMalformed", "TemporaryRedirect", "301", "307", "400"}


def _boto3_on_redirect(method: F) -> F:
    """Run `method`; if its lean request was answered with a wrong-region redirect, hand this
    storage to boto3 (which follows those) and run it again there."""

    @functools.wraps(method)
    def run(self: S3Storage, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StorageError as exc:
            if not (isinstance(exc.__cause__, ServerError) and self._handed_to_boto3(exc.__cause__)):
                raise
        return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


class S3Storage(Storage):
    scheme = "s3"
    abilities = Abilities(
        multipart=True,
        server_side_copy=True,
        ranged_read=True,
        # MD5 from head/put/whole GETs where the answer proves it (see `_checksums`), never
        # from a listing: a listing does not say whether an object is encrypted with KMS
        hashes=frozenset({MD5}),
        md5_up_front_from=PUT_BUFFER,
        min_part_size=5 * MiB,
        max_part_size=5 * GiB,
        max_parts=10000,
    )
    # CopyObject takes sources up to 5 GiB; larger ones are copied part by part (UploadPartCopy).
    copy_limit: int = 5 * GiB
    copy_part_size: int = 512 * MiB

    def __init__(self, location: Location, options: StorageOptions | None = None) -> None:
        super().__init__(location, options)
        self.bucket = location.bucket
        self.root = location.prefix  # "" or ending in "/" (a single-object parent is split off first)
        endpoint, derived_region = resolve_endpoint(location)
        self.endpoint_url = replace(location, endpoint=endpoint).endpoint_url(self.options.https)
        self.region = (derived_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                       or "us-east-1")
        self.addressing_style = "path" if location.path_style else ("virtual" if endpoint else "auto")
        self._boto: Any = None
        self._boto_lock = threading.Lock()
        self._lean = _lean_for(location, self.options, self.endpoint_url, self.region, location.path_style)
        if self._lean is None:
            self._client  # noqa: B018 - created now: a bad configuration fails at once
        self._download: DownloadDomain | None = None
        if location.download:  # bodies from the bucket's download domain (storage/download.py)
            from ossimport.storage.download import DownloadDomain

            self._download = DownloadDomain(location, self.options)
        self._closed = False

    def _handed_to_boto3(self, exc: ServerError) -> bool:
        """True when `exc` is a wrong-region answer to a lean request: from now on boto3 serves
        this storage. (A bodiless 400 is what S3 answers a HEAD signed for the wrong region.)"""
        if self._lean is None or exc.code not in _REDIRECTS or (exc.code == "400" and exc.message != "Bad Request"):
            return False
        self._lean = None
        return True

    @property
    def _client(self) -> Any:
        """The boto3 client, created on first use and shared by every thread (it is thread-safe)."""
        client = self._boto
        if client is None:
            with self._boto_lock:
                if self._boto is None:
                    self._boto = self._make_client()
                client = self._boto
        return client

    def _make_client(self) -> Any:
        import boto3
        import botocore.handlers
        from botocore import UNSIGNED
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            signature_version=UNSIGNED if self.options.anonymous else "s3v4",
            s3={"addressing_style": self.addressing_style},
            max_pool_connections=max(self.options.max_pool, 10),
            connect_timeout=self.options.connect_timeout,
            read_timeout=self.options.read_timeout,
            retries={"mode": "standard", "max_attempts": 3},
            # Newer botocore adds CRC32 trailers/headers by default; Ceph and other older
            # S3-compatible servers reject them. ContentMD5 protects our uploads instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        location = self.location
        creds: dict[str, str] = {}
        if location.access_key and not self.options.anonymous:
            creds = {"aws_access_key_id": location.access_key, "aws_secret_access_key": location.secret_key}
            if location.token:
                creds["aws_session_token"] = location.token
        with self._errors("connect"):
            # A Session per Storage: the default session is not safe to create clients from
            # concurrently; without explicit keys it reads env / AWS_PROFILE / instance roles.
            client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config, **creds)
        # botocore sends `Expect: 100-continue` with every PUT body and waits for the answer: a
        # round trip per small object. Our single PUTs are small (large files go multipart), and a
        # refused request costs at most that small body.
        events = client.meta.events
        events.unregister("before-call.s3", botocore.handlers.add_expect_header)
        events.register("before-call.s3", _expect_continue_except_put_object)
        return client

    # ---- required ----------------------------------------------------------------------------
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[Entry]:
        full_prefix = self.root + prefix
        after = self.root + start_after if start_after and self.root + start_after > full_prefix else ""
        cut = len(self.root)
        pages = self._lean_pages(full_prefix, after) if self._lean else self._boto_pages(full_prefix, after)
        with self._errors("list", prefix):
            for page in pages:
                for key, size, mtime, etag in page:
                    if (key.endswith("/") and size == 0) or len(key) <= cut:
                        continue  # directory markers made by consoles and other tools
                    yield Entry(key[cut:], size, mtime, etag)

    def list_dirs(self, prefix: str = "") -> list[str]:
        # only when a job plans its scan ranges: boto3's paginator is plenty for a few requests
        full = self.root + prefix
        cut = len(self.root)
        with self._errors("list", prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/")
            dirs = [p["Prefix"][cut:] for page in pages for p in page.get("CommonPrefixes", ())]
        return sorted(dirs, key=lambda k: k.encode())

    def list_level(self, prefix: str = "", limit: int | None = None) -> Iterator[Entry]:
        # one delimiter listing, page by page (a mount's `ls` shows the first page at once)
        full = self.root + prefix
        cut = len(self.root)
        size = None if limit is None else limit + 1  # one key more, for the directory's own marker
        pages = (self._lean_pages(full, "", delimiter="/", page_size=size) if self._lean
                 else self._boto_pages(full, "", delimiter="/", page_size=size))
        n = 0
        with self._errors("list", prefix):
            for page in pages:
                for key, length, mtime, etag in page:
                    if key.endswith("/") and length == 0:
                        continue  # directory markers are not files
                    if limit is not None and n >= limit:
                        return
                    n += 1
                    # a common prefix (length -1) is a directory: an entry whose key ends in '/'
                    yield Entry(key[cut:], max(length, 0), mtime, etag)
                if limit is not None:
                    return  # a bounded question is answered by its first page

    # Pages of (key, size, mtime, etag). With a delimiter, common prefixes come too, as
    # (prefix, -1, 0.0, None); `page_size` asks for smaller pages than the server's 1000.
    def _boto_pages(self, prefix: str, after: str, *, delimiter: str = "",
                    page_size: int | None = None) -> Iterator[list[tuple[str, int, float, str | None]]]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if after:
            args["StartAfter"] = after
        if delimiter:
            args["Delimiter"] = delimiter
        if page_size:
            args["PaginationConfig"] = {"PageSize": page_size}
        for page in self._client.get_paginator("list_objects_v2").paginate(**args):
            yield [(p["Prefix"], -1, 0.0, None) for p in page.get("CommonPrefixes", ())] + [
                (o["Key"], o["Size"], whole_seconds(o["LastModified"]), _etag(o.get("ETag")))
                for o in page.get("Contents", ())]

    def _lean_pages(self, prefix: str, after: str, *, delimiter: str = "",
                    page_size: int | None = None) -> Iterator[list[tuple[str, int, float, str | None]]]:
        lean = self._lean
        assert lean is not None
        query: dict[str, str | None] = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
        if after:
            query["start-after"] = after
        if delimiter:
            query["delimiter"] = delimiter
        if page_size:
            query["max-keys"] = str(page_size)
        seen: set[str] = set()
        try:
            _, data = lean.request("GET", None, query=query)
        except ServerError as exc:
            if not self._handed_to_boto3(exc):
                raise
            yield from self._boto_pages(prefix, after, delimiter=delimiter, page_size=page_size)
            return
        while True:
            root = xml_root(data)  # type: ignore[arg-type]
            if root is None or local_name(root.tag) != "ListBucketResult":
                raise ServerError(200, "InvalidResponse", "the listing is not a ListBucketResult")
            ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            decode = root.findtext(ns + "EncodingType") == "url"
            page = []
            for common in root.iter(ns + "CommonPrefixes"):
                p = common.findtext(ns + "Prefix") or ""
                page.append((unquote_plus(p) if decode else p, -1, 0.0, None))
            for obj in root.iter(ns + "Contents"):
                key = obj.findtext(ns + "Key") or ""
                page.append((
                    unquote_plus(key) if decode else key,
                    int(obj.findtext(ns + "Size") or 0),
                    iso_seconds(obj.findtext(ns + "LastModified") or ""),
                    _etag(obj.findtext(ns + "ETag")),
                ))
            yield page
            token = root.findtext(ns + "NextContinuationToken")
            if (root.findtext(ns + "IsTruncated") or "").lower() != "true" or not token:
                return
            if token in seen:  # botocore's paginator refuses a repeated token too
                raise ServerError(200, "InvalidResponse", "the listing repeats a continuation token")
            seen.add(token)
            query["continuation-token"] = token
            _, data = lean.request("GET", None, query=query)

    @_boto3_on_redirect
    def head(self, key: str) -> Entry:
        with self._errors("head", key):
            if (lean := self._lean) is not None:
                resp, _ = lean.request("HEAD", self.root + key)
                return Entry(key, int(resp.headers.get("content-length") or 0),
                             date_seconds(resp.headers.get("last-modified")), _etag(resp.headers.get("etag")),
                             _checksums(resp.headers))
            r = self._client.head_object(Bucket=self.bucket, Key=self.root + key)
        return Entry(key, r["ContentLength"], whole_seconds(r["LastModified"]), _etag(r.get("ETag")),
                     _checksums(_headers(r)))

    @_boto3_on_redirect
    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        if end is not None and end <= start:
            return io.BytesIO(b"")
        if self._download is not None:
            # the bucket's own HEAD says what the domain's answer must be (size, MD5)
            return self._download.read(key, start, end, self.head(key))
        rng = f"bytes={start}-{'' if end is None else end - 1}" if start or end is not None else None
        try:
            with self._errors("get", key):
                if (lean := self._lean) is not None:
                    body, _ = lean.request(
                        "GET", self.root + key, headers={"range": rng} if rng else None, stream=True,
                    )
                    length = int(body.headers.get("content-length") or 0)
                    headers = body.headers
                else:
                    args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.root + key}
                    if rng:
                        args["Range"] = rng
                    r = self._client.get_object(**args)
                    body, length, headers = r["Body"], r.get("ContentLength", 0), _headers(r)
        except StorageError as exc:
            # S3 refuses a range that starts at or past the end (416); like a file read past EOF,
            # that is simply no bytes.
            if exc.code != "InvalidRange" or start < self.head(key).size:
                raise
            return io.BytesIO(b"")
        if end is not None and length > end - start:
            # A server that ignores Range would hand back the whole object: never pass that off as
            # the requested bytes (a parallel download would write it at the wrong offset).
            with contextlib.suppress(Exception):
                body.close()
            raise StorageError(f"get {self._where(key)}: the server ignored the Range header", code="InvalidRange")
        reader = _Body(body, self, key)
        if rng is None:  # the answer's checksums describe the whole object, not a range
            reader.checksums = _checksums(headers)
        return reader  # type: ignore[return-value]

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
        feed = Feed(data, size, content_md5, f"put {self._where(key)}")
        if size >= PUT_BUFFER:
            return self._put_stream(key, feed, mtime)
        body = feed.read(size)
        return self._put_bytes(key, body, feed.md5(), mtime, content_md5 is not None)

    @_boto3_on_redirect
    def _put_bytes(self, key: str, body: bytes, md5: str, mtime: float | None, keep_md5: bool) -> Entry:
        size = len(body)
        content_md5 = base64.b64encode(bytes.fromhex(md5)).decode("ascii")
        # the store checks the bytes against Content-MD5, encrypted or not: their MD5 is known
        checksums = {MD5: md5}
        with self._errors("put", key):
            if (lean := self._lean) is not None:
                headers = {"content-md5": content_md5, **_meta_headers(mtime, md5 if keep_md5 else None)}
                resp, _ = lean.request("PUT", self.root + key, headers=headers, body=body)
                return Entry(key, size, date_seconds(resp.headers.get("date"), now=True),
                             _etag(resp.headers.get("etag")), checksums)
            r = self._client.put_object(
                Body=body, ContentLength=size, ContentMD5=content_md5,
                **self._write_args(key, mtime, md5 if keep_md5 else None),
            )
        return Entry(key, size, _server_time(r), _etag(r.get("ETag")), checksums)

    def _put_stream(self, key: str, feed: Feed, mtime: float | None) -> Entry:
        """A large single PUT, streamed. With the MD5 known up front it is sent as Content-MD5
        (checked by the store) and kept as md5chksum metadata; without, the answer's ETag is
        compared with the MD5 of what was sent wherever it is one (not under SSE-KMS/SSE-C)."""
        known = feed.content_md5
        with self._errors("put", key):
            if (lean := self._lean) is not None:
                headers = _meta_headers(mtime, known)
                if known:
                    headers["content-md5"] = base64.b64encode(bytes.fromhex(known)).decode("ascii")
                resp, _ = lean.put_streaming(self.root + key, headers, feed.len, feed.chunks())
                entry = Entry(key, feed.len, date_seconds(resp.headers.get("date"), now=True),
                              _etag(resp.headers.get("etag")), _checksums(resp.headers))
            else:
                args = self._write_args(key, mtime, known)
                if known:
                    args["ContentMD5"] = base64.b64encode(bytes.fromhex(known)).decode("ascii")
                # botocore reads a body twice (to sign it over http, to retry): spooled to disk
                with tempfile.TemporaryFile() as spool:
                    shutil.copyfileobj(feed, spool, STREAM_CHUNK)
                    spool.seek(0)
                    r = self._client.put_object(Body=spool, ContentLength=feed.len, **args)
                entry = Entry(key, feed.len, _server_time(r), _etag(r.get("ETag")), _checksums(_headers(r)))
        sent = feed.md5()
        if entry.checksums.get(MD5, sent) != sent:
            with contextlib.suppress(StorageError):
                self.delete(key)  # the store holds other bytes than were sent: never leave them
            raise VerifyFailed(f"put {self._where(key)}: the store's MD5 {entry.checksums[MD5]} differs from "
                               f"the bytes sent ({sent})")
        if known or MD5 in entry.checksums:
            entry.checksums = {MD5: sent}
        return entry

    @_boto3_on_redirect
    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            if (lean := self._lean) is not None:
                lean.request("DELETE", self.root + key)
            else:
                self._client.delete_object(Bucket=self.bucket, Key=self.root + key)

    # ---- multipart ---------------------------------------------------------------------------
    @_boto3_on_redirect
    def create_multipart(self, key: str, *, mtime: float | None = None, mode: int | None = None,
                         content_md5: str | None = None) -> str:
        # the composite ETag of a multipart object is no MD5: the content's MD5, when known, is
        # kept in the metadata (rclone's md5chksum), which head() and whole GETs report
        with self._errors("create multipart upload", key):
            if (lean := self._lean) is not None:
                resp, data = lean.request("POST", self.root + key, query={"uploads": None},
                                          headers=_meta_headers(mtime, content_md5) or None)
                upload_id = answer_fields(resp, data).get("UploadId")
                if not upload_id:
                    raise ServerError(resp.status, "InvalidResponse", "the answer names no UploadId")
                return upload_id
            args = self._write_args(key, mtime, content_md5)
            return str(self._client.create_multipart_upload(**args)["UploadId"])

    @_boto3_on_redirect
    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> Part:
        with self._errors(f"upload part {number}", key):
            if (lean := self._lean) is not None:
                # Content-MD5: the store checks the part on arrival, whatever its ETag means
                # (under SSE-KMS a part's ETag is no MD5 to compare with afterwards)
                resp, _ = lean.request(
                    "PUT", self.root + key, query={"partNumber": str(number), "uploadId": upload_id},
                    headers={"content-md5": md5_b64(data)}, body=data,
                )
                etag = resp.headers.get("etag")
            else:
                etag = self._client.upload_part(
                    Bucket=self.bucket, Key=self.root + key, UploadId=upload_id, PartNumber=number,
                    Body=data, ContentLength=len(data), ContentMD5=md5_b64(data),
                )["ETag"]
        return Part(number, _etag(etag) or "", len(data))

    @_boto3_on_redirect
    def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> Entry:
        ordered = sorted(parts, key=lambda p: p.number)
        with self._errors("complete multipart upload", key):
            if (lean := self._lean) is not None:
                body = "".join(f"<Part><ETag>&quot;{xml_escape(p.etag)}&quot;</ETag><PartNumber>{p.number}</PartNumber>"
                               "</Part>" for p in ordered)
                document = f'<CompleteMultipartUpload xmlns="{S3_NS}">{body}</CompleteMultipartUpload>'.encode()
                resp, data = lean.request("POST", self.root + key, query={"uploadId": upload_id},
                                                body=document)
                # S3 may fail the completion after answering 200: the error is in the body
                etag = answer_fields(resp, data).get("ETag")
                mtime = date_seconds(resp.headers.get("date"), now=True)
            else:
                r = self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self.root + key, UploadId=upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": f'"{p.etag}"'} for p in ordered]},
                )
                etag, mtime = r.get("ETag"), _server_time(r)
        if any(p.size <= 0 for p in ordered):  # parts rebuilt without sizes: ask the store
            return self.head(key)
        # Some servers (Ceph Pacific) answer an empty ETag here; None then, never a guess.
        return Entry(key, sum(p.size for p in ordered), mtime, _etag(etag))

    @_boto3_on_redirect
    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            with self._errors("abort multipart upload", key):
                if (lean := self._lean) is not None:
                    lean.request("DELETE", self.root + key, query={"uploadId": upload_id})
                else:
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=self.root + key, UploadId=upload_id)
        except NotFound as exc:
            if exc.code != "NoSuchUpload":  # already gone: aborting is idempotent, like delete
                raise

    def list_uploads(self, prefix: str = "") -> Iterator[Upload]:
        cut = len(self.root)
        try:
            with self._errors("list multipart uploads", prefix):
                pages = (self._lean_upload_pages(self.root + prefix) if self._lean is not None
                         else self._boto_upload_pages(self.root + prefix))
                for page in pages:
                    for up in page:
                        if up.key.startswith(self.root) and len(up.key) > cut:
                            yield Upload(up.key[cut:], up.upload_id, up.initiated)
        except NotFound as exc:
            # `rclone serve s3` answers NoSuchUpload when there is no unfinished upload at all
            if exc.code != "NoSuchUpload":
                raise

    def _boto_upload_pages(self, prefix: str) -> Iterator[list[Upload]]:
        for page in self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
            yield [Upload(up["Key"], up["UploadId"], up["Initiated"].timestamp() if up.get("Initiated") else 0.0)
                   for up in page.get("Uploads", ())]

    def _lean_upload_pages(self, prefix: str) -> Iterator[list[Upload]]:
        lean = self._lean
        assert lean is not None
        query: dict[str, str | None] = {"uploads": None, "prefix": prefix}
        while True:
            try:
                resp, data = lean.request("GET", None, query=query)
            except ServerError as exc:
                if "key-marker" in query or not self._handed_to_boto3(exc):
                    raise
                yield from self._boto_upload_pages(prefix)
                return
            root = xml_root(data)
            if root is None or local_name(root.tag) != "ListMultipartUploadsResult":
                raise ServerError(resp.status, "InvalidResponse", "the answer is not a ListMultipartUploadsResult")
            ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            yield [Upload(up.findtext(ns + "Key") or "", up.findtext(ns + "UploadId") or "",
                          _epoch(up.findtext(ns + "Initiated")))
                   for up in root.iter(ns + "Upload")]
            key_marker = root.findtext(ns + "NextKeyMarker")
            if (root.findtext(ns + "IsTruncated") or "").lower() != "true" or not key_marker:
                return
            if (key_marker, root.findtext(ns + "NextUploadIdMarker")) == (query.get("key-marker"),
                                                                            query.get("upload-id-marker")):
                raise ServerError(resp.status, "InvalidResponse", "the listing repeats its markers")
            query["key-marker"] = key_marker
            query["upload-id-marker"] = root.findtext(ns + "NextUploadIdMarker") or ""

    # ---- server-side copy --------------------------------------------------------------------
    @_boto3_on_redirect
    def copy(self, src_key: str, dst_key: str, *, src_root: Storage | None = None,
             size: int | None = None) -> Entry:
        src = src_root or self
        if not isinstance(src, S3Storage) or not self.same_server(src):
            raise StorageError(
                f"copy {src.describe()} to {self.describe()}: not on the same S3 server and account",
                code="NotImplemented",
            )
        source = {"Bucket": src.bucket, "Key": src.root + src_key}
        if size is None:
            size = src.head(src_key).size
        if size > self.copy_limit:
            info = src._head_raw(src_key)
            return self._copy_multipart(source, info, int(info["ContentLength"]), dst_key)
        with self._errors("copy", dst_key):
            if (lean := self._lean) is not None:
                copy_source = quote(f"{src.bucket}/{src.root}{src_key}", safe="/~")
                resp, data = lean.request("PUT", self.root + dst_key,
                                                headers={"x-amz-copy-source": copy_source})
                res = answer_fields(resp, data)  # S3 may fail a copy after a 200
                mtime = (iso_seconds(res["LastModified"]) if res.get("LastModified")
                         else date_seconds(resp.headers.get("date"), now=True))
                return Entry(dst_key, size, mtime, _etag(res.get("ETag")))
            r = self._client.copy_object(Bucket=self.bucket, Key=self.root + dst_key, CopySource=source)
        res = r.get("CopyObjectResult", {})
        mtime = whole_seconds(res["LastModified"]) if "LastModified" in res else _server_time(r)
        return Entry(dst_key, size, mtime, _etag(res.get("ETag")))

    def _copy_multipart(self, source: dict[str, str], info: dict[str, Any], size: int, dst_key: str) -> Entry:
        part = max(self.copy_part_size, math.ceil(size / self.abilities.max_parts), self.abilities.min_part_size)
        with self._errors("create multipart upload", dst_key):
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=self.root + dst_key, Metadata=info.get("Metadata", {}),
                **({"ContentType": info["ContentType"]} if info.get("ContentType") else {}),
            )["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, size, part), start=1):
                last = min(offset + part, size) - 1
                with self._errors(f"copy part {number}", dst_key):
                    r = self._client.upload_part_copy(
                        Bucket=self.bucket, Key=self.root + dst_key, UploadId=upload_id, PartNumber=number,
                        CopySource=source, CopySourceRange=f"bytes={offset}-{last}",
                    )
                parts.append(Part(number, _etag(r["CopyPartResult"]["ETag"]) or "", last - offset + 1))
            return self.complete_multipart(dst_key, upload_id, parts)
        except BaseException:
            with contextlib.suppress(StorageError):
                self.abort_multipart(dst_key, upload_id)
            raise

    def same_server(self, other: Storage) -> bool:
        return (
            isinstance(other, S3Storage)
            and other.endpoint_url == self.endpoint_url
            and other.location.access_key == self.location.access_key
            and other.options.anonymous == self.options.anonymous
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if (lean := self._lean) is not None:
                lean.close()
            if self._download is not None:
                self._download.close()
            if self._boto is not None:
                with contextlib.suppress(Exception):
                    self._boto.close()

    # ---- helpers -----------------------------------------------------------------------------
    def _head_raw(self, key: str) -> dict[str, Any]:
        with self._errors("head", key):
            return dict(self._client.head_object(Bucket=self.bucket, Key=self.root + key))

    def _write_args(self, key: str, mtime: float | None, content_md5: str | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.root + key}
        meta = {name[len("x-amz-meta-"):]: value for name, value in _meta_headers(mtime, content_md5).items()}
        if meta:
            args["Metadata"] = meta
        return args

    def _where(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.root}{key} at {self.endpoint_url or 'the AWS default endpoint'}"

    @contextlib.contextmanager
    def _errors(self, op: str, key: str = "") -> Iterator[None]:
        """Turn every failure of either client inside the block into a StorageError."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            mapped = self._map_error(exc, op, key)
            if mapped is None:
                raise
            raise mapped from exc

    def _map_error(self, exc: BaseException, op: str, key: str) -> StorageError | None:
        """The one place where S3 failures become StorageError codes, whichever client failed.
        Never includes a secret. None: not a storage failure (a bug), left to propagate."""
        where = self._where(key)
        endpoint = self.endpoint_url or "the AWS default endpoint"
        botocore_exc: Any = sys.modules.get("botocore.exceptions")  # loaded if boto3 was used
        err: StorageError
        answer: tuple[str, int | None, str] | None = None
        if isinstance(exc, ServerError):
            answer = (exc.code, exc.status, exc.message)
        elif botocore_exc is not None and isinstance(exc, botocore_exc.ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            answer = (str(error.get("Code") or status or "Unknown"), status, error.get("Message") or "")
        if answer is not None:
            code, status, detail = answer
            code = "NoSuchKey" if code == "404" else _STATUS_CODES.get(code, code)
            if code == "NoSuchBucket":
                err = NotFound(
                    f"{op} {where}: bucket {self.bucket!r} does not exist at {endpoint}; "
                    "create it or fix the bucket name in the address", code="NoSuchBucket",
                )
            elif code in ("NoSuchKey", "NoSuchUpload", "NotFound"):
                err = NotFound(f"{op} {where}: {code}{': ' + detail if detail else ''}", code=code)
            else:
                hint = _HINTS.get(code)
                text = f"{op} {where}: {code}{': ' + detail if detail else ''}{'; ' + hint if hint else ''}"
                retry = code in RETRYABLE or (isinstance(status, int) and status >= 500)
                err = StorageError(text, code=code, retryable=retry)
        elif botocore_exc is not None and isinstance(
            exc, (botocore_exc.NoCredentialsError, botocore_exc.PartialCredentialsError)
        ):
            err = StorageError(
                f"{op} {where}: no usable credentials; put AK:SK in the address, set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or use --anonymous for a public bucket",
                code="NoCredentials",
            )
        elif is_tls_error(exc) or (botocore_exc is not None and isinstance(exc, botocore_exc.SSLError)):
            err = StorageError(f"{op} {where}: TLS failed with {endpoint}: {exc}", code="SSLError")
        elif isinstance(exc, OSError) or _is_transport_error(exc, botocore_exc):
            code = transport_code(exc)
            err = StorageError(
                f"{op} {where}: cannot reach {endpoint} ({TRANSPORT_REASONS[code]}, {type(exc).__name__}); "
                "check the endpoint, the network and --https", code=code, retryable=True,
            )
        elif botocore_exc is not None and isinstance(exc, botocore_exc.BotoCoreError):
            err = StorageError(f"{op} {where}: {type(exc).__name__}: {exc}", code=type(exc).__name__)
        else:
            return None
        return self._scrub(err)

    def _scrub(self, err: StorageError) -> StorageError:
        """Last line of defence: no secret may reach a message, even if a server echoes it."""
        text = str(err)
        for secret in (self.location.secret_key, self.location.token):
            if secret and len(secret) >= 4 and secret in text:
                text = text.replace(secret, "***")
                err.args = (text,)
        return err


# ---- small functions --------------------------------------------------------------------------


def _is_transport_error(exc: BaseException, botocore_exc: Any) -> bool:
    if botocore_exc is not None and isinstance(exc, (
        botocore_exc.ConnectionError, botocore_exc.HTTPClientError, botocore_exc.IncompleteReadError,
    )):
        return True
    urllib3_exc: Any = sys.modules.get("urllib3.exceptions")
    return urllib3_exc is not None and isinstance(exc, urllib3_exc.HTTPError)


def _epoch(text: str | None) -> float:
    """An ISO 8601 time (a listing's Initiated) in epoch seconds, fractions kept; 0 if unreadable."""
    try:
        dt = datetime.fromisoformat((text or "").strip())
    except ValueError:
        return 0.0
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _etag(value: str | None) -> str | None:
    value = (value or "").strip('"').lower()
    return value or None


def _meta_headers(mtime: float | None, content_md5: str | None) -> dict[str, str]:
    """The metadata we keep with an object: the source mtime (informative, as rclone stores it:
    S3 keeps its own LastModified, which is Entry.mtime) and the content MD5 where known."""
    headers = {}
    if mtime is not None:
        headers["x-amz-meta-mtime"] = repr(float(mtime))
    if content_md5:
        headers["x-amz-meta-" + META_MD5] = base64.b64encode(bytes.fromhex(content_md5)).decode("ascii")
    return headers


def _checksums(headers: Mapping[str, str]) -> dict[str, str]:
    """The content checksums an answer's headers (lower-case names) prove: the MD5 kept in the
    metadata at upload, else a single-part ETag of an object stored in plain or with SSE-S3 (AWS
    documents that only those ETags are the MD5 of the data: not SSE-KMS, SSE-C, multipart)."""
    stored = headers.get("x-amz-meta-" + META_MD5)
    if stored:
        with contextlib.suppress(binascii.Error, ValueError):
            raw = base64.b64decode(stored, validate=True)
            if len(raw) == 16:
                return {MD5: raw.hex()}
    etag = _etag(headers.get("etag"))
    sse = headers.get("x-amz-server-side-encryption", "").lower()
    if (etag and _MD5_HEX.match(etag) and sse in ("", "aes256")
            and not headers.get("x-amz-server-side-encryption-customer-algorithm")):
        return {MD5: etag}
    return {}


def _headers(response: dict[str, Any]) -> dict[str, str]:
    """A boto3 answer's HTTP headers, names in lower case."""
    return dict(response.get("ResponseMetadata", {}).get("HTTPHeaders", {}))


def _server_time(response: dict[str, Any]) -> float:
    """The server's Date header: what LastModified will say, without another request."""
    return date_seconds(response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date"), now=True)


def _expect_continue_except_put_object(model: Any, params: dict[str, Any], **kwargs: Any) -> None:
    import botocore.handlers

    if model.name != "PutObject":
        botocore.handlers.add_expect_header(model, params, **kwargs)


