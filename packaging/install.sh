#!/bin/sh
# Install ChestView from an unpacked archive (the folder this script is in).
#
#   ./install.sh              per user:   ~/.local/opt/chestview, ~/.local/bin/chestview,
#                                          ~/.local/share/applications/chestview.desktop
#   sudo ./install.sh --system  system-wide: /opt/chestview, /usr/local/bin/chestview,
#                                          /usr/share/applications/chestview.desktop
#   --prefix DIR --bin-dir DIR --data-dir DIR   override any of those (packagers, tests)
#   --no-desktop                              no menu entry / icon (servers)
#   --force                                   install even if this system's glibc looks too old
#
# Works offline; copies files only (no network, no package manager). Re-running upgrades in place.
# Uninstall with <prefix>/uninstall.sh. Research use only, not for diagnostic use.
set -eu

SRC=$(cd "$(dirname "$0")" && pwd)
PREFIX="${HOME}/.local/opt/chestview"
BIN_DIR="${HOME}/.local/bin"
DATA_DIR="${XDG_DATA_HOME:-${HOME}/.local/share}"
DESKTOP=1
SYSTEM=0
FORCE=0

die() { echo "install.sh: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --system) SYSTEM=1; PREFIX=/opt/chestview; BIN_DIR=/usr/local/bin; DATA_DIR=/usr/share ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a folder"; PREFIX=$2; shift ;;
        --prefix=*) PREFIX=${1#*=} ;;
        --bin-dir) [ $# -ge 2 ] || die "--bin-dir needs a folder"; BIN_DIR=$2; shift ;;
        --bin-dir=*) BIN_DIR=${1#*=} ;;
        --data-dir) [ $# -ge 2 ] || die "--data-dir needs a folder"; DATA_DIR=$2; shift ;;
        --data-dir=*) DATA_DIR=${1#*=} ;;
        --no-desktop) DESKTOP=0 ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

[ -x "$SRC/chestview/chestview" ] || die "$SRC/chestview/chestview is missing: run install.sh from the unpacked archive"
# The bundle carries its own libraries but not glibc: it needs the version it was built against.
NEED=$(cat "$SRC/GLIBC_MIN" 2>/dev/null || echo unknown)
HAVE=$(ldd --version 2>/dev/null | head -n 1 | grep -o '[0-9][0-9]*\.[0-9][0-9]*$' || true)
if [ "$NEED" != unknown ] && [ -n "$HAVE" ] && [ "$FORCE" = 0 ]; then
    OLDEST=$(printf '%s\n%s\n' "$NEED" "$HAVE" | sort -V | head -n 1)
    if [ "$OLDEST" != "$NEED" ]; then
        die "this system has glibc $HAVE but ChestView needs $NEED or newer (a newer distribution, or a build made on an older one); --force skips this check"
    fi
fi
if [ "$SYSTEM" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "--system writes to /opt and /usr: run it as root (sudo ./install.sh --system)"
fi
case "$PREFIX" in /*) ;; *) PREFIX="$(pwd)/$PREFIX" ;; esac
case "$BIN_DIR" in /*) ;; *) BIN_DIR="$(pwd)/$BIN_DIR" ;; esac
case "$DATA_DIR" in /*) ;; *) DATA_DIR="$(pwd)/$DATA_DIR" ;; esac
MARKER="$PREFIX/.chestview-install"

# Never overwrite a folder that is not a ChestView installation.
if [ -e "$PREFIX" ] && [ ! -f "$MARKER" ]; then
    if [ -n "$(ls -A "$PREFIX" 2>/dev/null)" ]; then
        die "$PREFIX exists and is not a ChestView installation: choose another --prefix or empty it"
    fi
fi
if [ -e "$BIN_DIR/chestview" ] && [ ! -L "$BIN_DIR/chestview" ]; then
    die "$BIN_DIR/chestview exists and is not our symlink: remove it or choose another --bin-dir"
fi

# Copy into a fresh sibling folder, then swap: an interrupted upgrade leaves the old install working.
PARENT=$(dirname "$PREFIX")
mkdir -p "$PARENT"
NEW="$PREFIX.installing.$$"
rm -rf "$NEW"
mkdir "$NEW"
trap 'rm -rf "$NEW"' EXIT INT TERM
echo "[install] copying ChestView to $PREFIX"
cp -a "$SRC/chestview" "$NEW/chestview"
for f in chestview.sh chestview.svg chestview.desktop uninstall.sh VERSION GLIBC_MIN README.txt; do
    [ -e "$SRC/$f" ] && cp -a "$SRC/$f" "$NEW/$f"
done
chmod 755 "$NEW/chestview.sh" "$NEW/uninstall.sh" 2>/dev/null || true

DESKTOP_FILE="$DATA_DIR/applications/chestview.desktop"
ICON_FILE="$DATA_DIR/icons/hicolor/scalable/apps/chestview.svg"
{
    echo "# ChestView installation manifest: what uninstall.sh removes besides this folder."
    echo "version $(cat "$SRC/VERSION" 2>/dev/null || echo unknown)"
    echo "symlink $BIN_DIR/chestview"
    if [ "$DESKTOP" = 1 ]; then
        echo "file $DESKTOP_FILE"
        echo "file $ICON_FILE"
    fi
} > "$NEW/.chestview-install"

if [ -d "$PREFIX" ]; then
    OLD="$PREFIX.old.$$"
    mv "$PREFIX" "$OLD"
    mv "$NEW" "$PREFIX"
    rm -rf "$OLD"
else
    mv "$NEW" "$PREFIX"
fi
trap - EXIT INT TERM

mkdir -p "$BIN_DIR"
ln -sfn "$PREFIX/chestview.sh" "$BIN_DIR/chestview"

if [ "$DESKTOP" = 1 ]; then
    mkdir -p "$(dirname "$DESKTOP_FILE")" "$(dirname "$ICON_FILE")"
    cp "$PREFIX/chestview.svg" "$ICON_FILE"
    # Absolute paths: the desktop session's PATH often lacks ~/.local/bin.
    sed -e "s|^Exec=chestview |Exec=\"$PREFIX/chestview.sh\" |" \
        -e "s|^TryExec=chestview\$|TryExec=$PREFIX/chestview.sh|" \
        -e "s|^Icon=chestview\$|Icon=$ICON_FILE|" \
        "$PREFIX/chestview.desktop" > "$DESKTOP_FILE"
    chmod 644 "$DESKTOP_FILE"
    if command -v update-desktop-database >/dev/null 2>&1; then
        update-desktop-database -q "$(dirname "$DESKTOP_FILE")" 2>/dev/null || true
    fi
    if command -v gtk-update-icon-cache >/dev/null 2>&1; then
        gtk-update-icon-cache -q -t "$DATA_DIR/icons/hicolor" 2>/dev/null || true
    fi
fi

echo "[install] ChestView $(cat "$PREFIX/VERSION" 2>/dev/null || true) installed in $PREFIX"
echo "[install] command: $BIN_DIR/chestview   (e.g. 'chestview view', 'chestview selftest')"
case ":${PATH}:" in
    *":$BIN_DIR:"*) ;;
    *) echo "[install] note: $BIN_DIR is not on your PATH; add it or run $BIN_DIR/chestview" ;;
esac
[ "$DESKTOP" = 1 ] && echo "[install] menu entry: $DESKTOP_FILE"
echo "[install] uninstall: $PREFIX/uninstall.sh"
