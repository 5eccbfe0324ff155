#!/usr/bin/env bash
# One command on a fresh machine: set up, then run `yujing demo` (no hardware, no broker needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo python3-venv
exec .venv/bin/yujing demo "$@"
