#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu machine: system packages that are missing, a virtualenv in .venv
# with Yujing and the given extras, and the pinned MicroPython (npm) for the firmware tests.
# Usage: scripts/setup.sh EXTRAS [apt packages to ensure...]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="$1"; shift
missing=()
for pkg in "$@"; do
  case "$pkg" in
    mosquitto) command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto) ;;
    nodejs) command -v node >/dev/null || missing+=(nodejs npm) ;;
    python3-venv) python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv) ;;
    *) command -v "$pkg" >/dev/null || missing+=("$pkg") ;;
  esac
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "setup: installing ${missing[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Yujing needs Python 3.11 or newer")'
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
