"""workerRecordMd5: every uploaded object keeps its content MD5 where rclone keeps it."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from helpers import write_tree
from jobenv import JobEnv
from test_jobs import local_keys, s3_keys

from ossimport.address import parse_address


def _stored_md5s(s3, root: str) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    import boto3

    loc = parse_address(s3.address(root))
    client = boto3.client("s3", endpoint_url=loc.endpoint_url(), aws_access_key_id=loc.access_key,
                          aws_secret_access_key=loc.secret_key, region_name="us-east-1")
    out = {}
    for obj in client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.prefix).get("Contents", []):
        meta = client.head_object(Bucket=loc.bucket, Key=obj["Key"])["Metadata"]
        out[obj["Key"][len(loc.prefix):]] = meta.get("md5chksum")
    return out


def test_worker_record_md5_keeps_every_files_md5(tmp_path: Path, envs: list[JobEnv], backend_factory) -> None:  # type: ignore[no-untyped-def]
    s3 = backend_factory("s3-moto")
    files = {f"d/f{i}.bin": bytes([i]) * (100 + i) for i in range(5)}
    src = tmp_path / "src"
    write_tree(src, files)
    stored = {}
    for record in (False, True):
        root = s3.new_root()
        env = JobEnv(tmp_path / str(record), {**local_keys("src", src), **s3_keys("dest", s3.address(root))},
                     {"workerRecordMd5": record})
        envs.append(env)
        env.console("submit")
        env.console("start", "--workers", "1")
        assert env.wait_state({"SUCCEED", "FAILED"}, timeout=120)["JobState"] == "SUCCEED"
        env.stop()
        stored[record] = _stored_md5s(s3, root)
    want = {k: base64.b64encode(hashlib.md5(v).digest()).decode() for k, v in files.items()}
    assert stored[True] == want, "workerRecordMd5=true: each object keeps its MD5 as md5chksum"
    assert set(stored[False].values()) == {None}, "small objects carry no MD5 metadata by default"
