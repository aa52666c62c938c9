"""The OpenAPI RPC door, driven by the official Alibaba Cloud NAS SDK (alibabacloud-nas20170626)
against a real `ossimport serve` on 127.0.0.1 with service credentials, moto S3 as the store.
Signature failures, replays and stale dates are sent as raw signed requests."""

from __future__ import annotations

import hashlib
import json
import random
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from serviceenv import ServiceEnv

from ossimport.service.auth import sign, string_to_sign

sdk = pytest.importorskip("alibabacloud_nas20170626.client", reason="pip install alibabacloud-nas20170626 (test extra)")
from alibabacloud_nas20170626 import models  # noqa: E402
from alibabacloud_tea_openapi.models import Config  # noqa: E402
from Tea.exceptions import TeaException  # noqa: E402

AK, SK = "svcAccessKeyId01", "svc/Secret+Key=01"
MiB = 1024 * 1024


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[ServiceEnv]:
    env = ServiceEnv(tmp_path, {"serviceAccessKeyId": AK, "serviceAccessKeySecret": SK}, workers=False)
    env.start()
    try:
        yield env
    finally:
        env.stop()


def client(svc: ServiceEnv, ak: str = AK, sk: str = SK) -> Any:
    return sdk.Client(Config(access_key_id=ak, access_key_secret=sk, endpoint=svc.url.split("//", 1)[1],
                             protocol="http", read_timeout=60000, connect_timeout=10000))


def raw_rpc(svc: ServiceEnv, action: str, params: dict[str, str], *, secret: str = SK, date: str | None = None,
            nonce: str | None = None, method: str = "POST") -> tuple[int, dict[str, Any]]:
    """A request signed as the SDK signs it (ACS3-HMAC-SHA256), sent with urllib."""
    host = svc.url.split("//", 1)[1]
    headers = {"host": host, "x-acs-action": action, "x-acs-version": "2017-06-26",
               "x-acs-date": date or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "x-acs-signature-nonce": nonce or uuid.uuid4().hex,
               "x-acs-content-sha256": hashlib.sha256(b"").hexdigest()}
    signed = sorted(headers)
    text = string_to_sign(method, "/", list(params.items()), headers, signed, headers["x-acs-content-sha256"])
    headers["Authorization"] = (f"ACS3-HMAC-SHA256 Credential={AK},SignedHeaders={';'.join(signed)},"
                                f"Signature={sign(secret, text)}")
    req = urllib.request.Request(f"{svc.url}/?{urlencode(params)}", method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def error_of(call: Any) -> TeaException:
    with pytest.raises(TeaException) as info:
        call()
    return info.value


def test_the_official_sdk_drives_a_stream_import_and_export(svc: ServiceEnv, backend_factory: Any,
                                                            tmp_path: Path) -> None:
    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    bucket = s3.storage(root)
    data = random.Random(3).randbytes(3 * MiB + 17)
    import io

    bucket.put("bmcpfs/test/file.xml", io.BytesIO(data), len(data))
    fs = tmp_path / "fs"
    (fs / "oss").mkdir(parents=True)
    c = client(svc)
    address = s3.address(root).rsplit("/", 2)[0]
    flow_id = c.create_data_flow(models.CreateDataFlowRequest(
        file_system_id=str(fs), source_storage=address, file_system_path="/oss/",
        source_storage_path=f"/{root}/bmcpfs/", client_token="flow-1")).body.data_flow_id
    assert flow_id.startswith("df-")
    again = c.create_data_flow(models.CreateDataFlowRequest(
        file_system_id=str(fs), source_storage=address, file_system_path="/oss/",
        source_storage_path=f"/{root}/bmcpfs/", client_token="flow-1")).body.data_flow_id
    assert again == flow_id
    flows = c.describe_data_flows(models.DescribeDataFlowsRequest(
        file_system_id=str(fs), filters=[models.DescribeDataFlowsRequestFilters(key="DataFlowIds", value=flow_id)]))
    listed = flows.body.data_flow_info.data_flow
    assert [f.data_flow_id for f in listed] == [flow_id] and listed[0].status == "Running"
    assert SK not in json.dumps(flows.body.to_map()) and "SECRET" not in listed[0].source_storage

    task_id = c.create_data_flow_task(models.CreateDataFlowTaskRequest(
        file_system_id=str(fs), data_flow_id=flow_id, task_action="StreamImport", data_type="MetaAndData",
        directory="/test/", dst_directory="/mnt/", conflict_policy="SKIP_THE_FILE")).body.task_id
    sub_id = c.create_data_flow_sub_task(models.CreateDataFlowSubTaskRequest(
        file_system_id=str(fs), data_flow_id=flow_id, data_flow_task_id=task_id, src_file_path="/file.xml",
        dst_file_path="/mnt/file.xml",
        condition=models.CreateDataFlowSubTaskRequestCondition(size=len(data)))).body.data_flow_sub_task_id
    dry = c.create_data_flow_sub_task(models.CreateDataFlowSubTaskRequest(
        file_system_id=str(fs), data_flow_id=flow_id, data_flow_task_id=task_id, src_file_path="/file.xml",
        dst_file_path="/mnt/file.xml", dry_run=True)).body
    assert dry.data_flow_sub_task_id == ""

    def state() -> Any:
        body = c.describe_data_flow_sub_tasks(models.DescribeDataFlowSubTasksRequest(
            file_system_id=str(fs), filters=[models.DescribeDataFlowSubTasksRequestFilters(
                key="DataFlowSubTaskIds", value=sub_id)])).body
        items = body.data_flow_sub_task.data_flow_sub_task
        return items[0] if items and items[0].status in ("COMPLETE", "FAILED") else None

    item = svc.wait(state, 120, "the subtask")
    assert item.status == "COMPLETE" and item.progress == 10000, item.to_map()
    assert item.src_file_path == f"/{root}/bmcpfs/test/file.xml" and item.dst_file_path == "/oss/mnt/file.xml"
    from ossimport.engine.stream import crc64

    assert (fs / "oss" / "mnt" / "file.xml").read_bytes() == data
    assert item.file_detail.checksum == f"crc64:{crc64(data)}" and item.file_detail.size == len(data)
    assert item.progress_stats.bytes_total == item.progress_stats.actual_bytes == len(data)

    err = error_of(lambda: c.cancel_data_flow_sub_task(models.CancelDataFlowSubTaskRequest(
        file_system_id=str(fs), data_flow_id=flow_id, data_flow_task_id=task_id, data_flow_sub_task_id=sub_id)))
    assert err.code == "InvalidStatus.ResourceMismatch" and err.data["statusCode"] == 400
    tasks = c.describe_data_flow_tasks(models.DescribeDataFlowTasksRequest(file_system_id=str(fs))).body
    assert [t.task_id for t in tasks.task_info.task] == [task_id] and tasks.task_info.task[0].status == "Executing"

    (fs / "oss" / "out").mkdir()
    (fs / "oss" / "out" / "x.bin").write_bytes(b"exported")
    export = c.create_data_flow_task(models.CreateDataFlowTaskRequest(
        file_system_id=str(fs), data_flow_id=flow_id, task_action="StreamExport", directory="/out/",
        dst_directory="/dataflows/", conflict_policy="OVERWRITE_EXISTING")).body.task_id
    sub_id = c.create_data_flow_sub_task(models.CreateDataFlowSubTaskRequest(
        file_system_id=str(fs), data_flow_id=flow_id, data_flow_task_id=export, src_file_path="/x.bin",
        dst_file_path="/x.bin")).body.data_flow_sub_task_id
    svc.wait(state, 60, "the export")
    with bucket.open("bmcpfs/dataflows/x.bin") as f:
        assert f.read() == b"exported"

    c.stop_data_flow(models.StopDataFlowRequest(file_system_id=str(fs), data_flow_id=flow_id))
    c.start_data_flow(models.StartDataFlowRequest(file_system_id=str(fs), data_flow_id=flow_id))
    for t in (task_id, export):
        c.cancel_data_flow_task(models.CancelDataFlowTaskRequest(file_system_id=str(fs), data_flow_id=flow_id, task_id=t))
    c.delete_data_flow(models.DeleteDataFlowRequest(file_system_id=str(fs), data_flow_id=flow_id))
    err = error_of(lambda: c.delete_data_flow(models.DeleteDataFlowRequest(file_system_id=str(fs),
                                                                           data_flow_id=flow_id)))
    assert err.code == "InvalidDataFlow.NotFound" and err.data["statusCode"] == 404


def test_wrong_secret_and_unknown_key_are_refused(svc: ServiceEnv, tmp_path: Path) -> None:
    err = error_of(lambda: client(svc, sk="wrong-secret").describe_data_flows(
        models.DescribeDataFlowsRequest(file_system_id=str(tmp_path))))
    assert err.code == "SignatureDoesNotMatch" and err.data["statusCode"] == 400
    err = error_of(lambda: client(svc, ak="someoneElse01").describe_data_flows(
        models.DescribeDataFlowsRequest(file_system_id=str(tmp_path))))
    assert err.code == "InvalidAccessKeyId.NotFound" and err.data["statusCode"] == 404
    err = error_of(lambda: client(svc).cancel_data_flow_sub_task(models.CancelDataFlowSubTaskRequest(
        data_flow_id="df-1", data_flow_task_id="task-1", data_flow_sub_task_id="subTaskId-1")))
    assert err.code == "MissingFileSystemId" and err.data["statusCode"] == 400


def test_replayed_nonce_stale_date_and_unsigned_requests_are_refused(svc: ServiceEnv, tmp_path: Path) -> None:
    params = {"FileSystemId": str(tmp_path), "MaxResults": "10"}
    status, body = raw_rpc(svc, "DescribeDataFlows", params, nonce="nonce-once")
    assert status == 200 and body["DataFlowInfo"]["DataFlow"] == []
    status, body = raw_rpc(svc, "DescribeDataFlows", params, nonce="nonce-once")
    assert (status, body["Code"]) == (400, "SignatureNonceUsed")
    svc.stop()  # a restart must not forget the nonces of the last 15 minutes
    svc.start()
    status, body = raw_rpc(svc, "DescribeDataFlows", params, nonce="nonce-once")
    assert (status, body["Code"]) == (400, "SignatureNonceUsed")
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 16 * 60))
    status, body = raw_rpc(svc, "DescribeDataFlows", params, date=old)
    assert (status, body["Code"]) == (400, "InvalidTimeStamp.Expired")
    status, body = raw_rpc(svc, "DescribeDataFlows", params, secret="not-it")
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")
    assert set(body) == {"RequestId", "HostId", "Code", "Message"} and SK not in json.dumps(body)
    status, body = svc.call("DescribeJobs")
    assert (status, body["Code"]) == (400, "IncompleteSignature")
    import base64

    basic = {"Authorization": "Basic " + base64.b64encode(f"{AK}:{SK}".encode()).decode()}
    status, body = svc.call("DescribeJobs", headers=basic)
    assert status == 200 and body["Jobs"]["Job"] == []
    wrong = {"Authorization": "Basic " + base64.b64encode(f"{AK}:nope".encode()).decode()}
    assert svc.call("DescribeJobs", headers=wrong)[0] == 400
    status, raw, _ = svc.request("GET", "/metrics")
    assert status == 400


def test_jobs_actions_through_the_rpc_door(svc: ServiceEnv, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"a")
    status, body = raw_rpc(svc, "CreateJob", {"jobName": "rpc_job", "srcType": "local",
                                              "srcPrefix": f"{tmp_path}/src/", "destType": "local",
                                              "destPrefix": f"{tmp_path}/dst/"})
    assert status == 200 and body["JobName"] == "rpc_job"
    status, body = raw_rpc(svc, "DescribeJobs", {"MaxResults": "5"})
    assert status == 200 and [j["JobName"] for j in body["Jobs"]["Job"]] == ["rpc_job"]
    status, body = raw_rpc(svc, "CreateJob", {"jobName": "rpc_job2", "srcType": "nope"})
    assert (status, body["Code"]) == (400, "InvalidParameter") and body["Message"].startswith("CreateJob: srcType=")
    status, body = raw_rpc(svc, "DescribeJob", {"JobName": "rpc_job"})
    assert status == 200 and body["Job"]["Source"] == f"{tmp_path}/src/"
    for action in ("RetryJob", "StopJob", "DeleteJob"):
        status, body = raw_rpc(svc, action, {"JobName": "rpc_job", "DryRun": "true"})
        assert status == 200, (action, body)
    status, body = raw_rpc(svc, "DeleteJob", {"JobName": "rpc_job"})
    assert status == 200
    status, body = raw_rpc(svc, "DescribeJob", {"JobName": "rpc_job"}, method="GET")
    assert (status, body["Code"]) == (404, "InvalidJob.NotFound")
    status, body = raw_rpc(svc, "NoSuchAction", {})
    assert (status, body["Code"]) == (404, "InvalidAction.NotFound")
