#!/usr/bin/env bash
# Build the ChestView installer archive: PyInstaller one-folder app -> archive -> smoke test.
# Called by `make installer` (which runs `bash scripts/setup.sh installer` first).
#
#   scripts/build_installer.sh [--cpu] [--no-smoke] [--no-archive]
#
#   --cpu         CPU-only variant (drops the CUDA libraries torch loads only for GPU work, hides GPUs)
#   --no-smoke    skip the smoke test (install into a temp prefix, selftest, first window)
#   --no-archive  leave the staged folder, skip the .tar.gz (the slow, single-core step)
#
# Output: dist/chestview-<version>-linux-x86_64[-cpu].tar.gz and the same-named folder next to it;
# timings and sizes in build/installer-report-<variant>.json. Research use only, not for diagnostic use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
VARIANT=${CHESTVIEW_VARIANT:-gpu}
SMOKE=1
ARCHIVE=1
for arg in "$@"; do
    case "$arg" in
        --cpu) VARIANT=cpu ;;
        --gpu) VARIANT=gpu ;;
        --no-smoke) SMOKE=0 ;;
        --no-archive) ARCHIVE=0 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build_installer.sh: unknown option $arg" >&2; exit 2 ;;
    esac
done
[ -x "$PY" ] || { echo "build_installer.sh: no .venv: run 'bash scripts/setup.sh installer' (or make installer)" >&2; exit 1; }
"$PY" -c "import PyInstaller" 2>/dev/null || { echo "build_installer.sh: PyInstaller missing: run 'bash scripts/setup.sh installer'" >&2; exit 1; }

VERSION=$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' engine/__init__.py)
ARCH=$(uname -m)
NAME="chestview-${VERSION}-linux-${ARCH}"
[ "$VARIANT" = cpu ] && NAME="${NAME}-cpu"
WORK="build/pyinstaller-${VARIANT}"
STAGE="dist/${NAME}"
TARBALL="dist/${NAME}.tar.gz"
REPORT="build/installer-report-${VARIANT}.json"
mkdir -p build dist

echo "[installer] building ChestView ${VERSION} (${VARIANT}) with PyInstaller $("$PY" -c 'import PyInstaller; print(PyInstaller.__version__)')"
t0=$(date +%s)
CHESTVIEW_VARIANT="$VARIANT" "$PY" -m PyInstaller --noconfirm --clean --log-level WARN \
    --workpath "$WORK/work" --distpath "$WORK/dist" installer.spec
t1=$(date +%s)
echo "[installer] PyInstaller took $((t1 - t0)) s"

bash packaging/stage.sh "$WORK/dist/chestview" "$STAGE" "$VERSION" "$VARIANT"
FOLDER_BYTES=$(du -sb "$STAGE" | cut -f1)
echo "[installer] staged $STAGE ($((FOLDER_BYTES / 1048576)) MiB)"

ARCHIVE_BYTES=0
t2=$(date +%s)
if [ "$ARCHIVE" = 1 ]; then
    rm -f "$TARBALL"
    # gzip is single-threaded; pigz (if installed) uses every core and writes the same format.
    if command -v pigz >/dev/null 2>&1; then
        tar -C dist -cf - "$NAME" | pigz -"${CHESTVIEW_GZIP_LEVEL:-6}" > "$TARBALL.part"
    else
        tar -C dist -cf - "$NAME" | gzip -"${CHESTVIEW_GZIP_LEVEL:-6}" > "$TARBALL.part"
    fi
    mv "$TARBALL.part" "$TARBALL"
    ARCHIVE_BYTES=$(stat -c %s "$TARBALL")
    echo "[installer] archive $TARBALL ($((ARCHIVE_BYTES / 1048576)) MiB)"
fi
t3=$(date +%s)

cat > "$REPORT" <<EOF
{"version": "$VERSION", "variant": "$VARIANT", "pyinstaller_s": $((t1 - t0)), "archive_s": $((t3 - t2)),
 "folder_bytes": $FOLDER_BYTES, "archive_bytes": $ARCHIVE_BYTES, "stage": "$STAGE",
 "archive": "$( [ "$ARCHIVE" = 1 ] && echo "$TARBALL" )"}
EOF

if [ "$SMOKE" = 1 ]; then
    "$PY" packaging/smoke_test.py --stage "$STAGE" --report "$REPORT" \
        $( [ "$ARCHIVE" = 1 ] && echo "--archive $TARBALL" )
fi
if [ "$ARCHIVE" = 1 ]; then OUTPUT=$TARBALL; else OUTPUT=$STAGE; fi
echo "[installer] done in $(( $(date +%s) - t0 )) s: ${OUTPUT}"
