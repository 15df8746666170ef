"""A small user script, type-checked with ``mypy --strict`` against the installed package in CI.

It touches the public API the way a user would; a missing annotation or a stub that disagrees
with the package shows up here as a mypy error.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

import fastsgd
from fastsgd import _core, schedules


def train(steps: int) -> float:
    """Runs a few Nesterov steps with a schedule and EMA and returns the final mean weight."""
    w: npt.NDArray[np.float32] = np.ones((64, 32), np.float32)
    schedule = schedules.CosineDecay(initial_learning_rate=0.1, decay_steps=steps)
    opt = fastsgd.SGD(learning_rate=schedule, momentum=0.9, nesterov=True, use_ema=True, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        g = rng.standard_normal(w.shape).astype(np.float32)
        opt.apply([g], [w])
    opt.finalize_variable_values([w])
    rate: float = opt.learning_rate
    done: int = opt.iterations
    assert done == steps and rate >= 0.0
    return float(w.mean())


def describe() -> str:
    """The facts ``python -m fastsgd info`` prints, through the typed API."""
    cpu = fastsgd.cpu_info()
    cuda = fastsgd.cuda_info()
    fastsgd.set_num_threads(0)
    engine: type[_core.Engine] = _core.Engine
    version: str = fastsgd.__version__
    cmake_dir: str = fastsgd.get_cmake_dir()
    return f"{version} {cpu['active']} {cuda['status']} {engine.__name__} {cmake_dir}"


def engine_with_groups() -> tuple[bool, float]:
    """Two parameter groups under torch's rule, a skip check and the two-phase norm, typed."""
    options = _core.Options(convention=_core.Convention.torch, skip_nonfinite=True,
                            group=_core.Group(learning_rate=0.1, momentum=0.9))
    engine = _core.Engine(options)
    slow: int = engine.add_group(_core.Group(learning_rate=0.01, decay_form=_core.DecayForm.l2, weight_decay=1e-4))
    a, b = np.ones(8, np.float32), np.ones(4, np.float32)
    engine.build([a, b], groups=[0, slow])
    grads = [np.ones(8, np.float32), np.ones(4, np.float32)]
    stats: _core.GradStats = engine.grad_stats(grads)
    updated, skipped, missing = engine.step(grads, global_sum_squares=stats.total)
    return updated and not skipped and missing == 0, stats.total


if __name__ == "__main__":
    print(train(10), describe(), engine_with_groups())
