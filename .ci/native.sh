#!/usr/bin/env bash
# Native tests and the C++ package:
#   1. configure + build the core with -DFASTSGD_TESTS=ON and run CTest;
#   2. install that build to a prefix and build + run cpp/examples against it;
#   3. given a Python with fastsgd installed, build + run cpp/examples against the CMake
#      package inside the installed Python package (fastsgd.get_cmake_dir()).
#
# Usage: .ci/native.sh [WORK_DIR] [PYTHON]
#   WORK_DIR  build directories go here (default: a temporary directory, removed at exit)
#   PYTHON    interpreter with fastsgd installed (default: $PYTHON; step 3 is skipped if neither
#             is given, with a note)
# Environment: FASTSGD_CUDA (AUTO|ON|OFF, default AUTO), CMAKE_GENERATOR, CTEST_PARALLEL_LEVEL,
#   FASTSGD_NATIVE_SUBPROJECT=1 also builds the example with add_subdirectory(<checkout>).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if [ $# -ge 1 ] && [ -n "$1" ]; then
  work=$1
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
python=${2:-${PYTHON:-}}
generator=()
if [ -z "${CMAKE_GENERATOR:-}" ] && command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
jobs=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}
cuda=${FASTSGD_CUDA:-AUTO}
export CUDACXX="${CUDACXX:-$(command -v nvcc || true)}"
[ -n "$CUDACXX" ] || unset CUDACXX

echo "== native: configure + build (FASTSGD_CUDA=$cuda) in $work/build"
cmake -S "$root" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DFASTSGD_TESTS=ON -DFASTSGD_CUDA="$cuda"
cmake --build "$work/build" --parallel "$jobs"

echo "== native: ctest"
ctest --test-dir "$work/build" --output-on-failure --parallel "${CTEST_PARALLEL_LEVEL:-$jobs}"

echo "== native: install to a prefix, build cpp/examples against it"
rm -rf "$work/prefix" "$work/example-prefix"
cmake --install "$work/build" --prefix "$work/prefix"
cmake -S "$root/cpp/examples" -B "$work/example-prefix" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$work/prefix"
cmake --build "$work/example-prefix"
"$work/example-prefix/train_logistic"

if [ "${FASTSGD_NATIVE_SUBPROJECT:-0}" = 1 ]; then
  echo "== native: cpp/examples with add_subdirectory(<checkout>)"
  cmake -S "$root/cpp/examples" -B "$work/example-subproject" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DFASTSGD_SOURCE_DIR="$root" -DFASTSGD_CUDA="$cuda"
  cmake --build "$work/example-subproject" --parallel "$jobs"
  "$work/example-subproject/train_logistic"
fi

if [ -z "$python" ]; then
  echo "== native: no PYTHON given: skipped building cpp/examples against the installed Python package"
  exit 0
fi
echo "== native: cpp/examples against the CMake package of the installed Python package ($python)"
# Run from outside the checkout so that `import fastsgd` is the installed package.
cmake_dir=$(cd / && "$python" -c 'import fastsgd._cmake as c; print(c.get_cmake_dir())')
echo "fastsgd_DIR=$cmake_dir"
rm -rf "$work/example-python"
cmake -S "$root/cpp/examples" -B "$work/example-python" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release -Dfastsgd_DIR="$cmake_dir"
cmake --build "$work/example-python"
"$work/example-python/train_logistic"
echo "== native: passed"
