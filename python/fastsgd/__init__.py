"""fastsgd: Keras 3's SGD optimizer with a fused native core, for any array framework.

    import fastsgd
    opt = fastsgd.SGD(learning_rate=0.1, momentum=0.9, nesterov=True)
    opt.apply(grads, variables)   # NumPy arrays, torch tensors, any DLPack producer: in place

The update rules live in C++ (cpp/include/fastsgd/math.h); this package holds the
Keras-shaped facade, the learning-rate schedules and a plain NumPy reference.

Importing the package loads nothing native: the extension module is loaded on first use of
``SGD``, ``__version__`` or the functions below. Build tools that only look up the CMake
package (the ``cmake.root`` entry point, ``fastsgd.get_cmake_dir()``) thus keep working even
when the extension cannot be loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._cmake import get_cmake_dir, get_include
from .conventions import keras_velocity_to_torch, torch_buffer_to_keras

if TYPE_CHECKING:
    from . import schedules
    from ._core import __version__
    from .optimizer import SGD

# name -> (submodule, attribute or None for the submodule itself)
_LAZY = {
    "SGD": (".optimizer", "SGD"),
    "schedules": (".schedules", None),
    "__version__": ("._core", "__version__"),
}


def __getattr__(name: str) -> Any:
    """Loads ``SGD``, ``schedules`` and ``__version__`` on first access."""
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = importlib.import_module(module_name, __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, including those not loaded yet."""
    return sorted(set(globals()) | set(_LAZY))


def cpu_info() -> dict[str, Any]:
    """ISA levels this CPU supports, the level in use, and the thread count."""
    from . import _core

    return _core.cpu_info()


def cuda_info() -> dict[str, Any]:
    """Whether CUDA kernels were built into this install, and which devices are usable."""
    from . import _core

    return _core.cuda_info()


def set_num_threads(threads: int) -> None:
    """Caps the CPU threads a step uses (0 restores FASTSGD_NUM_THREADS or the CPU count).
    ``threads`` is an int in [0, 4096]; anything else raises TypeError/ValueError and changes nothing."""
    import numpy as np

    from . import _core

    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, (int, np.integer)):
        raise TypeError(f"`threads` must be an int in [0, 4096], got {threads!r}")
    if not 0 <= int(threads) <= 4096:
        raise ValueError(f"`threads` must be an int in [0, 4096], got {threads!r}")
    _core.set_num_threads(int(threads))


__all__ = ["SGD", "schedules", "keras_velocity_to_torch", "torch_buffer_to_keras", "cpu_info", "cuda_info",
           "set_num_threads", "get_cmake_dir", "get_include", "__version__"]
