#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine, then runs them:
#   Debian packages: openssh-server (SFTP tests), python3-venv (the deploy tests' worker host makes a
#   venv with the sshd session's python3), fuse3 (mount tests), ceph-mon ceph-osd radosgw ceph-common
#   (Ceph RGW tests), chromium (the service's web UI test, driven by playwright without downloading
#   a browser)
#   npm: Azurite (the Azure Blob emulator) into .azurite/
#   Python: a .venv (sharing the system's site-packages) with ossimport and its test extras
# Extra arguments go to pytest, e.g. ./test.sh -k s3 -x
set -euo pipefail
cd "$(dirname "$0")"

bin/apt-install openssh-server python3-venv fuse3 ceph-mon ceph-osd radosgw ceph-common chromium >/dev/null

# Azurite, the Azure Blob emulator (tests/backends/azure.py): Node's npm package, kept in .azurite/
if [ ! -x .azurite/node_modules/.bin/azurite-blob ]; then
    command -v npm >/dev/null || bin/apt-install npm >/dev/null
    npm install --silent --no-audit --no-fund --prefix .azurite azurite@3 >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
