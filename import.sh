#!/usr/bin/env bash
# One-click import (ossimport standalone style): on a fresh machine it first sets up .venv, then
# runs the job in conf/local_job.cfg (by default: copy the bundled demo/data/ to demo-output/):
# submit, start the master and local workers, print the status every 10 s (also to logs/import.log),
# offer a retry when tasks failed, stop what it started (unless another job still needs it). If the
# job ran before, it asks: resume from breakpoint (y) or start over (n).
#   ./import.sh [--yes [--max-retries N] | --resume | --restart] [--interval S] [--workers N] [CFG]
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/ossimport ]; then
    echo "import.sh: setting up .venv (first run only)"
    "$PY" -m venv --system-site-packages .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
exec .venv/bin/ossimport console import "$@"
