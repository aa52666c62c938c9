"""`ossimport serve [--listen HOST:PORT] [--conf-dir conf] [--sys FILE] [--no-workers]`

Starts the HTTP API and web UI for the working directory of sys.properties, with the master and
local workers (`console.sh start`; an already running master is kept). Binding anything but a
loopback address needs the service credentials (serviceAccessKeyId / serviceAccessKeySecret).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ossimport.address import is_loopback_host
from ossimport.errors import UsageError

log = logging.getLogger("ossimport.service")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see 'ossimport serve -h')")


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--listen {text!r} is not allowed; use HOST:PORT, e.g. 127.0.0.1:8567")
    return host, int(port)


def run_serve(argv: list[str]) -> int:
    from ossimport.jobs.config import DEFAULT_SERVICE_ADDRESS, load_sys

    p = _Parser(prog="ossimport serve", description="HTTP API, dataflows and web UI for the working directory")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to bind (default: serviceAddress in "
                   "sys.properties, 127.0.0.1:8567)")
    p.add_argument("--conf-dir", default="conf", help="directory of sys.properties (default conf)")
    p.add_argument("--sys", help="sys.properties (default CONF_DIR/sys.properties)")
    p.add_argument("--no-workers", action="store_true", help="do not start the job master and local workers")
    args = p.parse_args(argv)
    sys_path = Path(args.sys or Path(args.conf_dir) / "sys.properties")
    if not sys_path.exists():
        raise UsageError(f"{sys_path} does not exist: pass --sys FILE or run from the ossimport directory")
    sysconf = load_sys(sys_path)
    for w in sysconf.warnings:
        print(f"warning: {w}", file=sys.stderr)
    host, port = parse_listen(args.listen or sysconf.serviceAddress or DEFAULT_SERVICE_ADDRESS)
    if not is_loopback_host(host) and not (sysconf.serviceAccessKeyId and sysconf.serviceAccessKeySecret):
        raise UsageError(f"refusing to listen on {host}:{port} without credentials: set serviceAccessKeyId and "
                         f"serviceAccessKeySecret in {sys_path}, or listen on 127.0.0.1")
    from ossimport.log import register_secret
    from ossimport.service.core import Service
    from ossimport.service.server import ServiceServer

    register_secret(sysconf.serviceAccessKeySecret)
    service = Service(sysconf, sys_path.resolve(), start_workers=not args.no_workers)
    try:
        server = ServiceServer((host, port), service)
    except OSError as exc:
        service.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --listen") from None
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start()
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    shown = f"[{host}]" if ":" in host else host
    print(f"ossimport service on http://{shown}:{server.server_address[1]}/ "
          f"(working directory {sysconf.workingDir})", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    service.close()
    return 0
