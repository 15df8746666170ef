#!/usr/bin/env bash
# Builds fastsgd with CUDA and runs the GPU checks on a GPU machine without network access:
#   1. the host-side functor test (CUDA algorithm vs the CPU engine, no GPU needed: both
#      rules, parameter groups, maximize, L2/decoupled decay, fresh momentum, measure()),
#   2. tests/test_gpu.py (CUDA tensors vs the CPU engine; must not skip here): the torch rule
#      with groups bit for bit, grad_stats / skip_nonfinite / external global sums, refusal
#      of CUDA graph capture, explicit and side streams,
#   3. tests/gpu/bench_gpu.py (bert-base-shaped steps vs torch.optim.SGD(fused=True), and
#      bandwidth vs a device-to-device copy; the torch rule and skip_nonfinite included).
# Overflow skips: the engine takes found_inf as a host bool (GradScaler's device flag must be
# read by the caller, one sync); there is no device-side found_inf.
#
# Assumes (nothing is downloaded):
#   * an NVIDIA GPU of compute capability >= 7.5 and a driver >= 580 (CUDA 13 runtime);
#   * nvcc 13.x on PATH, at /usr/local/cuda/bin/nvcc, or named by $CUDACXX;
#   * cmake >= 3.24, a C++17 compiler, ninja or make;
#   * python3 with numpy, pybind11, pytest and a CUDA build of torch (cupy optional).
#     scikit-build-core / pip are not needed: the extension is built with CMake and imported
#     from the build tree (a staged copy of python/fastsgd plus the built _core module).
#
# Usage: tests/gpu/run.sh [build-dir]     (default build/gpu under the repository)
# Environment: FASTSGD_GPU_ARCHS (default "native": only this GPU, a quick build; use the
#   shipped list "75-real;80-real;86-real;89-real;90-real;100-real;120-real;120-virtual" to test
#   the release fatbin), PYTHON (default python3), OUT (directory for bench_gpu.json and logs),
#   BENCH_STEPS (default 50), SKIP_BENCH=1.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build/gpu}
archs=${FASTSGD_GPU_ARCHS:-native}
py=${PYTHON:-python3}
out=${OUT:-$build/out}
mkdir -p "$build" "$out"

if [ -z "${CUDACXX:-}" ]; then
  CUDACXX=$(command -v nvcc || true)
  [ -z "$CUDACXX" ] && [ -x /usr/local/cuda/bin/nvcc ] && CUDACXX=/usr/local/cuda/bin/nvcc
fi
[ -n "$CUDACXX" ] || { echo "run.sh: no nvcc found (set CUDACXX)" >&2; exit 2; }
export CUDACXX

echo "== machine"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$CUDACXX" --version | tail -2
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

echo "== build (CUDA architectures: $archs)"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
t0=$(date +%s)
cmake -S "$root" -B "$build" ${generator[@]+"${generator[@]}"} \
  -DCMAKE_BUILD_TYPE=Release -DFASTSGD_CUDA=ON -DFASTSGD_PYTHON=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$archs" \
  -DPython_EXECUTABLE="$(command -v "$py")" \
  -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" >"$out/configure.log"
cmake --build "$build" -j "$(nproc)" >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"

stage="$build/stage"
rm -rf "$stage"
mkdir -p "$stage"
cp -r "$root/python/fastsgd" "$stage/"
cp "$build"/python/_core*.so "$stage/fastsgd/"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import fastsgd; print(fastsgd.__file__); print(fastsgd.cuda_info())"

echo "== host functor test"
cudart=$(sed -n 's/^CUDA_cudart_static_LIBRARY:[A-Z]*=//p' "$build/CMakeCache.txt")
if [ -z "$cudart" ]; then
  cuda_root=$(cd "$(dirname "$(readlink -f "$CUDACXX")")/.." && pwd)
  cudart=$(find "$cuda_root" -name libcudart_static.a 2>/dev/null | head -1)
fi
"${CXX:-c++}" -std=c++17 -O2 -ffp-contract=off -fno-fast-math \
  -I"$root/cpp/include" -I"$root/cpp/src" -I"$root/cuda" \
  "$root/tests/gpu/test_cuda_functor_host.cpp" "$build/cpp/libfastsgd_core.a" "$cudart" -ldl -lrt -lpthread \
  -o "$build/test_cuda_functor_host"
"$build/test_cuda_functor_host" 250

echo "== GPU tests"
# Fail (not skip) when the GPU is not usable: that is what this script is for.
"$py" - <<'PY'
import sys, fastsgd, torch
info = fastsgd.cuda_info()
if not info["device_count"] or not torch.cuda.is_available():
    sys.exit(f"GPU not usable: fastsgd says {info['status']!r}, torch.cuda.is_available()={torch.cuda.is_available()}")
PY
(cd "$root" && "$py" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py | tee "$out/test_gpu.log")
if grep "^SKIPPED" "$out/test_gpu.log" | grep -vq "CuPy is not installed"; then
  echo "run.sh: GPU tests were skipped unexpectedly (see above)" >&2
  exit 1
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== GPU benchmark (bert-base shapes)"
  "$py" "$root/tests/gpu/bench_gpu.py" --steps "${BENCH_STEPS:-50}" --out "$out/bench_gpu.json"
fi
echo "== done (logs and bench_gpu.json in $out)"
