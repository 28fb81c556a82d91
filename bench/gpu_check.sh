#!/usr/bin/env bash
# The GPU check of the fast path in one call of the device tool (bench/RESULTS.md says how to run it).
#
#   bash bench/gpu_check.sh [CASES]        CASES: comma-separated, default "standard" (also: fast, high, 1024x32)
#
# By default the whole script ends within LIMIT_S = 300 s (5 minutes of device time; give the device
# tool timeout_s 330): the `standard` case once per path (plain diffusers, the daemon's eager path,
# its fast path with a cold compile), then the warm-restart child and memory hygiene if the time
# left allows them. bench_gpu.py estimates each piece from the anchors' figures, counting one cold
# compile for each new (size, frames) pair on torch < 2.13, and skips what would not end in time
# (saying so in bench.json); the eager path is skipped before the fast path's compile is.
#
# Environment:
#   LIMIT_S          seconds the whole script may take (default 300; 900 with --tiny, a CPU check of the script)
#   BUDGET_S         seconds after which bench_gpu.py starts nothing new (default: its own time limit)
#   REPEATS          timed jobs per path and case (default 1)
#   PYTHON           the interpreter (default: the repository's .venv/bin/python where there is one, else python3)
#   SITE             where the carried wheels go (/tmp/site)
#   CACHE_DIR        the compile cache (/tmp/i2v-compile-cache: empty on a fresh machine, so the first
#                    compile is the cold figure)
#   GPU_CHECK_EXTRA  more bench_gpu.py arguments; "--tiny --device cpu" tries the script on a CPU
#   OUT              where bench.json, table.md, bench.log and versions.txt go (/tmp/i2v-gpu-check)
#
# Installs the wheels carried in .whl/ that import on this Python (bench/pick_wheels.py reads their
# tags; any other is skipped with a line saying so): diffusers and importlib_metadata, which the GPU
# image lacks. bench.json and table.md are written after every path, so a run stopped at the limit
# (SIGINT, then SIGKILL 10 s later) keeps what it measured; a failure or a timeout of the warm-restart
# child is recorded there too. Exit status: 0 all ran, 1 something failed (bench.json says what),
# 124 stopped at the time limit.
set -uo pipefail
start=$SECONDS
cases="${1:-standard}"
extra="${GPU_CHECK_EXTRA:-}"
case " $extra " in
    *" --tiny "*) default_limit=900 ;;  # a CPU compiles the tiny model's graph in minutes
    *) default_limit=300 ;;
esac
limit="${LIMIT_S:-$default_limit}"
repeats="${REPEATS:-1}"
site="${SITE:-/tmp/site}"
out="${OUT:-/tmp/i2v-gpu-check}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.." || exit 1
if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"
elif [ -x .venv/bin/python ]; then
    python=.venv/bin/python
else
    python=python3
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    mapfile -t wheels < <("$python" bench/pick_wheels.py .whl/*.whl)
    if [ "${#wheels[@]}" -gt 0 ]; then
        echo "installing ${wheels[*]}"
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "${wheels[@]}" || { echo "installing the carried wheels failed"; exit 1; }
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "none of the wheels in .whl/ imports on $python"
    fi
else
    echo "no wheels in .whl/: using the packages $python has"
fi
timeout 120 "$python" -c '
import diffusers, torch, transformers
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
else:
    print("no CUDA GPU visible")
' 2>&1 | tee "$out/versions.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "torch, transformers or diffusers is missing: carry .whl (bench/RESULTS.md)"; exit 1; }
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv \
        | tee -a "$out/versions.txt"
fi

# What is left of LIMIT_S for bench_gpu.py: 10 s for the kill after SIGINT, 5 s for the last lines.
left=$((limit - (SECONDS - start) - 15))
if [ "$left" -lt 60 ]; then
    echo "only ${left} s of LIMIT_S=${limit} left after the set-up: not starting bench_gpu.py"
    exit 1
fi
export PYTHONUNBUFFERED=1 OUT="$out"
# INT lets Python stop cleanly and save at the time limit (bench.json is also saved after every path);
# -k: a child that does not end on INT is killed 10 s later.
# shellcheck disable=SC2086  # $extra is a list of arguments
timeout --signal=INT -k 10 "$left" "$python" bench/bench_gpu.py --cases "$cases" --repeats "$repeats" \
    --budget-s "${BUDGET_S:-$left}" --deadline-s "$left" --cache-dir "${CACHE_DIR:-/tmp/i2v-compile-cache}" \
    $extra 2>&1 | tee "$out/bench.log"
status=${PIPESTATUS[0]}
echo "bench_gpu.py exit status $status after $((SECONDS - start)) s in all; results in $out" \
    "(bench.json, table.md, bench.log, versions.txt)"
exit "$status"
