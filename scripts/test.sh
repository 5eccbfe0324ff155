#!/usr/bin/env bash
# One command on a fresh machine: install what the tests need (mosquitto, socat, Node for
# MicroPython, Chromium for the status page, Python packages), then run the whole suite against real components.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,consumer python3-venv mosquitto socat nodejs openssl chromium
if [ -f firmware/host/package-lock.json ]; then
  npm ci --prefix firmware/host --no-audit --no-fund --loglevel=error
fi
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# The whole suite: three pytest sessions side by side (it mostly waits on brokers, timeouts and simulated
# boards), each session's output shown in full when all are done; see scripts/parallel_pytest.py.
exec .venv/bin/python scripts/parallel_pytest.py
