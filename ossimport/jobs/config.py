"""Job and system configuration: ossimport's `job.cfg` / `local_job.cfg` and `sys.properties`.

Files are Java .properties (read as the Java ossimport reads them) or, when the name ends in
.yaml/.yml, a flat YAML mapping with the same keys. Upstream templates load unchanged: values are
trimmed, sizes take units (150m), unknown keys and out-of-range counts become `warnings`. A value
we cannot use raises `ConfigError`: one line naming the file, the key, the value (secrets as '***')
and what is allowed.

Relative local paths (srcPrefix/destPrefix of local and http jobs, httpListFilePath, workingDir,
privateKeyFile, curveKeysDir) are resolved against the *base directory*: the directory containing
`conf/` when the file sits in a directory named `conf` (so `conf/local_job.cfg` may say
`srcPrefix=demo/data/`), else the file's own directory. Absolute paths work unchanged.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ossimport.address import SCHEMES, Location, check_download_domain, check_endpoint, is_ip_or_localhost
from ossimport.errors import UsageError
from ossimport.storage.base import StorageOptions

KiB, MiB, GiB = 1024, 1024**2, 1024**3
UPSTREAM_TYPES = ("local", "oss", "qiniu", "bos", "ks3", "s3", "youpai", "http", "cos", "azure")
TYPES = (*UPSTREAM_TYPES, "sftp", "minio", "obs", "ufile", "aoss")
MIN_INCREMENTAL_INTERVAL = 900
DEFAULT_SERVICE_ADDRESS = "127.0.0.1:8567"
_YEAR_3000 = 32503680000  # a bigger "unix seconds" value is almost surely milliseconds

# COS v4 short region names, as upstream templates write them (srcDomain=sh)
COS_REGIONS = {"sh": "ap-shanghai", "gz": "ap-guangzhou", "tj": "ap-beijing-1", "bj": "ap-beijing",
               "cd": "ap-chengdu", "cq": "ap-chongqing", "hk": "ap-hongkong", "sgp": "ap-singapore"}

_DOMAIN = (r"(?:(?:https?|sftp)://)?(?:[^\s@/:]+@)?"
           r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9_.\-]*)(?::\d{1,5})?/?")
_DOMAIN_HINT = ("use host[:port], optionally after http:// or https://, without bucket or path "
                "(sftp: user@host[:port]; put the password in the SecretKey key)")
_BUCKET_HINT = "use the bucket name alone: letters, digits, '.', '_', '-', no '/' or endpoint"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WIN_DRIVE = re.compile(r"^[A-Za-z]:[/\\]")
_WIN_EATEN = re.compile(r"^[A-Za-z]:[^/\\]")  # D:\work read as Java escapes -> D:work
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)b?", re.IGNORECASE)


class ConfigError(UsageError):
    """A config file or value we cannot use. One line; never holds a secret."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


class UnsupportedSource(ConfigError):
    """Well-formed, but names a store we cannot read (a qiniu download domain).
    Loading only warns; `JobConfig.locations()` raises it."""


@dataclass(frozen=True, slots=True)
class _Key:
    kind: str  # text secret bool int float size choice path
    lo: float | None = None
    hi: float | None = None
    clamp: bool = False  # out of range: use the bound and warn (upstream tolerates these)
    choices: tuple[str, ...] = ()
    pattern: str = ""  # text: a non-empty value must match fully
    hint: str = ""  # what is allowed, for messages
    name: str = ""  # the key in files, when it is not a Python name
    aliases: tuple[str, ...] = ()


_TIME = _Key("int", 0, _YEAR_3000, hint="use unix seconds (not milliseconds), 0 = off")
_DOM = _Key("text", pattern=_DOMAIN, hint=_DOMAIN_HINT)
_BUCKET = _Key("text", pattern=r"[A-Za-z0-9][A-Za-z0-9._\-]{0,254}", hint=_BUCKET_HINT)

# Every job key, in upstream template order (dump_job writes this order).
_JOB_KEYS: dict[str, _Key] = {
    "jobName": _Key("text", pattern=r"[A-Za-z0-9_\-]{4,128}", hint="use 4-128 letters, digits, '_' or '-'"),
    "jobType": _Key("choice", choices=("import", "audit")),
    "isIncremental": _Key("bool"),
    "incrementalModeInterval": _Key("int", 0, 10**9, hint="use seconds, at least 900"),
    "importSince": _TIME,
    "lastModify": _TIME,
    "srcType": _Key("choice", choices=TYPES),
    "srcAccessKey": _Key("secret"),
    "srcSecretKey": _Key("secret"),
    "srcDomain": _DOM,
    "srcBucket": _BUCKET,
    "srcPrefix": _Key("text"),
    "destType": _Key("choice", choices=TYPES),
    "destAccessKey": _Key("secret"),
    "destSecretKey": _Key("secret"),
    "destDomain": _DOM,
    "destBucket": _BUCKET,
    "destPrefix": _Key("text"),
    "appId": _Key("int", 0, None, hint="use the COS APPID (digits), 0 = none"),
    "isDownloadFromCdn": _Key("bool"),
    "cdnDomain": _DOM,
    "httpListFilePath": _Key("text"),
    "httpPrefixColumn": _Key("int", 1, 100),
    "relativePathColumn": _Key("int", 1, 100),
    "isSkipExistFile": _Key("bool"),
    "taskObjectCountLimit": _Key("int", 1, 50000, clamp=True),
    "taskObjectSizeLimit": _Key("size", 1),
    "scanThreadCount": _Key("int", 1, 32, clamp=True),
    "maxMultiThreadScanDepth": _Key("int", 1, 16, clamp=True),
    "uploadThreadNumPerLargeFile": _Key("int", 1, 100),
    "multipartUploadThreshold": _Key("size", MiB, None, clamp=True),
    "multipartUploadPartSize": _Key("size", 100 * KiB, 5 * GiB, clamp=True),
    "isServerSideEncryption": _Key("bool"),
    "isAllowSymbolicLink": _Key("bool"),
    "getObjectMetaMode": _Key("choice", choices=("stat", "head")),
    "isAuditAfterImport": _Key("bool"),
    "auditMode": _Key("choice", choices=("simple", "general", "detailed")),
}
# The Express Connect build of ossimport (compat et/job.cfg): accepted, never used.
_IGNORED_JOB_KEYS = frozenset({"isUseExpressTunnel", "expressTunnelProxyHost", "expressTunnelProxyType",
                               "expressTunnelProxyUser", "expressTunnelProxyDest", "expressTunnelAuthToken"})

_SYS_KEYS: dict[str, _Key] = {
    "workingDir": _Key("path"),
    "workerUserName": _Key("text", aliases=("workerUser",)),
    "workerPassword": _Key("secret"),
    "privateKeyFile": _Key("path"),
    "sshPort": _Key("int", 1, 65535),
    "workerTaskThreadNum": _Key("int", 1, 1000),
    "workerMaxThroughput": _Key("int", 0, None, hint="use KB/s as a whole number, 0 = unlimited",
                                name="workerMaxThroughput(KB/s)", aliases=("workerMaxThroughput",)),
    "dispatcherThreadNum": _Key("int", 1, 1000),
    "workerAbortWhenUncatchedException": _Key("bool"),
    "workerRecordMd5": _Key("bool"),
    "javaHeapMaxSize": _Key("text"),
    "masterAddress": _Key("text", pattern=r"tcp://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):\d{1,5}",
                          hint="use tcp://HOST:PORT, e.g. tcp://127.0.0.1:13830"),
    "workerCount": _Key("int", 0, 1024, hint="use 0 (one per CPU) to 1024"),
    "leaseSeconds": _Key("int", 5, 86400),
    "heartbeatSeconds": _Key("float", 0.05, 3600),
    "allowShortIncrementalInterval": _Key("bool"),
    "curveKeysDir": _Key("path"),
    "serviceAddress": _Key("text", pattern=r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):\d{1,5}",
                           hint="use HOST:PORT, e.g. 127.0.0.1:8567"),
    "serviceAccessKeyId": _Key("text"),
    "serviceAccessKeySecret": _Key("secret"),
    "serviceSubTaskExpireSeconds": _Key("int", 0, 10 * 366 * 86400, hint="use whole seconds, 0 = never"),
}


# every key as written in files (the HTTP API and tests enumerate them)
JOB_KEYS = tuple(spec.name or attr for attr, spec in _JOB_KEYS.items())
SYS_KEYS = tuple(spec.name or attr for attr, spec in _SYS_KEYS.items())


# ---- Java .properties -----------------------------------------------------------------------------
def read_properties(text: str, source: str = "<text>") -> dict[str, str]:
    """Parse Java .properties text; the last of duplicate keys wins. Values are not trimmed."""
    return {key: value for key, value, _ in _parse_properties(text, source)}


def _parse_properties(text: str, source: str) -> list[tuple[str, str, int]]:
    """(key, value, line number) per entry, following java.util.Properties.load."""
    text = text.removeprefix("\ufeff")
    entries: list[tuple[str, str, int]] = []
    buf: str | None = None  # a logical line being continued
    start = 0
    for no, raw in enumerate(re.split(r"\r\n|\r|\n", text), 1):
        line = raw.lstrip(" \t\f")  # also drops the indentation of continued lines
        if buf is None:
            if not line or line[0] in "#!":
                continue  # comments are never continued
            start = no
        if (len(line) - len(line.rstrip("\\"))) % 2:  # an odd count: the last one escapes the newline
            buf = (buf or "") + line[:-1]
            continue
        entries.append(_split_entry((buf or "") + line, source, start))
        buf = None
    if buf is not None:
        entries.append(_split_entry(buf, source, start))
    return entries


def _split_entry(line: str, source: str, no: int) -> tuple[str, str, int]:
    i, n = 0, len(line)
    while i < n and line[i] not in "=: \t\f":
        i += 2 if line[i] == "\\" else 1
    i = min(i, n)
    j, has_sep = i, False
    if j < n and line[j] in "=:":
        j, has_sep = j + 1, True
    while j < n:  # whitespace, and one '=' or ':' when the key ended at whitespace
        if line[j] in " \t\f" or (not has_sep and line[j] in "=:"):
            has_sep = has_sep or line[j] in "=:"
            j += 1
        else:
            break
    return _unescape(line[:i], source, no), _unescape(line[j:], source, no), no


def _unescape(s: str, source: str, no: int) -> str:
    if "\\" not in s:
        return s
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        c = s[i + 1] if i + 1 < len(s) else ""
        if c == "u":
            digits = s[i + 2 : i + 6]
            if not re.fullmatch(r"[0-9A-Fa-f]{4}", digits):
                raise ConfigError(f"{source}:{no}: malformed \\uXXXX escape; write four hex digits")
            out.append(chr(int(digits, 16)))
            i += 6
        else:
            out.append({"t": "\t", "n": "\n", "r": "\r", "f": "\f"}.get(c, c))
            i += 2
    # \uD83D\uDE00 pairs arrive as two surrogates: join them into one character
    return "".join(out).encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _escape(s: str, key: bool) -> str:
    out = []
    for i, c in enumerate(s):
        if c == "\\":
            out.append("\\\\")
        elif c in "\t\n\r\f":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}[c])
        elif (key and c in "=: #!") or (c == " " and i == 0):
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


# ---- values --------------------------------------------------------------------------------------
def _mask(text: str) -> str:
    return re.sub(r"([^\s/@:]+):[^\s@/]*@", r"\1:***@", text)  # user:password@host


def _fmt_size(n: float) -> str:
    for unit, mult in (("g", GiB), ("m", MiB), ("k", KiB)):
        if n >= mult and n % mult == 0:
            return f"{int(n // mult)}{unit}"
    return str(int(n))


def _allowed(spec: _Key) -> str:
    if spec.hint:
        return spec.hint
    if spec.kind == "bool":
        return "use true or false"
    if spec.kind == "choice":
        *head, last = spec.choices
        if len(spec.choices) > 3:
            return f"use one of: {', '.join(spec.choices)}"
        return f"use {', '.join(head)} or {last}"
    fmt = _fmt_size if spec.kind == "size" else (lambda v: f"{v:g}")
    unit = {"size": "bytes or a size like 150m or 1g", "int": "a whole number"}.get(spec.kind, "a number")
    if spec.hi is None:
        return f"use {unit}, at least {fmt(spec.lo)}"
    return f"use {unit} from {fmt(spec.lo)} to {fmt(spec.hi)}"


def _convert(source: str, key: str, spec: _Key, raw: str) -> tuple[Any, str | None]:
    """(value, warning or None) for one trimmed, non-empty raw value."""
    shown = "'***'" if spec.kind == "secret" else repr(_mask(raw))

    def bad(allowed: str) -> ConfigError:
        return ConfigError(f"{source}: {key}={shown} is not allowed; {allowed}")

    if _CONTROL.search(raw):
        raise bad("remove the control character (a tab, newline, NUL...)")
    if spec.kind == "bool":
        if raw.lower() not in ("true", "false"):  # Java would read any typo as false
            raise bad(_allowed(spec))
        return raw.lower() == "true", None
    if spec.kind == "choice":
        if raw.lower() not in spec.choices:
            raise bad(_allowed(spec))
        return raw.lower(), None
    if spec.kind in ("text", "secret", "path"):
        if spec.pattern and raw and not re.fullmatch(spec.pattern, raw):
            raise bad(_allowed(spec))
        return raw, None
    value: float
    if spec.kind == "int" and re.fullmatch(r"\+?\d+", raw):
        value = int(raw)
    elif spec.kind == "size" and (m := _SIZE.fullmatch(raw)):
        value = int(float(m[1]) * {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}[m[2].lower()])
    elif spec.kind == "float" and re.fullmatch(r"\+?\d+(\.\d*)?|\.\d+", raw):
        value = float(raw)
    else:
        raise bad(_allowed(spec))
    lo = spec.lo if spec.lo is not None else -math.inf
    hi = spec.hi if spec.hi is not None else math.inf
    if lo <= value <= hi:
        return value, None
    if not spec.clamp:
        raise bad(_allowed(spec))
    clamped = type(value)(min(max(value, lo), hi))
    fmt = _fmt_size if spec.kind == "size" else (lambda v: f"{v:g}")
    bounds = f"{fmt(lo)}-{fmt(hi)}" if spec.hi is not None else f">= {fmt(lo)}"
    return clamped, f"{source}: {key}={raw!r} is out of range {bounds}; using {fmt(clamped)}"


def _text(source: str, key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):  # YAML native booleans
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value).strip()
    raise ConfigError(f"{source}: {key} must be a single value, not a {type(value).__name__}")


def _parse_keys(table: dict[str, _Key], mapping: Mapping[Any, Any], source: str, warnings: list[str],
                ignored: frozenset[str], other: dict[str, _Key], other_file: str) -> dict[str, Any]:
    names = {n: attr for attr, spec in table.items() for n in (spec.name or attr, *spec.aliases)}
    values: dict[str, Any] = {}
    for key_any, raw_any in mapping.items():
        key = str(key_any).strip()
        if key in names:
            spec = table[names[key]]
            raw = _text(source, key, raw_any)
            if not raw and spec.kind not in ("text", "secret"):
                continue  # an empty typed value means "the default", as in the upstream templates
            values[names[key]], warning = _convert(source, key, spec, raw)
            if warning:
                warnings.append(warning)
        elif key in ignored:
            continue
        elif key in other or any(key in (s.name, *s.aliases) for s in other.values()):
            warnings.append(f"{source}: {key} belongs in {other_file}; ignored here")
        else:
            lower = {n.lower(): n for n in names}
            close = [lower[key.lower()]] if key.lower() in lower else difflib.get_close_matches(
                key, names, 1, 0.75)
            hint = f"; did you mean {close[0]}?" if close else ""
            warnings.append(f"{source}: unknown key {key!r} is ignored{hint}")
    return values


# ---- files ---------------------------------------------------------------------------------------
def _decode(data: bytes) -> str:
    for encoding in ("utf-8-sig", "gb18030"):  # gb18030: comments saved by Chinese Windows editors
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


def _read_mapping(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """The file's key/value pairs, plus warnings about keys set twice with different values."""
    p = Path(path)
    try:
        text = _decode(p.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "syntax error"  # never the text: it may hold a secret
            raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
        if not isinstance(doc, dict | None):
            raise ConfigError(f"{p}: a YAML config must be a flat mapping of key: value")
        return dict(doc or {}), []
    seen: dict[str, tuple[str, int]] = {}
    warnings = []
    for key, value, no in _parse_properties(text, str(p)):
        if key in seen and seen[key][0] != value:
            first = seen[key][1]
            warnings.append(f"{p}:{no}: {key} is set again (first on line {first}); the last value wins")
        seen[key] = (value, no)
    return {k: v for k, (v, _) in seen.items()}, warnings


def _base_dir(path: str | os.PathLike[str]) -> Path:
    parent = Path(path).resolve().parent
    return parent.parent if parent.name == "conf" else parent


def load_job(path: str | os.PathLike[str], *, allow_short_interval: bool = False) -> JobConfig:
    """Load a job config (.cfg/.properties, or .yaml/.yml). `allow_short_interval` comes from
    SysConfig.allowShortIncrementalInterval."""
    mapping, warnings = _read_mapping(path)
    cfg = JobConfig.from_mapping(mapping, str(path), base_dir=_base_dir(path),
                                 allow_short_interval=allow_short_interval)
    cfg.warnings[:0] = warnings
    return cfg


def load_sys(path: str | os.PathLike[str]) -> SysConfig:
    """Load sys.properties (or .yaml/.yml)."""
    mapping, warnings = _read_mapping(path)
    cfg = SysConfig.from_mapping(mapping, str(path), base_dir=_base_dir(path))
    cfg.warnings[:0] = warnings
    return cfg


# ---- the job -------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class JobConfig:
    """One job. Build it with `load_job` or `from_mapping` (they validate); secrets stay out of repr."""

    jobName: str = "local_test"
    jobType: str = "import"
    isIncremental: bool = False
    incrementalModeInterval: int = 86400
    importSince: int = 0
    lastModify: int = 0
    srcType: str = ""
    srcAccessKey: str = field(default="", repr=False)
    srcSecretKey: str = field(default="", repr=False)
    srcDomain: str = ""
    srcBucket: str = ""
    srcPrefix: str = ""
    destType: str = "oss"
    destAccessKey: str = field(default="", repr=False)
    destSecretKey: str = field(default="", repr=False)
    destDomain: str = ""
    destBucket: str = ""
    destPrefix: str = ""
    appId: int = 0  # COS APPID: the S3 API names the bucket "<bucket>-<appId>"
    # qiniu: bodies downloaded from cdnDomain, listed through the S3 API at srcDomain
    isDownloadFromCdn: bool = False
    cdnDomain: str = ""
    httpListFilePath: str = ""
    httpPrefixColumn: int = 1
    relativePathColumn: int = 2
    isSkipExistFile: bool = False
    taskObjectCountLimit: int = 10000
    taskObjectSizeLimit: int = 1_000_000_000
    scanThreadCount: int = 1
    maxMultiThreadScanDepth: int = 1
    uploadThreadNumPerLargeFile: int = 3
    multipartUploadThreshold: int = 150 * MiB
    multipartUploadPartSize: int = 50 * MiB
    isServerSideEncryption: bool = False  # accepted, unused (warned when true)
    isAllowSymbolicLink: bool = False
    getObjectMetaMode: str = "stat"  # qiniu SDK detail: accepted, unused
    isAuditAfterImport: bool = True
    auditMode: str = "general"
    # where it came from: not part of the job's identity
    source: str = field(default="<mapping>", compare=False)
    base_dir: Path = field(default_factory=Path.cwd, compare=False)
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def from_mapping(cls, mapping: Mapping[Any, Any], source: str = "<mapping>", *,
                     base_dir: str | os.PathLike[str] | None = None,
                     allow_short_interval: bool = False) -> JobConfig:
        warnings: list[str] = []
        values = _parse_keys(_JOB_KEYS, mapping, source, warnings, _IGNORED_JOB_KEYS, _SYS_KEYS,
                             "sys.properties")
        base = Path(base_dir) if base_dir else Path.cwd()
        cfg = cls(**values, source=source, base_dir=base, warnings=warnings)
        if _text(source, "isUseExpressTunnel", mapping.get("isUseExpressTunnel")).lower() == "true":
            warnings.append(f"{source}: isUseExpressTunnel=true is not supported; data goes by the direct route")
        cfg._check(allow_short_interval)
        return cfg

    def _check(self, allow_short_interval: bool) -> None:
        src = self.source
        if not self.jobName:
            raise ConfigError(f"{src}: jobName='' is not allowed; {_allowed(_JOB_KEYS['jobName'])}")
        if not self.srcType:
            raise ConfigError(f"{src}: srcType is missing; {_allowed(_JOB_KEYS['srcType'])}")
        if self.incrementalModeInterval < MIN_INCREMENTAL_INTERVAL and not allow_short_interval:
            if self.isIncremental:
                self.warnings.append(f"{src}: incrementalModeInterval={self.incrementalModeInterval} is below the "
                                     f"minimum {MIN_INCREMENTAL_INTERVAL}; using {MIN_INCREMENTAL_INTERVAL}")
            self.incrementalModeInterval = MIN_INCREMENTAL_INTERVAL
        elif self.incrementalModeInterval < 1:
            raise ConfigError(f"{src}: incrementalModeInterval=0 is not allowed; use seconds, at least 1")
        if self.srcType == "http" and self.httpPrefixColumn == self.relativePathColumn:
            raise ConfigError(f"{src}: relativePathColumn={self.relativePathColumn} is not allowed; "
                              "it must differ from httpPrefixColumn")
        if self.isServerSideEncryption:
            self.warnings.append(f"{src}: isServerSideEncryption=true is not supported; objects are stored "
                                 "unencrypted unless the bucket encrypts by default")
        if self.isDownloadFromCdn and self.srcType not in ("qiniu", "youpai"):
            self.warnings.append(f"{src}: isDownloadFromCdn=true applies to srcType=qiniu only; "
                                 f"srcType={self.srcType} is read through its own API")
        for side in ("src", "dest"):
            self._check_side(side)

    def _check_side(self, side: str) -> None:
        src, kind = self.source, getattr(self, f"{side}Type")

        def need(key: str, what: str) -> None:
            if not getattr(self, key):
                raise ConfigError(f"{src}: {key} is missing; {side}Type={kind} needs {what}")

        if side == "dest" and kind in ("http", "youpai"):
            raise ConfigError(f"{src}: destType={kind!r} is not allowed ({kind} is read-only, a source only); a "
                              f"destination must be one of: {', '.join(t for t in TYPES if t not in ('http', 'youpai'))}")
        if kind in ("local", "sftp"):
            need(f"{side}Prefix", "the directory to copy " + ("from" if side == "src" else "to"))
        if kind == "sftp":
            need(f"{side}Domain", "the server as user@host[:port]")
        elif kind == "http":
            need("httpListFilePath", "the list file of 'URL-prefix relative-key' lines")
        elif kind == "youpai":
            need(f"{side}Bucket", "the UpYun service (bucket) name")
            need(f"{side}AccessKey", "the operator name")
            need(f"{side}SecretKey", "the operator's password")
            if self.isDownloadFromCdn:
                self.warnings.append(f"{src}: isDownloadFromCdn=true is ignored for youpai; files are read "
                                     "through the UpYun REST API")
        elif kind != "local":
            need(f"{side}Bucket", "the container name" if kind == "azure" else "the bucket name")
            if kind == "azure":
                need(f"{side}AccessKey", "the storage account name")
            elif kind != "s3":  # only AWS (and Azure: core.windows.net) has a usable default endpoint
                need(f"{side}Domain", "the endpoint" + (", e.g. ap-shanghai or sh" if kind == "cos" else ""))
        prefix = getattr(self, f"{side}Prefix")
        if kind == "local" and os.name != "nt" and _WIN_DRIVE.match(prefix):
            self.warnings.append(f"{src}: {side}Prefix={prefix!r} is a Windows path; it will not exist here")
        if kind == "local" and _WIN_EATEN.match(prefix):
            self.warnings.append(f"{src}: {side}Prefix={prefix!r} looks like a Windows path whose '\\' were "
                                 "read as escapes; write '/' (D:/work/data/) or double each '\\'")
        try:
            self._location(side)
        except UnsupportedSource as exc:
            self.warnings.append(f"{exc} (loaded, but the job cannot run)")

    # ---- where to copy ----------------------------------------------------------------------------
    def locations(self) -> tuple[Location, Location]:
        """(source, destination) as directory Locations. Raises ConfigError/UnsupportedSource."""
        return self._location("src"), self._location("dest")

    def _local_path(self, text: str, directory: bool = True) -> str:
        path = os.path.expanduser(text)
        if not _WIN_DRIVE.match(path):
            path = os.path.normpath(os.path.join(self.base_dir, path))  # also folds '//' upstream rejects
        return path + "/" if directory and not path.endswith("/") else path

    def _location(self, side: str) -> Location:
        src, kind = self.source, getattr(self, f"{side}Type")
        domain, bucket = getattr(self, f"{side}Domain"), getattr(self, f"{side}Bucket")
        prefix = getattr(self, f"{side}Prefix")
        ak, sk = getattr(self, f"{side}AccessKey"), getattr(self, f"{side}SecretKey")
        if kind == "local":
            return Location(backend="local", flavour="local", path=self._local_path(prefix), is_dir=True)
        if kind == "http":
            return Location(backend="http", flavour="http", is_dir=True,
                            path=self._local_path(self.httpListFilePath, directory=False))
        https, user, host = _split_domain(domain)
        if kind == "sftp":
            m = re.fullmatch(r"(\[[^\]]+\]|[^:]+)(?::(\d+))?", host)
            port = int(m[2]) if m and m[2] else None
            if not m or (port is not None and not 0 < port < 65536):
                raise ConfigError(f"{src}: {side}Domain={_mask(domain)!r} is not allowed; use user@host[:port]")
            if user and ak and user != ak:
                raise ConfigError(f"{src}: {side}Domain names a user and {side}AccessKey another; "
                                  "give the user once")
            path = prefix if prefix.endswith("/") else prefix + "/"
            return Location(backend="sftp", flavour="sftp", host=m[1].strip("[]"), port=port, user=user or ak,
                            password=sk, path=path, is_dir=True)
        backend, flavour = SCHEMES[kind]
        if kind == "cos":
            region = COS_REGIONS.get(host.lower(), host)
            host = f"cos.{region}.myqcloud.com" if re.fullmatch(r"[a-z]{2}-[a-z0-9-]+", region) else host
            if self.appId and not bucket.endswith(f"-{self.appId}"):
                bucket = f"{bucket}-{self.appId}"
        elif kind == "azure" and host.lower().startswith(f"{ak.lower()}.blob."):
            host = host[len(ak) + len(".blob."):]  # the blob endpoint, written whole: its suffix
        elif kind == "bos" and (m := re.fullmatch(r"([a-z0-9]+)\.bcebos\.com(:\d+)?", host)):
            host = f"s3.{m[1]}.bcebos.com{m[2] or ''}"  # the native BOS endpoint -> its S3 endpoint
        elif kind == "qiniu" and not (re.match(r"s3[-.]", host) or is_ip_or_localhost(host)):
            fix = (f"write cdnDomain={_mask(domain)} with isDownloadFromCdn=true (bodies are downloaded there) and "
                   if side == "src" else "")
            raise UnsupportedSource(
                f"{src}: {side}Domain={_mask(domain)!r} is a qiniu download domain; qiniu is listed through its S3 "
                f"API: {fix}write the region's S3 endpoint, e.g. {side}Domain=s3-cn-east-1.qiniucs.com")
        named = {b.lower() for b in (getattr(self, f"{side}Bucket"), bucket) if b}
        if flavour != "minio" and "." in host and host.split(".", 1)[0].lower() in named:
            raise ConfigError(f"{src}: {side}Domain={_mask(domain)!r} is not allowed; write the endpoint "
                              f"without the bucket: {host.split('.', 1)[1]}")
        if host:
            try:
                check_endpoint(host, f"{kind}://{host}")
            except UsageError:
                raise ConfigError(f"{src}: {side}Domain={_mask(domain)!r} is not allowed; write "
                                  "[http[s]://]HOST[:PORT] with a port in 1-65535") from None
        prefix = prefix.lstrip("/")
        return Location(backend=backend, flavour=flavour, bucket=bucket, endpoint=host, download=self._download(side),
                        prefix=prefix + "/" if prefix and not prefix.endswith("/") else prefix,
                        is_dir=True, https=https,
                        path_style=flavour == "minio" or (bool(host) and is_ip_or_localhost(host)),
                        access_key=ak, secret_key=sk)

    def _download(self, side: str) -> str:
        """A qiniu source's download domain (isDownloadFromCdn + cdnDomain), '' when not used."""
        if side != "src" or self.srcType != "qiniu" or not self.isDownloadFromCdn:
            return ""
        if not self.cdnDomain:
            raise ConfigError(f"{self.source}: cdnDomain is missing; isDownloadFromCdn=true needs the bucket's "
                              "download domain, e.g. cdnDomain=http://cdn.example.com")
        url = self.cdnDomain if "://" in self.cdnDomain else f"http://{self.cdnDomain}"  # upstream: host + key
        try:
            return check_download_domain(url, f"{self.source}: cdnDomain")
        except UsageError as exc:
            raise ConfigError(str(exc)) from None

    def storage_options(self, sys: SysConfig) -> tuple[StorageOptions, StorageOptions]:
        """(source, destination) options: symlinks, connection pool and list-file columns."""
        pool = max(10, sys.workerTaskThreadNum * 2)  # part uploads run beside whole-file copies
        src = StorageOptions(https=bool(_split_domain(self.srcDomain)[0]), max_pool=pool,
                             threads=sys.workerTaskThreadNum,
                             follow_symlinks=self.isAllowSymbolicLink, http_prefix_column=self.httpPrefixColumn,
                             http_key_column=self.relativePathColumn)
        dst = StorageOptions(https=bool(_split_domain(self.destDomain)[0]), max_pool=pool)
        return src, dst


def _split_domain(domain: str) -> tuple[bool | None, str, str]:
    """'https://user@host:port/' -> (https?, user, 'host:port'); https is None without a scheme."""
    scheme, sep, rest = domain.partition("://")
    https = {"https": True, "http": False}.get(scheme.lower()) if sep else None
    if not sep:
        rest = domain
    user, _, host = rest.rstrip("/").rpartition("@")
    return https, user, host


def dump_job(cfg: JobConfig) -> str:
    """The job as properties text, for freezing at submit. Local paths are written absolute so
    the copy loads the same wherever it lives. Contains secrets: write it with mode 0600."""
    lines = ["# ossimport job config, frozen at submit; holds secrets (keep it mode 0600)"]
    for attr, spec in _JOB_KEYS.items():
        value = getattr(cfg, attr)
        side = attr[: -len("Prefix")] if attr.endswith("Prefix") else ""
        if side and value and getattr(cfg, f"{side}Type") == "local":
            value = cfg._local_path(value)
        elif attr == "httpListFilePath" and value:
            value = cfg._local_path(value, directory=False)
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        lines.append(f"{_escape(spec.name or attr, True)}={_escape(text, False)}")
    return "\n".join(lines) + "\n"


# ---- the system ----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class SysConfig:
    """sys.properties. workingDir defaults to `<base dir>/run` (the package root's run/ for
    conf/sys.properties); curveKeysDir to `<workingDir>/keys`. Relative paths use the base dir."""

    workingDir: Path = field(default_factory=lambda: Path.cwd() / "run")
    workerUserName: str = ""  # SSH user for `deploy` (upstream docs also say workerUser)
    workerPassword: str = field(default="", repr=False)
    privateKeyFile: Path | None = None
    sshPort: int = 22
    workerTaskThreadNum: int = 20
    workerMaxThroughput: int = 0  # KB/s per worker, 0 = unlimited; key workerMaxThroughput(KB/s)
    dispatcherThreadNum: int = 5  # accepted; our tracker needs no thread pool
    workerAbortWhenUncatchedException: bool = False
    workerRecordMd5: bool = False
    javaHeapMaxSize: str = ""  # accepted, ignored: there is no JVM
    masterAddress: str = "tcp://127.0.0.1:13830"
    workerCount: int = 0  # local workers `start` launches; 0 = os.cpu_count()
    leaseSeconds: int = 60
    heartbeatSeconds: float = 5.0
    allowShortIncrementalInterval: bool = False  # tests: incrementalModeInterval below 900
    curveKeysDir: Path | None = None  # set by __post_init__
    # `ossimport serve` (HTTP API and web UI); empty: `console start` starts no service and
    # `serve` listens on DEFAULT_SERVICE_ADDRESS
    serviceAddress: str = ""
    serviceAccessKeyId: str = ""  # the service's own credentials: when set, every request is signed
    serviceAccessKeySecret: str = field(default="", repr=False)
    # a dataflow subtask still waiting (CREATED) this long after its creation becomes EXPIRED
    serviceSubTaskExpireSeconds: int = 86400
    source: str = field(default="<mapping>", compare=False)
    base_dir: Path = field(default_factory=Path.cwd, compare=False)
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.curveKeysDir is None:
            self.curveKeysDir = self.workingDir / "keys"

    @classmethod
    def from_mapping(cls, mapping: Mapping[Any, Any], source: str = "<mapping>", *,
                     base_dir: str | os.PathLike[str] | None = None) -> SysConfig:
        warnings: list[str] = []
        values = _parse_keys(_SYS_KEYS, mapping, source, warnings, frozenset(), _JOB_KEYS, "the job config")
        base = Path(base_dir) if base_dir else Path.cwd()
        for attr in ("workingDir", "privateKeyFile", "curveKeysDir"):
            if attr in values:
                values[attr] = base / os.path.expanduser(values[attr])  # an absolute path replaces base
        values.setdefault("workingDir", base / "run")
        cfg = cls(**values, source=source, base_dir=base, warnings=warnings)
        lease, beat = cfg.leaseSeconds, cfg.heartbeatSeconds
        if beat >= lease / 2:
            raise ConfigError(f"{source}: heartbeatSeconds='{beat:g}' is not allowed; use less than "
                              f"leaseSeconds/2 = {lease / 2:g}")
        port = int(cfg.masterAddress.rpartition(":")[2])
        if not 0 < port < 65536:
            raise ConfigError(f"{source}: masterAddress={cfg.masterAddress!r} is not allowed; "
                              "the port must be 1-65535")
        return cfg

    def resolved_worker_count(self) -> int:
        return self.workerCount or os.cpu_count() or 1
