#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu machine: system packages that are missing, a virtualenv in .venv
# with Yujing and the given extras, and the pinned MicroPython (npm) for the firmware tests.
# Usage: scripts/setup.sh EXTRAS [apt packages to ensure...]
# Run again, it only says what is there: apt is skipped when every package is present, pip when
# .venv/.yujing-setup records this pyproject.toml and the extras (delete that file to force a reinstall).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="$1"; shift
say() { echo "setup: $*" >&2; }
# A Debian package counts as present when dpkg has it installed or its command is on the PATH (built by hand).
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
missing=()
for pkg in "$@"; do
  case "$pkg" in
    mosquitto) command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || installed mosquitto || missing+=(mosquitto) ;;
    nodejs) command -v node >/dev/null || missing+=(nodejs npm) ;;
    python3-venv) python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv) ;;
    *) command -v "$pkg" >/dev/null || installed "$pkg" || missing+=("$pkg") ;;
  esac
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  say "installing apt packages: ${missing[*]} (apt-get update, then install; a minute or two)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
elif [ $# -gt 0 ]; then
  say "apt packages already installed: $*"
fi
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Yujing needs Python 3.11 or newer")'
if [ ! -x .venv/bin/python ]; then
  say "creating the virtualenv .venv"
  python3 -m venv .venv
fi
# The install is editable: code changes need no reinstall, only a changed pyproject.toml (dependencies,
# entry points) or an extra not installed yet. The stamp holds "<sha256 of pyproject.toml> <extras,…>".
stamp=.venv/.yujing-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
have=""; have_extras=""
[ -f "$stamp" ] && read -r have have_extras < "$stamp" || true
[ "$have" = "$want" ] || have_extras=""
todo=""
for e in ${extras//,/ }; do
  case ",$have_extras," in *",$e,"*) ;; *) todo="$todo,$e" ;; esac
done
# -I: import from the virtualenv only, not from this directory, so a checkout that moved is reinstalled
if [ -z "$todo" ] && [ "$have" = "$want" ] && .venv/bin/python -I -c 'import gateway.cli' 2>/dev/null; then
  say "Python packages in .venv up to date (yujing with [${have_extras}]; pyproject.toml unchanged)"
else
  say "installing Python packages into .venv: yujing (editable) with [$extras] and their dependencies (pip; a minute on a fresh machine)"
  rm -f "$stamp"  # an install that fails half way leaves no stamp
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
  all=$(printf '%s\n' ${have_extras//,/ } ${extras//,/ } | sort -u | paste -sd, -)
  echo "$want $all" > "$stamp"
fi
