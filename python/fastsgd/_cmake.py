"""Where the C++ side of this installed package lives: headers and the CMake package.

The wheel carries ``fastsgd/include/fastsgd/*.h``, ``fastsgd/lib/libfastsgd_core.so`` and
``fastsgd/share/cmake/fastsgd/fastsgdConfig.cmake``, so a C++ project can build against the
very engine this package runs::

    cmake -S . -B build -Dfastsgd_DIR="$(python -c 'import fastsgd; print(fastsgd.get_cmake_dir())')"

(or put site-packages on ``CMAKE_PREFIX_PATH``: CMake searches ``<prefix>/fastsgd/share/cmake``).
Pure Python on purpose: nothing here loads the native module.
"""

from __future__ import annotations

import os
import sys

__all__ = ["get_cmake_dir", "get_include"]

_CONFIG = os.path.join("share", "cmake", "fastsgd", "fastsgdConfig.cmake")
_HEADER = os.path.join("include", "fastsgd", "fastsgd.h")


def _package_dirs() -> list[str]:
    """This package's directories: its own, then every entry of ``fastsgd.__path__``.

    A regular install has one. An editable install (scikit-build-core's redirect mode) serves the
    Python files from the source tree while the files CMake installed (the native module, headers,
    library, CMake package) sit in site-packages; its ``__path__`` lists both.
    """
    dirs = [os.path.dirname(os.path.abspath(__file__))]
    package = sys.modules.get(__package__ or "fastsgd")
    for entry in getattr(package, "__path__", None) or []:
        entry = os.path.abspath(str(entry))
        if entry not in dirs:
            dirs.append(entry)
    return dirs


def _find(relative: str, what: str) -> str:
    for root in _package_dirs():
        if os.path.isfile(os.path.join(root, relative)):
            return root
    raise FileNotFoundError(
        f"fastsgd's {what} is not part of this installation (looked in "
        f"{', '.join(_package_dirs())}); it is installed with the package when CMake's "
        "FASTSGD_INSTALL option is ON (the default)"
    )


def get_cmake_dir() -> str:
    """The directory holding ``fastsgdConfig.cmake``: pass it as ``-Dfastsgd_DIR=...``."""
    return os.path.join(_find(_CONFIG, "CMake package"), "share", "cmake", "fastsgd")


def get_include() -> str:
    """The include directory: ``#include <fastsgd/fastsgd.h>`` resolves below it."""
    return os.path.join(_find(_HEADER, "C++ header set"), "include")
