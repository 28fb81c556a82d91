#!/usr/bin/env bash
# The planned placement of full-size Wan 2.1 I2V 14B (random weights) under a 24 GiB cap, in one call of the
# device tool (bench/RESULTS.md says how to run it).
#
#   bash bench/gpu_placement.sh [bench_placement.py arguments]     e.g. --frames 49, --placement model_offload
#
# The whole script ends within LIMIT_S = 570 s (give the device tool timeout_s 600): it installs the
# carried wheels, then bench/bench_placement.py builds the 22.8 B-parameter pipeline on the host
# (about 44 GiB in bf16, plus the pinned copies group offloading makes), asks models/planner.plan for
# 832x480x81 on 24 GiB, caps the allocator at 24 GiB, applies the plan through the daemon's adapter
# and runs a 2-step job at guidance 5, a 4-step job at guidance 1 (the distillation preset's shape,
# no LoRA), then, if time is left, a warm 1-step and 2-step pair (s/step as their difference).
# Results: $OUT/placement.json (written after every stage) and placement.md; placement.log and
# versions.txt beside them.
#
# Environment:
#   LIMIT_S          seconds the whole script may take (default 570; 300 with --tiny, a CPU check of the script)
#   PYTHON           the interpreter (default: the repository's .venv/bin/python where there is one, else python3)
#   SITE             where the carried wheels go (/tmp/site)
#   PLACEMENT_EXTRA  more bench_placement.py arguments; "--tiny --device cpu" tries the script on a CPU
#   OUT              the results' folder (/tmp/i2v-gpu-placement)
#
# Exit status: 0 all ran, 1 something failed (placement.json says what), 124 stopped at the time limit
# (SIGINT, then SIGKILL 10 s later; what was measured before it is in placement.json).
set -uo pipefail
start=$SECONDS
extra="${PLACEMENT_EXTRA:-} $*"
case " $extra " in
    *" --tiny "*) default_limit=300 ;;
    *) default_limit=570 ;;
esac
limit="${LIMIT_S:-$default_limit}"
site="${SITE:-/tmp/site}"
out="${OUT:-/tmp/i2v-gpu-placement}"
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
import accelerate, diffusers, torch, transformers
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible")
' 2>&1 | tee "$out/versions.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "torch, transformers, accelerate or diffusers is missing: carry .whl"; exit 1; }
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv | tee -a "$out/versions.txt"
fi
grep -E '^(MemTotal|MemAvailable)' /proc/meminfo | tee -a "$out/versions.txt"

# What is left of LIMIT_S for bench_placement.py: 10 s for the kill after SIGINT, 5 s for the last lines.
left=$((limit - (SECONDS - start) - 15))
if [ "$left" -lt 60 ]; then
    echo "only ${left} s of LIMIT_S=${limit} left after the set-up: not starting bench_placement.py"
    exit 1
fi
export PYTHONUNBUFFERED=1 OUT="$out"
# shellcheck disable=SC2086  # $extra is a list of arguments
timeout --signal=INT -k 10 "$left" "$python" bench/bench_placement.py --deadline-s "$left" $extra 2>&1 \
    | tee "$out/placement.log"
status=${PIPESTATUS[0]}
echo "bench_placement.py exit status $status after $((SECONDS - start)) s in all; results in $out" \
    "(placement.json, placement.md, placement.log, versions.txt)"
exit "$status"
