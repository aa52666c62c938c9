"""Azure on the wire: every range a GET brings is checked against the MD5 the service sent for it,
whatever path reads it (a whole blob, the parallel ranges of a large one), and every Put Blob is
checked by the service against the MD5 sent with it; against Azurite behind a proxy that damages
answers and requests (tests/servers/faultproxy.py)."""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from backends import azure as azurite
from helpers import run_cli
from jobenv import free_port
from servers.faultproxy import Fault, FaultProxy, Headers

from ossimport.address import parse_address
from ossimport.errors import StorageError
from ossimport.storage import open_storage

MiB = 1024 * 1024


class Damage:
    """Flips the first body byte of the next `left` GETs of a blob whose path matches `name`
    (the service's Content-MD5 stays: what a bit flip on the way looks like)."""

    def __init__(self, name: str) -> None:
        self.name, self.left, self.done = name, 0, 0

    def response(self, method: str, path: str, headers: Headers, body: bytes) -> tuple[Headers, bytes]:
        if method == "GET" and path.endswith("/" + self.name) and body and self.left:
            self.left -= 1
            self.done += 1
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        return headers, body


class DamagePuts:
    """Flips the first byte of the next `left` Put Blob bodies (Content-MD5 as the client sent it)."""

    def __init__(self) -> None:
        self.left, self.done = 0, 0

    def request(self, method: str, query: str, body: bytes) -> bytes:
        if method == "PUT" and "comp=" not in query and body and self.left:
            self.left -= 1
            self.done += 1
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        return body


@pytest.fixture
def azure(backend_factory: Any) -> Any:
    return backend_factory("azure")


@pytest.fixture
def damaged(azure: Any) -> Iterator[tuple[Any, FaultProxy, Damage]]:
    damage = Damage("big.bin")
    proxy = FaultProxy("127.0.0.1", azure.handle.port, shape_response=damage.response).start()
    try:
        yield azure, proxy, damage
    finally:
        proxy.stop()


def _address(azure: Any, root: str, port: int) -> str:
    return f"azure://{azurite.ACCOUNT}:{quote(azurite.KEY, safe='')}@{azure.handle.container}.127.0.0.1:{port}/{root}/"


def test_a_damaged_range_is_refused_by_every_read(damaged: tuple[Any, FaultProxy, Damage]) -> None:
    azure, proxy, damage = damaged
    root = azure.new_root()
    data = random.Random(7).randbytes(9 * MiB)  # three GETs: 4 + 4 + 1 MiB
    azure.seed(root, {"big.bin": data})
    st = open_storage(parse_address(_address(azure, root, proxy.port)))
    try:
        for start, end in ((0, None), (5 * MiB, 9 * MiB), (MiB, 2 * MiB)):
            damage.left = 1
            with pytest.raises(StorageError) as err, st.open("big.bin", start, end) as f:
                f.read()
            assert err.value.code == "CHECKSUM_NOT_MATCH" and err.value.retryable, (start, end)
            with st.open("big.bin", start, end) as f:  # undamaged: the same range reads whole
                assert f.read() == data[start:end]
        assert damage.done == 3
    finally:
        st.close()


@pytest.mark.parametrize("threshold", ["64m", "4m"])  # one stream; parallel ranges written at offsets
def test_a_download_damaged_once_is_read_again_and_one_damaged_always_fails(
        damaged: tuple[Any, FaultProxy, Damage], tmp_path: Path, threshold: str) -> None:
    azure, proxy, damage = damaged
    root = azure.new_root()
    data = random.Random(8).randbytes(9 * MiB)
    azure.seed(root, {"big.bin": data, "small.txt": b"small"})
    addr = _address(azure, root, proxy.port)
    opts = ("--multipart-threshold", threshold, "--part-size", "4m")
    damage.left = 1
    ok = run_cli(*opts, "cp", addr, f"{tmp_path / 'once'}/", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "once" / "big.bin").read_bytes() == data and damage.done == 1
    damage.left = 1000
    bad = run_cli(*opts, "cp", addr, f"{tmp_path / 'always'}/", timeout=120)
    assert bad.returncode == 1 and "CHECKSUM_NOT_MATCH" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert sorted(p.name for p in (tmp_path / "always").rglob("*")) == ["small.txt"], "no damaged file is left"


def test_a_put_damaged_on_the_way_is_refused(azure: Any, tmp_path: Path) -> None:
    # Azure answers 400 Md5Mismatch (retried as CHECKSUM_NOT_MATCH), Azurite 400 InvalidOperation
    damage = DamagePuts()
    proxy = FaultProxy("127.0.0.1", azure.handle.port, shape_request=damage.request).start()
    try:
        root = azure.new_root()
        data = random.Random(9).randbytes(100_000)
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "f.bin").write_bytes(data)
        damage.left = 1000
        bad = run_cli("cp", f"{tmp_path / 'src'}/", _address(azure, root, proxy.port), timeout=120)
        assert bad.returncode == 1 and "FAILED f.bin" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert damage.done >= 1 and list(azure.storage(root).list()) == [], "no damaged blob was stored"
        damage.left = 0
        ok = run_cli("cp", f"{tmp_path / 'src'}/", _address(azure, root, proxy.port), timeout=120)
        assert ok.returncode == 0, ok.stderr
        with azure.storage(root).open("f.bin") as f:
            assert f.read() == data
    finally:
        proxy.stop()


def test_a_listing_of_many_pages_lists_every_blob_once_in_order(azure: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from ossimport.storage import azure as azure_storage

    monkeypatch.setattr(azure_storage, "LIST_PAGE", 3)  # 3 pages and a bit for 10 blobs
    root = azure.new_root()
    files = {f"d{i % 3}/f{i}.txt": str(i).encode() for i in range(10)}
    azure.seed(root, files)
    st = azure.storage(root)
    entries = list(st.list())
    assert [e.key for e in entries] == sorted(files)
    assert {e.key: (e.size, e.checksums) for e in entries} == {
        k: (len(v), {"md5": hashlib.md5(v).hexdigest()}) for k, v in files.items()}
    assert [e.key for e in st.list(start_after="d1/f4.txt")] == [k for k in sorted(files) if k > "d1/f4.txt"]


@pytest.mark.parametrize("kind", ["reset_mid", "truncate"])
def test_a_download_broken_off_mid_body_is_read_again(damaged: tuple[Any, FaultProxy, Damage], tmp_path: Path,
                                                      kind: str) -> None:
    azure, proxy, _ = damaged
    root = azure.new_root()
    data = random.Random(10).randbytes(9 * MiB)
    azure.seed(root, {"big.bin": data})
    proxy.add(Fault(kind, count=2, method="GET", path=r"/big\.bin$"))
    for threshold in ("64m", "4m"):  # one stream; parallel ranges
        out = tmp_path / threshold
        ok = run_cli("--multipart-threshold", threshold, "--part-size", "4m", "cp", _address(azure, root, proxy.port),
                     f"{out}/", timeout=120)
        assert ok.returncode == 0, ok.stderr
        assert (out / "big.bin").read_bytes() == data
    assert proxy.injected[kind] == 2


def test_requests_go_through_the_proxy_the_environment_names(azure: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # the proxy settings are read once per storage (not by requests at every request): still read
    root = azure.new_root()
    azure.seed(root, {"a.txt": b"through the proxy"})
    proxy = FaultProxy("127.0.0.1", azure.handle.port).start()  # forwards whatever it is sent to Azurite
    try:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        st = open_storage(parse_address(_address(azure, root, free_port())))  # nothing listens there
        try:
            assert [e.key for e in st.list()] == ["a.txt"]
            with st.open("a.txt") as f:
                assert f.read() == b"through the proxy"
            st.put("b.txt", io.BytesIO(b"b"), 1)
        finally:
            st.close()
        assert {r.method for r in proxy.records} == {"GET", "PUT"}
    finally:
        proxy.stop()
