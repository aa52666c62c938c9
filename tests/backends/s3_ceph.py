"""S3 through a real Ceph RADOS Gateway (production S3 code, verifies signatures and MD5s)."""

from __future__ import annotations

from pathlib import Path

from servers.ceph import CephRGW, CephUnavailable

from backends import unavailable

NAME = "s3-ceph"
BUCKET = "ossimport-test"

# A failed bring-up is remembered so that later tests skip or fail at once, not after a timeout each.
_failure: BaseException | None = None


def start(tmp: Path) -> CephRGW:
    global _failure
    if isinstance(_failure, CephUnavailable):
        unavailable(str(_failure))
    if _failure is not None:
        raise RuntimeError(f"Ceph RGW failed to start earlier: {_failure}")
    rgw = CephRGW()
    try:
        rgw.start(tmp)
        rgw.create_bucket(BUCKET)
    except CephUnavailable as exc:
        _failure = exc
        unavailable(str(exc))
    except BaseException as exc:
        _failure = exc
        rgw.stop()
        raise
    return rgw


def stop(handle: CephRGW) -> None:
    handle.stop()


def address(handle: CephRGW, root: str) -> str:
    return handle.address(BUCKET, f"{root}/")  # the secret's '/' is written %2F


def env(handle: CephRGW) -> dict[str, str]:
    return {}
