#!/bin/sh
# ChestView launcher: runs the bundled one-folder app next to this script (symlinks resolved, so
# ~/.local/bin/chestview -> <prefix>/chestview.sh works). Research use only, not for diagnostic use.
#
# Why a launcher and not the bare executable: a user's PYTHONPATH/PYTHONHOME or a Qt 5 plugin
# path in the environment would leak into the frozen Python/Qt 6 and break it.
set -eu
SELF=$(readlink -f "$0" 2>/dev/null || echo "$0")
HERE=$(dirname "$SELF")
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP QT_PLUGIN_PATH QML2_IMPORT_PATH
exec "$HERE/chestview/chestview" "$@"
