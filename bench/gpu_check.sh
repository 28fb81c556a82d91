#!/usr/bin/env bash
# The GPU check of the fast path in one call of the device tool (bench/RESULTS.md says how to run it).
#
#   bash bench/gpu_check.sh [CASES]        CASES: comma-separated, default "standard,fast"
#
# Environment: BUDGET_S (default 420), PYTHON (default python3), SITE (where the wheels go, /tmp/site),
# CACHE_DIR (the compile cache, /tmp/i2v-compile-cache: empty on a fresh machine, so the first
# compile is the cold figure), GPU_CHECK_EXTRA (more bench_gpu.py arguments; "--tiny --device cpu"
# tries the script on a CPU).
#
# Installs the wheels carried in .whl/ (diffusers and importlib_metadata: the GPU image has neither),
# prints the versions and the card, then runs bench/bench_gpu.py with a time budget so it ends inside
# one call: plain diffusers, the daemon's eager path and its fast path per case, a warm-restart child
# process on the same compile cache, memory hygiene, and (case 1024x32) the 24 GiB capped ladder run.
# Everything it measures lands in $OUT: bench.json and table.md after every case, bench.log.
set -uo pipefail
cases="${1:-standard,fast}"
budget="${BUDGET_S:-420}"  # seconds after which no new case or path starts
python="${PYTHON:-python3}"
site="${SITE:-/tmp/site}"
extra="${GPU_CHECK_EXTRA:-}"
out="${OUT:-/tmp/i2v-gpu-check}"
mkdir -p "$out"
cd "$(dirname "$0")/.."

if ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -c '
import diffusers, torch, transformers
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
else:
    print("no CUDA GPU visible")
' 2>&1 | tee "$out/versions.txt" || { echo "torch or diffusers is missing: carry .whl (bench/RESULTS.md)"; exit 1; }
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv \
        | tee -a "$out/versions.txt"
fi

export PYTHONUNBUFFERED=1
# INT lets Python stop cleanly at the time limit; bench.json is already saved after each case.
# shellcheck disable=SC2086  # $extra is a list of arguments
timeout --signal=INT 560 "$python" bench/bench_gpu.py --cases "$cases" --budget-s "$budget" \
    --cache-dir "${CACHE_DIR:-/tmp/i2v-compile-cache}" $extra 2>&1 | tee "$out/bench.log"
status=${PIPESTATUS[0]}
echo "bench_gpu.py exit status $status; results in $out (bench.json, table.md, bench.log)"
exit "$status"
