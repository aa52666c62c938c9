"""A pipe that a ZeroMQ poll can watch beside its socket, so that another thread ends the poll at
once (a result is ready, a message waits to be sent) instead of at the poll's timeout."""

from __future__ import annotations

import os


class Wakeup:
    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def fileno(self) -> int:
        return self._r

    def set(self) -> None:
        try:
            os.write(self._w, b"x")
        except OSError:
            pass  # the pipe is full (the poll will return anyway) or closed (we are stopping)

    def clear(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
