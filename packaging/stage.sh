#!/bin/sh
# Lay out the Linux archive folder around a PyInstaller one-folder build.
#
#   packaging/stage.sh APP_DIR OUT_DIR VERSION [VARIANT]
#
# APP_DIR is the one-folder app (contains the `chestview` executable and `_internal/`); it is MOVED
# into OUT_DIR/chestview (no 4 GB copy). OUT_DIR then holds: chestview/, chestview.sh (launcher),
# chestview.desktop, chestview.svg, install.sh, uninstall.sh, VERSION, README.txt.
set -eu
[ $# -ge 3 ] || { echo "usage: $0 APP_DIR OUT_DIR VERSION [VARIANT]" >&2; exit 2; }
APP=$1; OUT=$2; VERSION=$3; VARIANT=${4:-gpu}
PKG=$(cd "$(dirname "$0")" && pwd)
[ -x "$APP/chestview" ] || { echo "stage.sh: $APP/chestview is not an executable" >&2; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT"
mv "$APP" "$OUT/chestview"
cp "$PKG/chestview.sh" "$PKG/install.sh" "$PKG/uninstall.sh" "$OUT/"
cp "$PKG/chestview.desktop" "$OUT/"
# The same icon as the viewer's window (resources/icons/app.svg) when the repository has one.
ICON="$PKG/../resources/icons/app.svg"
[ -f "$ICON" ] || ICON="$PKG/chestview.svg"
cp "$ICON" "$OUT/chestview.svg"
chmod 755 "$OUT/chestview.sh" "$OUT/install.sh" "$OUT/uninstall.sh"
echo "$VERSION" > "$OUT/VERSION"
# Newest glibc symbol version any bundled ELF file needs = the oldest Linux the archive runs on.
GLIBC=$(find "$OUT/chestview" -type f \( -name '*.so*' -o -name chestview \) -exec objdump -T {} + 2>/dev/null \
        | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1 | sed 's/GLIBC_//')
GLIBC=${GLIBC:-unknown}
echo "$GLIBC" > "$OUT/GLIBC_MIN"
cat > "$OUT/README.txt" <<EOF
ChestView $VERSION ($VARIANT build) for Linux x86_64
Chest X-ray and CT DICOM viewer with AI assistance.
RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.

Install for this user:   ./install.sh          (then run: chestview view)
Install system-wide:     sudo ./install.sh --system
Run without installing:  ./chestview.sh view   or   ./chestview.sh selftest
Uninstall:               ~/.local/opt/chestview/uninstall.sh   (or /opt/chestview/uninstall.sh)

Needs glibc $GLIBC or newer (ldd --version) and, for the window, an X11 or Wayland session (Qt xcb libraries are bundled;
on a minimal system install libxkbcommon-x11-0, libxcb-cursor0 and libegl1). Without a display,
'chestview run-demo' runs the batch review instead of the viewer.
EOF
