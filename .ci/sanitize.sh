#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer pass:
#   1. the core and the native tests built with -fsanitize=address,undefined
#      -fno-omit-frame-pointer -fno-sanitize-recover=all (every finding is fatal), CPU only,
#      -O2 -g so that the ISA walks are vectorised as in a release; CTest runs every test,
#      every ISA level, with leak detection on;
#   2. if a Python with numpy, pytest and pybind11 is given: the extension module built the same
#      way, and the Python test suite run against it with libasan preloaded (and libstdc++:
#      ASan resolves the real __cxa_throw when it starts, and python itself does not link
#      libstdc++, so the first C++ exception would otherwise hit "CHECK failed ...
#      real___cxa_throw"), with ASAN_OPTIONS=detect_leaks=0 (the interpreter never frees
#      everything). Reports go to $WORK_DIR/sanitizer.* (pytest would swallow them) and are
#      printed when the run fails.
#
# Usage: .ci/sanitize.sh [WORK_DIR] [PYTHON]
#   WORK_DIR  build directory parent (default: a temporary directory, removed at exit)
#   PYTHON    interpreter for step 2 (default: $PYTHON; step 2 is skipped without one)
#   3. with FASTSGD_SANITIZE_THREAD=1: the core and the threaded native tests (native.threads,
#      native.engine) under ThreadSanitizer.
# Environment: FASTSGD_SANITIZE_PYTEST_ARGS replaces the pytest arguments of step 2
#   (default: tests -x -q, without the tests that build C++ against an installed package or check
#   the installed package's layout).
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
cxx=${CXX:-c++}

san="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
build="$work/asan"
python_args=()
with_python=0
if [ -n "$python" ]; then
  if pybind11_dir=$("$python" -m pybind11 --cmakedir 2>/dev/null) &&
     "$python" -c 'import numpy, pytest' 2>/dev/null; then
    with_python=1
    python_args=(-DFASTSGD_PYTHON=ON -DPython_EXECUTABLE="$(command -v "$python")"
                 -Dpybind11_DIR="$pybind11_dir")
  else
    echo "== sanitize: $python lacks pybind11, numpy or pytest: the Python module is not checked"
  fi
fi

echo "== sanitize: configure + build in $build"
cmake -S "$root" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_CXX_FLAGS="$san" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF \
  -DFASTSGD_CUDA=OFF -DFASTSGD_TESTS=ON -DFASTSGD_INSTALL=OFF "${python_args[@]}"
cmake --build "$build" --parallel "$jobs"

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
echo "== sanitize: ctest (native tests under ASan + UBSan)"
ctest --test-dir "$build" --output-on-failure --parallel "${CTEST_PARALLEL_LEVEL:-$jobs}"

if [ "${FASTSGD_SANITIZE_THREAD:-0}" = 1 ]; then
  echo "== sanitize: ThreadSanitizer (native.threads, native.engine)"
  cmake -S "$root" -B "$work/tsan" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$cxx" \
    -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" \
    -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=thread" \
    -DFASTSGD_CUDA=OFF -DFASTSGD_TESTS=ON -DFASTSGD_INSTALL=OFF
  cmake --build "$work/tsan" --parallel "$jobs" --target test_threads test_engine
  TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1" \
    ctest --test-dir "$work/tsan" --output-on-failure -R '^native\.(threads|engine)$'
fi

if [ "$with_python" != 1 ]; then
  echo "== sanitize: passed (native tests only)"
  exit 0
fi

echo "== sanitize: the Python module under ASan + UBSan"
pkg="$work/pypkg"
rm -rf "$pkg"
mkdir -p "$pkg/fastsgd"
cp "$root"/python/fastsgd/*.py "$pkg/fastsgd/"
cp "$root"/python/fastsgd/*.pyi "$pkg/fastsgd/" 2>/dev/null || true
module=$(find "$build/python" -maxdepth 1 -name '_core*.so' | head -n 1)
[ -n "$module" ] || { echo "sanitize: the built _core module was not found under $build/python"; exit 1; }
cp "$module" "$pkg/fastsgd/"
runtime_lib() {  # the real file behind the compiler's runtime library name
  local f
  for name in "$@"; do
    f=$("$cxx" -print-file-name="$name")
    if [ "${f#/}" != "$f" ] && [ -e "$f" ]; then realpath "$f"; return 0; fi
  done
  echo "sanitize: none of $* found by $cxx -print-file-name" >&2
  return 1
}
libasan=$(runtime_lib libasan.so libasan.so.8)
libstdcxx=$(runtime_lib libstdc++.so.6 libstdc++.so)
rm -f "$work"/sanitizer.*
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$work/sanitizer.asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$work/sanitizer.ubsan"
run_python() {
  (cd "$work" && LD_PRELOAD="$libasan $libstdcxx" PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" "$python" "$@")
}
show_reports() {
  local found=0
  for f in "$work"/sanitizer.*; do
    [ -e "$f" ] || continue
    found=1
    echo "---- $f"
    cat "$f"
  done
  [ "$found" = 1 ] || echo "(no sanitizer report files)"
}
loaded=$(run_python -c 'import fastsgd._core as c; print(c.__file__)')
case "$loaded" in
  "$pkg"/*) echo "sanitized module: $loaded" ;;
  *) echo "sanitize: Python imported $loaded instead of the sanitized module (an editable install's import hook?)"; exit 1 ;;
esac
if [ -n "${FASTSGD_SANITIZE_PYTEST_ARGS:-}" ]; then
  # shellcheck disable=SC2206
  pytest_args=($FASTSGD_SANITIZE_PYTEST_ARGS)
else
  pytest_args=("$root/tests" -x -q -p no:cacheprovider --ignore="$root/tests/test_cmake_package.py"
               --ignore="$root/tests/test_packaging.py")
fi
if ! run_python -m pytest "${pytest_args[@]}"; then
  echo "== sanitize: the Python tests FAILED under the sanitizers; reports:"
  show_reports
  exit 1
fi
if compgen -G "$work/sanitizer.*" >/dev/null; then
  echo "== sanitize: sanitizer reports were written although the tests passed:"
  show_reports
  exit 1
fi
echo "== sanitize: passed (native tests and the Python module)"
