"""One way to name a place: every address form users type becomes a `Location`.

Forms (ads-cli grammar, see README "Addresses"):
  NAME://[AK:SK[:TOKEN]@]BUCKET[.ENDPOINT][/PREFIX]   NAME in s3 oss cos obs bos ks3 qiniu ufile aoss
  azure://ACCOUNT:KEY@CONTAINER[.ENDPOINT][/PREFIX]   ENDPOINT: the suffix (core.windows.net), or
                                                      an emulator's IP/localhost:PORT (path style)
  azure://ACCOUNT@CONTAINER[.ENDPOINT][/PREFIX]?SAS   a SAS token instead of the key (kept in `token`)
  qiniu://AK:SK@BUCKET.ENDPOINT[/PREFIX]?download=http://DOMAIN
                                                      listed through the S3 API, bodies downloaded
                                                      from the bucket's download domain (`download`)
  upyun://OPERATOR:PASSWORD@SERVICE[.ENDPOINT][/PREFIX]  UpYun's REST API, read-only (also youpai://);
                                                      ENDPOINT defaults to v0.api.upyun.com (https)
  minio://[AK:SK[:TOKEN]@]HOST:PORT/BUCKET[/PREFIX]
  [user[:pass]@]host[:port]:path                       SFTP (no '://', has ':')
  sftp://[user[:pass]@]host[:port]/path                SFTP, the path absolute (/~/path: from home)
  path                                                 local (no '://', no ':'), also file://path
  http(s)://host/path                                  one URL, read-only source
  list://PATH                                          a URL list file (read-only source)
Percent-escapes (%2F for '/', %40 for '@', %3A for ':') are decoded in keys, prefixes and secrets.
Secrets live only in the Location (also a signed URL's query string, in `query` once the URL is
split into directory and name); its repr and `display()` mask them.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
from dataclasses import dataclass, field, replace
from urllib.parse import unquote

from ossimport.errors import UsageError

# Address NAME -> (registry backend, flavour). The S3-compatible clouds are flavours of `s3`.
SCHEMES: dict[str, tuple[str, str]] = {
    "s3": ("s3", "s3"),
    "cos": ("s3", "cos"),
    "obs": ("s3", "obs"),
    "bos": ("s3", "bos"),
    "ks3": ("s3", "ks3"),
    "qiniu": ("s3", "qiniu"),
    "ufile": ("s3", "ufile"),
    "us3": ("s3", "ufile"),
    "aoss": ("s3", "aoss"),
    "minio": ("s3", "minio"),
    "oss": ("oss", "oss"),
    "azure": ("azure", "azure"),
    "upyun": ("upyun", "upyun"),
    "youpai": ("upyun", "upyun"),  # the name ossimport's job configs use
}

_SFTP_RE = re.compile(
    r"^(?:(?P<user>[^:@/]+)(?::(?P<password>[^@/]*))?@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-]*)"
    r"(?::(?P<port>\d+))?:(?P<path>.*)$"
)
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,254}$")
# with path-style addressing the bucket is a path segment, so dots are unambiguous there
_DOTTED_BUCKET_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_\-]|\.(?!\.)){0,253}[A-Za-z0-9]$")


@dataclass(slots=True)
class Location:
    """A parsed address. `backend` is the registry key; `flavour` the provider."""

    backend: str  # local | s3 | oss | sftp | http
    flavour: str = ""  # s3 cos obs bos ks3 qiniu ufile aoss minio oss | local | sftp | http
    bucket: str = ""
    endpoint: str = ""  # host[:port] without scheme; "" = the provider's default
    prefix: str = ""  # object stores: key prefix of the root ("" or ending in "/" for a directory)
    path: str = ""  # local and SFTP: the directory (or file); http: the URL or the list file
    host: str = ""  # SFTP host
    port: int | None = None  # SFTP port
    user: str = ""  # SFTP user
    is_dir: bool = True  # the address ended in '/' (or names a bucket root)
    https: bool | None = None  # None: decided by the --https option
    path_style: bool = False  # path-style addressing (IP / localhost endpoints, MinIO)
    access_key: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    # http: the query string of a single URL split by `split_object` (a presigned URL's signature):
    # sent with every request for the object, never shown
    query: str = field(default="", repr=False)
    # object stores (qiniu): scheme://host[:port] of the bucket's download domain (a CDN); object
    # bodies are read from there, listings and metadata still come from the S3 API
    download: str = ""

    def __repr__(self) -> str:
        return f"Location({self.display()!r})"

    def display(self) -> str:
        """The address as the user would write it, with every secret replaced by '***'."""
        if self.backend == "local":
            return self.path
        if self.backend == "http":
            return _mask_url(self.path)
        if self.backend == "sftp":
            user = f"{self.user}{':***' if self.password else ''}@" if self.user else ""
            port = f":{self.port}" if self.port else ""
            return f"{user}{self.host}{port}:{self.path}"
        creds = "***:***@" if (self.access_key or self.secret_key) else ""
        if self.flavour in ("azure", "upyun") and self.access_key:  # an account/operator name is no secret
            creds = f"{self.access_key}:***@" if self.secret_key else f"{self.access_key}@"
            if self.token:  # a SAS token
                return f"azure://{creds}{self.bucket}{'.' if self.endpoint else ''}{self.endpoint}/{self.prefix}?***"
        if self.flavour == "minio":
            return f"minio://{creds}{self.endpoint}/{self.bucket}/{self.prefix}"
        host = f"{self.bucket}.{self.endpoint}" if self.endpoint else self.bucket
        download = f"?download={self.download}" if self.download else ""
        return f"{self.flavour}://{creds}{host}/{self.prefix}{download}"

    def endpoint_url(self, https_default: bool = False) -> str | None:
        """scheme://endpoint for object stores, None when the provider default applies."""
        if not self.endpoint:
            return None
        secure = self.https if self.https is not None else https_default
        return f"{'https' if secure else 'http'}://{self.endpoint}"

    def split_object(self) -> tuple[Location, str]:
        """For a single-object address: (the parent directory's Location, the object's name)."""
        if self.backend in ("local", "sftp", "http"):
            path = self.path.rstrip("/") if self.backend != "http" else self.path
            query = self.query
            if self.backend == "http":
                # the query string (a signed URL's signature) and fragment are not part of the name:
                # kept, they became the destination's file name and showed up in every message.
                # The query goes to `query`, which the storage sends and nothing prints.
                path, _, query = path.split("#", 1)[0].partition("?")
            parent, _, name = path.rpartition("/")
            if self.backend == "http":
                name = unquote(name)  # list() keys are decoded; so must the single object's be
            if self.backend == "local" and not parent and not path.startswith("/"):
                parent = "."
            return replace(self, path=(parent or "/") + "/", is_dir=True, query=query), name
        parent, _, name = self.prefix.rpartition("/")
        return replace(self, prefix=f"{parent}/" if parent else "", is_dir=True), name

    def place(self) -> tuple[tuple[str, ...], str]:
        """(the store, the path inside it, without a trailing '/'): two Locations name the same
        data when both are equal. A store is the backend plus endpoint and bucket (a default
        endpoint stands for its provider), an SFTP server its host and port (and the user, whose
        home a relative path starts from); local paths are resolved (symlinks, '..')."""
        if self.backend == "local":
            return ("local",), os.path.realpath(self.path).rstrip("/")
        if self.backend == "sftp":
            path = self.path
            home = path == "~" or path.startswith("~/") or not path.startswith("/")
            path = posixpath.normpath("/" + path.removeprefix("~").lstrip("/")).rstrip("/")
            server = ("sftp", self.host.lower(), str(self.port or 22))
            return (*server, self.user) if home else server, path
        if self.backend == "http":
            return ("http",), self.path
        endpoint = self.endpoint.lower() or f"{self.flavour} default"
        if self.backend == "azure":  # a container is one account's
            endpoint = f"{self.access_key}@{endpoint}"
        return (self.backend, endpoint, self.bucket), ("/" + self.prefix).rstrip("/")

    def child(self, name: str) -> Location:
        """The single-object Location of `name` inside this directory Location."""
        if self.backend in ("local", "sftp"):
            return replace(self, path=self.path.rstrip("/") + "/" + name, is_dir=False)
        return replace(self, prefix=self.prefix + name, is_dir=False)


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback IP (127.0.0.0/8, ::1), brackets allowed: only this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_ip_or_localhost(host: str) -> bool:
    host = host.split(":")[0] if not host.startswith("[") else host[1 : host.index("]")]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_address(text: str, *, https: bool | None = None) -> Location:
    """Parse one address. Raises UsageError with a message naming the problem and the fix."""
    if not text:
        raise UsageError("empty address: give a local path, an SFTP path or NAME://BUCKET.ENDPOINT/PREFIX")
    if "\x00" in text:
        raise UsageError("address contains a NUL character")
    if "://" in text:
        name, _, rest = text.partition("://")
        name = name.lower()
        if name in ("file", "local"):
            return _local(rest or "/")
        if name in ("http", "https"):
            return Location(backend="http", flavour="http", path=text, is_dir=False, https=name == "https")
        if name == "list":
            if not rest:
                raise UsageError("list:// needs the path of a URL list file, e.g. list:///data/urls.txt")
            return Location(backend="http", flavour="http", path=rest, is_dir=True)
        if name == "sftp":
            return _sftp_url(rest, text)
        if name not in SCHEMES:
            known = ", ".join(sorted(SCHEMES))
            raise UsageError(f"unknown storage type {name!r} in {_mask(text)!r}; use one of: {known}, or a local/SFTP path")
        return _object_store(name, rest, text, https)
    m = _SFTP_RE.match(text)
    if ":" in text and not text.startswith(("/", ".", "~")):
        if m and m["user"] is None and "@" in text:
            head, _, tail = text.rpartition("@")
            tm = _SFTP_RE.match(tail)
            if ":" in head and "/" in head and tm and tm["user"] is None:
                # 'user:pa/ss@host:/dir/' would read as host 'user', path 'pa/ss@host:/dir/'
                raise UsageError(f"address {_mask(text)!r}: the password seems to contain '/'; escape it as %2F "
                                 "(an '@' in the path as %40)")
        if m:
            return _sftp(m, text)
        # neither a local path (those have no ':') nor a well-formed SFTP address: refuse rather
        # than create a local directory named after a mistyped address (or a password in it)
        raise UsageError(
            f"address {_mask(text)!r} is not a valid SFTP address [user[:password]@]host[:port]:path "
            "(escape '@' '/' ':' in a password as %40 %2F %3A); write ./NAME for a local name with ':'"
        )
    return _local(text)


def _local(path: str) -> Location:
    path = os.path.expanduser(path)
    is_dir = path.endswith("/") or path in (".", "..") or path.endswith(("/.", "/.."))
    return Location(backend="local", flavour="local", path=path, is_dir=is_dir)


def _sftp(m: re.Match[str], text: str) -> Location:
    path = unquote(m["path"])
    if not path:
        raise UsageError(f"SFTP address {_mask(text)!r} has no path after 'host:'; write user@host:/dir/")
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"SFTP port {port} is out of range 1-65535")
    return Location(
        backend="sftp",
        flavour="sftp",
        host=m["host"].strip("[]"),
        port=port,
        user=unquote(m["user"] or ""),
        password=unquote(m["password"] or ""),
        path=path,
        is_dir=path.endswith("/"),
    )


_SFTP_URL_RE = re.compile(
    r"^(?:(?P<user>[^:@/]+)(?::(?P<password>[^@/]*))?@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-]*)"
    r"(?::(?P<port>\d+))?(?P<path>/.*)?$"
)


def _sftp_url(rest: str, text: str) -> Location:
    """sftp://[user[:password]@]host[:port]/path: the path is absolute, as in curl and rclone;
    /~/path is relative to the login's home directory."""
    m = _SFTP_URL_RE.match(rest)
    if m is None:
        raise UsageError(f"address {_mask(text)!r} is not a valid SFTP URL sftp://[user[:password]@]host[:port]/path "
                         "(escape '@' '/' ':' in a password as %40 %2F %3A)")
    if not m["path"]:
        raise UsageError(f"SFTP address {_mask(text)!r} has no path after the host; write sftp://user@host/dir/")
    loc = _sftp(m, text)
    if loc.path == "/~" or loc.path.startswith("/~/"):
        loc.path = loc.path[1:]
    return loc


def _split_credentials(authority_and_rest: str, original: str) -> tuple[str, str, str, str]:
    """'AK:SK[:TOKEN]@rest' -> (ak, sk, token, rest). Secrets must escape '/', '@' as %2F, %40."""
    head = authority_and_rest.split("/", 1)[0]
    if "@" not in head:
        if "@" in authority_and_rest and ":" in authority_and_rest.split("@", 1)[0]:
            raise UsageError(
                f"address {_mask(original)!r}: the secret key seems to contain '/'; escape it as %2F"
            )
        return "", "", "", authority_and_rest
    creds, _, rest = authority_and_rest.partition("/")[0].rpartition("@")
    tail = authority_and_rest[len(creds) + 1 :]
    fields = creds.split(":")
    if len(fields) not in (2, 3) or not fields[0] or not fields[1]:
        raise UsageError(
            f"address {_mask(original)!r}: credentials must be ACCESS_KEY:SECRET_KEY[:TOKEN]@ "
            "(escape ':' '@' '/' in keys as %3A %40 %2F)"
        )
    ak, sk = unquote(fields[0]), unquote(fields[1])
    token = unquote(fields[2]) if len(fields) == 3 else ""
    return ak, sk, token, tail


def _split_bucket(host: str) -> tuple[str, str, str]:
    """BUCKET[.ENDPOINT] -> (bucket, ".", endpoint). The bucket ends at the first '.', except
    where the rest from a later '.' on is an IP address or `localhost` (with a port or not):
    `my.data.127.0.0.1:9000` is bucket `my.data` on 127.0.0.1:9000, addressed path-style."""
    dots = [i for i, c in enumerate(host) if c == "."]
    for i in dots[1:]:
        rest = host[i + 1:]
        name = rest[1:rest.index("]")] if rest.startswith("[") and "]" in rest else rest.rsplit(":", 1)[0]
        if (name == "localhost" or _is_ip(name)) and _DOTTED_BUCKET_RE.match(host[:i]):
            return host[:i], ".", rest
    return host.partition(".")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _object_store(name: str, rest: str, original: str, https: bool | None) -> Location:
    backend, flavour = SCHEMES[name]
    sas = download = ""
    if name == "qiniu" and "?" in rest:
        rest, _, query = rest.partition("?")
        option, eq, value = query.partition("=")
        if option != "download" or not eq:
            raise UsageError(f"address {_mask(original)!r}: a qiniu address takes one option, ?download=http://DOMAIN "
                             "(the bucket's download domain); write a '?' in a prefix as %3F")
        download = check_download_domain(unquote(value), f"address {_mask(original)!r}")
    if name == "azure":
        rest, _, sas = rest.partition("?")
        account, at, tail = rest.partition("@")
        if sas and not (at and account and ":" not in account and "/" not in account):
            raise UsageError(f"address {_mask(original)!r}: a SAS token goes with the account alone: write "
                             "azure://ACCOUNT@CONTAINER[.ENDPOINT][/PREFIX]?SAS ('?' in a prefix as %3F)")
    if sas:  # azure://ACCOUNT@CONTAINER/PREFIX?SAS: the token is sent as it is written
        ak, sk, token, rest = unquote(account), "", sas, tail
    else:
        ak, sk, token, rest = _split_credentials(rest, original)
    host, slash, key = rest.partition("/")
    if name == "minio":
        # minio://[AK:SK@]HOST:PORT/BUCKET[/PREFIX]
        bucket, slash2, key = key.partition("/")
        endpoint = host
        if not endpoint or not bucket:
            raise UsageError(f"address {_mask(original)!r}: write minio://[AK:SK@]HOST:PORT/BUCKET[/PREFIX]")
        is_dir = not key or key.endswith("/")
        path_style = True
    else:
        bucket, dot, endpoint = _split_bucket(host)
        if dot and not endpoint:
            raise UsageError(
                f"address {_mask(original)!r} has an empty endpoint after '{bucket}.'; write "
                f"{name}://[AK:SK@]BUCKET.ENDPOINT[/PREFIX], or drop the '.' for the provider's default endpoint"
            )
        if not bucket:
            raise UsageError(
                f"address {_mask(original)!r} has no bucket; write {name}://[AK:SK@]BUCKET[.ENDPOINT][/PREFIX]"
            )
        is_dir = not key or key.endswith("/")
        path_style = bool(endpoint) and is_ip_or_localhost(endpoint)
    if not (_BUCKET_RE.match(bucket) or (path_style and _DOTTED_BUCKET_RE.match(bucket))):
        raise UsageError(
            f"address {_mask(original)!r}: {bucket!r} is not a valid bucket name "
            "(letters, digits, '-' and '_'; the endpoint follows the first '.'; a bucket with dots "
            "needs a path-style address: minio://HOST:PORT/BUCKET/ or BUCKET.IP:PORT)"
        )
    if endpoint:
        check_endpoint(endpoint, original)
    if backend == "upyun" and (not ak or not sk or token):
        raise UsageError(f"address {_mask(original)!r}: UpYun needs its operator and the operator's password: write "
                         f"{name}://OPERATOR:PASSWORD@SERVICE[.ENDPOINT][/PREFIX] (escape ':' '@' '/' as %3A %40 %2F)")
    prefix = unquote(key)
    if "\x00" in prefix:
        raise UsageError("address prefix contains a NUL character")
    return Location(
        backend=backend,
        flavour=flavour,
        bucket=bucket,
        endpoint=endpoint,
        prefix=prefix,
        is_dir=is_dir,
        https=https,
        path_style=path_style,
        access_key=ak,
        secret_key=sk,
        token=token,
        download=download,
    )


_ENDPOINT_RE = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9_\-]*[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9_\-]*[A-Za-z0-9])?)*)(?::(?P<port>[0-9]{1,5}))?$")


def check_endpoint(endpoint: str, original: str) -> None:
    """HOST[:PORT] with a port in 1-65535: refused here, not as a failure of every file later."""
    m = _ENDPOINT_RE.match(endpoint)
    if not m:
        raise UsageError(f"address {_mask(original)!r}: {endpoint!r} is not a valid endpoint; write HOST or HOST:PORT")
    if m["port"] is not None and not 0 < int(m["port"]) < 65536:
        raise UsageError(f"address {_mask(original)!r}: port {int(m['port'])} is out of range 1-65535")


def check_download_domain(url: str, where: str) -> str:
    """A bucket's download domain as scheme://HOST[:PORT] (a trailing '/' dropped); refuses
    anything else with a line that says what to write. `where` starts the message."""
    scheme, sep, rest = url.partition("://")
    host = rest.removesuffix("/")
    m = _ENDPOINT_RE.match(host)
    if not sep or scheme.lower() not in ("http", "https") or m is None:
        raise UsageError(f"{where}: download domain {_mask_url(url)!r} is not http(s)://HOST[:PORT]; write "
                         "the domain bound to the bucket, e.g. http://cdn.example.com")
    if m["port"] is not None and not 0 < int(m["port"]) < 65536:
        raise UsageError(f"{where}: download domain {_mask_url(url)!r}: port {int(m['port'])} is out of range 1-65535")
    return f"{scheme.lower()}://{host}"


def _mask_url(url: str) -> str:
    """A URL without its user:password@ and query string (signed URLs carry secrets there)."""
    if "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    host = host.rpartition("@")[2]
    return f"{scheme}://{host}{slash}{path.split('?', 1)[0]}"


def _mask(text: str) -> str:
    """The address as typed, with anything that could be a secret hidden (for error messages)."""
    if "://" in text:
        name, _, rest = text.partition("://")
        if "?" in rest:  # a SAS token or a signed URL's signature
            rest = rest.partition("?")[0] + "?***"
        if "@" in rest:
            rest = "***@" + rest.rpartition("@")[2]
        return f"{name}://{rest}"
    if "@" in text:
        user, _, rest = text.rpartition("@")
        return f"{user.split(':')[0]}{':***' if ':' in user else ''}@{rest}"
    return text
