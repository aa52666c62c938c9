"""Error types shared by every layer.

Each error carries a short machine code (the codes users know from ossimport audit logs and
from S3/OSS error responses) and says whether retrying can help. Front ends turn them into one
line for the user; nothing here ever holds a secret in its message.
"""

from __future__ import annotations

import errno
import socket


class OssimportError(Exception):
    """Base of every error we raise on purpose. `exit_code` is what the CLI returns."""

    exit_code = 1
    code = "Error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


# Codes after which every other request to the same store fails the same way (wrong keys, no such
# bucket, an untrusted server): once one file fails with one of them, the rest of the run is
# failed without a request each, so a wrong secret gives one line instead of one per file.
# Transient trouble (connection refused, 5xx, timeouts) is not here: a days-long job rides it out.
FATAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "InvalidBucketName",
    "NoCredentials", "MissingCredentials", "AuthenticationFailed", "AuthorizationFailure", "HostKeyMismatch",
    "UnknownHostKey", "SSLError",
})
# Codes of a store that could not be reached at all (no connection was made). Retried like any
# transport failure; but when nothing in a run has reached the store yet, they mean a mistyped or
# dead endpoint, and the engine treats them as FATAL_CODES (one FAILED line, the rest not tried).
UNREACHABLE_CODES = frozenset({"UnknownHost", "ConnectionRefused", "ConnectTimeout", "HostUnreachable"})


TRANSPORT_REASONS = {
    "UnknownHost": "unknown host",
    "ConnectionRefused": "connection refused",
    "ConnectTimeout": "no connection within the connect timeout",
    "HostUnreachable": "no route to the host",
    "ReadTimeout": "no answer within the timeout",
    "ConnectionError": "the connection broke",
}


def transport_code(exc: BaseException) -> str:
    """The code of a failure to talk to a store, from the OS error at its root (whichever
    library wrapped it: azure-core keeps it in inner_exception): UnknownHost, ConnectionRefused, ConnectTimeout, HostUnreachable,
    ReadTimeout, or ConnectionError for the rest (a reset, an answer that broke off)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 20:
        e = todo.pop()
        if e in seen:
            continue
        seen.append(e)
        kwargs = getattr(e, "kwargs", None)  # botocore's errors keep the cause in kwargs["error"]
        for nxt in (e.__cause__, e.__context__, getattr(e, "reason", None),
                    kwargs.get("error") if isinstance(kwargs, dict) else None,
                    getattr(e, "exception", None), getattr(e, "inner_exception", None), *e.args):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    names = {type(e).__name__ for e in seen}
    if any(isinstance(e, socket.gaierror) for e in seen) or "NameResolutionError" in names:
        return "UnknownHost"
    if any(isinstance(e, ConnectionRefusedError) for e in seen):
        return "ConnectionRefused"
    if any(isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH) for e in seen):
        return "HostUnreachable"
    if names & {"ConnectTimeout", "ConnectTimeoutError"}:
        return "ConnectTimeout"
    if any(isinstance(e, TimeoutError) for e in seen) or names & {"ReadTimeout", "ReadTimeoutError", "Timeout"}:
        return "ReadTimeout"
    return "ConnectionError"


class UsageError(OssimportError):
    """The user's input is wrong (address, option, config): fix it and run again."""

    exit_code = 2
    code = "InvalidArgument"


class StorageError(OssimportError):
    """A storage operation failed. `retryable` is true for throttling, 5xx and broken connections."""

    def __init__(self, message: str, *, code: str = "StorageError", retryable: bool = False) -> None:
        super().__init__(message, code=code)
        self.retryable = retryable


class NotFound(StorageError):
    """The key (or bucket) does not exist."""

    def __init__(self, message: str, *, code: str = "NoSuchKey") -> None:
        super().__init__(message, code=code, retryable=False)


class UnsafeKey(StorageError):
    """A key that would escape the destination root, or cannot be a file name."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="InvalidObjectName", retryable=False)


class SourceChanged(StorageError):
    """The source changed while we copied it; the copy is not recorded as done."""

    def __init__(self, message: str, *, code: str = "SIZE_NOT_MATCH") -> None:
        super().__init__(message, code=code, retryable=False)


class VerifyFailed(StorageError):
    """What arrived differs from what was sent."""

    def __init__(self, message: str, *, code: str = "CHECKSUM_NOT_MATCH") -> None:
        super().__init__(message, code=code, retryable=True)
