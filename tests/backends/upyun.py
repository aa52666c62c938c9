"""UpYun's REST API through its test double (tests/servers/upyun_server.py) on 127.0.0.1: a
read-only source, seeded in the server's memory. Small listing pages, so every listing pages."""

from __future__ import annotations

from urllib.parse import quote

from servers.upyun_server import UpYunServer

NAME = "upyun"
READ_ONLY = True
SERVICE = "upsvc"
OPERATOR = "upop"
PASSWORD = "Up/Pass:w0rd@1"  # '/', ':' and '@' must travel percent-encoded in addresses


def start(tmp: object) -> UpYunServer:
    server = UpYunServer({OPERATOR: PASSWORD})
    server.create_service(SERVICE)
    server.start()
    return server


def stop(handle: UpYunServer) -> None:
    handle.stop()


def address(handle: UpYunServer, root: str, *, password: str = PASSWORD, service: str = SERVICE,
            port: int = 0) -> str:
    return f"upyun://{OPERATOR}:{quote(password, safe='')}@{service}.127.0.0.1:{port or handle.port}/{root}/"


def env(handle: UpYunServer) -> dict[str, str]:
    return {}


def seed(handle: UpYunServer, root: str, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        handle.put(SERVICE, f"{root}/{key}", data)
