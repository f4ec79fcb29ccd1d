#!/bin/sh
# Remove a ChestView installation made by install.sh.
#
#   <prefix>/uninstall.sh            removes the installation this script lives in
#   ./uninstall.sh --prefix DIR      removes the installation in DIR
#   ./uninstall.sh --system          removes /opt/chestview (run as root)
#
# Removes only what the install manifest (<prefix>/.chestview-install) lists, and the symlink only
# if it still points into the prefix. User data (~/.local/share/chestview: settings, demo, received
# studies) is kept; delete it yourself if you want it gone.
set -eu

die() { echo "uninstall.sh: error: $*" >&2; exit 1; }

HERE=$(cd "$(dirname "$0")" && pwd)
if [ -f "$HERE/.chestview-install" ]; then
    PREFIX=$HERE
else
    PREFIX="${HOME}/.local/opt/chestview"
fi
while [ $# -gt 0 ]; do
    case "$1" in
        --system) PREFIX=/opt/chestview ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a folder"; PREFIX=$2; shift ;;
        --prefix=*) PREFIX=${1#*=} ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
PREFIX=$(cd "$PREFIX" 2>/dev/null && pwd) || die "no ChestView installation in $PREFIX"
MANIFEST="$PREFIX/.chestview-install"
[ -f "$MANIFEST" ] || die "$PREFIX has no .chestview-install manifest: not removing a folder install.sh did not create"

while read -r kind path; do
    case "$kind" in
        symlink)
            if [ -L "$path" ]; then
                case "$(readlink "$path")" in
                    "$PREFIX"/*) rm -f "$path"; echo "[uninstall] removed $path" ;;
                    *) echo "[uninstall] kept $path (points elsewhere)" ;;
                esac
            fi ;;
        file)
            if [ -f "$path" ]; then rm -f "$path"; echo "[uninstall] removed $path"; fi ;;
        *) ;;
    esac
done < "$MANIFEST"

case "$PREFIX" in
    /|/usr|/usr/*|/opt|"$HOME"|"$HOME/.local"|"$HOME/.local/opt") die "refusing to delete $PREFIX" ;;
esac
# Run from inside the prefix? Leave it before deleting it.
cd /
rm -rf "$PREFIX"
echo "[uninstall] removed $PREFIX (user data in ~/.local/share/chestview was kept)"
