"""The C++ side of the installed package: headers, static library and CMake package.

Builds cpp/examples (a standalone CMake project: ``find_package(fastsgd CONFIG REQUIRED)``)
out of tree against the fastsgd this interpreter imports, and runs the trainer. Skipped only
when CMake or a C++ compiler is missing; a missing CMake package is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastsgd
from fastsgd import _cmake

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "cpp" / "examples"


def _cmake_exe() -> str | None:
    found = shutil.which("cmake")
    if found:
        return found
    try:  # the `cmake` wheel, if installed in this environment
        import cmake  # type: ignore[import-not-found]

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        return str(exe) if exe.exists() else None
    except (ImportError, AttributeError):
        return None


def _cxx_compiler() -> str | None:
    candidates = [os.environ.get("CXX", "")] + ["c++", "g++", "clang++"]
    for name in candidates:
        if name and shutil.which(name.split()[0]):
            return name
    return None


CMAKE = _cmake_exe()
CXX = _cxx_compiler()
needs_toolchain = pytest.mark.skipif(
    CMAKE is None or CXX is None,
    reason=f"needs CMake and a C++ compiler (cmake: {CMAKE or 'missing'}, C++: {CXX or 'missing'})",
)


def _generator_args() -> list[str]:
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (
        f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
        f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    )
    return proc


def test_paths_point_into_the_package():
    cmake_dir = Path(_cmake.get_cmake_dir())
    include = Path(_cmake.get_include())
    assert (cmake_dir / "fastsgdConfig.cmake").is_file()
    assert (cmake_dir / "fastsgdConfigVersion.cmake").is_file()
    assert (cmake_dir / "fastsgdTargets.cmake").is_file()
    assert (include / "fastsgd" / "fastsgd.h").is_file()
    for header in ("config.h", "dtype.h", "math.h", "sgd.h", "step.h", "tensor.h"):
        assert (include / "fastsgd" / header).is_file(), header
    # <pkg>/share/cmake/fastsgd and <pkg>/include sit in the same installed package.
    assert cmake_dir.parents[2] == include.parent
    assert list((include.parent / "lib").glob("*fastsgd*")), "the static library is missing"
    version = (cmake_dir / "fastsgdConfigVersion.cmake").read_text()
    assert f'set(PACKAGE_VERSION "{fastsgd.__version__}")' in version


def test_cmake_dir_from_the_command_line():
    proc = _run([sys.executable, "-m", "fastsgd", "info", "--cmake-dir"])
    assert Path(proc.stdout.strip()) == Path(_cmake.get_cmake_dir())


@needs_toolchain
def test_example_builds_and_trains_against_the_installed_package(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ)
    if CXX and "CXX" not in env:
        env["CXX"] = CXX
    _run(
        [CMAKE, "-S", str(EXAMPLE), "-B", str(build), *_generator_args(),
         "-DCMAKE_BUILD_TYPE=Release", f"-Dfastsgd_DIR={_cmake.get_cmake_dir()}"],
        env=env,
    )
    _run([CMAKE, "--build", str(build)], env=env)
    exe = build / "train_logistic"
    proc = _run([str(exe)], timeout=300)
    assert "epoch  1" in proc.stdout
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout


@needs_toolchain
def test_found_through_cmake_prefix_path(tmp_path):
    # With site-packages on CMAKE_PREFIX_PATH, CMake finds <prefix>/fastsgd/share/cmake/fastsgd.
    cmake_dir = Path(_cmake.get_cmake_dir())
    prefix = cmake_dir.parents[3]
    proc = _run(
        [CMAKE, "-S", str(EXAMPLE), "-B", str(tmp_path / "build"), *_generator_args(),
         f"-DCMAKE_PREFIX_PATH={prefix}"],
    )
    found = [line.split(" from ", 1)[1].split(" (CUDA")[0] for line in proc.stdout.splitlines()
             if line.startswith("-- fastsgd ") and " from " in line]
    assert found and os.path.realpath(found[0]) == os.path.realpath(cmake_dir), proc.stdout
