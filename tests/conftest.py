"""Shared fixtures.

Backends under test are discovered from `tests/backends/*.py`. Each such module defines:

    NAME: str                                   e.g. "s3-moto"; the pytest id
    def start(tmp: pathlib.Path) -> object      start its real server(s) once per session; return a
                                                handle. Call backends.unavailable("reason") if it
                                                cannot run (a skip; a failure under CI=true).
    def stop(handle) -> None                    stop everything start() started
    def address(handle, root: str) -> str       the CLI address of an empty directory named `root`
                                                (unique per test), ending with '/'
    def env(handle) -> dict[str, str]           extra environment for the CLI (may be {})
    READ_ONLY: bool = False  (optional)         a source-only backend (http)
    def seed(handle, root, files) -> None       (optional) put {key: bytes} under root, for
                                                read-only backends or faster seeding

`backend` is parametrized over all of them; `backend_name` filters with -k as usual.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import backends as _backends_pkg  # noqa: E402

from ossimport.address import parse_address  # noqa: E402
from ossimport.storage import Storage, StorageOptions, open_storage  # noqa: E402

# the moto server logs every request at INFO: keep failures readable
logging.getLogger("werkzeug").setLevel(logging.ERROR)

BACKEND_MODULES = {
    mod.NAME: mod
    for mod in (
        importlib.import_module(f"backends.{info.name}")
        for info in pkgutil.iter_modules(_backends_pkg.__path__)
        if not info.name.startswith("_")
    )
}


class Backend:
    """One backend under test, bound to a running server."""

    def __init__(self, module: Any, handle: Any) -> None:
        self.module = module
        self.handle = handle
        self.name: str = module.NAME
        self.read_only: bool = getattr(module, "READ_ONLY", False)
        self._opened: list[Storage] = []

    def new_root(self) -> str:
        return f"t{uuid.uuid4().hex[:10]}"

    def address(self, root: str) -> str:
        return self.module.address(self.handle, root)

    def env(self) -> dict[str, str]:
        return dict(self.module.env(self.handle))

    def storage(self, root: str) -> Storage:
        old = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            st = open_storage(parse_address(self.address(root)), StorageOptions())
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self._opened.append(st)
        return st

    def seed(self, root: str, files: dict[str, bytes]) -> None:
        if hasattr(self.module, "seed"):
            self.module.seed(self.handle, root, files)
            return
        import io

        st = self.storage(root)
        for key, data in files.items():
            st.put(key, io.BytesIO(data), len(data))

    def close(self) -> None:
        for st in self._opened:
            st.close()
        self._opened.clear()


_handles: dict[str, Any] = {}


@pytest.fixture(scope="session")
def backend_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield _handles
    for name, handle in list(_handles.items()):
        BACKEND_MODULES[name].stop(handle)
    _handles.clear()


def get_backend(name: str, servers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Backend:
    module = BACKEND_MODULES[name]
    if name not in servers:
        servers[name] = module.start(tmp_path_factory.mktemp(name.replace("-", "_")))
    return Backend(module, servers[name])


@pytest.fixture(params=sorted(BACKEND_MODULES))
def backend(request: pytest.FixtureRequest, backend_servers: dict[str, Any],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    b = get_backend(request.param, backend_servers, tmp_path_factory)
    yield b
    b.close()


@pytest.fixture
def backend_factory(backend_servers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """backend_factory("s3-moto") -> Backend, for tests that need a particular pair of backends."""
    made: list[Backend] = []

    def make(name: str) -> Backend:
        if name not in BACKEND_MODULES:
            pytest.skip(f"backend {name} is not available in this checkout")
        b = get_backend(name, backend_servers, tmp_path_factory)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def envs() -> Iterator[list[Any]]:
    """Job systems (tests/jobenv.py JobEnv) a test started: each is stopped afterwards."""
    made: list[Any] = []
    yield made
    for env in made:
        env.stop()
