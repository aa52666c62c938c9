"""Azure Blob end to end: addresses, what a user sees when Azure says no, and a job from the
upstream blob template, against Azurite (tests/backends/azure.py). The storage contract itself is
tests/test_conformance.py; cp/sync between backends tests/test_cli_copy.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
from backends import azure as azurite
from helpers import digests, md5s, run_cli, tree, write_tree
from jobenv import JobEnv, free_port
from test_jobs import run_upstream_template

from ossimport.address import parse_address
from ossimport.errors import NotFound
from ossimport.storage import open_storage

COMPAT_BLOB = Path(__file__).resolve().parents[2] / "shared" / "compat" / "ossimport-conf" / "blob" / "job.cfg"
WRONG_KEY = base64.b64encode(b"not the account key, 64 bytes long like a real one......").decode()


# ---- addresses ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("address", "url", "prefix"), [
    ("azure://acct:a2V5%2F==@box/", "https://acct.blob.core.windows.net", ""),
    ("azure://acct:a2V5@box.core.chinacloudapi.cn/docs/", "https://acct.blob.core.chinacloudapi.cn", "docs/"),
    ("azure://devstoreaccount1:a2V5@box.127.0.0.1:10000/p/", "http://127.0.0.1:10000/devstoreaccount1", "p/"),
    ("azure://devstoreaccount1:a2V5@box.localhost:10000/", "http://localhost:10000/devstoreaccount1", ""),
])
def test_address_names_account_container_endpoint(address: str, url: str, prefix: str) -> None:
    loc = parse_address(address)
    assert (loc.backend, loc.bucket, loc.prefix) == ("azure", "box", prefix)
    with open_storage(loc) as st:  # no request is made until the first operation
        assert st.url == url  # type: ignore[attr-defined]
    assert loc.secret_key.startswith("a2V5") and loc.secret_key not in repr(loc) + loc.display()
    assert loc.display().startswith(f"azure://{loc.access_key}:***@box")


def test_one_container_name_in_two_accounts_is_two_places() -> None:
    a = parse_address("azure://one:a2V5@box/p/")
    b = parse_address("azure://two:a2V5@box/p/")
    assert a.place() != b.place() and a.place() == parse_address("azure://one:eHl6@box/p").place()


# ---- listing order ----------------------------------------------------------------------------------------
# Azure sorts names by UTF-16 code units: characters beyond U+FFFF (emoji, CJK extension B) come
# before U+E000-U+FFFF (fullwidth forms such as '（') there, after them in UTF-8 byte order
ORDER_NAMES = ["a（x", "a😀x", "a\ue000", "a😀/b（", "a😀/b😀", "a😀/b😀/c", "a𠀀", "a~", "z", "😀", "（",
               "dir/😀/x", "dir/（/y", "dir/~", "dir/😀😀", "dir/😀（"]


def test_listing_is_in_byte_order_whatever_the_service_sorts_by(azure: Any) -> None:
    root = azure.new_root()
    azure.seed(root, {name: name.encode() for name in ORDER_NAMES})
    st = azure.storage(root)
    expected = sorted(ORDER_NAMES, key=lambda k: k.encode())
    assert [e.key for e in st.list()] == expected
    assert [e.key for e in st.list(prefix="dir/")] == [k for k in expected if k.startswith("dir/")]
    assert [e.key for e in st.list(start_after="a😀/b😀")] == [k for k in expected if k.encode() > "a😀/b😀".encode()]


def test_hierarchical_namespace_directories_are_not_files(azure: Any) -> None:
    """An ADLS Gen2 account lists each directory as an empty blob named like it, with metadata
    hdi_isfolder=true: listed as a file, "dir" beside "dir/x" would fail every copy to a disk."""
    root = azure.new_root()
    azure.seed(root, {"dir/x": b"x", "dir/sub/y": b"y", "empty-file": b""})
    with azure.module.container_client(azure.handle) as container:
        for name in ("dir", "dir/sub"):
            container.upload_blob(f"{root}/{name}", b"", metadata={"hdi_isfolder": "true"})
    assert [e.key for e in azure.storage(root).list()] == ["dir/sub/y", "dir/x", "empty-file"]


# ---- credentials from the environment ---------------------------------------------------------------------
@pytest.mark.parametrize("how", ["connection string", "account and key"])
def test_credentials_from_the_environment(tmp_path: Path, azure: Any, how: str) -> None:
    h, root = azure.handle, azure.new_root()
    if how == "connection string":
        env = {"AZURE_STORAGE_CONNECTION_STRING": (
            f"DefaultEndpointsProtocol=http;AccountName={azurite.ACCOUNT};AccountKey={azurite.KEY};"
            f"BlobEndpoint=http://{h.endpoint}/{azurite.ACCOUNT};")}
        addr = f"azure://{h.container}/{root}/"
    else:
        env = {"AZURE_STORAGE_ACCOUNT": azurite.ACCOUNT, "AZURE_STORAGE_KEY": azurite.KEY}
        addr = f"azure://{h.container}.{h.endpoint}/{root}/"
    files = tree(big=9 * 1024 * 1024)  # the big one streams as blocks
    write_tree(tmp_path / "src", files)
    up = run_cli("--json", "cp", f"{tmp_path / 'src'}/", addr, env=env)
    check = run_cli("--json", "verify", "--checksum", f"{tmp_path / 'src'}/", addr, env=env)
    for proc in (up, check):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert azurite.KEY not in proc.stdout + proc.stderr
    assert json.loads(up.stdout.strip().splitlines()[-1])["copied"] == len(files)
    assert digests(azure.storage(root)) == md5s(files)


def test_sas_token_in_the_address(tmp_path: Path, azure: Any) -> None:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    h, root = azure.handle, azure.new_root()
    sas = generate_container_sas(azurite.ACCOUNT, h.container, account_key=azurite.KEY,
                                 permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True),
                                 expiry=datetime.now(UTC) + timedelta(hours=1))
    signature = dict(part.split("=", 1) for part in sas.split("&"))["sig"]
    addr = f"azure://{azurite.ACCOUNT}@{h.container}.{h.endpoint}/{root}/?{sas}"
    files = tree()
    write_tree(tmp_path / "src", files)
    up = run_cli("--json", "-v", "sync", f"{tmp_path / 'src'}/", addr)
    down = run_cli("--json", "-v", "sync", addr, f"{tmp_path / 'back'}/")
    for proc in (up, down):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for secret in (signature, unquote(signature), sas):
            assert secret not in proc.stdout + proc.stderr
    assert digests(azure.storage(root)) == md5s(files)
    assert md5s({str(p.relative_to(tmp_path / "back")): p.read_bytes()
                 for p in (tmp_path / "back").rglob("*") if p.is_file()}) == md5s(files)


# ---- block uploads ----------------------------------------------------------------------------------------
def test_completing_again_after_a_lost_answer_succeeds_and_an_aborted_upload_does_not(azure: Any) -> None:
    """A retried completion (its first answer lost) finds the blob committed from its blocks;
    one of an aborted upload fails as NoSuchUpload and writes nothing."""
    st = azure.storage(azure.new_root())
    data = [os.urandom(1000), os.urandom(500)]
    upload = st.create_multipart("k", content_md5=hashlib.md5(b"".join(data)).hexdigest())
    parts = [st.upload_part("k", upload, n, d) for n, d in enumerate(data, start=1)]
    first = st.complete_multipart("k", upload, parts)
    again = st.complete_multipart("k", upload, parts)
    assert first.size == again.size == 1500 and again.checksums == first.checksums != {}
    with st.open("k") as f:
        assert f.read() == b"".join(data)
    assert list(st.list_multipart()) == []

    gone = st.create_multipart("gone")
    parts = [st.upload_part("gone", gone, 1, b"x" * 10)]
    st.abort_multipart("gone", gone)
    with pytest.raises(NotFound) as err:
        st.complete_multipart("gone", gone, parts)
    assert err.value.code == "NoSuchUpload"
    assert [e.key for e in st.list()] == ["k"]


# ---- Azure says no: one line each ------------------------------------------------------------------------
@pytest.fixture
def azure(backend_factory: Any) -> Any:
    return backend_factory("azure")


def _address(azure: Any, root: str, *, key: str = azurite.KEY, container: str = "", port: int = 0) -> str:
    h = azure.handle
    return (f"azure://{azurite.ACCOUNT}:{quote(key, safe='')}@{container or h.container}."
            f"127.0.0.1:{port or h.port}/{root}/")


@pytest.mark.parametrize(("case", "code", "says"), [
    # Azure answers a wrong key with AuthenticationFailed, Azurite with AuthorizationFailure
    ("wrong key", "Auth", "check the account key"),
    ("missing container", "NoSuchBucket", "container 'nosuchcontainer' does not exist"),
    ("closed port", "ConnectionRefused", "connection refused"),
])
def test_refusals_are_one_clear_line(tmp_path: Path, azure: Any, case: str, code: str, says: str) -> None:
    root = azure.new_root()
    azure.seed(root, {"remote.txt": b"remote"})
    addr = {
        "wrong key": _address(azure, root, key=WRONG_KEY),
        "missing container": _address(azure, root, container="nosuchcontainer"),
        "closed port": _address(azure, root, port=free_port()),
    }[case]
    write_tree(tmp_path / "src", {"a.txt": b"a", "sub/b.txt": b"b"})
    up = run_cli("--json", "cp", f"{tmp_path / 'src'}/", addr, timeout=120)
    down = run_cli("--json", "sync", addr, f"{tmp_path / 'dst'}/", timeout=120)
    for proc in (up, down):
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and says in proc.stderr, proc.stderr
        assert WRONG_KEY not in proc.stdout + proc.stderr and azurite.KEY not in proc.stdout + proc.stderr
        assert quote(azurite.KEY, safe="") not in proc.stdout + proc.stderr
    failed = [line for line in up.stderr.splitlines() if line.startswith("FAILED ")]
    summary = json.loads(up.stdout.strip().splitlines()[-1])
    assert len(failed) == 1 and f": {code}" in failed[0], up.stderr
    assert (summary["failed"], summary["not_tried"]) == (2, 1), up.stderr
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").rglob("*"))
    assert {e.key for e in azure.storage(root).list()} == {"remote.txt"}, "nothing was written"


# ---- the upstream blob template as a job -----------------------------------------------------------------
@pytest.mark.parametrize("dest", ["local", "s3-moto"])
def test_upstream_blob_template_runs_as_a_job(tmp_path: Path, envs: list[JobEnv], backend_factory: Any,
                                              dest: str) -> None:
    """blob/job.cfg unchanged but for where its ends are: srcDomain at Azurite (whose account and
    key replace the template's placeholders), the destination a local directory or moto's S3."""
    if not COMPAT_BLOB.exists():
        pytest.skip(f"the upstream templates are not here: {COMPAT_BLOB} is missing")
    azure = backend_factory("azure")
    root = azure.new_root()
    files = {f"docs/{k}": v for k, v in tree().items()}
    azure.seed(root, {**files, "elsewhere/not-copied.txt": b"outside srcPrefix"})
    overrides = {
        "srcDomain": f"http://127.0.0.1:{azure.handle.port}", "srcAccessKey": azurite.ACCOUNT,
        "srcSecretKey": azurite.KEY, "srcBucket": azure.handle.container, "srcPrefix": f"{root}/docs/",
    }
    template = COMPAT_BLOB.read_text(encoding="utf-8")
    assert re.search(r"^srcType=azure$", template, re.M)
    run_upstream_template(tmp_path, envs, backend_factory, template, overrides, files, dest)
