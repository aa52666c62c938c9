"""`ossimport verify SRC DST` (like `rclone check`): missing, differing and extra keys."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from helpers import run_cli, run_json, tree, write_tree
from servers.faultproxy import FaultProxy


def _differences(src: Path, dst: Path) -> dict[str, bytes]:
    files = tree()
    write_tree(src, files)
    changed = dict(files)
    del changed["top.txt"]  # missing at the destination
    changed["a/b/sibling.txt"] = b"short"  # size differs
    same_size = bytearray(files["many/f003.txt"])
    same_size[0] ^= 0xFF
    changed["many/f003.txt"] = bytes(same_size)  # same size, other content
    changed["only/at/destination"] = b"extra"
    write_tree(dst, changed)
    for key in ("many/f003.txt",):  # same mtime too: only a checksum can tell
        st = os.stat(src / key)
        os.utime(dst / key, (st.st_atime, st.st_mtime))
    return files


def test_identical_trees_exit_zero(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, tree())
    run_json("cp", f"{src}/", f"{dst}/")
    out = run_json("--checksum", "verify", f"{src}/", f"{dst}/")
    assert (out["identical"], out["missing"], out["differ"], out["extra"]) == (len(tree()), 0, 0, 0)


def test_reports_missing_differing_and_extra(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = _differences(src, dst)
    lists = {k: tmp_path / f"{k}.txt" for k in ("missing", "differ", "extra")}
    out = run_json("verify", *[f"--{k}={p}" for k, p in lists.items()], f"{src}/", f"{dst}/", ok=False)
    assert (out["missing"], out["differ"], out["extra"]) == (1, 1, 1)
    assert out["identical"] == len(files) - 2
    out = run_json("--checksum", "verify", *[f"--{k}={p}" for k, p in lists.items()], f"{src}/", f"{dst}/",
                   ok=False)
    assert (out["missing"], out["differ"], out["extra"]) == (1, 2, 1)
    assert lists["missing"].read_text().split("\n")[:-1] == ["top.txt"]
    assert sorted(lists["differ"].read_text().splitlines()) == ["a/b/sibling.txt", "many/f003.txt"]
    assert lists["extra"].read_text().splitlines() == ["only/at/destination"]


def test_text_output_and_exit_code(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _differences(src, dst)
    proc = run_cli("verify", f"{src}/", f"{dst}/")
    assert proc.returncode == 1
    assert "1 missing at destination, 1 differ, 1 extra at destination" in proc.stdout
    assert "MISSING top.txt" in proc.stderr and "DIFFER a/b/sibling.txt" in proc.stderr
    assert "EXTRA only/at/destination" in proc.stderr.splitlines()  # named without -v, like rclone check


def test_one_way_ignores_extras(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, tree())
    run_json("cp", f"{src}/", f"{dst}/")
    (dst / "only-here.txt").write_bytes(b"extra")
    proc = run_cli("verify", "--one-way", f"{src}/", f"{dst}/")
    assert proc.returncode == 0, proc.stderr
    assert "only-here.txt" not in proc.stderr
    out = run_json("verify", "--one-way", f"{src}/", f"{dst}/")
    assert (out["identical"], out["extra"]) == (len(tree()), 0)
    (src / "top.txt").unlink()
    (dst / "many/f001.txt").unlink()
    proc = run_cli("verify", "--one-way", f"{src}/", f"{dst}/")  # missing files still count
    assert proc.returncode == 1 and "MISSING many/f001.txt" in proc.stderr and "top.txt" not in proc.stderr


def test_checksum_verify_reads_no_object_whose_etag_is_its_md5(tmp_path: Path, backend_factory) -> None:  # type: ignore[no-untyped-def]
    """Local files are hashed; the objects' MD5s are compared without a GET: single PUTs by their
    ETag, the multipart object by the md5chksum it was uploaded with (its ETag is no MD5)."""
    b = backend_factory("s3-moto")
    root = b.new_root()
    src = tmp_path / "src"
    files = tree(big=6 * 1024 * 1024)
    write_tree(src, files)
    run_json("--multipart-threshold", "5m", "--part-size", "5m", "cp", f"{src}/", b.address(root))
    with FaultProxy("127.0.0.1", b.handle.port) as proxy:
        addr = re.sub(r"(@[^/@]+\.127\.0\.0\.1:)\d+/", rf"\g<1>{proxy.port}/", b.address(root), count=1)
        out = run_json("--checksum", "verify", f"{src}/", addr)
        reads = sorted(r.path.rpartition(f"/{root}/")[2] for r in proxy.records if r.method == "GET" and
                       f"/{root}/" in r.path)
    assert (out["identical"], out["differ"]) == (len(files), 0)
    assert reads == []


@pytest.mark.parametrize("store", ["s3-moto", "oss"])
def test_checksum_verify_against_object_stores(tmp_path: Path, backend_factory, store: str) -> None:  # type: ignore[no-untyped-def]
    b = backend_factory(store)
    root = b.new_root()
    src = tmp_path / "src"
    files = tree(big=6 * 1024 * 1024)
    write_tree(src, files)
    addr = b.address(root)
    run_json("--multipart-threshold", "5m", "--part-size", "5m", "cp", f"{src}/", addr)
    out = run_json("--checksum", "verify", f"{src}/", addr)
    assert (out["identical"], out["differ"]) == (len(files), 0)
    (src / "a/b/sibling.txt").write_bytes(b"X" * len(files["a/b/sibling.txt"]))  # same size
    out = run_json("--checksum", "verify", f"{src}/", addr, ok=False)
    assert out["differ"] == 1
