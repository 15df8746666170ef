#!/usr/bin/env bash
# Installs NVIDIA's CUDA 13.0 compiler and static runtime from PyPI into PREFIX and links
# PREFIX/bin/nvcc, for wheel builds in containers that have no CUDA toolkit (cibuildwheel's
# manylinux images). The packages are the ones the project's CI image is assembled from.
#
# Usage: tools/install-nvcc.sh PREFIX
set -euo pipefail
prefix=${1:?usage: tools/install-nvcc.sh PREFIX}
python=${PYTHON:-$(command -v python3 || ls /opt/python/cp312-cp312/bin/python3)}
"$python" -m venv "$prefix/venv"
"$prefix/venv/bin/python" -m pip install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
  "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*"
root=$("$prefix/venv/bin/python" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')/nvidia
nvcc=$(find "$root" -path '*/bin/nvcc' -type f | head -n 1)
[ -n "$nvcc" ] || { echo "install-nvcc: nvcc not found under $root" >&2; exit 1; }
mkdir -p "$prefix/bin"
ln -sf "$nvcc" "$prefix/bin/nvcc"
"$prefix/bin/nvcc" --version
