#!/usr/bin/env bash
# One command on a fresh machine: set up, then run `yujing demo` (no hardware, no broker needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo python3-venv
# yujing lives in .venv, which this script does not activate: say how to reach it from another terminal.
echo "demo: yujing is $PWD/.venv/bin/yujing; to type just 'yujing', run: . $PWD/.venv/bin/activate" >&2
exec .venv/bin/yujing demo "$@"
