#!/usr/bin/env bash
# One-shot GPU check on a CUDA host with no network, run from the repository root:
#
#     bash scripts/gpu_check.sh [extra gpu_check.py arguments]
#
# It unpacks the offline TileLang bundle .bundle/dsa-bundle.tar.xz (when present) into /tmp/dsa-site, puts that and
# the repository on PYTHONPATH, runs scripts/gpu_check.py (host and ceilings, every kernel of the GPU tests compiled in
# parallel on all cores into TileLang's cache, `pytest -m gpu` in three stages with the ws and portable schedules apart,
# benchmarks, a short tuning pass; about 9 minutes on an H200) and, when $OUT is set, copies the JSON record, the PNG
# plot and the stage logs there. Its exit status is gpu_check.py's (0 all stages ok,
# 1 some stage failed, 2 no CUDA device).
#
# How a session uses it with the device tool (the GPU machine has PyTorch but no TileLang and no network):
#   1. here, on the CPU machine, build the bundle once (about 85 MB of wheels in, a 39 MB archive out; .bundle/ is
#      git-ignored, so it must be carried):
#          python scripts/bundle_offline.py
#   2. call the device tool's `run` with
#          command:   bash scripts/gpu_check.sh
#          carry:     [".bundle/dsa-bundle.tar.xz"]
#      (carry the archive alone, not all of .bundle/: the wheel cache there, .bundle/wheels, is 85 MB and the tree
#      that travels may hold 64 MiB)
#          timeout_s: 570
#      (the command stays inside one call's 10-minute limit; the machine's start is not counted in timeout_s, but it
#      is counted in the session's 15 minutes of device time, so run it once, then give the machine back.)
#   3. the reply's files hold benchmarks/results/<sku>-<YYYYMMDD>.json (and .png), the host/compile/tests/tests_ws/
#      tests_portable/tests_decode/bench/tune logs and the compile stage's per-kernel report (compile-report.json: registers, spills, shared
#      memory, compile seconds); the summary table is the last thing in output_tail.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

BUNDLE=.bundle/dsa-bundle.tar.xz
SITE=/tmp/dsa-site
WORK=/tmp/dsa-gpu-check
PY=python3

if [ -f "$BUNDLE" ]; then
    rm -rf "$SITE" && mkdir -p "$SITE" && tar -xJf "$BUNDLE" -C "$SITE" || { echo "gpu_check.sh: could not unpack $BUNDLE" >&2; exit 2; }
    echo "gpu_check.sh: TileLang bundle unpacked into $SITE"
else
    echo "gpu_check.sh: no $BUNDLE; using whatever TileLang is installed"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

rm -rf "$WORK" && mkdir -p "$WORK"
STAMP="$WORK/started"
touch "$STAMP"
"$PY" scripts/gpu_check.py --work-dir "$WORK" --out-dir benchmarks/results "$@"
rc=$?

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    find benchmarks/results -maxdepth 1 -type f -newer "$STAMP" \( -name '*.json' -o -name '*.png' \) -exec cp {} "$OUT"/ \;
    for log in host collect compile compile-portable tests tests_ws tests_portable tests_decode bench tune; do
        [ -f "$WORK/$log.log" ] && cp "$WORK/$log.log" "$OUT/$log.log"
    done
    [ -f "$WORK/compile-report.json" ] && cp "$WORK/compile-report.json" "$OUT/compile-report.json"
    echo "gpu_check.sh: copied the record and logs to \$OUT"
fi
exit "$rc"
