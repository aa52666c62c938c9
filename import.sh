#!/usr/bin/env bash
# One-click import: sets up ossimport in .venv on a fresh machine, then runs the default job:
# copy the bundled demo data (demo/data/) to a local destination (demo-output/).
# Any arguments are passed to `ossimport sync`, e.g. ./import.sh --dryrun
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/ossimport ]; then
    echo "import.sh: setting up .venv (first run only)"
    "$PY" -m venv --system-site-packages .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
exec .venv/bin/ossimport "$@" sync demo/data/ demo-output/
