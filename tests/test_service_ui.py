"""The web UI in headless Chromium (Debian's /usr/bin/chromium driven by playwright; nothing is
downloaded): sign in, create a job through the New job form (its validation message shown beside
the field), watch the card reach 100 %, open the detail page, retry the failed file. Screenshots
go to the test's tmp dir."""

from __future__ import annotations

import base64
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serviceenv import ServiceEnv

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
expect = sync_api.expect

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
AK, SK = "uiAccessKey01", "ui/Secret+Key=01"
S3_SECRET = "SECRET/TEST5678"


@pytest.fixture
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: ./test.sh installs Debian's chromium")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[ServiceEnv]:
    env = ServiceEnv(tmp_path, {"serviceAccessKeyId": AK, "serviceAccessKeySecret": SK})
    env.start()
    try:
        yield env
    finally:
        env.stop()


def test_create_watch_detail_and_retry_in_the_browser(browser: Any, svc: ServiceEnv, backend_factory: Any,
                                                      tmp_path: Path) -> None:
    s3 = backend_factory("s3-moto")
    root = s3.new_root()
    bucket = s3.storage(root)
    files = {"ok.txt": b"fine", "blocked/inner.txt": b"needs a directory", "more/data.bin": os.urandom(300_000)}
    for key, data in files.items():
        bucket.put(key, io.BytesIO(data), len(data))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "blocked").write_bytes(b"a file where the source has a directory")
    shots = tmp_path / "screenshots"
    shots.mkdir()

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(svc.url + "/")
    assert page.url.endswith("/login.html")
    page.fill("input[name=AccessKeyId]", AK)
    page.fill("input[name=AccessKeySecret]", "wrong")
    page.click("button[type=submit]")
    page.wait_for_selector("#failed:not([hidden])")
    page.fill("input[name=AccessKeyId]", AK)
    page.fill("input[name=AccessKeySecret]", SK)
    page.click("button[type=submit]")
    page.wait_for_selector("#jobs-view")

    # a write without the page's CSRF token is refused even with the session cookie
    status = page.evaluate("""async () => (await fetch('/api/DescribeJobs', {
        method: 'POST', body: '{}', headers: {'Content-Type': 'application/json'}})).status""")
    assert status == 403

    page.click("#show-new")
    page.fill("input[name=jobName]", "ui_job")
    page.select_option("select[name=kind]", "object-file")
    page.select_option("select[name=srcType]", "s3")
    page.fill("input[name=srcDomain]", f"127.0.0.1:{s3.handle.port}")
    page.fill("input[name=srcAccessKey]", "AKIDTEST1234")
    page.fill("input[name=srcSecretKey]", S3_SECRET)
    page.fill("input[name=srcBucket]", s3.handle.bucket)
    page.fill("input[name=srcPrefix]", f"{root}/")
    page.select_option("select[name=destType]", "local")
    page.click("#create")  # no destination directory yet: the API's message beside the field
    # (waits by locator: the page's CSP allows no eval, so no wait_for_function)
    expect(page.locator('#dest [data-for="Prefix"]')).to_contain_text("destPrefix is missing")
    page.screenshot(path=str(shots / "1-validation.png"), full_page=True)
    page.fill("input[name=destPrefix]", f"{dst}/")
    page.click("#create")

    card = page.locator('[data-job="ui_job"]')
    card.wait_for(timeout=30000)
    expect(card.locator(".progress")).to_have_text("100.0 %", timeout=90000)
    assert "failed 1" in card.text_content() and "FAILED" in card.text_content()
    page.screenshot(path=str(shots / "2-cards.png"), full_page=True)

    card.click()
    page.wait_for_selector("#failed tbody tr")
    row = page.locator("#failed tbody tr").first
    assert row.locator("td").first.text_content() == "blocked/inner.txt"
    assert row.locator("td").nth(1).text_content()
    page.screenshot(path=str(shots / "3-detail.png"), full_page=True)

    (dst / "blocked").unlink()
    page.click("#retry")
    expect(page.locator("#detail-name")).to_have_text("ui_job \u2014 SUCCEED", timeout=90000)
    assert page.locator("#failed tbody tr").count() == 0
    page.screenshot(path=str(shots / "4-retried.png"), full_page=True)
    for key, data in files.items():
        assert (dst / key).read_bytes() == data

    # a dataflow made through the API shows in the Dataflows view, its subtask reaching COMPLETE
    basic = {"Authorization": "Basic " + base64.b64encode(f"{AK}:{SK}".encode()).decode()}
    fs = tmp_path / "fs"
    (fs / "oss").mkdir(parents=True)
    flow = svc.call("CreateDataFlow", headers=basic, FileSystemId=str(fs), FileSystemPath="/oss/",
                    SourceStorage=s3.address(root).rsplit("/", 2)[0], SourceStoragePath=f"/{root}/")[1]["DataFlowId"]
    task = svc.call("CreateDataFlowTask", headers=basic, FileSystemId=str(fs), DataFlowId=flow,
                    TaskAction="StreamImport", Directory="/more/", DstDirectory="/in/")[1]["TaskId"]
    sub = svc.call("CreateDataFlowSubTask", headers=basic, FileSystemId=str(fs), DataFlowId=flow,
                   DataFlowTaskId=task, SrcFilePath="/data.bin", DstFilePath="/data.bin")[1]["DataFlowSubTaskId"]
    page.click("#show-flows")
    page.fill("#flows-form input[name=fs]", str(fs))
    page.click("#flows-form button[type=submit]")
    expect(page.locator(f'[data-subtask="{sub}"] .status')).to_have_text("COMPLETE", timeout=60000)
    page.screenshot(path=str(shots / "5-dataflows.png"), full_page=True)
    assert (fs / "oss" / "in" / "data.bin").read_bytes() == files["more/data.bin"]

    html = page.content()
    assert S3_SECRET not in html and SK not in html
    for name in ("1-validation.png", "2-cards.png", "3-detail.png", "4-retried.png", "5-dataflows.png"):
        assert (shots / name).stat().st_size > 1000
    out = os.environ.get("OSSIMPORT_SCREENSHOTS")
    if out:  # keep them past the tmp dir when asked
        shutil.copytree(shots, out, dirs_exist_ok=True)


def test_the_login_outlives_a_service_restart_and_sign_out_ends_it(browser: Any, svc: ServiceEnv) -> None:
    page = browser.new_page()
    page.goto(svc.url + "/")
    page.fill("input[name=AccessKeyId]", AK)
    page.fill("input[name=AccessKeySecret]", SK)
    page.click("button[type=submit]")
    expect(page.locator("#signout button")).to_be_visible()

    address = svc.url.removeprefix("http://")
    svc.kill9()
    svc.start(listen=address)
    page.reload()
    expect(page.locator("#signout button")).to_be_visible()  # still signed in: no login page
    assert not page.url.endswith("/login.html")
    page.click("#signout button")
    page.wait_for_url("**/login.html")
    page.goto(svc.url + "/")
    assert page.url.endswith("/login.html")
