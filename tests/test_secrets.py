"""No secret ever leaves the places made for it.

Every command path runs with distinctive credentials (S3 access key, secret and session token in
the address and in the environment, OSS key, secret and STS token, an SFTP password, job-config
keys). Then every stdout and stderr, and every file under the test's tmp dirs (the job working
dir with its logs, audit.log, error.list, STAT.json, TASK, DONE and checkpoints; key lists;
--recordName files), is searched for every secret, raw and percent-encoded: zero hits. The only
files allowed to hold one are the frozen 0600 job.cfg copies and the config file the test wrote.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import pytest
from helpers import write_tree
from jobenv import JobEnv
from servers.oss_shim import OSSShim

from ossimport.address import parse_address
from ossimport.errors import UsageError
from ossimport.jobs.config import JobConfig, SysConfig
from ossimport.jobs.plan import job_spec

ROOT = Path(__file__).resolve().parent.parent

S3_AK, S3_SK, S3_TOKEN = "AKIDLEAKCHECK0001", "S3cr3t/Leak+Check=0001", "T0ken/Leak+Sess=0001"
ENV_AK, ENV_SK, ENV_TOKEN = "AKIDLEAKENVIR0001", "EnvS3cr3t/Leak+0001", "EnvT0ken/Leak+0001"
OSS_AK, OSS_SK, OSS_TOKEN = "OSSLEAKCHECK0001", "0ssS3cr3t/Leak+0001", "0ssT0ken/Leak=0001"
OSS_WRONG = "0ssWr0ng/Leak+0001"
SFTP_PW = "Sftp/P@ss:Leak0001"
JOB_AK, JOB_SK = "AKIDLEAKJOB0001", "J0bS3cr3t/Leak+0001"
JOB_OSS_WRONG = "J0bOssWr0ng/Leak+0001"
UPYUN_PW, UPYUN_WRONG = "UpYun/P@ss:Leak0001", "UpYunWr0ng/Leak+0001"
SECRETS = [S3_AK, S3_SK, S3_TOKEN, ENV_AK, ENV_SK, ENV_TOKEN, OSS_AK, OSS_SK, OSS_TOKEN, OSS_WRONG, SFTP_PW,
           JOB_AK, JOB_SK, JOB_OSS_WRONG, UPYUN_PW, UPYUN_WRONG]


def forms(secret: str) -> set[str]:
    """The secret as typed and in every percent-encoding a URL or a log could carry."""
    return {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}


def q(secret: str) -> str:
    return quote(secret, safe="")


class LeakCheck:
    """Collects every text a run produced; `assert_clean` lists each hit with where it was."""

    def __init__(self, secrets: list[str]) -> None:
        self.needles = {form: s for s in secrets for form in forms(s)}
        self.hits: list[str] = []
        self.found: set[str] = set()  # the secrets hit
        self.texts_checked = 0
        self.files_checked = 0
        self.protected: dict[Path, str] = {}  # 0600 job.cfg copies (the one place credentials rest)

    def text(self, where: str, text: str) -> None:
        self.texts_checked += 1
        for form, secret in self.needles.items():
            if form in text:
                line = next(ln for ln in text.splitlines() if form in ln)
                self.found.add(secret)
                self.hits.append(f"{where}: {secret!r} (as {form!r}) in line {line[:300]!r}")

    def proc(self, label: str, proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
        self.text(f"{label} stdout", proc.stdout)
        self.text(f"{label} stderr", proc.stderr)
        return proc

    def tree(self, top: Path, allowed: set[Path]) -> None:
        for d, _, files in os.walk(top):
            for name in files:
                path = Path(d, name)
                if path in allowed:
                    continue
                if path.name == "job.cfg":
                    mode = stat.S_IMODE(path.stat().st_mode)
                    assert mode == 0o600, f"{path} holds credentials and is {oct(mode)}"
                    self.protected[path] = path.read_text(encoding="utf-8")
                    continue
                if path.is_symlink() or not path.is_file():
                    continue
                self.files_checked += 1
                self.text(str(path), path.read_bytes().decode("utf-8", errors="replace"))

    def assert_clean(self) -> None:
        assert not self.hits, "secrets leaked:\n" + "\n".join(self.hits)


def cli(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OSS_"))}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "ossimport", *args], cwd=cwd, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def leak_oss() -> Iterator[tuple[OSSShim, str]]:
    """An OSS shim of our own that knows only the distinctive key pair (and wants its STS token)."""
    shim = OSSShim({OSS_AK: OSS_SK}, sts_tokens={OSS_AK: OSS_TOKEN})
    shim.start()
    bucket = f"leak-{os.getpid()}"
    shim.create_bucket(bucket)
    yield shim, bucket
    shim.stop()


def s3_address(backend: Any, root: str, ak: str = S3_AK, sk: str = S3_SK, token: str | None = S3_TOKEN,
               bucket: str | None = None) -> str:
    loc = parse_address(backend.address(root))
    creds = f"{q(ak)}:{q(sk)}" + (f":{q(token)}" if token else "")
    return f"s3://{creds}@{bucket or loc.bucket}.{loc.endpoint}/{root}/"


# ---- direct commands -------------------------------------------------------------------------------------
def test_direct_commands_never_show_a_secret(tmp_path: Path, backend_factory: Any,
                                             leak_oss: tuple[OSSShim, str]) -> None:
    s3 = backend_factory("s3-moto")
    check = LeakCheck(SECRETS)
    src = tmp_path / "src"
    write_tree(src, {"a.txt": b"alpha", "dir/b.txt": b"beta" * 100, "dir/c d+e.txt": b"special"})
    (src / "link").symlink_to("a.txt")
    root = s3.new_root()
    addr = s3_address(s3, root)
    runs: list[tuple[str, list[str], dict[str, str]]] = []
    for i, flags in enumerate((["-v"], ["-vv"], ["-q"], ["--json"], ["--dryrun", "-vv"], ["--checksum", "-vv"])):
        rec = str(tmp_path / f"links{i}.txt")
        runs += [
            (f"{flags} cp up", [*flags, "--recordName", rec, "cp", f"{src}/", addr], {}),
            (f"{flags} sync down", [*flags, "--delete-dst", "sync", addr, f"{tmp_path}/back{i}/"], {}),
            (f"{flags} verify", [*flags, "verify", "--missing", f"{tmp_path}/missing{i}", "--differ", f"{tmp_path}/differ{i}",
                        "--extra", f"{tmp_path}/extra{i}", f"{src}/", addr], {}),
        ]
    runs += [
        ("single object", ["-vv", "cp", f"{src}/a.txt", addr + "one/a.txt"], {}),
        ("single object down", ["-vv", "cp", addr + "one/a.txt", f"{tmp_path}/single.txt"], {}),
        ("info", ["-vv", "cp", "--info", addr, f"{tmp_path}/unused/"], {}),
        ("move", ["-vv", "--delete-src", "cp", addr + "one/", f"{tmp_path}/moved/"], {}),
        ("missing object", ["-vv", "cp", addr + "absent.txt", f"{tmp_path}/absent.txt"], {}),
        ("missing bucket up", ["-vv", "cp", f"{src}/", s3_address(s3, root, bucket="nosuchbucket-leak")], {}),
        ("missing bucket down", ["-vv", "sync", s3_address(s3, root, bucket="nosuchbucket-leak"),
                                 f"{tmp_path}/nb/"], {}),
        ("missing bucket verify", ["--json", "verify", f"{src}/", s3_address(s3, root, bucket="nosuchbucket-leak")],
         {}),
        ("unescaped secret", ["-v", "cp", f"{src}/", f"s3://{S3_AK}:{S3_SK}@b.127.0.0.1:9/p/"], {}),
        ("unescaped password", ["-v", "cp", f"{src}/", f"root:{SFTP_PW}@127.0.0.1:22:/tmp/x/"], {}),
        ("bad option", ["-vv", "--threads", "0", "cp", f"{src}/", addr], {}),
        # credentials from the environment, not the address
        ("env creds", ["-vv", "cp", f"{src}/", f"s3://{parse_address(addr).bucket}.{parse_address(addr).endpoint}"
                                             f"/{root}-env/"],
         {"AWS_ACCESS_KEY_ID": ENV_AK, "AWS_SECRET_ACCESS_KEY": ENV_SK, "AWS_SESSION_TOKEN": ENV_TOKEN}),
    ]
    # OSS with key, secret and STS token (verified by the shim), then a wrong secret
    shim, bucket = leak_oss
    oss_addr = f"oss://{q(OSS_AK)}:{q(OSS_SK)}:{q(OSS_TOKEN)}@{bucket}.127.0.0.1:{shim.port}/{root}/"
    oss_wrong = f"oss://{q(OSS_AK)}:{q(OSS_WRONG)}:{q(OSS_TOKEN)}@{bucket}.127.0.0.1:{shim.port}/{root}/"
    oss_env = f"oss://{bucket}.127.0.0.1:{shim.port}/{root}-env/"
    runs += [
        ("oss up", ["-vv", "cp", f"{src}/", oss_addr], {}),
        ("oss down", ["-vv", "--json", "sync", oss_addr, f"{tmp_path}/oss_back/"], {}),
        ("oss verify", ["-vv", "--checksum", "verify", f"{src}/", oss_addr], {}),
        ("oss wrong up", ["-vv", "cp", f"{src}/", oss_wrong], {}),
        ("oss wrong down", ["-vv", "sync", oss_wrong, f"{tmp_path}/oss_wrong/"], {}),
        ("oss env", ["-vv", "cp", f"{src}/", oss_env],
         {"OSS_ACCESS_KEY_ID": OSS_AK, "OSS_ACCESS_KEY_SECRET": OSS_SK, "OSS_SESSION_TOKEN": OSS_TOKEN}),
    ]
    # SFTP with a password in the address (the test sshd takes keys only: the login fails)
    sftp = backend_factory("sftp")
    sftp_loc = parse_address(sftp.address(sftp.new_root()))
    sftp_addr = f"{sftp_loc.user}:{q(SFTP_PW)}@127.0.0.1:{sftp_loc.port}:{sftp_loc.path}"
    runs += [
        ("sftp password", ["-vv", "cp", f"{src}/", sftp_addr], {"SSH_KNOWN_HOSTS": sftp.env()["SSH_KNOWN_HOSTS"]}),
        ("sftp password+key", ["-vv", "sync", f"{src}/", sftp_addr], sftp.env()),
        ("sftp closed port", ["-vv", "--connTimeout", "1", "sync", f"{src}/",
                              f"{sftp_loc.user}:{q(SFTP_PW)}@127.0.0.1:{closed_port()}:/tmp/x/"], {}),
    ]
    # an endpoint nobody listens on: retries are logged at -vv with their causes
    dead = f"s3://{q(S3_AK)}:{q(S3_SK)}:{q(S3_TOKEN)}@bucket.127.0.0.1:{closed_port()}/p/"
    runs += [
        ("dead endpoint down", ["-vv", "--connTimeout", "1", "sync", dead, f"{tmp_path}/dead/"], {}),
        ("dead endpoint up", ["-vv", "--connTimeout", "1", "cp", f"{src}/a.txt", dead], {}),
    ]
    codes: dict[str, int] = {}
    for label, args, env in runs:
        proc = check.proc(label, cli(tmp_path, *args, env=env))
        assert "Traceback" not in proc.stderr or "-v" in args or "-vv" in args, (label, proc.stderr)
        codes[label] = proc.returncode
    # the runs did what they were meant to (a leak test of runs that all failed early proves little)
    plain = [label for label in codes if label.startswith("[")]
    assert len(plain) == 18 and all(codes[label] == 0 for label in plain), codes
    assert codes["oss up"] == 0 and codes["oss down"] == 0 and codes["oss verify"] == 0, codes
    assert codes["single object"] == 0 and codes["single object down"] == 0 and codes["move"] == 0, codes
    # a password in the address is the only SFTP login tried (README), and this sshd refuses passwords
    assert codes["env creds"] == 0 and codes["oss env"] == 0 and codes["sftp password+key"] == 1, codes
    assert codes["oss wrong up"] == 1 and codes["missing bucket up"] == 1 and codes["dead endpoint up"] == 1
    assert codes["unescaped secret"] == 2 and codes["unescaped password"] == 2 and codes["bad option"] == 2
    assert codes["sftp password"] == 1 and codes["missing bucket verify"] == 1
    assert (tmp_path / "back0" / "dir" / "c d+e.txt").read_bytes() == b"special"
    check.tree(tmp_path, allowed=set())
    assert check.texts_checked >= 2 * len(runs) and check.files_checked >= 30
    probe = LeakCheck(SECRETS)  # the needles match what was typed (percent-encoded) as well as raw
    probe.text("address", addr + oss_addr + sftp_addr)
    assert probe.found == {S3_AK, S3_SK, S3_TOKEN, OSS_AK, OSS_SK, OSS_TOKEN, SFTP_PW}, probe.hits
    check.assert_clean()


def test_wrong_secret_on_ceph_is_not_shown(tmp_path: Path, backend_factory: Any) -> None:
    ceph = backend_factory("s3-ceph")
    root = ceph.new_root()
    ceph.seed(root, {"x.txt": b"x"})
    good = parse_address(ceph.address(root))
    wrong = f"s3://{q(good.access_key)}:{q(S3_SK)}:{q(S3_TOKEN)}@{good.bucket}.{good.endpoint}/{root}/"
    unknown = f"s3://{q(S3_AK)}:{q(S3_SK)}@{good.bucket}.{good.endpoint}/{root}/"
    src = tmp_path / "src"
    write_tree(src, {"a.txt": b"a"})
    check = LeakCheck(SECRETS)
    for label, args in (("up", ["-vv", "cp", f"{src}/", wrong]), ("down", ["-vv", "sync", wrong, f"{tmp_path}/d/"]),
                        ("verify", ["-vv", "verify", f"{src}/", wrong]),
                        ("unknown key", ["-vv", "--json", "cp", f"{src}/", unknown])):
        proc = check.proc(label, cli(tmp_path, *args))
        assert proc.returncode == 1, (label, proc.stderr)
        assert "SignatureDoesNotMatch" in proc.stderr or "AccessDenied" in proc.stderr or \
            "InvalidAccessKeyId" in proc.stderr, (label, proc.stderr)
    check.tree(tmp_path, allowed=set())
    check.assert_clean()


# ---- the job system ---------------------------------------------------------------------------------------
def _wait_job(env: JobEnv, name: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = env.stat(name)
        if st.get("JobState") in states:
            return st
        time.sleep(0.3)
    raise AssertionError(f"job {name} did not reach {states} in {timeout}s: {st}\n{env.log_tail()}")


def test_job_commands_never_show_a_secret(tmp_path: Path, backend_factory: Any,
                                          leak_oss: tuple[OSSShim, str]) -> None:
    import boto3

    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    loc = parse_address(s3.address(root))
    client = boto3.client("s3", endpoint_url=loc.endpoint_url(), aws_access_key_id=JOB_AK,
                          aws_secret_access_key=JOB_SK, region_name="us-east-1")
    files = {f"d{i % 3}/f{i:02d}.txt": f"file {i}".encode() for i in range(12)}
    for key, data in {**files, "../escape.txt": b"evil"}.items():  # one key fails (InvalidObjectName)
        client.put_object(Bucket=loc.bucket, Key=loc.prefix + key, Body=data)
    s3_side = {"srcType": "s3", "srcDomain": f"http://{loc.endpoint}", "srcBucket": loc.bucket,
               "srcPrefix": loc.prefix, "srcAccessKey": JOB_AK, "srcSecretKey": JOB_SK}
    env = JobEnv(tmp_path, {"jobName": "leak_local", **s3_side, "destType": "local",
                            "destPrefix": f"{tmp_path}/out/", "taskObjectCountLimit": 5})
    shim, bucket = leak_oss
    oss_cfg = env.conf / "oss_job.cfg"
    oss_job = {"jobName": "leak_oss", **s3_side, "destType": "oss", "destDomain": f"http://127.0.0.1:{shim.port}",
               "destBucket": bucket, "destPrefix": f"{root}-job/", "destAccessKey": OSS_AK,
               "destSecretKey": JOB_OSS_WRONG, "taskObjectCountLimit": 5}
    oss_cfg.write_text("".join(f"{k}={v}\n" for k, v in oss_job.items()), encoding="utf-8")
    inputs = {env.conf / "local_job.cfg", oss_cfg}
    for path in inputs:
        path.chmod(0o600)
    check = LeakCheck(SECRETS)
    try:
        check.proc("submit", env.console("submit"))
        check.proc("submit oss", env.console("submit", str(oss_cfg)))
        check.proc("start", env.console("start", "--workers", "2"))
        st = _wait_job(env, "leak_local", {"SUCCEED", "FAILED"})
        assert (st["JobState"], st["Files Done"], st["Files Failed"]) == ("FAILED", 12, 1), st
        st = _wait_job(env, "leak_oss", {"SUCCEED", "FAILED"})
        assert (st["JobState"], st["Files Done"]) == ("FAILED", 0), st
        check.proc("stat", env.console("stat"))
        check.proc("stat --json", env.console("stat", "--json"))
        check.proc("stat job", env.console("stat", "leak_oss"))
        check.tree(tmp_path, allowed=inputs)
        audit = {name: "".join(p.read_text(encoding="utf-8")
                               for p in (env.workdir / "master" / "jobs" / name / "failed_tasks").glob("*/audit.log"))
                 for name in ("leak_local", "leak_oss")}
        assert "InvalidObjectName" in audit["leak_local"], audit
        assert any(code in audit["leak_oss"] for code in ("SignatureDoesNotMatch", "InvalidAccessKeyId")), audit
        check.proc("retry", env.console("retry"))
        _wait_job(env, "leak_local", {"FAILED"})
        _wait_job(env, "leak_oss", {"FAILED"})
        check.proc("stat after retry", env.console("stat", "--json", "leak_local"))
        check.tree(tmp_path, allowed=inputs)
        check.proc("stop", env.console("stop"))
        check.proc("clean", env.console("clean", "leak_oss"))
        check.proc("clean all", env.console("clean"))
        check.tree(tmp_path, allowed=inputs)
    finally:
        env.stop()
    assert check.files_checked > 20
    assert check.protected, "the frozen job.cfg copies were seen (and skipped)"
    probe = LeakCheck(SECRETS)  # the search would have found them: they do hold the job's keys
    for path, text in check.protected.items():
        probe.text(str(path), text)
    assert probe.found == {JOB_AK, JOB_SK, OSS_AK, JOB_OSS_WRONG}, probe.hits
    check.assert_clean()


# ---- objects that hold secrets -----------------------------------------------------------------------------
def test_reprs_hide_secrets(tmp_path: Path) -> None:
    check = LeakCheck(SECRETS)
    addresses = [
        f"s3://{q(S3_AK)}:{q(S3_SK)}:{q(S3_TOKEN)}@bucket.127.0.0.1:9000/pre/",
        f"minio://{q(S3_AK)}:{q(S3_SK)}@127.0.0.1:9000/bucket/pre/",
        f"oss://{q(OSS_AK)}:{q(OSS_SK)}:{q(OSS_TOKEN)}@bucket.oss-cn-hangzhou.aliyuncs.com/p/",
        f"azure://account:{q(S3_SK)}@container.core.chinacloudapi.cn/p/",
        f"azure://account:{q(S3_SK)}@container.127.0.0.1:10000/p/",
        f"azure://account@container/p/?sv=2024-11-04&sr=c&sig={q(S3_SK)}",
        f"qiniu://{q(S3_AK)}:{q(S3_SK)}@bucket.s3-cn-east-1.qiniucs.com/p/?download=http://cdn.example.com",
        f"upyun://operator:{q(S3_SK)}@service/p/",
        f"youpai://operator:{q(S3_SK)}@service.127.0.0.1:8080/p/",
        f"user:{q(SFTP_PW)}@127.0.0.1:2222:/data/",
        f"https://user:{q(SFTP_PW)}@example.com/file?X-Amz-Signature={q(S3_SK)}",
    ]
    for text in addresses:
        loc = parse_address(text)
        held = (loc.secret_key, loc.password, unquote(loc.token))  # azure: a SAS token holds its signature
        assert loc.backend == "http" or any(s in v for v in held for s in (S3_SK, OSS_SK, SFTP_PW)), loc.backend
        for label, shown in (("repr", repr(loc)), ("str", str(loc)), ("display", loc.display()),
                             ("format", f"{loc}"), ("list repr", repr([loc])),
                             ("split", repr(loc.split_object())), ("child", repr(loc.child("k")))):
            check.text(f"{label} of {parse_address(text).display()}", shown)
    for bad in (f"s3://{S3_AK}:{S3_SK}@b.127.0.0.1:9000/p/", f"root:{SFTP_PW}@127.0.0.1:22:/x/",
                f"upyun://op:{q(S3_SK)}:{q(S3_TOKEN)}@service/p/", f"upyun://op:{S3_SK}@service/p/",
                f"s3://{q(S3_AK)}:{q(S3_SK)}@b.127.0.0.1:99999/p/", f"s3://{q(S3_AK)}:{q(S3_SK)}@bad!b/p/"):
        with pytest.raises(UsageError) as err:
            parse_address(bad)
        check.text("UsageError", str(err.value) + repr(err.value))
    cfg = JobConfig.from_mapping({
        "jobName": "leak_job", "srcType": "s3", "srcDomain": "http://127.0.0.1:9000", "srcBucket": "b",
        "srcAccessKey": JOB_AK, "srcSecretKey": JOB_SK, "destType": "oss", "destDomain": "http://127.0.0.1:9001",
        "destBucket": "c", "destAccessKey": OSS_AK, "destSecretKey": OSS_SK}, "leak.cfg", base_dir=tmp_path)
    sysconf = SysConfig.from_mapping({"workingDir": str(tmp_path / "run"), "workerPassword": SFTP_PW}, "sys",
                                     base_dir=tmp_path)
    spec = job_spec(cfg, sysconf)
    assert (spec.src.secret_key, spec.dst.secret_key) == (JOB_SK, OSS_SK), "the spec carries the credentials"
    for label, obj in (("JobConfig", cfg), ("SysConfig", sysconf), ("JobSpec", spec), ("locations", cfg.locations()),
                       ("StorageOptions", spec.src_options)):
        check.text(f"repr({label})", repr(obj))
        check.text(f"str({label})", str(obj))
    check.text("JobSpec fields", repr([getattr(spec, f.name) for f in dataclasses.fields(spec)]))
    check.assert_clean()


# ---- qiniu through a download domain -----------------------------------------------------------------------
def test_download_domain_never_shows_a_secret(tmp_path: Path, backend_factory: Any) -> None:
    """qiniu://...?download=: the S3 API lists (moto), the domain serves bodies to URLs signed with
    a token made of the access key and an HMAC of the secret key; a wrong secret key is refused
    there. Neither key nor token shows anywhere."""
    from servers.qiniu_domain import QiniuDomain

    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    s3.seed(root, {"a.txt": b"alpha", "dir/b c.txt": b"beta" * 100})
    loc = parse_address(s3.address(root))
    check = LeakCheck([*SECRETS, "token="])  # "token=": a signed URL's query string
    with QiniuDomain(s3.handle.endpoint, loc.bucket, keys={S3_AK: S3_SK}) as domain:
        def address(sk: str) -> str:
            return f"qiniu://{q(S3_AK)}:{q(sk)}@{loc.bucket}.{loc.endpoint}/{root}/?download={domain.url}"

        runs = {
            "cp": ["-vv", "cp", address(S3_SK), f"{tmp_path}/cp/"],
            "sync": ["-vv", "--json", "sync", address(S3_SK), f"{tmp_path}/sync/"],
            "verify": ["-vv", "--checksum", "verify", address(S3_SK), f"{tmp_path}/cp/"],
            "wrong secret": ["-vv", "cp", address(OSS_WRONG), f"{tmp_path}/wrong/"],
            "wrong secret sync": ["-vv", "--json", "sync", address(OSS_WRONG), f"{tmp_path}/wrong/"],
        }
        codes = {label: check.proc(label, cli(tmp_path, *args)).returncode for label, args in runs.items()}
        assert domain.gets >= 4 and domain.answered[401] >= 2, (domain.gets, domain.answered)
    assert codes == {"cp": 0, "sync": 0, "verify": 0, "wrong secret": 1, "wrong secret sync": 1}, codes
    assert (tmp_path / "sync" / "dir" / "b c.txt").read_bytes() == b"beta" * 100
    check.tree(tmp_path, allowed=set())


# ---- UpYun: the operator's password -----------------------------------------------------------------------
def test_upyun_password_is_never_shown(tmp_path: Path) -> None:
    """An UpYun operator's password (and a wrong one), in addresses and in a youpai job: no output,
    log or job file shows it, raw, percent-encoded, or as the MD5 that signs requests."""
    import hashlib

    from servers.upyun_server import UpYunServer

    server = UpYunServer({"upop": UPYUN_PW})
    server.put("svc", "p/a.txt", b"alpha")
    server.put("svc", "p/dir/b.txt", b"beta" * 100)
    server.start()
    check = LeakCheck([UPYUN_PW, UPYUN_WRONG])
    check.needles.update({hashlib.md5(pw.encode()).hexdigest(): pw for pw in (UPYUN_PW, UPYUN_WRONG)})
    good = f"upyun://upop:{q(UPYUN_PW)}@svc.127.0.0.1:{server.port}/p/"
    wrong = f"youpai://upop:{q(UPYUN_WRONG)}@svc.127.0.0.1:{server.port}/p/"
    env = JobEnv(tmp_path / "job", {"jobName": "leak_upyun", "srcType": "youpai", "srcAccessKey": "upop",
                                    "srcSecretKey": UPYUN_PW, "srcDomain": f"http://127.0.0.1:{server.port}",
                                    "srcBucket": "svc", "srcPrefix": "p/", "destType": "local",
                                    "destPrefix": f"{tmp_path}/job_out/"})
    inputs = {env.conf / "local_job.cfg"}
    try:
        codes = {}
        for label, args in (("cp", ["-vv", "cp", good, f"{tmp_path}/out/"]),
                            ("sync", ["-vv", "--json", "sync", good, f"{tmp_path}/out/"]),
                            ("verify", ["-vv", "--checksum", "verify", good, f"{tmp_path}/out/"]),
                            ("wrong", ["-vv", "sync", wrong, f"{tmp_path}/wrong/"]),
                            ("as destination", ["-vv", "cp", f"{tmp_path}/out/", good]),
                            ("unescaped", ["-vv", "cp", f"upyun://upop:{UPYUN_PW}@svc/p/", f"{tmp_path}/x/"])):
            codes[label] = check.proc(label, cli(tmp_path, *args)).returncode
        assert codes == {"cp": 0, "sync": 0, "verify": 0, "wrong": 1, "as destination": 2, "unescaped": 2}, codes
        check.proc("submit", env.console("submit"))
        check.proc("start", env.console("start", "--workers", "1"))
        st = _wait_job(env, "leak_upyun", {"SUCCEED", "FAILED"})
        assert (st["JobState"], st["Files Done"]) == ("SUCCEED", 2), st
        check.proc("stat", env.console("stat", "--json"))
        check.proc("stop", env.console("stop"))
    finally:
        env.stop()
        server.stop()
    assert (tmp_path / "job_out" / "dir" / "b.txt").read_bytes() == b"beta" * 100
    check.tree(tmp_path, allowed=inputs)
    check.assert_clean()


# ---- signed URLs -----------------------------------------------------------------------------------------
SIGNATURE = "S1gnature/Leak+0001"


@pytest.fixture
def signed_web(tmp_path: Path) -> Iterator[str]:
    """A web server that serves /file.txt only to requests signed with ?X-Amz-Signature=SIGNATURE."""
    import http.server
    import threading
    from urllib.parse import parse_qs, urlsplit

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, body: bool) -> None:
            parts = urlsplit(self.path)
            if parts.path != "/file.txt" or parse_qs(parts.query).get("X-Amz-Signature") != [SIGNATURE]:
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", "6")
            self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
            self.end_headers()
            if body:
                self.wfile.write(b"signed")

        def do_HEAD(self) -> None:
            self._answer(False)

        def do_GET(self) -> None:
            self._answer(True)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/file.txt?X-Amz-Expires=60&X-Amz-Signature={q(SIGNATURE)}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_signed_url_signature_is_not_shown(tmp_path: Path, signed_web: str) -> None:
    check = LeakCheck([SIGNATURE])
    for i, flags in enumerate(([], ["-v"], ["-vv"], ["--json"])):
        proc = check.proc(f"cp {flags}", cli(tmp_path, *flags, "cp", signed_web, f"{tmp_path}/d{i}/"))
        assert proc.returncode == 0, proc.stderr  # copied: every request carried the signature
    proc = check.proc("cp to a file", cli(tmp_path, "-vv", "cp", signed_web, f"{tmp_path}/one.txt"))
    assert proc.returncode == 0, proc.stderr
    bad = signed_web.replace("/file.txt?", "/other.txt?")  # refused with 403: the error names the URL
    proc = check.proc("cp refused", cli(tmp_path, "-vv", "cp", bad, f"{tmp_path}/refused/"))
    assert proc.returncode != 0 and "403" in proc.stderr, proc.stderr
    names = LeakCheck([SIGNATURE])
    names.text("file names", "\n".join(str(p) for p in tmp_path.rglob("*")))
    names.assert_clean()  # the query string never becomes a file name
    check.tree(tmp_path, allowed=set())
    check.assert_clean()


def test_signed_url_can_be_copied(tmp_path: Path, signed_web: str) -> None:
    proc = cli(tmp_path, "cp", signed_web, f"{tmp_path}/dst/")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dst" / "file.txt").read_bytes() == b"signed"
    proc = cli(tmp_path, "sync", signed_web, f"{tmp_path}/dst/")  # HEADs the source and the destination
    assert proc.returncode == 0, proc.stderr
    proc = cli(tmp_path, "cp", signed_web, f"{tmp_path}/named.txt")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "named.txt").read_bytes() == b"signed"


def test_split_signed_url_keeps_its_query_out_of_sight() -> None:
    loc = parse_address(f"https://example.com/dir/file%20one.txt?X-Amz-Signature={q(SIGNATURE)}&x=1#frag")
    parent, name = loc.split_object()
    assert (parent.path, name, parent.query) == ("https://example.com/dir/", "file one.txt",
                                                  f"X-Amz-Signature={q(SIGNATURE)}&x=1")
    check = LeakCheck([SIGNATURE])
    for label, shown in (("repr", repr(parent)), ("str", str(parent)), ("display", parent.display()),
                         ("child", repr(parent.child("k")))):
        check.text(label, shown)
    check.assert_clean()


SVC_AK, SVC_SK = "svcLeakCheck0001", "SvcS3cr3t/Leak+0001"


def test_http_service_does_not_leak(tmp_path: Path, backend_factory: Any, leak_oss: tuple[OSSShim, str]) -> None:
    """Every answer of the service (both error and success, JSON and RPC door, metrics, events,
    pages), its output and every file it writes: no secret, only the 0600 database holds them."""
    import base64
    import http.client
    import threading

    from serviceenv import ServiceEnv

    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    loc = parse_address(s3.address(root))
    shim, bucket = leak_oss
    check = LeakCheck([*SECRETS, SVC_SK])
    env = ServiceEnv(tmp_path, {"serviceAccessKeyId": SVC_AK, "serviceAccessKeySecret": SVC_SK})
    auth = {"Authorization": "Basic " + base64.b64encode(f"{SVC_AK}:{SVC_SK}".encode()).decode()}
    answers: list[str] = []

    def call(action: str, **params: Any) -> dict[str, Any]:
        status, body = env.call(action, headers=auth, **params)
        answers.append(f"{action} -> {status} {json.dumps(body)}")
        return body

    src = tmp_path / "src"
    write_tree(src, {"a.txt": b"alpha", "b/c.txt": b"beta"})
    fs = tmp_path / "fs"
    (fs / "oss").mkdir(parents=True)
    (fs / "oss" / "up.txt").write_bytes(b"up")
    events: list[str] = []
    env.start()
    try:
        host, port = env.url.split("//", 1)[1].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        conn.request("GET", "/api/events", headers=auth)
        stream = conn.getresponse()
        reader = threading.Thread(target=lambda: events.extend(iter(lambda: stream.readline().decode(), "")),
                                  daemon=True)
        reader.start()
        s3_job = {"destType": "s3", "destDomain": f"http://{loc.endpoint}", "destBucket": loc.bucket,
                  "destPrefix": f"{root}/job/", "destAccessKey": JOB_AK, "destSecretKey": JOB_SK}
        call("CreateJob", jobName="leak_svc", srcType="local", srcPrefix=f"{src}/", **s3_job)
        call("CreateJob", jobName="leak_bad", srcType="local", srcPrefix=f"{src}/",
             **{**s3_job, "destDomain": f"http://u:{SFTP_PW}@bad host"})
        call("CreateJob", jobName="leak_oss_wrong", srcType="local", srcPrefix=f"{src}/", destType="oss",
             destDomain=f"http://127.0.0.1:{shim.port}", destBucket=bucket, destPrefix=f"{root}/",
             destAccessKey=OSS_AK, destSecretKey=JOB_OSS_WRONG)
        addr = f"s3://{q(S3_AK)}:{q(S3_SK)}:{q(S3_TOKEN)}@{loc.bucket}.{loc.endpoint}"
        flow = call("CreateDataFlow", FileSystemId=str(fs), SourceStorage=addr, FileSystemPath="/oss/",
                    SourceStoragePath=f"/{root}/flow/")["DataFlowId"]
        wrong = f"oss://{q(OSS_AK)}:{q(OSS_WRONG)}:{q(OSS_TOKEN)}@{bucket}.127.0.0.1:{shim.port}"
        bad_flow = call("CreateDataFlow", FileSystemId=str(fs), SourceStorage=wrong, FileSystemPath="/oss/")
        call("CreateDataFlow", FileSystemId=str(fs), SourceStorage=f"s3://{q(S3_AK)}:{q(S3_SK)}@bad bucket")
        task = call("CreateDataFlowTask", FileSystemId=str(fs), DataFlowId=flow, TaskAction="StreamExport",
                    Directory="/", DstDirectory="/")["TaskId"]
        sub = call("CreateDataFlowSubTask", FileSystemId=str(fs), DataFlowId=flow, DataFlowTaskId=task,
                   SrcFilePath="/up.txt", DstFilePath="/up.txt")["DataFlowSubTaskId"]
        env.wait(lambda: call("DescribeDataFlowSubTasks", FileSystemId=str(fs))["DataFlowSubTask"]
                 ["DataFlowSubTask"][0]["Status"] == "COMPLETE", 60, "the subtask")
        for name in ("leak_svc", "leak_oss_wrong"):
            env.wait(lambda n=name: env.call("DescribeJob", headers=auth, JobName=n)[1]["Job"]["State"]
                     in ("SUCCEED", "FAILED"), 90, f"job {name}")
            call("DescribeJob", JobName=name)
        assert call("DescribeJob", JobName="leak_svc")["Job"]["State"] == "SUCCEED"
        assert call("DescribeJob", JobName="leak_oss_wrong")["Job"]["FilesFailed"] == 2
        call("DescribeJobs")
        call("DescribeDataFlows", FileSystemId=str(fs))
        call("DescribeDataFlowTasks", FileSystemId=str(fs))
        call("RetryJob", JobName="leak_oss_wrong")
        call("CancelDataFlowSubTask", FileSystemId=str(fs), DataFlowId=flow, DataFlowTaskId=task,
             DataFlowSubTaskId=sub)
        for path in ("/metrics", "/openapi.json", "/", "/login.html", "/app.js"):
            status, raw, _ = env.request("GET", path, headers=auth)
            answers.append(f"GET {path} -> {status} {raw.decode(errors='replace')}")
        assert "Misconfigured" in json.dumps(bad_flow) or "DataFlowId" in bad_flow
        conn.close()
    finally:
        env.stop()
    for i, text in enumerate(answers):
        check.text(f"answer {i}", text)
    check.text("events", "".join(events))
    check.text("service output", "".join(env.output))
    db_files = set((env.workdir / "service").glob("service.db*"))
    for path in db_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path} holds credentials"
    check.tree(tmp_path, allowed=db_files | {env.sys_path})  # sys.properties: the config the test wrote
    assert len(answers) > 20 and check.files_checked > 10 and len(events) > 5
    assert any('"JobName": "leak_svc"' in line for line in events)
    probe = LeakCheck([*SECRETS, SVC_SK])
    probe.text("requests", addr + wrong + json.dumps(s3_job) + SVC_SK)
    assert {S3_SK, OSS_WRONG, JOB_SK, SVC_SK} <= probe.found
    check.assert_clean()
