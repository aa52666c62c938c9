#!/usr/bin/env bash
# ossimport job console: submit | start | stop | stat [--json] | retry [job] | clean [job | --all] | deploy [--trust-new-hosts] | version
# Runs from the directory holding conf/ (conf/local_job.cfg, conf/sys.properties, conf/workers).
set -euo pipefail
cd "$(dirname "$0")"
if [ -x .venv/bin/ossimport ]; then
    exec .venv/bin/ossimport console "$@"
fi
exec "${PYTHON:-python3}" -m ossimport console "$@"
