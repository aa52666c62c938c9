"""Logging set-up with a redaction filter: a secret registered here never reaches any log line,
whichever library logs it (ours, botocore, paramiko)."""

from __future__ import annotations

import logging
import sys
import threading

_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(*values: str) -> None:
    """Hide `values` (access keys, secret keys, tokens, passwords) from every log record."""
    with _lock:
        _secrets.update(v for v in values if v and len(v) >= 3)


def redact(text: str) -> str:
    for s in sorted(_secrets, key=len, reverse=True):
        if s in text:
            text = text.replace(s, "***")
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            record.msg = redact(record.getMessage())
            record.args = None
        return True


def setup(verbosity: int) -> None:
    """verbosity: -1 quiet (errors only), 0 normal (warnings), 1 -v (per-file lines, debug)."""
    level = logging.ERROR if verbosity < 0 else logging.INFO if verbosity == 1 else (
        logging.DEBUG if verbosity > 1 else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("ossimport").setLevel(level)
    # libraries stay quiet even with -v: their debug output carries signed headers
    for name in ("botocore", "boto3", "urllib3", "s3transfer", "paramiko", "oss2"):
        logging.getLogger(name).setLevel(logging.WARNING)
