"""Moving momentum state between the Keras and torch conventions.

Keras keeps a velocity that already holds the learning rate, torch a buffer that does not:

* Keras: ``v = m*v - lr*g;  w = w + v``
* torch (dampening 0): ``b = m*b + g;  w = w - lr*b``

At a constant learning rate the two walk the same path with ``v = -lr * b``. When the rate
changes between steps they differ (Keras's velocity keeps the old rates inside it), so a
conversion is exact only for the rate the state is converted at.
"""

from __future__ import annotations

from typing import Any


def _rate(learning_rate: Any) -> float:
    rate = float(learning_rate)
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"`learning_rate` must be a finite float > 0 to convert momentum state, got {learning_rate!r}")
    return rate


def keras_velocity_to_torch(velocity: Any, learning_rate: float) -> Any:
    """torch's momentum buffer ``b = -v / lr`` for a Keras velocity ``v`` (a new array of the
    same type: NumPy, torch, ...)."""
    return velocity * (-1.0 / _rate(learning_rate))


def torch_buffer_to_keras(buffer: Any, learning_rate: float) -> Any:
    """Keras's velocity ``v = -lr * b`` for a torch momentum buffer ``b`` (a new array of the
    same type)."""
    return buffer * (-_rate(learning_rate))
