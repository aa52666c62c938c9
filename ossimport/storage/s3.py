"""S3 and the S3-compatible clouds (COS, OBS, BOS, KS3, Kodo, US3, AOSS, MinIO) through boto3.

The clouds differ only in endpoint and signing-region rules, kept in the `FLAVOURS` table; one
class serves them all. The root is `bucket` + `prefix`; every key in and out is relative to it.
One boto3 client per Storage, shared by every thread (boto3 clients are thread-safe).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, BinaryIO

import boto3
import botocore.handlers
import urllib3.exceptions
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ossimport.errors import NotFound, SourceChanged, StorageError
from ossimport.storage.base import Abilities, Entry, Part, Storage, StorageOptions

if TYPE_CHECKING:
    from ossimport.address import Location

GiB = 1024**3
MiB = 1024**2


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
_RETRYABLE = {
    "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "RequestTimeoutException",
    "500", "502", "503", "504", "429",
}
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


class _Body(io.RawIOBase):
    """The GET response body, with transport errors turned into StorageError like every call."""

    def __init__(self, body: Any, storage: S3Storage, key: str) -> None:
        self._body, self._storage, self._key = body, storage, key

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        with self._storage._errors("read", self._key):
            return self._body.read(None if size is None or size < 0 else size)

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):  # closing a broken connection is not an error
                self._body.close()
        super().close()


class S3Storage(Storage):
    scheme = "s3"
    abilities = Abilities(
        multipart=True,
        server_side_copy=True,
        ranged_read=True,
        etag_is_md5=True,
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
        region = derived_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        style = "path" if location.path_style else ("virtual" if endpoint else "auto")
        config = Config(
            region_name=region,
            signature_version=UNSIGNED if self.options.anonymous else "s3v4",
            s3={"addressing_style": style},
            max_pool_connections=max(self.options.max_pool, 10),
            connect_timeout=self.options.connect_timeout,
            read_timeout=self.options.read_timeout,
            retries={"mode": "standard", "max_attempts": 3},
            # Newer botocore adds CRC32 trailers/headers by default; Ceph and other older
            # S3-compatible servers reject them. ContentMD5 protects our uploads instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        creds: dict[str, str] = {}
        if location.access_key and not self.options.anonymous:
            creds = {"aws_access_key_id": location.access_key, "aws_secret_access_key": location.secret_key}
            if location.token:
                creds["aws_session_token"] = location.token
        with self._errors("connect"):
            # A Session per Storage: the default session is not safe to create clients from
            # concurrently; without explicit keys it reads env / AWS_PROFILE / instance roles.
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, config=config, **creds
            )
        # botocore sends `Expect: 100-continue` with every PUT body and waits for the answer: a
        # round trip per small object. Our single PUTs are small (large files go multipart), and a
        # refused request costs at most that small body.
        events = self._client.meta.events
        events.unregister("before-call.s3", botocore.handlers.add_expect_header)
        events.register("before-call.s3", _expect_continue_except_put_object)
        self._closed = False

    # ---- required ----------------------------------------------------------------------------
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[Entry]:
        full_prefix = self.root + prefix
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
        if start_after and self.root + start_after > full_prefix:
            args["StartAfter"] = self.root + start_after
        cut = len(self.root)
        with self._errors("list", prefix):
            for page in self._client.get_paginator("list_objects_v2").paginate(**args):
                for obj in page.get("Contents", ()):
                    key, size = obj["Key"], obj["Size"]
                    if (key.endswith("/") and size == 0) or len(key) <= cut:
                        continue  # directory markers made by consoles and other tools
                    yield Entry(key[cut:], size, _seconds(obj["LastModified"]), _etag(obj.get("ETag")))

    def head(self, key: str) -> Entry:
        with self._errors("head", key):
            r = self._client.head_object(Bucket=self.bucket, Key=self.root + key)
        return Entry(key, r["ContentLength"], _seconds(r["LastModified"]), _etag(r.get("ETag")))

    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        if end is not None and end <= start:
            return io.BytesIO(b"")
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.root + key}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            with self._errors("get", key):
                r = self._client.get_object(**args)
        except StorageError as exc:
            # S3 refuses a range that starts at or past the end (416); like a file read past EOF,
            # that is simply no bytes.
            if exc.code != "InvalidRange" or start < self.head(key).size:
                raise
            return io.BytesIO(b"")
        if end is not None and r.get("ContentLength", 0) > end - start:
            # A server that ignores Range would hand back the whole object: never pass that off as
            # the requested bytes (a parallel download would write it at the wrong offset).
            r["Body"].close()
            raise StorageError(f"get {self._where(key)}: the server ignored the Range header", code="InvalidRange")
        return _Body(r["Body"], self, key)  # type: ignore[return-value]

    def put(
        self,
        key: str,
        data: BinaryIO,
        size: int,
        *,
        mtime: float | None = None,
        mode: int | None = None,
    ) -> Entry:
        body = _read_at_most(data, size + 1)  # one byte more reveals a source that grew
        if len(body) != size:
            raise SourceChanged(f"put {self._where(key)}: expected {size} bytes, the source gave "
                                f"{'more' if len(body) > size else len(body)}")
        args = self._write_args(key, mtime)
        with self._errors("put", key):
            r = self._client.put_object(
                Body=body, ContentLength=size, ContentMD5=_md5_b64(body), **args
            )
        return Entry(key, size, _server_time(r), _etag(r.get("ETag")))

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=self.root + key)

    # ---- multipart ---------------------------------------------------------------------------
    def create_multipart(self, key: str, *, mtime: float | None = None, mode: int | None = None) -> str:
        with self._errors("create multipart upload", key):
            return str(self._client.create_multipart_upload(**self._write_args(key, mtime))["UploadId"])

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> Part:
        with self._errors(f"upload part {number}", key):
            r = self._client.upload_part(
                Bucket=self.bucket, Key=self.root + key, UploadId=upload_id, PartNumber=number,
                Body=data, ContentLength=len(data), ContentMD5=_md5_b64(data),
            )
        return Part(number, _etag(r["ETag"]) or "", len(data))

    def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> Entry:
        ordered = sorted(parts, key=lambda p: p.number)
        with self._errors("complete multipart upload", key):
            r = self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.root + key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": f'"{p.etag}"'} for p in ordered]},
            )
        if any(p.size <= 0 for p in ordered):  # parts rebuilt without sizes: ask the store
            return self.head(key)
        # Some servers (Ceph Pacific) answer an empty ETag here; None then, never a guess.
        return Entry(key, sum(p.size for p in ordered), _server_time(r), _etag(r.get("ETag")))

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            with self._errors("abort multipart upload", key):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=self.root + key, UploadId=upload_id)
        except NotFound as exc:
            if exc.code != "NoSuchUpload":  # already gone: aborting is idempotent, like delete
                raise

    def list_multipart(self, prefix: str = "") -> Iterator[tuple[str, str]]:
        cut = len(self.root)
        with self._errors("list multipart uploads", prefix):
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.root + prefix
            )
            for page in pages:
                for up in page.get("Uploads", ()):
                    if up["Key"].startswith(self.root) and len(up["Key"]) > cut:
                        yield up["Key"][cut:], up["UploadId"]

    # ---- server-side copy --------------------------------------------------------------------
    def copy(self, src_key: str, dst_key: str, *, src_root: Storage | None = None,
             size: int | None = None) -> Entry:
        src = src_root or self
        if not isinstance(src, S3Storage) or not self.same_server(src):
            raise StorageError(
                f"copy {src.describe()} to {self.describe()}: not on the same S3 server and account",
                code="NotImplemented",
            )
        source = {"Bucket": src.bucket, "Key": src.root + src_key}
        if size is None or size > self.copy_limit:
            info = src._head_raw(src_key)
            size = int(info["ContentLength"])
        if size <= self.copy_limit:
            with self._errors("copy", dst_key):
                r = self._client.copy_object(Bucket=self.bucket, Key=self.root + dst_key, CopySource=source)
            res = r.get("CopyObjectResult", {})
            mtime = _seconds(res["LastModified"]) if "LastModified" in res else _server_time(r)
            return Entry(dst_key, size, mtime, _etag(res.get("ETag")))
        return self._copy_multipart(source, info, size, dst_key)

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
            with contextlib.suppress(Exception):
                self._client.close()

    # ---- helpers -----------------------------------------------------------------------------
    def _head_raw(self, key: str) -> dict[str, Any]:
        with self._errors("head", key):
            return dict(self._client.head_object(Bucket=self.bucket, Key=self.root + key))

    def _write_args(self, key: str, mtime: float | None) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.root + key}
        if mtime is not None:
            # Informative, as rclone stores it: S3 keeps its own LastModified, which is Entry.mtime.
            args["Metadata"] = {"mtime": repr(float(mtime))}
        return args

    def _where(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.root}{key} at {self.endpoint_url or 'the AWS default endpoint'}"

    @contextlib.contextmanager
    def _errors(self, op: str, key: str = "") -> Iterator[None]:
        """Turn every boto3/botocore/urllib3 failure inside the block into a StorageError."""
        try:
            yield
        except StorageError:
            raise
        except (BotoCoreError, ClientError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._map_error(exc, op, key) from exc

    def _map_error(self, exc: BaseException, op: str, key: str) -> StorageError:
        """The one place where S3 failures become StorageError codes. Never includes a secret."""
        where = self._where(key)
        endpoint = self.endpoint_url or "the AWS default endpoint"
        err: StorageError
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(error.get("Code") or status or "Unknown")
            code = "NoSuchKey" if code == "404" else _STATUS_CODES.get(code, code)
            detail = error.get("Message") or ""
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
                retry = code in _RETRYABLE or (isinstance(status, int) and status >= 500)
                err = StorageError(text, code=code, retryable=retry)
        elif isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            err = StorageError(
                f"{op} {where}: no usable credentials; put AK:SK in the address, set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or use --anonymous for a public bucket",
                code="NoCredentials",
            )
        elif isinstance(exc, SSLError):
            err = StorageError(f"{op} {where}: TLS failed with {endpoint}: {exc}", code="SSLError")
        elif isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, urllib3.exceptions.HTTPError, OSError)):
            err = StorageError(
                f"{op} {where}: cannot reach {endpoint} ({type(exc).__name__}); check the endpoint, "
                "the network and --https", code="ConnectionError", retryable=True,
            )
        else:
            err = StorageError(f"{op} {where}: {type(exc).__name__}: {exc}", code=type(exc).__name__)
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
def _etag(value: str | None) -> str | None:
    value = (value or "").strip('"')
    return value or None


def _seconds(dt: Any) -> float:
    """LastModified in whole seconds: HEAD's header has second resolution and listings have
    milliseconds; flooring both keeps list() and head() consistent for the same object."""
    return float(math.floor(dt.timestamp()))


def _server_time(response: dict[str, Any]) -> float:
    """The server's Date header: what LastModified will say, without another request."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date:
        with contextlib.suppress(TypeError, ValueError):
            return _seconds(parsedate_to_datetime(date))
    return float(math.floor(time.time()))


def _expect_continue_except_put_object(model: Any, params: dict[str, Any], **kwargs: Any) -> None:
    if model.name != "PutObject":
        botocore.handlers.add_expect_header(model, params, **kwargs)


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def _read_at_most(stream: BinaryIO, limit: int) -> bytes:
    """Up to `limit` bytes, looping because raw streams and sockets return short reads."""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
