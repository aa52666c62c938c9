"""Sorting a stream of listed records by the UTF-8 bytes of their keys in bounded memory.

Every `Storage.list()` yields keys in byte order, but some sources are read in an order of their
own (an HTTP URL list file; an UpYun, local or SFTP directory) and may hold millions of names.
`sorted_records` is an external merge sort: runs of at most `run_size` records are sorted in memory and spilled
to temporary files, then merged lazily (heapq.merge), so memory holds one run while reading and a
few hundred records per open run while merging. A stream that fits in one run never touches the
disk, and the order is stable: records with equal keys come out in the order they went in.

The temporary files are anonymous (tempfile.TemporaryFile: unlinked as soon as they are created
on POSIX, deleted on close on Windows), so there is nothing for a killed process to leave behind
and nothing to sweep; closing the generator (fully read, closed early, or failed) closes them.
They hold the records only (keys, sizes, times; for a URL list its URLs, exactly as the list
file has them), never a storage's credentials, and no other user can open them (mode 0600, no name).
"""

from __future__ import annotations

import heapq
import marshal
import struct
import tempfile
from collections.abc import Generator, Iterable, Iterator
from typing import IO, Any

from ossimport.errors import StorageError
from ossimport.storage.base import Entry

RUN_SIZE = 100_000  # records sorted in memory at a time (tests make it small)
FAN_IN = 64  # runs merged at once: bounds open files (fan-in runs of a level merge into one)
TEMP_PREFIX = "ossimport-sort-"
_FRAME = struct.Struct("<I")  # the length of one marshalled chunk of records

# A record is a tuple whose first item is the key (str); the rest are marshal-able values.
Record = tuple[Any, ...]


def _order(record: Record) -> bytes:
    # surrogateescape: a name that is not valid UTF-8 sorts by its raw bytes, as in local.py
    return record[0].encode("utf-8", "surrogateescape")


def sorted_records(records: Iterable[Record], *, run_size: int | None = None,
                   directory: str | None = None) -> Generator[Record, None, None]:
    """`records` sorted by the UTF-8 bytes of their keys (record[0]), stably. At most
    `run_size` (default RUN_SIZE) records are held to sort at once; longer streams spill sorted
    runs to temporary files in `directory` (default: the system's temp dir, TMPDIR).
    The input is read whole before the first record comes out."""
    size = max(1, run_size or RUN_SIZE)
    chunk = max(1, min(1024, size // FAN_IN))  # records per frame: what an open run holds when merging
    runs: list[tuple[int, IO[bytes]]] = []  # (level, file), levels non-increasing: oldest runs first
    try:
        batch: list[Record] = []
        for record in records:
            if len(batch) >= size:  # a full run and more to come (a stream of one run stays in memory)
                batch.sort(key=_order)
                _add_run(runs, _spill(batch, chunk, directory), chunk, directory)
                batch = []
            batch.append(record)
        batch.sort(key=_order)
        if not runs:
            yield from batch
            return
        if batch:
            _add_run(runs, _spill(batch, chunk, directory), chunk, directory)
        del batch
        yield from heapq.merge(*(_read(f) for _, f in runs), key=_order)
    finally:
        for _, f in runs:
            f.close()


def _add_run(runs: list[tuple[int, IO[bytes]]], f: IO[bytes], chunk: int, directory: str | None) -> None:
    """Append a level-0 run; whenever FAN_IN runs of one level are the newest, merge them into one
    run of the next level (a binary-counter cascade: each record is rewritten log_FAN_IN(runs)
    times, and at most (FAN_IN - 1) runs per level stay open). Merging the newest runs, in order,
    keeps the sort stable."""
    level = 0
    runs.append((level, f))
    while len(runs) >= FAN_IN and runs[-FAN_IN][0] == level:
        group = runs[-FAN_IN:]
        merged = _spill(heapq.merge(*(_read(g) for _, g in group), key=_order), chunk, directory)
        del runs[-FAN_IN:]
        for _, g in group:
            g.close()
        level += 1
        runs.append((level, merged))


def _spill(records: Iterable[Record], chunk: int, directory: str | None) -> IO[bytes]:
    """A new anonymous temporary file holding `records` (already in order) in frames of `chunk`."""
    try:
        f = tempfile.TemporaryFile(prefix=TEMP_PREFIX, dir=directory)  # noqa: SIM115 (the caller closes it)
    except OSError as e:
        raise _temp_error(directory, e) from e
    try:
        frame: list[Record] = []
        for record in records:
            frame.append(record)
            if len(frame) >= chunk:
                _write_frame(f, frame)
                frame = []
        if frame:
            _write_frame(f, frame)
        f.flush()
    except OSError as e:
        f.close()
        raise _temp_error(directory, e) from e
    except BaseException:
        f.close()
        raise
    return f


def _write_frame(f: IO[bytes], frame: list[Record]) -> None:
    blob = marshal.dumps(frame)
    f.write(_FRAME.pack(len(blob)))
    f.write(blob)


def _read(f: IO[bytes]) -> Iterator[Record]:
    """The records of a run, one frame in memory at a time."""
    f.seek(0)
    while header := f.read(_FRAME.size):
        yield from marshal.loads(f.read(_FRAME.unpack(header)[0]))


def _temp_error(directory: str | None, e: OSError) -> StorageError:
    where = directory or tempfile.gettempdir()
    return StorageError(f"sorting a listing: cannot write a temporary file in {where}: {e.strerror or e}; "
                        "free space there or point TMPDIR at a larger disk", code="TempFileError")


def entry_record(e: Entry) -> Record:
    """An Entry as a record for `sorted_records` (`record_entry` makes it an Entry again)."""
    return (e.key, e.size, e.mtime, e.etag, e.checksums, e.mode, e.link_target)


def record_entry(r: Record) -> Entry:
    return Entry(*r)


def sorted_entries(entries: Iterable[Entry], *, run_size: int | None = None,
                   directory: str | None = None) -> Iterator[Entry]:
    """`entries` sorted by the UTF-8 bytes of their keys, stably, in bounded memory."""
    records = sorted_records(map(entry_record, entries), run_size=run_size, directory=directory)
    try:
        for r in records:
            yield record_entry(r)
    finally:
        records.close()  # its temporary files, when our consumer stops early
