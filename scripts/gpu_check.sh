#!/usr/bin/env bash
# One-shot GPU check on a CUDA host with no network, run from the repository root:
#
#     bash scripts/gpu_check.sh [extra gpu_check.py arguments]
#
# Steps, each printing its elapsed time:
#   1. unpack the offline TileLang bundle .bundle/dsa-bundle.tar.xz (when present) into $WORK/site, with `tar -xJf`
#      when the `xz` program is on PATH, else with Python's tarfile (filter="data"); a few seconds;
#   2. put that and the repository on PYTHONPATH (the stages' PYTHONPATH), and every cache in $WORK (TileLang's kernel
#      cache TILELANG_CACHE_DIR, our config cache DSA_CACHE_DIR, tvm-ffi's, matplotlib's, Triton's, CUDA's, XDG):
#      nothing is written to the home directory of a borrowed machine;
#   3. import tilelang, tvm_ffi, dsa, autotune and benchmarks once; if any fails, say which and why, and exit 2
#      (before, a missing dependency failed every stage in turn for 9 minutes);
#   4. run scripts/gpu_check.py (host and ceilings, every kernel of the GPU tests compiled in parallel on all cores,
#      `pytest -m gpu` in four stages, benchmarks, a short tuning pass; at most 9 minutes, each stage printing its
#      status and elapsed time);
#   5. when $OUT is set, write at most 8 files there (the device tool returns at most 8, of at most 16 MiB each): the
#      JSON record, the PNG plot, compile-report.json, logs.tar.gz (every log of the work folder) and summary.txt
#      (stage by stage: passed, failed, timeout or skipped, with counts and the first error).
# Its exit status is gpu_check.py's (0 all stages ok, 1 some stage failed, 2 no CUDA device), or 2 when the bundle
# cannot be unpacked or an import fails.
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
#   3. the reply's files are the five above; summary.txt and the summary table are the last things in output_tail.
#
# Environment (none is needed on a GPU host):
#   OUT                    where the returned files go (the device tool sets it); unset: nothing is copied.
#   DSA_GPU_CHECK_WORK     the work folder (default /tmp/dsa-gpu-check), emptied first; a folder that is neither
#                          empty nor an earlier work folder (no .dsa-gpu-check marker) is refused.
#   DSA_GPU_CHECK_TOTAL_S  the whole script's time limit in seconds (default 555, for the device call's 570): the
#                          check gets what is left as --deadline-s and cuts its stages' budgets to fit.
#   DSA_GPU_CHECK_RUNNER   a test hook: a program run instead of `python3 scripts/gpu_check.py`, with the same
#                          arguments (--work-dir, --out-dir, then this script's); tests use a stub that writes fake
#                          logs and a record in seconds. Unset on a GPU host.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

BUNDLE=.bundle/dsa-bundle.tar.xz
DEFAULT_WORK=/tmp/dsa-gpu-check
WORK=${DSA_GPU_CHECK_WORK:-$DEFAULT_WORK}
SITE=$WORK/site
CACHE=$WORK/cache
RESULTS=benchmarks/results
MARKER=.dsa-gpu-check
PY=python3
REQUIRED_MODULES=(tilelang tvm_ffi dsa autotune benchmarks)
# Everything, step 5 included, ends within TOTAL_S of the start (the device call is run with timeout_s 570; a command
# killed there returns only what it had written to $OUT, so the check must stop itself first).
TOTAL_S=${DSA_GPU_CHECK_TOTAL_S:-555}
COLLECT_RESERVE_S=10

# Microseconds since the epoch (bash 5's EPOCHREALTIME; whole seconds on an older bash), and the time since one.
now_us() {
    local t=${EPOCHREALTIME:-}
    if [ -n "$t" ]; then echo "${t//[.,]/}"; else echo "$((SECONDS * 1000000))"; fi
}
since() {
    local d=$(($(now_us) - $1))
    echo "$((d / 1000000)).$(((d / 100000) % 10)) s"
}
T0=$(now_us)

if [ -e "$WORK" ] && [ "$WORK" != "$DEFAULT_WORK" ] && [ ! -e "$WORK/$MARKER" ] \
    && [ -n "$(ls -A "$WORK" 2>/dev/null)" ]; then
    echo "gpu_check.sh: $WORK is not empty and not a work folder of this script; not removing it" >&2
    exit 2
fi
rm -rf "$WORK" && mkdir -p "$WORK" "$CACHE" && touch "$WORK/$MARKER" || {
    echo "gpu_check.sh: could not create the work folder $WORK" >&2
    exit 2
}

# 1. the bundle
if [ -f "$BUNDLE" ]; then
    t=$(now_us)
    mkdir -p "$SITE"
    if command -v xz >/dev/null 2>&1 && command -v tar >/dev/null 2>&1; then
        how="tar -xJf"
        tar -xJf "$BUNDLE" -C "$SITE"
    else
        how="Python's tarfile (no xz on PATH)"
        "$PY" - "$BUNDLE" "$SITE" <<'PYEOF'
import sys
import tarfile

with tarfile.open(sys.argv[1], "r:xz") as tar:
    try:
        tar.extractall(sys.argv[2], filter="data")
    except TypeError:  # a Python without extraction filters (before 3.8.17, 3.9.17, 3.10.12, 3.11.4)
        tar.extractall(sys.argv[2])
PYEOF
    fi || {
        echo "gpu_check.sh: could not unpack $BUNDLE with $how" >&2
        exit 2
    }
    echo "gpu_check.sh: bundle unpacked into $SITE with $how in $(since "$t")"
else
    echo "gpu_check.sh: no $BUNDLE; using whatever TileLang is installed"
fi

# 2. the stages' environment
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TILELANG_CACHE_DIR="$CACHE/tilelang" DSA_CACHE_DIR="$WORK/dsa-cache" TVM_FFI_CACHE_DIR="$CACHE/tvm-ffi" \
    XDG_CACHE_HOME="$CACHE/xdg" MPLCONFIGDIR="$CACHE/matplotlib" TRITON_HOME="$CACHE/triton" \
    TRITON_CACHE_DIR="$CACHE/triton/cache" TORCHINDUCTOR_CACHE_DIR="$CACHE/inductor" CUDA_CACHE_PATH="$CACHE/nv"

# 3. one import of everything the stages import, with their PYTHONPATH and working directory
t=$(now_us)
"$PY" - "${REQUIRED_MODULES[@]}" >"$WORK/imports.log" 2>&1 <<'PYEOF'
import importlib
import sys

print(f"python {sys.version.split()[0]} at {sys.executable}", flush=True)
failed = []
for name in sys.argv[1:]:
    print(f"importing {name}", flush=True)
    try:
        module = importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001 - any failure to import is reported the same way
        failed.append(name)
        print(f"cannot import {name}: {type(exc).__name__}: {exc}", flush=True)
    else:
        version = getattr(module, "__version__", None)
        where = getattr(module, "__file__", None) or list(getattr(module, "__path__", []))
        print(f"  {name}{f' {version}' if version else ''} from {where}", flush=True)
if failed:
    print(f"import check failed: cannot import {', '.join(failed)}", flush=True)
sys.exit(2 if failed else 0)
PYEOF
rc=$?
cat "$WORK/imports.log"
if [ "$rc" -ne 0 ]; then
    last=""
    while IFS= read -r line; do
        case $line in "importing "*) last=${line#importing } ;; esac
    done <"$WORK/imports.log"
    {
        echo "gpu_check.sh: the import check failed (exit $rc; the last module tried: $last): no stage was run."
        if [ "$rc" -eq 2 ]; then
            echo "gpu_check.sh: a package the bundle leaves to the host (scripts/bundle_offline.py's DEFAULT_EXCLUDE)"
            echo "gpu_check.sh: may be missing here: rebuild the bundle with a shorter --exclude, or install it."
        else
            echo "gpu_check.sh: the interpreter died while importing $last: is the bundle built for this Python?"
            echo "gpu_check.sh: (scripts/bundle_offline.py --python-version; the bundle's DSA_BUNDLE.json says which)"
        fi
    } >>"$WORK/imports.log"
    tail -n 3 "$WORK/imports.log" >&2
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT" && cp "$WORK/imports.log" "$OUT/summary.txt"
    fi
    exit 2
fi
echo "gpu_check.sh: imports ok in $(since "$t")"

# 4. the check
STAMP="$WORK/started"
touch "$STAMP"
t=$(now_us)
RUNNER=("$PY" scripts/gpu_check.py)
if [ -n "${DSA_GPU_CHECK_RUNNER:-}" ]; then
    echo "gpu_check.sh: DSA_GPU_CHECK_RUNNER is set: running $DSA_GPU_CHECK_RUNNER instead of scripts/gpu_check.py"
    RUNNER=("$DSA_GPU_CHECK_RUNNER")
fi
# Its output also goes to gpu_check.log (in logs.tar.gz; summary.txt quotes its first error when no record is written).
# The whole script must end inside the device call's limit, or nothing comes back: the check gets what is left of
# TOTAL_S (less COLLECT_RESERVE_S for step 5) as its deadline, cuts its stages to fit, and a hard stop backs that up.
left=$((TOTAL_S - ($(now_us) - T0) / 1000000 - COLLECT_RESERVE_S))
[ "$left" -lt 1 ] && left=1
echo "gpu_check.sh: the check has ${left} s (DSA_GPU_CHECK_TOTAL_S=$TOTAL_S)"
HARD_STOP=()
command -v timeout >/dev/null 2>&1 && HARD_STOP=(timeout -k 5 "$((left + COLLECT_RESERVE_S / 2))")
${HARD_STOP[@]+"${HARD_STOP[@]}"} "${RUNNER[@]}" --work-dir "$WORK" --out-dir "$RESULTS" --deadline-s "$left" "$@" 2>&1 \
    | tee "$WORK/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check.sh: the check exited $rc after $(since "$t")"

# 5. what comes back
if [ -n "${OUT:-}" ]; then
    t=$(now_us)
    if ! "$PY" -m benchmarks.gpu_check --collect-into "$OUT" --work-dir "$WORK" --out-dir "$RESULTS" --since "$STAMP" \
        --runner-rc "$rc"; then
        echo "gpu_check.sh: packing the outputs failed; copying the newest records alone" >&2
        mkdir -p "$OUT"
        n=0
        for f in "$RESULTS"/*.json "$WORK/compile-report.json"; do
            if [ "$n" -lt 4 ] && [ -f "$f" ] && [ "$f" -nt "$STAMP" ]; then
                cp "$f" "$OUT/" && n=$((n + 1))
            fi
        done
    fi
    echo "gpu_check.sh: outputs in \$OUT in $(since "$t")"
fi
echo "gpu_check.sh: total $(since "$T0")"
exit "$rc"
