#!/usr/bin/env bash
# Where the build's minutes and the wheel's bytes go: builds one wheel from this checkout without
# build isolation (the current environment needs scikit-build-core, pybind11, ninja, cmake) into
# a fresh build directory, then prints the wall and CPU time, the slowest translation units (from
# ninja's log), the wheel's compressed and installed size, its biggest files, and the CUDA
# fatbinary's share of the core library.
#
# Usage: tools/measure-build.sh [cpu|cuda] [OUT_DIR]
#   cpu   FASTSGD_CUDA=OFF (default);  cuda  FASTSGD_CUDA=ON (nvcc from CUDACXX or PATH)
# Environment: CMAKE_BUILD_PARALLEL_LEVEL (default 2). Compare runs at similar machine load: the
#   load average is printed with the times.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-cpu}
out=${2:-$(mktemp -d)}
mkdir -p "$out"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
case "$mode" in
  cpu) export FASTSGD_CUDA=OFF ;;
  cuda) export FASTSGD_CUDA=ON CUDACXX="${CUDACXX:-$(command -v nvcc)}" ;;
  *) echo "usage: tools/measure-build.sh [cpu|cuda] [OUT_DIR]" >&2; exit 2 ;;
esac
build="build/measure-$mode"
rm -rf "$build"
TIMEFORMAT="wall %R s, user %U s, sys %S s"
echo "== $mode build, -j$CMAKE_BUILD_PARALLEL_LEVEL, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
time python -m pip wheel -q --no-build-isolation --no-deps -Cbuild-dir="$build" -w "$out" .
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== slowest translation units (seconds)"
awk 'NR > 1 { printf "%7.1f  %s\n", ($2 - $1) / 1000, $4 }' "$build/.ninja_log" | sort -rn | head -n 8
wheel=$(ls -t "$out"/fastsgd-*.whl | head -n 1)
echo "== $(basename "$wheel"): $(stat -c %s "$wheel") bytes compressed, $(unzip -l "$wheel" | tail -n 1 | awk '{print $1}') bytes installed"
unzip -l "$wheel" | sort -n | tail -n 4 | head -n 3
lib=$(find "$build" -name 'libfastsgd_core.so' -o -name 'libfastsgd_core.a' | head -n 1)
if [ "$mode" = cuda ] && [ -n "$lib" ]; then
  fatbin=$(size -A "$lib" 2>/dev/null | awk '$1 == ".nv_fatbin" { print $2 }')
  echo "== $(basename "$lib"): $(stat -c %s "$lib") bytes, of which .nv_fatbin ${fatbin:-?} bytes"
fi
