#!/usr/bin/env bash
# Build llama.cpp's own CPU tools (llama-bench, llama-batched-bench, llama-server,
# llama-cli, llama-simple) from the llama.cpp copy vendored in the
# `llama-cpp-python` sdist on the Python package index.  No GitHub access needed.
#
# Usage:
#   benchmarks/build_llamacpp.sh [OUT_DIR]           # default OUT_DIR=/work/llama.cpp-build
#
# Environment knobs:
#   LLAMA_CPP_PYTHON_VERSION  sdist version to fetch (default: newest on the index;
#                             0.3.36 -> llama.cpp ggml-org/llama.cpp@0c1e57098 was measured)
#   LLAMA_CPP_SDIST           path to an already-downloaded llama_cpp_python-*.tar.gz
#                             (skips the download)
#   PIP                       pip to use (default: /work/venv/bin/pip, else `python3 -m pip`)
#   JOBS                      parallel build jobs (default: 2)
#   NICE                      niceness for the build (default: 10)
#   LLAMA_CPP_ISA             native (default: -march=native) or avx2 (GGML_NATIVE=OFF with AVX2,
#                             FMA and F16C: what to measure ember's EMBER_MAX_CPU_ISA=avx2 path
#                             against on an AVX-512 machine)
#   LLAMA_CPP_AMX             1 to keep Intel AMX kernels (default: 0 = compiled out).
#                             On this machine (Sapphire Rapids VM) -march=native enables AMX
#                             and every prompt batch then segfaults in ggml_backend_amx_mul_mat
#                             (ldtilecfg; upstream ggml-org/llama.cpp#20824, fix proposed in
#                             PR #26954), so AMX is disabled with -mno-amx-* by default.
#
# Result: $OUT_DIR/bin/llama-{bench,batched-bench,server,cli,simple}, statically
# linked against libllama/libggml (no LD_LIBRARY_PATH needed).  Point
# benchmarks/llamacpp.py at it with LLAMA_CPP_BIN=$OUT_DIR/bin (it looks in
# /work/llama.cpp-build/bin by default).
#
# Takes about 5 minutes of compiling on 2 idle cores (9-10 when the cores are shared).
set -euo pipefail

OUT_DIR="${1:-/work/llama.cpp-build}"
JOBS="${JOBS:-2}"
NICE="${NICE:-10}"
if [[ -z "${PIP:-}" ]]; then
    if [[ -x /work/venv/bin/pip ]]; then PIP=/work/venv/bin/pip; else PIP="python3 -m pip"; fi
fi

mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SRC_PARENT="$OUT_DIR/src"
mkdir -p "$SRC_PARENT"

# 1. Fetch the sdist (source only, no deps).
if [[ -n "${LLAMA_CPP_SDIST:-}" ]]; then
    SDIST="$LLAMA_CPP_SDIST"
else
    SPEC="llama-cpp-python"
    [[ -n "${LLAMA_CPP_PYTHON_VERSION:-}" ]] && SPEC="llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
    DL_DIR="$OUT_DIR/sdist"
    mkdir -p "$DL_DIR"
    $PIP download --no-deps --no-binary :all: "$SPEC" -d "$DL_DIR"
    SDIST="$(ls -t "$DL_DIR"/llama_cpp_python-*.tar.gz | head -n1)"
fi
echo "sdist: $SDIST"

# 2. Extract it; llama.cpp is under vendor/llama.cpp.
tar -xzf "$SDIST" -C "$SRC_PARENT"
PKG_DIR="$SRC_PARENT/$(basename "$SDIST" .tar.gz)"
LLAMA_SRC="$PKG_DIR/vendor/llama.cpp"
[[ -f "$LLAMA_SRC/CMakeLists.txt" ]] || { echo "no vendor/llama.cpp in $SDIST" >&2; exit 1; }

# The sdist has no .git, so take the upstream commit from the package changelog
# ("feat: update llama.cpp to ggml-org/llama.cpp@<sha>") for the build info.
COMMIT="$(grep -m1 -o 'ggml-org/llama.cpp@[0-9a-f]*' "$PKG_DIR/CHANGELOG.md" 2>/dev/null | cut -d@ -f2 || true)"
COMMIT="${COMMIT:-unknown}"
PKG_VERSION="$(basename "$PKG_DIR" | sed 's/^llama_cpp_python-//')"
echo "llama-cpp-python $PKG_VERSION, llama.cpp commit $COMMIT"

# 3. Configure: CPU only, Release, native ISA (minus AMX, see above), static libs,
#    no curl/openssl/web-UI download.
EXTRA_FLAGS=""
if [[ "${LLAMA_CPP_AMX:-0}" != "1" ]]; then
    EXTRA_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
ISA_FLAGS=(-DGGML_NATIVE=ON)
if [[ "${LLAMA_CPP_ISA:-native}" == "avx2" ]]; then
    ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF)
fi
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
nice -n "$NICE" cmake -S "$LLAMA_SRC" -B "$OUT_DIR" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    "${ISA_FLAGS[@]}" \
    -DCMAKE_C_FLAGS="$EXTRA_FLAGS" -DCMAKE_CXX_FLAGS="$EXTRA_FLAGS" \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENCL=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_COMMIT="$COMMIT"

# 4. Build only the tools we need.
start=$(date +%s)
nice -n "$NICE" cmake --build "$OUT_DIR" --config Release -j "$JOBS" \
    --target llama-bench llama-batched-bench llama-server llama-cli llama-simple
end=$(date +%s)

cat > "$OUT_DIR/BUILD_INFO.txt" <<EOF
llama-cpp-python sdist: $(basename "$SDIST")
llama.cpp commit: $COMMIT
ISA: ${LLAMA_CPP_ISA:-native} (${ISA_FLAGS[*]})
extra compiler flags: ${EXTRA_FLAGS:-none}
build dir: $OUT_DIR
build seconds (cmake --build, -j$JOBS, nice $NICE): $((end - start))
built: $(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
cat "$OUT_DIR/BUILD_INFO.txt"
ls -la "$OUT_DIR/bin"
"$OUT_DIR/bin/llama-bench" --version 2>&1 || true
