#!/usr/bin/env bash
# How the GPU tables in docs/benchmarks.md ("At scale: bench_scale.py") and docs/usage.md (the latency-budget rows) were made:
# one script for one device-tool call (one H100-class GPU, 16 CPU cores, no network), about 450 s.
#
# Run from the repository root with src/ and benchmarks/ on PYTHONPATH. With the device tool, the wheels
# that machine lacks (jsonargparse and its needs, and transformers/tokenizers/regex at this project's
# versions) travel in the ignored folder .whl (`carry: [".whl"]`):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks || exit; bash benchmarks/gpu_run.sh
#
# Each step's output goes to $OUT/<step>.log as it is printed (tee), so a step stopped by the time limit
# still leaves its log. Cheapest steps first: versions, latency table (about a minute), bench_scale at
# 1024 images (writes the JPEGs and the model), then at 8192 (same cache: only the new images are written).
# STEPS="versions latency scale8k" runs some of the steps (gputests: tests/test_gpu.py, not in the default).
set -u -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/xdg}  # a fresh latency-table cache on a bare machine
OUT=${OUT:-gpu_logs}
PYTHON=${PYTHON:-python3}
CACHE=${CACHE:-/tmp/bs}
mkdir -p "$OUT"
STEPS=${STEPS:-"versions latency scale1k scale8k"}
failed=0

step() {  # step NAME COMMAND...: run COMMAND, its output to the screen and $OUT/NAME.log (if NAME is in STEPS)
    local name=$1 start=$SECONDS rc
    shift
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name ($(date +%T)): $*" | tee "$OUT/$name.log"
    "$@" 2>&1 | tee -a "$OUT/$name.log"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=1
    return "$rc"
}

# 14 DataLoader workers with batches of 128 float32 images keep about 2 GiB in shared memory: make room if
# /dev/shm is small (a container's 64 MiB would stop the workers).
shm_kib=$(df -k --output=size /dev/shm 2>/dev/null | tail -1)
if [ "${shm_kib:-0}" -lt 8000000 ]; then mount -o remount,size=32G /dev/shm && echo "/dev/shm remounted at 32G"; fi

step versions bash -c "nvidia-smi; nproc; free -g | head -2; df -h /dev/shm /tmp; $PYTHON -c 'import sys, torch, transformers, tokenizers, \
huggingface_hub, lightning, jsonargparse; print(sys.version); print(\"torch\", torch.__version__, \
torch.cuda.get_device_name(), \"transformers\", transformers.__version__, \"tokenizers\", tokenizers.__version__, \
\"huggingface_hub\", huggingface_hub.__version__, \"lightning\", lightning.__version__, \"jsonargparse\", \
jsonargparse.__version__)'"
step gputests "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py
step latency "$PYTHON" benchmarks/bench_latency.py --device cuda --dtype bfloat16 --batch-size 128 \
    --constraints 0.5 0.75 --latency-constraints 0.75 0.5 --multiple-of 64 --runs 10 --warmup 3
step scale1k "$PYTHON" benchmarks/bench_scale.py --samples 1024 --batch-size 128 --workers 14 \
    --precision bf16-mixed --cache "$CACHE" && cp "$CACHE/run/report.json" "$OUT/report1k.json"
step scale8k "$PYTHON" benchmarks/bench_scale.py --samples 8192 --batch-size 128 --workers 14 \
    --precision bf16-mixed --cache "$CACHE" && cp "$CACHE/run/report.json" "$OUT/report8k.json"
exit $failed
