#!/usr/bin/env bash
# The cuda backend on a real GPU, in one call of the device tool (an H200 machine: no network, its
# own python3 with torch, triton and transformers):
#
#   run(command="bash benchmarks/gpu/h200_check.sh", carry=[".whl"], timeout_s=420)
#
# after benchmarks/gpu/fetch_wheels.sh has put the missing packages in .whl/. Steps: the machine
# (GPU, versions, host CPU and its ISA), ember made importable without a build
# (offline_install.py), the cuda tests on the GPU, then bench_gpu.py for dummy:qwen3-0.6b and
# dummy:llama3-8b. Every step runs whatever the one before did, under its own time limit, cut to
# what is left of BUDGET_S; everything goes to $OUT, in 7 files (at most 8 come back): summary.log,
# env.log, tests.log, tests.xml, bench.log, bench-<model>.json. SKIP_TESTS=1 or SKIP_BENCH=1 leave
# a part out (a short second run).
set -u -o pipefail
OUT=${OUT:-/tmp/h200-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-400}
T0=$(date +%s)
SUMMARY="$OUT/summary.log"

elapsed() { echo $(( $(date +%s) - T0 )); }
note() { echo "[$(elapsed)s] $*" | tee -a "$SUMMARY"; }

# step NAME LIMIT LOG CMD...: run CMD under min(LIMIT, time left), appending to $OUT/LOG
step() {
  local name=$1 limit=$2 log="$OUT/$3"; shift 3
  local left=$(( BUDGET_S - $(elapsed) - 5 ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then note "$name: skipped, ${left}s left"; return 0; fi
  note "$name: start (limit ${limit}s)"
  echo "===== $name: $* =====" >> "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=$?
  note "$name: rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (time limit)')"
  return 0
}

# --- 1. the machine -----------------------------------------------------------------------------
env_info() {
  nvidia-smi
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,clocks.max.sm,power.limit,persistence_mode --format=csv
  python3 - <<'PY'
import platform, sys
print("python", sys.version.split()[0], sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"cc {p.major}.{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.1f} GiB", "smem optin", getattr(p, "shared_memory_per_block_optin", None))
for name in ("triton", "transformers", "accelerate", "numpy", "tokenizers", "jinja2", "pluggy", "tqdm",
             "safetensors", "pytest", "xdist", "pytest_timeout", "yaml", "requests"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
PY
  lscpu | head -20
  echo "ISA flags (count = logical CPUs that report each):"
  grep -o -w 'avx512f\|avx512_vnni\|avx512_bf16\|avx2\|amx_int8\|amx_bf16\|amx_tile' /proc/cpuinfo | sort | uniq -c
  nproc; free -g; df -h /tmp | tail -1
  gcc --version 2>&1 | head -1
}
export -f env_info
step env 40 env.log bash -c env_info

# --- 2. ember, importable with no network -------------------------------------------------------
ember_install() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else
    echo "no .whl/ carried: gguf, llguidance and platformdirs must already be there"
  fi
  python3 benchmarks/gpu/offline_install.py /tmp/ember-site
  PYTHONPATH=/tmp/ember-site:/tmp/site python3 - <<'PY'
import ember, gguf, llguidance, platformdirs
from ember.plugins import PluginRegistry
reg = PluginRegistry()
for name, info in sorted(reg.backends.items()):
    avail = info.cls.availability() if info.cls else None
    print(f"{name:10} {info.distribution} {'yes' if avail and avail.ok else 'no: ' + (avail.reason if avail else '?')}")
print("failed plugins:", [(b.name, b.error) for b in reg.failed])
PY
}
export -f ember_install
step install 60 env.log bash -c ember_install
export PYTHONPATH=/tmp/ember-site:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PIP_NO_INDEX=1 EMBER_MODELS=/tmp/ember-models  # the tests' SmolLM2 pull fails at once, they skip
unset TRITON_INTERPRET

# --- 3. the cuda tests on the GPU ---------------------------------------------------------------
if [[ -z "${SKIP_TESTS:-}" ]]; then
  extra=()
  python3 -c "import xdist" 2>/dev/null && extra+=(-n 8)  # parallel Triton compiles; tests size pools per process
  python3 -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 150)
  # shellcheck disable=SC2086  # TEST_ARGS: more pytest arguments (-k ..., say)
  step tests 150 tests.log python3 -m pytest tests/test_cuda_kernels.py tests/test_cuda_backend.py \
    tests/test_rocm_backend.py -v -rfEs -p no:randomly -p no:cacheprovider --maxfail 40 --durations 15 \
    --junitxml "$OUT/tests.xml" ${extra[@]+"${extra[@]}"} ${TEST_ARGS:-}
fi

# --- 4. bench_gpu.py: single stream and 256 sequences, against transformers and the roofline -----
# utilization 0.5: a KV pool far past what these runs use, and room for transformers afterwards
# even if ember's memory were not all released (bench_gpu.py reports what it left)
# (BENCH_MODELS, BENCH_DEVICE and BENCH_SIZES change them: a dry run here on the CPU, say)
BENCH_SIZES=${BENCH_SIZES:---single-input 128 --single-output 256 --num-seqs 256 --input-len 64:256 --output-len 64:256 --hf-batch-size 64}
if [[ -z "${SKIP_BENCH:-}" ]]; then
  for model in ${BENCH_MODELS:-qwen3-0.6b llama3-8b}; do
    limit=90; [[ $model == llama3-8b ]] && limit=170
    # shellcheck disable=SC2086  # BENCH_SIZES is a list of arguments
    step "bench-$model" $limit bench.log python3 benchmarks/bench_gpu.py --model "dummy:$model" \
      --device "${BENCH_DEVICE:-cuda}" --gpu-memory-utilization 0.5 $BENCH_SIZES --json "$OUT/bench-$model.json"
  done
fi

note "done"
nvidia-smi --query-gpu=memory.used,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$SUMMARY"
exit 0
