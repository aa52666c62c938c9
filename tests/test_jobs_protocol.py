"""The master/worker wire format: one JSON frame per message, versioned; a JobSpec (credentials
included) survives the trip unchanged; anything else is a ProtocolError, never a crash."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zmq

from ossimport.address import Location, parse_address
from ossimport.errors import OssimportError
from ossimport.jobs.execute import JobSpec
from ossimport.jobs.master import Master
from ossimport.jobs.protocol import VERSION, ProtocolError, pack, unpack
from ossimport.jobs.security import CurveClientKeys, ensure_keys
from ossimport.jobs.store import WorkDir
from ossimport.storage.base import StorageOptions


def test_pack_unpack_round_trip() -> None:
    body: dict[str, Any] = {"job": "j1", "task": "t-0001", "manifest": "héllo\twörld\n\x00 ünicode/键",
                            "progress": {"t-0001": [3, 4096]}, "ok": True, "errors": [], "wait": 1.5}
    frame = pack("task", **body)
    assert isinstance(frame, bytes)
    assert unpack(frame) == {"v": VERSION, "type": "task", **body}


@pytest.mark.parametrize("msg", [
    {"v": VERSION + 1, "type": "want"},
    {"v": VERSION - 1, "type": "want"},
    {"v": str(VERSION), "type": "want"},
    {"type": "want"},
    {"v": VERSION},
    [VERSION, "want"],
    "want",
    None,
])
def test_other_versions_and_shapes_are_refused(msg: Any) -> None:
    with pytest.raises(ProtocolError, match="another protocol version"):
        unpack(json.dumps(msg).encode())


@pytest.mark.parametrize("frame", [
    b"", b"garbage", b"{", b'{"v": 1, "type": "want"', b"\xff\xfe\x00garbage", b"\x00\x00\x00\x01",
    b"\xc3\x28", b"{'v': 1}",
])
def test_garbage_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="undecodable") as info:
        unpack(frame)
    assert isinstance(info.value, OssimportError)


def test_deeply_nested_garbage_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        unpack(b"[" * 100_000)


def _spec() -> JobSpec:
    src = parse_address("s3://AKIDEXAMPLE:s3cr%2Ft%40key:tok%3Aen@bucket.127.0.0.1:9000/pre/fix/")
    dst = parse_address("deployer:pa%40ss@sftp.example.com:2222:/data/dest/")
    assert src.secret_key == "s3cr/t@key" and src.token == "tok:en" and dst.password == "pa@ss"
    return JobSpec(
        job="job-ü",
        src=replace(src, https=True),
        dst=dst,
        src_options=StorageOptions(https=True, connect_timeout=3.5, read_timeout=7.0, anonymous=False, max_pool=33,
                                   follow_symlinks=True, keep_perms=False, http_prefix_column=2,
                                   http_key_column=3),
        dst_options=StorageOptions(max_pool=4),
        job_type="audit",
        skip_existing=True,
        audit_mode="detailed",
        audit_after_import=False,
        last_modify=1_700_000_000,
        threads=7,
        max_throughput_kbps=512,
        multipart_threshold=10 * 1024 * 1024,
        part_size=5 * 1024 * 1024,
        part_threads=2,
    )


def test_jobspec_round_trip_keeps_locations_and_secrets() -> None:
    spec = _spec()
    # the way it travels: inside a task message, through JSON
    msg = unpack(pack("task", job=spec.job, task="t", manifest="", spec=spec.to_dict()))
    back = JobSpec.from_dict(msg["spec"])
    assert back == spec
    assert isinstance(back.src, Location) and isinstance(back.dst, Location)
    assert (back.src.access_key, back.src.secret_key, back.src.token) == ("AKIDEXAMPLE", "s3cr/t@key", "tok:en")
    assert back.dst.password == "pa@ss"
    assert (back.src.endpoint, back.src.bucket, back.src.prefix, back.src.https) == \
        ("127.0.0.1:9000", "bucket", "pre/fix/", True)
    assert (back.dst.host, back.dst.port, back.dst.user, back.dst.path) == \
        ("sftp.example.com", 2222, "deployer", "/data/dest/")
    # every field of every Location, secrets included
    for name in Location.__dataclass_fields__:
        assert getattr(back.src, name) == getattr(spec.src, name), name
        assert getattr(back.dst, name) == getattr(spec.dst, name), name


def test_jobspec_round_trip_drops_the_skipped_links_record() -> None:
    spec = _spec()
    spec.src_options.skipped_links.append("a/link")  # a run's record, not a setting: not sent
    back = JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back.src_options.skipped_links == []
    assert replace(back.src_options, skipped_links=["a/link"]) == spec.src_options


# ---- a real master must survive what a protocol error is ---------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def master(tmp_path: Path) -> Iterator[tuple[Master, threading.Thread, str]]:
    address = f"tcp://127.0.0.1:{_free_port()}"
    ensure_keys(tmp_path / "work" / "keys")
    m = Master(WorkDir(tmp_path / "work"), address, lambda path: None, stat_interval=3600,
               curve_keys=tmp_path / "work" / "keys")
    t = threading.Thread(target=m.run, name="test-master", daemon=True)
    t.start()
    yield m, t, address
    m.stop_event.set()
    t.join(10)
    assert not t.is_alive(), "the master did not stop"


def _ask_idle(master: Master, address: str, thread: threading.Thread, frames: list[bytes]) -> dict[str, Any] | None:
    """Send `frames`, then `want`; the answer to `want` (None if none came in 5 s or the master died).
    Connects with the worker keys: the master hears no one else."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    assert master.curve_keys is not None
    CurveClientKeys(master.curve_keys).apply(sock)
    sock.connect(address)
    try:
        for frame in frames:
            sock.send(frame)
        sock.send(pack("want", worker="probe"))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and thread.is_alive():
            if sock.poll(100):
                return unpack(sock.recv())
        return None
    finally:
        sock.close()


def test_master_ignores_garbage_frames(master: tuple[Master, threading.Thread, str]) -> None:
    m, thread, address = master
    answer = _ask_idle(m, address, thread, [b"garbage", b"{", json.dumps({"v": VERSION + 1, "type": "want"}).encode()])
    assert answer is not None and answer["type"] == "idle"
    assert thread.is_alive()


@pytest.mark.parametrize("frame", [b"[" * 100_000, pack("result")], ids=["deep-nesting", "result-without-task"])
def test_master_survives_malformed_messages(master: tuple[Master, threading.Thread, str], frame: bytes) -> None:
    m, thread, address = master
    answer = _ask_idle(m, address, thread, [frame])
    assert answer is not None and answer["type"] == "idle"
    assert thread.is_alive()
