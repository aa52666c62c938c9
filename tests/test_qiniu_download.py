"""Qiniu listed through its S3 API, object bodies downloaded from the bucket's download domain
(qiniu://AK:SK@BUCKET.ENDPOINT/PREFIX?download=http://DOMAIN; job: isDownloadFromCdn + cdnDomain).

moto plays Qiniu's S3 API, behind a counting proxy (tests/servers/faultproxy.py) that proves no
object body was read from it; tests/servers/qiniu_domain.py plays the download domain: it serves
the same bucket, checks Qiniu's private download token (401 without) and honours Range."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from helpers import MiB, digests, md5s, run_cli, tree, via
from jobenv import JobEnv
from servers.faultproxy import FaultProxy
from servers.qiniu_domain import QiniuDomain
from test_jobs import run_upstream_template

from ossimport.address import parse_address
from ossimport.errors import UsageError
from ossimport.jobs.config import ConfigError, JobConfig, UnsupportedSource
from ossimport.storage import open_storage

COMPAT_QINIU = Path(__file__).resolve().parents[2] / "shared" / "compat" / "ossimport-conf" / "qiniu" / "job.cfg"
AK, SK = "AKIDTEST1234", "SECRET/TEST5678"  # the moto backend's keys, which the domain checks too
WRONG_SK = "Wr0ngSecret/Qiniu+0001"


class Qiniu:
    """The S3 API (moto, reached through a counting proxy) and the download domain of one bucket."""

    def __init__(self, s3: Any, domain: QiniuDomain, proxy: FaultProxy) -> None:
        self.s3, self.domain, self.proxy = s3, domain, proxy

    def address(self, root: str, sk: str = SK) -> str:
        s3_api = via(self.s3.address(root), self.proxy).replace(f"s3://{AK}:SECRET%2FTEST5678@", "", 1)
        return f"qiniu://{AK}:{quote(sk, safe='')}@{s3_api}?download={self.domain.url}"

    def object_gets(self) -> list[str]:
        """Object paths the S3 API was asked to GET (a listing is a GET of the bucket alone)."""
        bucket = self.s3.handle.bucket
        return [r.path for r in self.proxy.records if r.method == "GET" and r.path.startswith(f"/{bucket}/")]


@pytest.fixture
def qiniu(backend_factory: Any) -> Iterator[Qiniu]:
    s3 = backend_factory("s3-moto")
    with QiniuDomain(s3.handle.endpoint, s3.handle.bucket, keys={AK: SK}) as domain, \
            FaultProxy("127.0.0.1", s3.handle.port) as proxy:
        yield Qiniu(s3, domain, proxy)


def summary(proc: Any) -> dict[str, Any]:
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- addresses and job keys -----------------------------------------------------------------------------
def test_address_names_the_download_domain() -> None:
    loc = parse_address(f"qiniu://ak:{quote(SK, safe='')}@box.s3-cn-east-1.qiniucs.com/docs/?download=https://cdn.example.com/")
    assert (loc.backend, loc.flavour, loc.bucket, loc.prefix) == ("s3", "qiniu", "box", "docs/")
    assert loc.download == "https://cdn.example.com"
    assert loc.display() == "qiniu://***:***@box.s3-cn-east-1.qiniucs.com/docs/?download=https://cdn.example.com"
    assert loc.place() == parse_address("qiniu://ak:sk@box.s3-cn-east-1.qiniucs.com/docs/").place()
    for bad, says in (("?download=cdn.example.com", "is not http(s)://HOST[:PORT]"),
                      ("?download=http://cdn.example.com/sub", "is not http(s)://HOST[:PORT]"),
                      ("?cdn=http://cdn.example.com", "takes one option, ?download=")):
        with pytest.raises(UsageError, match=re.escape(says)):
            parse_address(f"qiniu://ak:sk@box.s3-cn-east-1.qiniucs.com/docs/{bad}")


def _job(**keys: str) -> JobConfig:
    base = {"srcType": "qiniu", "srcDomain": "http://s3-cn-east-1.qiniucs.com", "srcBucket": "mybucket",
            "srcAccessKey": "ak", "srcSecretKey": "sk", "destType": "local", "destPrefix": "/tmp/out/"}
    return JobConfig.from_mapping({**base, **keys}, "job.cfg")


def test_job_keys_name_the_download_domain() -> None:
    assert _job(isDownloadFromCdn="true", cdnDomain="cdn.example.com").locations()[0].download == \
        "http://cdn.example.com"
    assert _job(isDownloadFromCdn="false", cdnDomain="http://cdn.example.com").locations()[0].download == ""
    with pytest.raises(ConfigError, match="cdnDomain is missing; isDownloadFromCdn=true needs"):
        _job(isDownloadFromCdn="true")
    other = _job(srcType="s3", isDownloadFromCdn="true", cdnDomain="http://cdn.example.com")
    assert other.locations()[0].download == ""
    assert any("isDownloadFromCdn=true applies to srcType=qiniu only" in w for w in other.warnings)
    # the template's srcDomain is a download domain: refused, with the keys that fix it
    cfg = _job(srcDomain="http://mybucket.u.qiniudn.com")
    with pytest.raises(UnsupportedSource) as err:
        cfg.locations()
    assert "cdnDomain=http://mybucket.u.qiniudn.com with isDownloadFromCdn=true" in str(err.value)
    assert "srcDomain=s3-cn-east-1.qiniucs.com" in str(err.value)


# ---- the domain server itself: Qiniu's documented token, and Range ----------------------------------------
def test_domain_wants_the_documented_token_and_honours_range(qiniu: Qiniu) -> None:
    root = qiniu.s3.new_root()
    qiniu.s3.seed(root, {"a b.txt": b"0123456789"})
    with open_storage(parse_address(qiniu.address(root))) as st:
        signed = st._download._url("a b.txt")  # type: ignore[attr-defined]
    assert re.fullmatch(rf"{qiniu.domain.url}/{root}/a%20b\.txt\?e=\d+&token={AK}:[A-Za-z0-9_=-]+", signed)
    ranged = urllib.request.Request(signed, headers={"Range": "bytes=2-4"})
    with urllib.request.urlopen(ranged, timeout=10) as r:
        assert (r.status, r.read()) == (206, b"234")
    unsigned = signed.partition("?")[0]
    forged = re.sub(r"e=(\d+)", lambda m: f"e={int(m[1]) + 1}", signed)
    for url in (unsigned, forged):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=10)
        assert err.value.code == 401


# ---- cp, sync, verify ------------------------------------------------------------------------------------
def test_cp_sync_verify_read_bodies_from_the_domain(tmp_path: Path, qiniu: Qiniu, backend_factory: Any) -> None:
    root = qiniu.s3.new_root()
    files = tree(big=12 * MiB)  # the big one moves in ranges: ranged GETs at the domain
    qiniu.s3.seed(root, files)
    src = qiniu.address(root)
    nonempty = sum(1 for v in files.values() if v)
    parts = ["--multipart-threshold", "6m", "--part-size", "5m"]

    qiniu.proxy.reset_counters()
    proc = run_cli("--json", *parts, "cp", src, f"{tmp_path}/cp/", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert md5s({str(p.relative_to(tmp_path / "cp")): p.read_bytes()
                 for p in (tmp_path / "cp").rglob("*") if p.is_file()}) == md5s(files)
    assert qiniu.domain.gets >= nonempty and any(rng for m, _, rng in qiniu.domain.requests if m == "GET")
    assert qiniu.object_gets() == [], "object bodies were read from the S3 API"
    assert qiniu.proxy.records, "the S3 API listed"

    # sync to moto (another endpoint: no server-side copy), then a sync that has nothing to do
    dst_s3 = backend_factory("s3-moto")
    dst_root = dst_s3.new_root()
    gets = qiniu.domain.gets
    proc = run_cli("--json", *parts, "sync", src, dst_s3.address(dst_root), timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["copied"] == len(files), proc.stdout

    assert digests(dst_s3.storage(dst_root)) == md5s(files)
    assert qiniu.domain.gets - gets >= nonempty
    again = run_cli("--json", "sync", src, dst_s3.address(dst_root), timeout=120)
    assert again.returncode == 0 and summary(again)["copied"] == 0, again.stdout + again.stderr

    # verify by content: the source side is read through the domain
    gets = qiniu.domain.gets
    proc = run_cli("--json", "--checksum", "verify", src, f"{tmp_path}/cp/", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert qiniu.object_gets() == [], "object bodies were read from the S3 API"
    (tmp_path / "cp" / "top.txt").write_bytes(b"top levem\n")  # same size, other bytes
    proc = run_cli("--json", "--checksum", "verify", src, f"{tmp_path}/cp/", timeout=180)
    assert proc.returncode == 1 and "top.txt" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_a_stale_or_truncated_copy_at_the_domain_fails_that_file(tmp_path: Path, qiniu: Qiniu) -> None:
    root = qiniu.s3.new_root()
    files = {"ok.txt": b"fine", "short.txt": b"truncated at the CDN", "stale.txt": b"stale at the CDN", "z.txt": b"z"}
    qiniu.s3.seed(root, files)
    qiniu.domain.damage = {f"{root}/short.txt": "truncate", f"{root}/stale.txt": "alter"}
    proc = run_cli("--json", "cp", qiniu.address(root), f"{tmp_path}/out/", timeout=180)
    assert proc.returncode == 1, proc.stderr
    failed = sorted(line for line in proc.stderr.splitlines() if line.startswith("FAILED "))
    assert len(failed) == 2, proc.stderr
    assert "short.txt" in failed[0] and "SIZE_NOT_MATCH" in failed[0] and "stale or truncated copy" in failed[0]
    assert "stale.txt" in failed[1] and "CHECKSUM_NOT_MATCH" in failed[1], failed
    assert (summary(proc)["copied"], summary(proc)["failed"]) == (2, 2), proc.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["ok.txt", "z.txt"], "a bad copy was written"


def test_wrong_secret_key_is_one_clear_line(tmp_path: Path, qiniu: Qiniu) -> None:
    """moto takes any key; the domain checks the token, which the wrong key signs wrongly."""
    root = qiniu.s3.new_root()
    qiniu.s3.seed(root, {f"f{i}.txt": b"x" * i for i in range(1, 6)})
    proc = run_cli("--json", "-vv", "cp", qiniu.address(root, sk=WRONG_SK), f"{tmp_path}/out/", timeout=120)
    assert proc.returncode == 1, proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 1 and "SignatureDoesNotMatch" in failed[0] and "check the access and secret keys" \
        in failed[0], proc.stderr
    assert summary(proc)["not_tried"] >= 1, proc.stdout
    shown = proc.stdout + proc.stderr
    assert "Traceback" not in shown and "token=" not in shown, shown
    for secret in (WRONG_SK, SK):
        assert secret not in shown and quote(secret, safe="") not in shown, shown


# ---- the upstream qiniu template as a job ------------------------------------------------------------------
@pytest.mark.parametrize("dest", ["local", "s3-moto"])
def test_upstream_qiniu_template_runs_as_a_job(tmp_path: Path, envs: list[JobEnv], qiniu: Qiniu,
                                               backend_factory: Any, dest: str) -> None:
    """qiniu/job.cfg unchanged but for where its ends are: srcDomain at the S3 API (moto, its keys
    replacing the placeholders), isDownloadFromCdn=true with cdnDomain at the domain server."""
    if not COMPAT_QINIU.exists():
        pytest.skip(f"the upstream templates are not here: {COMPAT_QINIU} is missing")
    root = qiniu.s3.new_root()
    files = {f"docs/{k}": v for k, v in tree().items()}
    qiniu.s3.seed(root, {**files, "elsewhere/not-copied.txt": b"outside srcPrefix"})
    overrides = {
        "srcDomain": f"http://{qiniu.proxy.address}", "srcAccessKey": AK, "srcSecretKey": SK,
        "srcBucket": qiniu.s3.handle.bucket, "srcPrefix": f"{root}/docs/",
        "isDownloadFromCdn": "true", "cdnDomain": qiniu.domain.url,
    }
    template = COMPAT_QINIU.read_text(encoding="utf-8")
    assert re.search(r"^srcType=qiniu$", template, re.M)
    run_upstream_template(tmp_path, envs, backend_factory, template, overrides, files, dest)
    assert qiniu.domain.gets >= sum(1 for v in files.values() if v)
    assert qiniu.object_gets() == [], "object bodies were read from the S3 API"


def test_a_stale_copy_of_a_large_object_fails_though_read_in_ranges(tmp_path: Path, qiniu: Qiniu,
                                                                    backend_factory: Any) -> None:
    """Parts read by range are never one stream to hash: the domain's Last-Modified, older than
    the bucket's, gives a stale cached copy away (to S3 its parts would be stored as they came)."""
    root = qiniu.s3.new_root()
    big = bytes(range(256)) * (12 * MiB // 256)
    qiniu.s3.seed(root, {"big.bin": big, "small.txt": b"small"})
    qiniu.domain.damage = {f"{root}/big.bin": "stale"}
    dst = backend_factory("s3-moto")
    dst_root = dst.new_root()
    proc = run_cli("--json", "--multipart-threshold", "6m", "--part-size", "5m", "cp", qiniu.address(root),
                   dst.address(dst_root), timeout=180)
    assert proc.returncode == 1, proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 1 and "big.bin" in failed[0] and "stale copy" in failed[0], proc.stderr
    assert any(rng for m, _, rng in qiniu.domain.requests if m == "GET"), "read in ranges"
    assert {e.key for e in dst.storage(dst_root).list()} == {"small.txt"}


def test_a_service_batch_task_keeps_the_download_domain() -> None:
    """A dataflow's batch task runs as a job: the address's download domain becomes its keys."""
    from ossimport.service.batch import _side

    loc = parse_address("qiniu://ak:sk@box.s3-cn-east-1.qiniucs.com/docs/?download=http://cdn.example.com")
    cfg = JobConfig.from_mapping({**_side("src", loc), "destType": "local", "destPrefix": "/tmp/out/"}, "task")
    src = cfg.locations()[0]
    assert (src.download, src.endpoint, src.prefix) == ("http://cdn.example.com", "s3-cn-east-1.qiniucs.com", "docs/")
