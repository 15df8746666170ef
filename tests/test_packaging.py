"""The installed package as a user gets it: one version everywhere, type information, a package
import that loads nothing native, and a ``cmake.root`` entry point that survives a broken
extension module."""

from __future__ import annotations

import importlib.metadata
from importlib.machinery import EXTENSION_SUFFIXES
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import fastsgd
from fastsgd import _cmake

PACKAGE = Path(fastsgd.__file__).resolve().parent


def _python(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter from outside the source tree."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.expanduser("~"))


def test_one_version_everywhere():
    metadata = importlib.metadata.version("fastsgd")
    assert fastsgd.__version__ == metadata
    header = Path(_cmake.get_include()) / "fastsgd" / "version.h"
    major, minor, patch = metadata.split(".")
    text = header.read_text()
    for name, value in (("MAJOR", major), ("MINOR", minor), ("PATCH", patch)):
        assert f"#define FASTSGD_VERSION_{name} {value}\n" in text


def test_type_information_is_shipped():
    assert (PACKAGE / "py.typed").is_file()
    assert (PACKAGE / "_core.pyi").is_file()


def test_importing_the_package_loads_no_native_code():
    proc = _python("import sys, fastsgd; print('fastsgd._core' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_cmake_root_entry_point_survives_a_broken_extension():
    # Loads the entry point the way scikit-build-core does, with the extension made unloadable.
    code = """
import importlib.abc, importlib.metadata, importlib.resources, sys

class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastsgd._core":
            raise ImportError("simulated broken extension")
        return None

sys.meta_path.insert(0, Broken())
(ep,) = [e for e in importlib.metadata.entry_points(group="cmake.root") if e.name == "fastsgd"]
root = importlib.resources.files(ep.load())
print((root / "share" / "cmake" / "fastsgd" / "fastsgdConfig.cmake").is_file())
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_the_engine_is_installed_once():
    # The wheel builds the core shared: the extension links it instead of carrying a copy.
    # The compiled files sit beside the extension module (an editable install keeps the Python
    # sources elsewhere).
    from fastsgd import _core

    native = Path(_core.__file__).resolve().parent
    libs = sorted(p.name for p in (native / "lib").glob("*fastsgd_core*"))
    assert libs, "the core library is missing"
    if any(name.endswith((".so", ".dylib")) for name in libs):
        assert not any(name.endswith(".a") for name in libs), libs
        module = next(p for p in native.glob("_core*") if p.name.endswith(tuple(EXTENSION_SUFFIXES)))
        core = next(p for p in (native / "lib").glob("*fastsgd_core*"))
        assert module.stat().st_size < core.stat().st_size / 2


def test_installed_package_when_asked():
    # .ci/run sets this when it tests the repaired wheel: the tests must see site-packages, not
    # the source tree.
    if os.environ.get("FASTSGD_TEST_INSTALLED") != "1":
        pytest.skip("checks CI's installed-wheel pass only (.ci/run sets FASTSGD_TEST_INSTALLED=1)")
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    platlib = Path(sysconfig.get_paths()["platlib"]).resolve()
    assert PACKAGE.parent in (purelib, platlib), PACKAGE
