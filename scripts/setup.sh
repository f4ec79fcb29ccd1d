#!/usr/bin/env bash
# Create .venv if missing and install everything ChestView needs (idempotent, fast when done).
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
VENV="${CHESTVIEW_VENV:-.venv}"
PY="${PYTHON:-python3}"

# Debian libraries the Qt (PySide6) platform plugins need on a bare machine.
QT_DEBS="libgl1 libegl1 libxkbcommon0 libxkbcommon-x11-0 libfontconfig1 libdbus-1-3 libglib2.0-0 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libxcb-render-util0 libxcb-image0"
missing=""
if command -v dpkg-query >/dev/null 2>&1; then
  for p in $QT_DEBS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
fi
if [ -n "$missing" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian packages for Qt:$missing"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "[setup] warning: missing Debian packages for Qt:$missing (run as root or install them)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# The app's own modules as bytecode: an editable install has none, and where PYTHONDONTWRITEBYTECODE
# is set Python never writes it, so every start would compile some 240 modules (0.17 s of the
# viewer's start-up, bench/bench_viewer_start.py). Up-to-date files are skipped (milliseconds).
"$VPY" -m compileall -q -j 0 engine viewer main.py >/dev/null 2>&1 || true
stamp="$VENV/.chestview-installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS:-base}"
if [ -f "$stamp" ]; then
  exit 0
fi
# pip, minus the local-index "Location ... is ignored" noise of this machine's pip config.
pipq() {
  local rc
  set +e
  "$VPY" -m pip "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory"
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch, torchvision, sys; sys.exit(0 if (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')) else 1)" 2>/dev/null; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1 (about a minute)"
  pipq install -q torch==2.14.1 torchvision==0.29.1
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
echo "[setup] installing ChestView and pinned dependencies ($spec)"
pipq install -q -e "$spec"
rm -f "$VENV"/.chestview-installed-*-"${EXTRAS:-base}"
touch "$stamp"
echo "[setup] ready: $VENV"
