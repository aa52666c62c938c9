"""The service's records: dataflows, their tasks and subtasks, ClientToken answers, recent
signature nonces and web UI sessions (auth.Sessions), in SQLite (WAL) at
`<workingDir>/service/service.db`.

The file holds the dataflows' object-store addresses with their credentials, so it is created
mode 0600 like a frozen job.cfg. Every state change is one statement (SQLite makes it atomic), so
a kill -9 between two requests leaves a consistent database; what a kill leaves RUNNING is
settled on the next start (`subtasks.Executor.recover`).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS dataflows (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, fs_id TEXT NOT NULL,
    fs_path TEXT NOT NULL, source_storage TEXT NOT NULL, source_display TEXT NOT NULL,
    source_storage_path TEXT NOT NULL, description TEXT NOT NULL DEFAULT '', status TEXT NOT NULL,
    throughput INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '',
    create_time TEXT NOT NULL, update_time TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, dataflow_id TEXT NOT NULL,
    action TEXT NOT NULL, data_type TEXT NOT NULL, directory TEXT NOT NULL, dst_directory TEXT NOT NULL,
    conflict_policy TEXT NOT NULL, status TEXT NOT NULL, error TEXT NOT NULL DEFAULT '',
    create_time TEXT NOT NULL, start_time TEXT NOT NULL DEFAULT '', end_time TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS subtasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, dataflow_id TEXT NOT NULL,
    task_id TEXT NOT NULL, src_path TEXT NOT NULL, dst_path TEXT NOT NULL,
    cond_mtime INTEGER, cond_size INTEGER, status TEXT NOT NULL, progress INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '', create_time TEXT NOT NULL, start_time TEXT NOT NULL DEFAULT '',
    end_time TEXT NOT NULL DEFAULT '', bytes_total INTEGER NOT NULL DEFAULT 0,
    bytes_done INTEGER NOT NULL DEFAULT 0, actual_bytes INTEGER NOT NULL DEFAULT 0,
    average_speed INTEGER NOT NULL DEFAULT 0, file_mtime INTEGER, file_size INTEGER,
    checksum TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS subtasks_by_task ON subtasks (task_id, status);
CREATE INDEX IF NOT EXISTS subtasks_by_status ON subtasks (status);
CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY, csrf TEXT NOT NULL, binding TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    action TEXT NOT NULL, token TEXT NOT NULL, fingerprint TEXT NOT NULL, response TEXT NOT NULL,
    PRIMARY KEY (action, token));
"""


class Database:
    """One connection shared by the request threads, serialised by a lock (writes are tiny)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last commit only
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def execute(self, sql: str, args: Iterable[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        with self._lock:
            return self._conn.execute(sql, tuple(args)).rowcount

    def one(self, sql: str, args: Iterable[Any] = ()) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute(sql, tuple(args)).fetchone()
        return dict(row) if row is not None else None

    def all(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(sql, tuple(args)).fetchall()]

    def insert(self, table: str, values: dict[str, Any]) -> None:
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", values.values())

    def update(self, table: str, id_: str, values: dict[str, Any], where: str = "", args: Iterable[Any] = ()) -> int:
        """Set `values` on the row `id_` (and `where`, e.g. a status guard); rows changed."""
        sets = ", ".join(f"{k} = ?" for k in values)
        extra = f" AND ({where})" if where else ""
        return self.execute(f"UPDATE {table} SET {sets} WHERE id = ?{extra}", [*values.values(), id_, *args])

    def page(self, table: str, where: list[str], args: list[Any], max_results: int,
             next_token: str) -> tuple[list[dict[str, Any]], str]:
        """One page in creation order; NextToken is the position after the last row ('' at the end)."""
        conds = list(where)
        params = list(args)
        if next_token:
            conds.append("seq > ?")
            params.append(int(next_token))
        sql = f"SELECT * FROM {table}"
        if conds:
            sql += " WHERE " + " AND ".join(f"({c})" for c in conds)
        sql += " ORDER BY seq LIMIT ?"
        rows = self.all(sql, [*params, max_results + 1])
        if len(rows) > max_results:
            return rows[:max_results], str(rows[max_results - 1]["seq"])
        return rows, ""
