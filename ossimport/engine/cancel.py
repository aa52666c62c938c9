"""One cancel token per run: a stop (Ctrl-C, a job's lease lost) is one flag that planning,
copying and deleting each check before they start anything new, and that every wait of the
run (the bandwidth limit, a retry's back-off) wakes up for."""

from __future__ import annotations

import threading

from ossimport.errors import OssimportError


class Cancelled(OssimportError):
    """The run was stopped: raised out of a wait or a read so that the copy in hand is abandoned
    (its temporary file or multipart upload cleaned up on the way out), never counted as failed."""

    code = "Cancelled"


class CancelToken:
    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("the run was stopped")

    def sleep(self, seconds: float) -> None:
        """time.sleep that a cancel cuts short (raising Cancelled)."""
        if self._event.wait(seconds):
            raise Cancelled("the run was stopped")
