#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine, then runs them:
#   Debian packages: openssh-server (SFTP tests), ceph-mon ceph-osd radosgw ceph-common (Ceph RGW tests)
#   Python: a .venv (sharing the system's site-packages) with ossimport and its test extras
# Extra arguments go to pytest, e.g. ./test.sh -k s3 -x
set -euo pipefail
cd "$(dirname "$0")"

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
        echo "test.sh: need root (or sudo) to install: ${missing[*]}" >&2
        return 1
    fi
    local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    # the dpkg lock may be held briefly by another apt run: retry for up to ~5 minutes
    for attempt in $(seq 1 30); do
        if $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
            return 0
        fi
        echo "test.sh: apt-get failed (attempt $attempt), retrying in 10 s" >&2
        sleep 10
    done
    echo "test.sh: could not install ${missing[*]}" >&2
    return 1
}

apt_install openssh-server ceph-mon ceph-osd radosgw ceph-common >/dev/null

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
