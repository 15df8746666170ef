"""fastsgd: Keras 3's SGD optimizer with a fused native core, for any array framework.

    import fastsgd
    opt = fastsgd.SGD(learning_rate=0.1, momentum=0.9, nesterov=True)
    opt.apply(grads, variables)   # NumPy arrays, torch tensors, any DLPack producer: in place

The update rules live in C++ (cpp/include/fastsgd/math.h); this package holds the
Keras-shaped facade, the learning-rate schedules and a plain NumPy reference.
"""

from . import _core, schedules
from ._cmake import get_cmake_dir, get_include
from ._core import __version__
from .conventions import keras_velocity_to_torch, torch_buffer_to_keras
from .optimizer import SGD


def cpu_info() -> dict:
    """ISA levels this CPU supports, the level in use, and the thread count."""
    return _core.cpu_info()


def cuda_info() -> dict:
    """Whether CUDA kernels were built into this install, and which devices are usable."""
    return _core.cuda_info()


def set_num_threads(threads: int) -> None:
    """Caps the CPU threads a step uses (0 restores FASTSGD_NUM_THREADS or the CPU count)."""
    _core.set_num_threads(int(threads))


__all__ = ["SGD", "schedules", "keras_velocity_to_torch", "torch_buffer_to_keras", "cpu_info", "cuda_info", "set_num_threads", "get_cmake_dir", "get_include",
           "__version__"]
