#!/usr/bin/env bash
# Build llama.cpp's own `llama-server`, `llama-quantize` and `llama-perplexity` from the vendored source of
# the llama-cpp-python==0.3.36 sdist: the peer benchmarks/compare.py runs against. Never a tricklm dependency.
#
#   bash benchmarks/build_llama_cpp.sh avx2     # GGML_NATIVE=OFF, AVX2+FMA+F16C, no AVX-512: the common CPU's path
#   bash benchmarks/build_llama_cpp.sh native   # this CPU's best (GGML_NATIVE=ON), AMX off
#   bash benchmarks/build_llama_cpp.sh avx512   # AVX-512 with VNNI/BF16/VBMI named, no AMX: on a Xeon that has AMX,
#                                               # GGML_NATIVE=ON compiled AMX code all the same and died with SIGILL
#
# Binaries go to benchmarks/.llama.cpp/<variant>/bin (ignored by git). Prints the llama-server path last.
set -euo pipefail

variant="${1:-avx2}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/.llama.cpp"
src="$root/src"
build="$root/$variant"
py="${PYTHON:-$here/../.venv/bin/python}"

case "$variant" in
  avx2) flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF
               -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF) ;;
  native) flags=(-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF) ;;
  avx512) flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
                 -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON -DGGML_AMX_TILE=OFF
                 -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF) ;;
  *) echo "usage: $0 avx2|native|avx512" >&2; exit 2 ;;
esac

if [ ! -f "$src/CMakeLists.txt" ]; then
  mkdir -p "$root/sdist"
  "$py" -m pip download --quiet --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d "$root/sdist"
  tar -xzf "$root"/sdist/llama_cpp_python-0.3.36.tar.gz -C "$root/sdist"
  rm -rf "$src"
  mv "$root/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp" "$src"
fi

cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON "${flags[@]}" >"$build.cmake.log" 2>&1 || { tail -30 "$build.cmake.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" --target llama-server llama-quantize llama-perplexity \
  >"$build.build.log" 2>&1 || { tail -30 "$build.build.log"; exit 1; }
echo "$variant: ${flags[*]}" >"$build/build-flags.txt"  # benchmarks/compare.py reports it with each run
echo "$build/bin/llama-server"
