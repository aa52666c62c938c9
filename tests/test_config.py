"""Job/system config: the upstream ossimport templates, the shipped conf/, properties syntax,
YAML, validation of every key, and secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import compat_dir

from ossimport.jobs.config import (
    JOB_KEYS,
    SYS_KEYS,
    ConfigError,
    JobConfig,
    SysConfig,
    UnsupportedSource,
    dump_job,
    load_job,
    load_sys,
    read_properties,
)

ROOT = Path(__file__).resolve().parents[1]
COMPAT = compat_dir()
TEMPLATES = ("blob", "bos", "cos", "et", "local", "oss", "qiniu", "s3", "youpai")
MiB = 1024 * 1024


@pytest.fixture
def compat() -> Path:
    if not COMPAT.is_dir():
        reason = f"../shared/compat not present: {COMPAT} is missing, upstream templates not checked"
        print(reason)
        pytest.skip(reason)
    return COMPAT


def job(tmp_path: Path, **overrides: object) -> JobConfig:
    """A valid local -> local job with `overrides` applied."""
    mapping: dict[str, object] = {"srcType": "local", "srcPrefix": str(tmp_path / "src"),
                                  "destType": "local", "destPrefix": str(tmp_path / "dst")}
    mapping.update(overrides)
    return JobConfig.from_mapping(mapping, "t.cfg", base_dir=tmp_path)


# ---- the upstream templates -----------------------------------------------------------------------
@pytest.mark.parametrize("name", TEMPLATES)
def test_upstream_template_loads_unchanged(compat: Path, name: str) -> None:
    cfg = load_job(compat / name / "job.cfg")
    assert cfg.jobName.startswith("local_test")
    assert cfg.destType == "oss"  # no destType key: the destination is OSS
    assert cfg.isAuditAfterImport is True  # "true " with a trailing space
    assert cfg.jobType == "import" and cfg.auditMode in ("general", "simple")
    assert cfg.multipartUploadThreshold in (50 * MiB, 150 * MiB)
    assert cfg.taskObjectSizeLimit == 1_000_000_000
    assert not any("unknown key" in w for w in cfg.warnings), cfg.warnings
    assert all("\n" not in w for w in cfg.warnings)


def test_upstream_sizes_and_defaults(compat: Path) -> None:
    blob = load_job(compat / "blob" / "job.cfg")
    assert (blob.multipartUploadThreshold, blob.multipartUploadPartSize) == (50 * MiB, 150 * MiB)
    et = load_job(compat / "et" / "job.cfg")  # Express Connect keys: accepted, one warning
    assert et.jobName == "local_test_md" and et.taskObjectCountLimit == 5 and et.auditMode == "simple"
    assert any("isUseExpressTunnel" in w for w in et.warnings)
    assert et.uploadThreadNumPerLargeFile == 3 and et.scanThreadCount == 1 and et.isSkipExistFile is False


def test_upstream_oss_last_destprefix_wins(compat: Path) -> None:
    path = compat / "oss" / "job.cfg"
    raw = [line.split("=", 1)[1].strip() for line in path.read_text(encoding="utf-8").splitlines()
           if line.startswith("destPrefix=")]
    cfg = load_job(path)
    assert cfg.destPrefix == raw[-1]
    src, dst = cfg.locations()
    assert (src.backend, dst.backend) == ("oss", "oss")
    assert dst.endpoint == "oss-cn-hangzhou-internal.aliyuncs.com" and dst.https is False
    assert dst.prefix == raw[-1]


def test_upstream_s3_scan_threads_clamped(compat: Path) -> None:
    cfg = load_job(compat / "s3" / "job.cfg")
    assert cfg.scanThreadCount == 32
    assert any("scanThreadCount" in w and "10000" in w and "32" in w for w in cfg.warnings)
    src, _ = cfg.locations()
    assert (src.backend, src.flavour, src.endpoint, src.bucket, src.prefix) == (
        "s3", "s3", "s3.us-east-1.amazonaws.com", "mybucket", "docs/")


def test_upstream_cos_short_region(compat: Path) -> None:
    cfg = load_job(compat / "cos" / "job.cfg")
    src, _ = cfg.locations()
    assert src.endpoint == "cos.ap-shanghai.myqcloud.com"
    assert src.prefix == "docs/"  # srcPrefix=/docs/
    assert src.bucket == "mybucket-1252883280"  # the S3 API names COS buckets <bucket>-<appId>


def test_upstream_bos_uses_s3_endpoint(compat: Path) -> None:
    src, _ = load_job(compat / "bos" / "job.cfg").locations()
    assert (src.flavour, src.endpoint) == ("bos", "s3.bj.bcebos.com")


def test_upstream_blob_reads_azure_china(compat: Path) -> None:
    cfg = load_job(compat / "blob" / "job.cfg")
    assert not cfg.warnings, cfg.warnings
    src, _ = cfg.locations()
    assert (src.backend, src.access_key, src.bucket, src.endpoint, src.prefix) == (
        "azure", "useraccount", "mycontainer", "core.chinacloudapi.cn", "docs/")
    assert src.secret_key == cfg.srcSecretKey and cfg.srcSecretKey not in repr(src)


@pytest.mark.parametrize("domain", ["core.windows.net", "https://acct.blob.core.windows.net/", ""])
def test_azure_domain_is_the_endpoint_suffix(tmp_path: Path, domain: str) -> None:
    """srcDomain is the connection string's EndpointSuffix; the whole blob endpoint means the same."""
    cfg = job(tmp_path, srcType="azure", srcAccessKey="acct", srcSecretKey="a2V5", srcBucket="box",
              srcDomain=domain, destType="azure", destAccessKey="acct", destSecretKey="a2V5", destBucket="out")
    src, dst = cfg.locations()
    assert (src.endpoint, dst.endpoint) == ("core.windows.net" if domain else "", "")
    assert src.https is (True if domain.startswith("https") else None)


def test_azure_needs_the_account(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="srcAccessKey is missing; srcType=azure needs the storage account name"):
        job(tmp_path, srcType="azure", srcBucket="box")


def test_youpai_template_is_an_upyun_source(compat: Path) -> None:
    """srcType=youpai: srcAccessKey is the operator, srcSecretKey its password, srcDomain the API
    endpoint (http:// as the template writes it)."""
    cfg = load_job(compat / "youpai" / "job.cfg")
    assert not any("youpai" in w for w in cfg.warnings), cfg.warnings
    src, _ = cfg.locations()
    assert (src.backend, src.access_key, src.secret_key, src.bucket, src.endpoint, src.prefix, src.https) == (
        "upyun", "operator", "password", "mybucket", "v0.api.upyun.com", "docs/", False)
    assert "password" not in repr(src) and src.display() == "upyun://operator:***@mybucket.v0.api.upyun.com/docs/"


def test_youpai_cdn_download_is_ignored_with_a_warning(tmp_path: Path) -> None:
    cfg = job(tmp_path, srcType="youpai", srcBucket="svc", srcAccessKey="op", srcSecretKey="pw",
              isDownloadFromCdn="true", cdnDomain="http://cdn.example.com")
    assert [w for w in cfg.warnings if "isDownloadFromCdn" in w] == [
        "t.cfg: isDownloadFromCdn=true is ignored for youpai; files are read through the UpYun REST API"]
    assert cfg.locations()[0].backend == "upyun"


@pytest.mark.parametrize(("missing", "says"), [("srcBucket", "the UpYun service (bucket) name"),
                                                ("srcAccessKey", "the operator name"),
                                                ("srcSecretKey", "the operator's password")])
def test_youpai_needs_service_operator_and_password(tmp_path: Path, missing: str, says: str) -> None:
    keys = {"srcType": "youpai", "srcBucket": "svc", "srcAccessKey": "op", "srcSecretKey": "pw", missing: ""}
    with pytest.raises(ConfigError, match=f"{missing} is missing; srcType=youpai needs {re.escape(says)}"):
        job(tmp_path, **keys)


@pytest.mark.parametrize("name, word", [("qiniu", "s3-cn-east-1.qiniucs.com")])
def test_unreadable_sources_load_but_refuse_to_run(compat: Path, name: str, word: str) -> None:
    cfg = load_job(compat / name / "job.cfg")
    assert any(word in w for w in cfg.warnings)
    with pytest.raises(UnsupportedSource) as info:
        cfg.locations()
    msg = str(info.value)
    assert "\n" not in msg and word in msg and str(compat / name / "job.cfg") in msg


def test_upstream_windows_path_warns(compat: Path) -> None:
    cfg = load_job(compat / "local" / "job.cfg")
    assert cfg.srcPrefix == "D:/work/oss/data/"
    assert any("Windows path" in w for w in cfg.warnings)
    assert cfg.locations()[0].path == "D:/work/oss/data/"


def test_upstream_secrets_masked(compat: Path) -> None:
    for name in TEMPLATES:
        path = compat / name / "job.cfg"
        cfg = load_job(path)
        text = repr(cfg) + str(cfg) + " ".join(cfg.warnings)
        for secret in (cfg.srcAccessKey, cfg.srcSecretKey, cfg.destAccessKey, cfg.destSecretKey):
            assert len(secret) < 10 or secret not in text  # short ones ("operator") are common words
        if name != "qiniu":
            src, dst = cfg.locations()
            assert cfg.destSecretKey not in repr(src) + repr(dst)


# ---- shipped conf/ --------------------------------------------------------------------------------
def test_shipped_local_job_points_at_demo_data() -> None:
    cfg = load_job(ROOT / "conf" / "local_job.cfg")
    assert cfg.warnings == []
    src, dst = cfg.locations()
    assert src.backend == "local" and src.path == str(ROOT / "demo" / "data") + "/"
    assert Path(src.path).is_dir()
    assert dst.backend == "local" and dst.path == str(ROOT / "demo-output") + "/"


def test_shipped_distributed_job_and_sys() -> None:
    cfg = load_job(ROOT / "conf" / "job.cfg")
    assert cfg.warnings == []
    src, dst = cfg.locations()
    assert src.backend == "local" and dst.backend == "s3" and dst.https is True
    sysconf = load_sys(ROOT / "conf" / "sys.properties")
    assert sysconf.warnings == []
    assert sysconf.workingDir == ROOT / "run" and sysconf.curveKeysDir == ROOT / "run" / "keys"
    assert sysconf.masterAddress == "tcp://127.0.0.1:13830"
    assert (sysconf.sshPort, sysconf.workerTaskThreadNum, sysconf.workerMaxThroughput) == (22, 20, 0)


def test_shipped_files_document_every_key() -> None:
    for name, keys in (("local_job.cfg", JOB_KEYS), ("job.cfg", JOB_KEYS), ("sys.properties", SYS_KEYS)):
        lines = (ROOT / "conf" / name).read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line and not line.startswith("#"):
                above = next(x for x in reversed(lines[:i]) if not re.match(r"^[\w()/]+=", x))
                assert above.startswith("#"), f"{name}: {line!r} has no comment above"
        present = {line.split("=", 1)[0] for line in lines if line and not line.startswith("#")}
        upstream_only = {"appId", "isDownloadFromCdn", "cdnDomain", "isServerSideEncryption", "getObjectMetaMode"}
        assert set(keys) - upstream_only <= present, name
    hosts = [x for x in (ROOT / "conf" / "workers").read_text().splitlines() if x and not x.startswith("#")]
    assert hosts == ["127.0.0.1"]


# ---- properties syntax ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("a=1\nb = 2\nc:3\nd 4\ne\t=\t5", {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}),
    ("k = = v", {"k": "= v"}),
    ("k==v", {"k": "=v"}),
    ("key = one \\\n      two \\\n\tthree", {"key": "one two three"}),
    ("# comment \\\nk=v\n! also a comment\n  # indented comment", {"k": "v"}),
    ("tab=a\\tb\\nc\\rd\\fe\\\\f", {"tab": "a\tb\nc\rd\fe\\f"}),
    ("a\\:b\\=c\\ d=e\\#f", {"a:b=c d": "e#f"}),
    ("u=\\u4e2d\\u6587 \\uD83D\\uDE00", {"u": "中文 😀"}),
    ("\ufeffa=1\r\nb=2\r\n", {"a": "1", "b": "2"}),
    ("a=1\rb=2", {"a": "1", "b": "2"}),
    ("dup=1\ndup=2", {"dup": "2"}),
    ("trail=true \n", {"trail": "true "}),
    ("lead=\\ x", {"lead": " x"}),
    ("empty=\nonly", {"empty": "", "only": ""}),
    ("workerMaxThroughput(KB/s)=100", {"workerMaxThroughput(KB/s)": "100"}),
    ("end=a\\", {"end": "a"}),
    ("x=\\q", {"x": "q"}),
])
def test_read_properties(text: str, expected: dict[str, str]) -> None:
    assert read_properties(text) == expected


def test_read_properties_bad_unicode_escape() -> None:
    with pytest.raises(ConfigError, match=r"f.cfg:2: malformed"):
        read_properties("a=1\nb=\\u12x4", "f.cfg")


def test_file_bom_crlf_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "j.cfg"
    path.write_bytes("\ufeffsrcType=local\r\nsrcPrefix=a/\r\ndestType=local\r\ndestPrefix=x/\r\n"
                     "destPrefix=out/\r\n".encode())
    cfg = load_job(path)
    assert cfg.srcType == "local" and cfg.destPrefix == "out/"
    assert any("destPrefix is set again" in w and "line 4" in w for w in cfg.warnings)
    src, dst = cfg.locations()  # not in conf/: relative to the file's own directory
    assert src.path == f"{tmp_path}/a/" and dst.path == f"{tmp_path}/out/"


def test_conf_dir_base(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "j.cfg").write_text("srcType=local\nsrcPrefix=./data//x\ndestType=local\ndestPrefix=~/o\n")
    src, dst = load_job(tmp_path / "conf" / "j.cfg").locations()
    assert src.path == f"{tmp_path}/data/x/"
    assert dst.path == str(Path.home() / "o") + "/"


def test_gbk_comments(tmp_path: Path) -> None:
    path = tmp_path / "j.cfg"
    path.write_bytes("# 源前缀\nsrcType=local\nsrcPrefix=/d/\ndestType=local\ndestPrefix=/e/\n".encode("gbk"))
    assert load_job(path).srcPrefix == "/d/"


# ---- values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [("150m", 150 * MiB), ("50M", 50 * MiB), ("1g", 1024 * MiB),
                                        ("1024k", MiB), ("2097152", 2 * MiB), (" 3MB ", 3 * MiB)])
def test_sizes(tmp_path: Path, text: str, size: int) -> None:
    assert job(tmp_path, multipartUploadThreshold=text).multipartUploadThreshold == size


@pytest.mark.parametrize("text, value", [("true", True), ("TRUE ", True), (" False", False), (True, True)])
def test_booleans(tmp_path: Path, text: object, value: bool) -> None:
    assert job(tmp_path, isSkipExistFile=text).isSkipExistFile is value


def test_defaults(tmp_path: Path) -> None:
    cfg = JobConfig.from_mapping({"srcType": "local", "srcPrefix": "/s/", "destBucket": "b",
                                  "destDomain": "oss-cn-beijing.aliyuncs.com"})
    assert (cfg.jobName, cfg.jobType, cfg.destType, cfg.auditMode) == ("local_test", "import", "oss", "general")
    assert (cfg.scanThreadCount, cfg.maxMultiThreadScanDepth, cfg.taskObjectCountLimit) == (1, 1, 10000)
    assert (cfg.multipartUploadThreshold, cfg.multipartUploadPartSize) == (150 * MiB, 50 * MiB)
    assert cfg.isAuditAfterImport and not cfg.isAllowSymbolicLink and not cfg.isIncremental
    assert (cfg.httpPrefixColumn, cfg.relativePathColumn, cfg.uploadThreadNumPerLargeFile) == (1, 2, 3)
    assert cfg.warnings == []
    empty_typed = job(tmp_path, scanThreadCount="", auditMode="")  # empty = default, as upstream writes
    assert (empty_typed.scanThreadCount, empty_typed.auditMode) == (1, "general")


def test_clamps_warn(tmp_path: Path) -> None:
    cfg = job(tmp_path, scanThreadCount="0", maxMultiThreadScanDepth="99", taskObjectCountLimit="100000",
              multipartUploadPartSize="10g", multipartUploadThreshold="1k")
    assert (cfg.scanThreadCount, cfg.maxMultiThreadScanDepth, cfg.taskObjectCountLimit) == (1, 16, 50000)
    assert (cfg.multipartUploadPartSize, cfg.multipartUploadThreshold) == (5 * 1024 * MiB, MiB)
    assert len(cfg.warnings) == 5


def test_incremental_interval(tmp_path: Path) -> None:
    cfg = job(tmp_path, isIncremental="true", incrementalModeInterval="60")
    assert cfg.incrementalModeInterval == 900 and any("900" in w for w in cfg.warnings)
    short = JobConfig.from_mapping({"srcType": "local", "srcPrefix": "/s/", "destType": "local",
                                    "destPrefix": "/d/", "incrementalModeInterval": 2},
                                   allow_short_interval=True)
    assert short.incrementalModeInterval == 2
    (tmp_path / "j.cfg").write_text("srcType=local\nsrcPrefix=/s/\ndestType=local\ndestPrefix=/d/\n"
                                    "isIncremental=true\nincrementalModeInterval=3\n")
    assert load_job(tmp_path / "j.cfg", allow_short_interval=True).incrementalModeInterval == 3


def test_unknown_keys_warn(tmp_path: Path) -> None:
    cfg = job(tmp_path, isSkipExistFiles="true", srctype="x", workerTaskThreadNum="5", frobnicate="1")
    text = "\n".join(cfg.warnings)
    assert "'isSkipExistFiles'" in text and "did you mean isSkipExistFile" in text
    assert "did you mean srcType" in text
    assert "workerTaskThreadNum belongs in sys.properties" in text
    assert "'frobnicate' is ignored" in text
    assert cfg.isSkipExistFile is False


# ---- every key: one invalid value -----------------------------------------------------------------
INVALID_JOB = {
    "jobName": "ab", "jobType": "importt", "isIncremental": "yes", "incrementalModeInterval": "15min",
    "importSince": "1700000000000", "lastModify": "-1", "srcType": "ftp", "srcAccessKey": "AKID\tSECRET1",
    "srcSecretKey": "s3cr\x01etvalue", "srcDomain": "http://oss-cn-hangzhou.aliyuncs.com/mybucket",
    "srcBucket": "my/bucket", "srcPrefix": "docs\n/", "destType": "http", "destAccessKey": "AK\nAKAKAK",
    "destSecretKey": "SK\x7fSKSKSK", "destDomain": "ho st", "destBucket": "bucket/", "destPrefix": "a\x00b",
    "appId": "abc", "isDownloadFromCdn": "1", "cdnDomain": "http://cdn.example.com/path",
    "httpListFilePath": "list\x07", "httpPrefixColumn": "0", "relativePathColumn": "101",
    "isSkipExistFile": "ture", "taskObjectCountLimit": "many", "taskObjectSizeLimit": "1x",
    "scanThreadCount": "four", "maxMultiThreadScanDepth": "1.5", "uploadThreadNumPerLargeFile": "0",
    "multipartUploadThreshold": "150mm", "multipartUploadPartSize": "-5m", "isServerSideEncryption": "on",
    "isAllowSymbolicLink": "no", "getObjectMetaMode": "list", "isAuditAfterImport": "t", "auditMode": "full",
}
INVALID_SYS = {
    "workingDir": "run\tdir", "workerUserName": "u\nx", "workerPassword": "pa\x01ssword", "privateKeyFile": "k\tey",
    "sshPort": "70000", "workerTaskThreadNum": "0", "workerMaxThroughput(KB/s)": "fast",
    "dispatcherThreadNum": "x", "workerAbortWhenUncatchedException": "maybe", "workerRecordMd5": "2",
    "javaHeapMaxSize": "1g\t2", "masterAddress": "127.0.0.1:13830", "workerCount": "-1", "leaseSeconds": "2",
    "heartbeatSeconds": "40", "allowShortIncrementalInterval": "yes", "curveKeysDir": "k\x00x",
    "serviceAddress": "http://0.0.0.0:8567", "serviceAccessKeyId": "ak\tid", "serviceAccessKeySecret": "se\x01cret",
    "serviceSubTaskExpireSeconds": "1d",
}
SECRETS = {"srcAccessKey", "srcSecretKey", "destAccessKey", "destSecretKey", "workerPassword", "serviceAccessKeySecret"}


def test_every_key_has_an_invalid_case() -> None:
    assert set(INVALID_JOB) == set(JOB_KEYS)
    assert set(INVALID_SYS) == set(SYS_KEYS)


def _check_message(exc: ConfigError, key: str, value: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and msg.startswith("t.cfg: ") and key in msg
    if key in SECRETS:
        assert value not in msg and value.strip()[:4] not in msg and "***" in msg
    else:
        assert repr(value.strip()) in msg or repr(value.strip()).strip("'") in msg


@pytest.mark.parametrize("key", sorted(INVALID_JOB))
def test_invalid_job_value(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        job(tmp_path, **{key: INVALID_JOB[key]})
    assert info.value.exit_code == 2
    _check_message(info.value, key, INVALID_JOB[key])


@pytest.mark.parametrize("key", sorted(INVALID_SYS))
def test_invalid_sys_value(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        SysConfig.from_mapping({key: INVALID_SYS[key]}, "t.cfg", base_dir=tmp_path)
    _check_message(info.value, key, INVALID_SYS[key])


def test_invalid_message_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        job(tmp_path, jobType="importt")
    assert str(info.value) == "t.cfg: jobType='importt' is not allowed; use import or audit"


@pytest.mark.parametrize("mapping, key", [
    ({"destType": "local", "destPrefix": "/d/"}, "srcType"),
    ({"srcType": "local", "destType": "local", "destPrefix": "/d/"}, "srcPrefix"),
    ({"srcType": "s3", "destType": "local", "destPrefix": "/d/"}, "srcBucket"),
    ({"srcType": "cos", "srcBucket": "b", "destType": "local", "destPrefix": "/d/"}, "srcDomain"),
    ({"srcType": "sftp", "srcPrefix": "/x/", "destType": "local", "destPrefix": "/d/"}, "srcDomain"),
    ({"srcType": "http", "destType": "local", "destPrefix": "/d/"}, "httpListFilePath"),
    ({"srcType": "local", "srcPrefix": "/s/"}, "destBucket"),
    ({"srcType": "local", "srcPrefix": "/s/", "destBucket": "b"}, "destDomain"),
    ({"srcType": "local", "srcPrefix": "/s/", "destType": "local"}, "destPrefix"),
    ({"srcType": "local", "srcPrefix": "/s/", "destType": "local", "destPrefix": "/d/", "jobName": ""}, "jobName"),
])
def test_missing_required(mapping: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        JobConfig.from_mapping(mapping, "t.cfg")
    assert key in str(info.value) and "\n" not in str(info.value)


def test_object_store_prefix_may_be_empty() -> None:
    cfg = JobConfig.from_mapping({"srcType": "oss", "srcBucket": "b", "srcDomain": "oss-cn-beijing.aliyuncs.com",
                                  "destType": "local", "destPrefix": "/d/"})
    assert cfg.locations()[0].prefix == ""


def test_http_columns_must_differ(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="relativePathColumn"):
        job(tmp_path, srcType="http", httpListFilePath="l.txt", httpPrefixColumn=2, relativePathColumn="2")


# ---- locations ------------------------------------------------------------------------------------
def _src(tmp_path: Path, **kw: object) -> object:
    return job(tmp_path, **kw).locations()[0]


@pytest.mark.parametrize("domain, endpoint", [
    ("sh", "cos.ap-shanghai.myqcloud.com"), ("tj", "cos.ap-beijing-1.myqcloud.com"),
    ("sgp", "cos.ap-singapore.myqcloud.com"), ("ap-guangzhou", "cos.ap-guangzhou.myqcloud.com"),
    ("https://cos.ap-nanjing.myqcloud.com", "cos.ap-nanjing.myqcloud.com"),
])
def test_cos_regions(tmp_path: Path, domain: str, endpoint: str) -> None:
    loc = _src(tmp_path, srcType="cos", srcBucket="b-125", srcDomain=domain, appId="125")
    assert loc.endpoint == endpoint and loc.bucket == "b-125"  # appId already in the bucket name


def test_object_store_locations(tmp_path: Path) -> None:
    loc = _src(tmp_path, srcType="s3", srcBucket="b", srcDomain="https://s3.amazonaws.com/", srcPrefix="/a/b",
               srcAccessKey="AK", srcSecretKey="SK")
    assert (loc.backend, loc.flavour, loc.endpoint, loc.prefix, loc.https, loc.path_style) == (
        "s3", "s3", "s3.amazonaws.com", "a/b/", True, False)
    assert (loc.access_key, loc.secret_key, loc.is_dir) == ("AK", "SK", True)
    assert _src(tmp_path, srcType="s3", srcBucket="b").endpoint == ""  # AWS default
    assert _src(tmp_path, srcType="s3", srcBucket="b", srcDomain="s3.x.com").https is None
    ip = _src(tmp_path, srcType="obs", srcBucket="b", srcDomain="http://127.0.0.1:9000")
    assert (ip.flavour, ip.endpoint, ip.path_style, ip.https) == ("obs", "127.0.0.1:9000", True, False)
    minio = _src(tmp_path, srcType="minio", srcBucket="minio", srcDomain="minio.lan:9000")
    assert minio.path_style and minio.flavour == "minio"
    qiniu = _src(tmp_path, srcType="qiniu", srcBucket="b", srcDomain="s3-cn-east-1.qiniucs.com")
    assert qiniu.endpoint == "s3-cn-east-1.qiniucs.com"
    oss = job(tmp_path, destType="oss", destBucket="b", destDomain="oss-cn-beijing.aliyuncs.com",
              destPrefix="x").locations()[1]
    assert (oss.backend, oss.prefix) == ("oss", "x/")


def test_bucket_in_domain_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without the bucket: oss-cn-beijing.aliyuncs.com"):
        job(tmp_path, srcType="oss", srcBucket="mybucket", srcDomain="http://mybucket.oss-cn-beijing.aliyuncs.com")


def test_sftp_location(tmp_path: Path) -> None:
    loc = _src(tmp_path, srcType="sftp", srcDomain="alice@files.lan:2222", srcPrefix="/data", srcSecretKey="pw")
    assert (loc.backend, loc.host, loc.port, loc.user, loc.password, loc.path) == (
        "sftp", "files.lan", 2222, "alice", "pw", "/data/")
    other = _src(tmp_path, srcType="sftp", srcDomain="[::1]", srcPrefix="up/", srcAccessKey="bob")
    assert (other.host, other.port, other.user) == ("::1", None, "bob")
    with pytest.raises(ConfigError) as info:
        job(tmp_path, srcType="sftp", srcDomain="alice:hunter2@files.lan", srcPrefix="/d/")
    assert "hunter2" not in str(info.value)


def test_http_location(tmp_path: Path) -> None:
    loc = _src(tmp_path, srcType="http", httpListFilePath="urls.txt")
    assert (loc.backend, loc.path, loc.is_dir) == ("http", f"{tmp_path}/urls.txt", True)


def test_unsupported_destination(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"destType='youpai' is not allowed \(youpai is read-only, a source only\)"):
        job(tmp_path, destType="youpai")


def test_storage_options(tmp_path: Path) -> None:
    cfg = job(tmp_path, isAllowSymbolicLink="true", srcType="http", httpListFilePath="l", httpPrefixColumn="3",
              relativePathColumn="1", destType="s3", destBucket="b", destDomain="https://s3.amazonaws.com")
    src, dst = cfg.storage_options(SysConfig.from_mapping({"workerTaskThreadNum": "30"}))
    assert src.follow_symlinks and not dst.follow_symlinks
    assert (src.http_prefix_column, src.http_key_column) == (3, 1)
    assert src.max_pool >= 30 and dst.max_pool >= 30
    assert (src.https, dst.https) == (False, True)


# ---- YAML, dump -----------------------------------------------------------------------------------
def test_yaml_equivalent(tmp_path: Path) -> None:
    (tmp_path / "job.cfg").write_text(
        "jobName=yaml_job\nsrcType=local\nsrcPrefix=data/\nisSkipExistFile=true \nscanThreadCount=4\n"
        "taskObjectSizeLimit=1g\ndestType=minio\ndestDomain=http://127.0.0.1:9000\ndestBucket=bk\n"
        "destAccessKey=ak\ndestSecretKey=sk\n")
    (tmp_path / "job.yaml").write_text(
        "jobName: yaml_job\nsrcType: local\nsrcPrefix: data/\nisSkipExistFile: true\nscanThreadCount: 4\n"
        "taskObjectSizeLimit: 1g\ndestType: minio\ndestDomain: http://127.0.0.1:9000\ndestBucket: bk\n"
        "destAccessKey: ak\ndestSecretKey: sk\n")
    a, b = load_job(tmp_path / "job.cfg"), load_job(tmp_path / "job.yaml")
    assert a == b and a.locations()[0].path == b.locations()[0].path
    (tmp_path / "sys.yml").write_text("workerTaskThreadNum: 8\nworkerMaxThroughput(KB/s): 100\nworkingDir: w\n")
    s = load_sys(tmp_path / "sys.yml")
    assert (s.workerTaskThreadNum, s.workerMaxThroughput, s.workingDir) == (8, 100, tmp_path / "w")


@pytest.mark.parametrize("text", ["- a\n- b\n", "a: [1, 2]\n", "a: b: c\n"])
def test_bad_yaml(tmp_path: Path, text: str) -> None:
    (tmp_path / "j.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_job(tmp_path / "j.yaml")
    assert "j.yaml" in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.cfg: cannot read"):
        load_job(tmp_path / "nope.cfg")


def test_dump_round_trip(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "j.cfg").write_text(
        "jobName=round_trip\nsrcType=local\nsrcPrefix=demo/ d\\u00e9j\u00e0/\ndestType=oss\ndestBucket=b\n"
        "destDomain=http://oss-cn-beijing.aliyuncs.com\ndestPrefix=\\ in ner/\ndestSecretKey=s\\\\k=x:y\n"
        "scanThreadCount=99\nmultipartUploadThreshold=200m\n")
    cfg = load_job(tmp_path / "conf" / "j.cfg")
    text = dump_job(cfg)
    (tmp_path / "frozen").mkdir()
    (tmp_path / "frozen" / "job.cfg").write_text(text)
    again = load_job(tmp_path / "frozen" / "job.cfg")
    assert again.warnings == []
    assert again.locations() == cfg.locations()
    assert again.locations()[0].path == f"{tmp_path}/demo/ déjà/"
    assert again.destSecretKey == "s\\k=x:y" and again.destPrefix == "in ner/"  # values are trimmed
    assert again.scanThreadCount == 32 and again.multipartUploadThreshold == 200 * MiB
    abs_cfg = job(tmp_path, srcPrefix=f"{tmp_path}/s/", destPrefix=f"{tmp_path}/d/", isIncremental=True)
    assert JobConfig.from_mapping(read_properties(dump_job(abs_cfg))) == abs_cfg


# ---- sys ------------------------------------------------------------------------------------------
def test_sys_defaults_and_paths(tmp_path: Path) -> None:
    s = SysConfig.from_mapping({}, base_dir=tmp_path)
    assert (s.workingDir, s.curveKeysDir) == (tmp_path / "run", tmp_path / "run" / "keys")
    assert (s.leaseSeconds, s.heartbeatSeconds, s.workerCount, s.workerRecordMd5) == (60, 5.0, 0, False)
    assert s.resolved_worker_count() >= 1
    s = SysConfig.from_mapping({"workingDir": "/abs/w", "privateKeyFile": "id_rsa", "workerUser": "deployer",
                                "workerMaxThroughput": "5", "javaHeapMaxSize": "2g", "dispatcherThreadNum": "3",
                                "leaseSeconds": 10, "heartbeatSeconds": "0.5"}, base_dir=tmp_path)
    assert (s.workingDir, s.curveKeysDir, s.privateKeyFile) == (Path("/abs/w"), Path("/abs/w/keys"), tmp_path / "id_rsa")
    assert (s.workerUserName, s.workerMaxThroughput, s.heartbeatSeconds) == ("deployer", 5, 0.5)


def test_sys_cross_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="heartbeatSeconds=.5. .*leaseSeconds/2 = 3"):
        SysConfig.from_mapping({"leaseSeconds": "6"}, "t.cfg")
    with pytest.raises(ConfigError, match="masterAddress"):
        SysConfig.from_mapping({"masterAddress": "tcp://h:70000"}, "t.cfg")
    s = SysConfig.from_mapping({"incrementalModeInterval": "5", "allowShortIncrementalInterval": "TRUE"})
    assert s.allowShortIncrementalInterval and any("belongs in the job config" in w for w in s.warnings)


def test_sys_secret_masked(tmp_path: Path) -> None:
    s = SysConfig.from_mapping({"workerPassword": "topsecretpw"}, base_dir=tmp_path)
    assert s.workerPassword == "topsecretpw" and "topsecretpw" not in repr(s)


def test_repr_masks_job_secrets(tmp_path: Path) -> None:
    cfg = job(tmp_path, destType="oss", destBucket="b", destDomain="oss-cn-beijing.aliyuncs.com",
              destAccessKey="AKVISIBLE1", destSecretKey="SKVISIBLE2", srcAccessKey="x1y2z3", srcSecretKey="q9w8e7")
    text = repr(cfg) + str(cfg) + repr(cfg.locations())
    for secret in ("AKVISIBLE1", "SKVISIBLE2", "x1y2z3", "q9w8e7"):
        assert secret not in text
