"""Learning-rate schedules with Keras 3 semantics, in pure Python and NumPy.

A schedule is a one-argument callable: ``schedule(step)`` returns the learning rate for the
optimizer step ``step`` (``fastsgd.SGD`` passes the raw ``apply()`` call count, as Keras does).
The classes mirror ``keras.optimizers.schedules`` (Keras 3.15): the same constructor arguments,
defaults, ``name`` defaults, ``get_config()`` keys and ``ValueError`` checks, so configs move
freely between the two libraries through :func:`serialize` and :func:`deserialize`.

Schedules
---------
``LearningRateSchedule``
    Base class. Subclass it and override ``__call__`` (and ``get_config`` to serialize).
``ExponentialDecay(initial_learning_rate, decay_steps, decay_rate, staircase=False)``
    ``lr0 * decay_rate ** p`` with ``p = step / decay_steps`` (floored if ``staircase``).
``PiecewiseConstantDecay(boundaries, values)``
    ``values[i]`` on the interval ``boundaries[i-1] < step <= boundaries[i]``.
``PolynomialDecay(initial_learning_rate, decay_steps, end_learning_rate=1e-4, power=1.0, cycle=False)``
    ``(lr0 - end) * (1 - step / decay_steps) ** power + end``, optionally cycling.
``InverseTimeDecay(initial_learning_rate, decay_steps, decay_rate, staircase=False)``
    ``lr0 / (1 + decay_rate * p)`` with ``p = step / decay_steps`` (floored if ``staircase``).
``CosineDecay(initial_learning_rate, decay_steps, alpha=0.0, warmup_target=None, warmup_steps=0)``
    Optional linear warm-up to ``warmup_target``, then a half cosine down to ``alpha`` times
    the start value.
``CosineDecayRestarts(initial_learning_rate, first_decay_steps, t_mul=2.0, m_mul=1.0, alpha=0.0)``
    SGDR: cosine periods whose length grows by ``t_mul`` and whose height shrinks by ``m_mul``.

Numerics
--------
Keras evaluates a schedule with tensor ops in the dtype of
``convert_to_tensor(initial_learning_rate)``. Here the same operations run, in the same order,
on NumPy scalars of the *compute dtype*:

* ``float32`` when ``initial_learning_rate`` is a Python ``float`` or ``int`` (Keras would use
  ``int32`` for an ``int``, which truncates ``decay_rate``/``warmup_target``; fastsgd does not);
* the NumPy dtype when it is a NumPy floating scalar or 0-d array (``np.float64`` gives float64,
  ``np.float16`` float16, ``np.float32`` float32). Note: Keras's *torch* backend turns a bare
  ``np.float64`` scalar into float32 because it is a ``float`` subclass; the TensorFlow backend
  keeps float64, and so does fastsgd.

The step and every constructor argument are cast to the compute dtype; every ``+ - * /`` is
rounded to it; ``cos``, ``log`` and ``pow`` are evaluated in double precision and rounded once,
which reproduces the float32 results of the torch backend (whose scalar kernels call libm's
``cosf``/``logf``/``powf``) to the last bit in almost all cases. Calls return a Python ``float``
(``PiecewiseConstantDecay`` returns a Python ``int`` when ``values[0]`` is an integer).
"""

from __future__ import annotations

import bisect
import math
import operator
from typing import Any, Callable, Dict, Optional

import numpy as np

__all__ = [
    "LearningRateSchedule",
    "ExponentialDecay",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "InverseTimeDecay",
    "CosineDecay",
    "CosineDecayRestarts",
    "serialize",
    "deserialize",
]

#: The ``module`` field Keras writes for its built-in schedules.
KERAS_MODULE = "keras.optimizers.schedules"

# ----------------------------------------------------------------------------------------------
# Scalar helpers. `dt` is a NumPy scalar type; `cast(x)` rounds a Python int/float to it.
# ----------------------------------------------------------------------------------------------

# NumPy >= 2 (NEP 50) rounds a Python scalar to the NumPy operand's type: `float32(0) + x` is
# a float32 cast that costs ~80 ns, against ~500 ns for `np.float32(x)`. NumPy 1.x promotes to
# float64 instead, so there the (slower) constructor is used.
_WEAK_PYTHON_SCALARS = type(np.float32(0) + 0.5) is np.float32 and type(np.float32(0) + 1) is np.float32


def _compute_dtype(value: Any) -> type:
    """The NumPy scalar type a schedule computes in, from ``initial_learning_rate``.

    NumPy floating scalars and 0-d arrays keep their dtype (float16/32/64; wider types use
    float64); everything else (Python float, int, bool) computes in float32.
    """
    if isinstance(value, (np.generic, np.ndarray)) and value.dtype.kind == "f":
        if value.dtype in (np.float16, np.float32, np.float64):
            return value.dtype.type
        return np.float64
    return np.float32


def _caster(dt: type) -> Callable[[Any], Any]:
    """A fast ``x -> dt(x)`` for Python ints and floats (NaN/inf included)."""
    if _WEAK_PYTHON_SCALARS:
        return dt(0).__add__
    return dt


def _as_number(step: Any) -> Any:
    """``step`` as a Python int (integers, NumPy/torch integer scalars) or float (the rest)."""
    try:
        return operator.index(step)
    except TypeError:
        return float(step)


def _floor(x, cast):
    try:
        return cast(math.floor(x))
    except (OverflowError, ValueError):  # +-inf and NaN are their own floor
        return x


def _ceil(x, cast):
    try:
        return cast(math.ceil(x))
    except (OverflowError, ValueError):
        return x


def _cos(x, cast):
    try:
        return cast(math.cos(x))
    except ValueError:  # cos(+-inf)
        return cast(math.nan)


def _log(x, cast):
    try:
        return cast(math.log(x))
    except ValueError:
        return cast(-math.inf if x == 0 else math.nan)


def _pow(a, b, cast):
    try:
        return cast(math.pow(a, b))
    except (ValueError, OverflowError):  # IEEE results instead of Python's exceptions
        with np.errstate(all="ignore"):
            return cast(float(np.power(np.float64(a), np.float64(b))))


def _plain(value: Any) -> Any:
    """A config value in the JSON-friendly form Keras's ``serialize`` gives it."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value  # np.float64 is a float and is kept, as in Keras
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray) and value.ndim > 0:
        return {"class_name": "__numpy__", "config": {"value": value.tolist(), "dtype": str(value.dtype)}}
    if isinstance(value, (np.generic, np.ndarray)):
        return value.item()
    return value


def _unplain(value: Any) -> Any:
    """Inverse of :func:`_plain` for the array forms Keras writes into configs."""
    if isinstance(value, dict):
        if value.get("class_name") in ("__numpy__", "__tensor__") and isinstance(value.get("config"), dict):
            cfg = value["config"]
            return np.asarray(cfg["value"], dtype=cfg.get("dtype"))
        return {k: _unplain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_unplain(v) for v in value)
    return value


# ----------------------------------------------------------------------------------------------
# Base classes
# ----------------------------------------------------------------------------------------------


class LearningRateSchedule:
    """Base class of learning-rate schedules: ``lr = schedule(step)``.

    Subclasses override ``__call__(self, step)`` (``step``: the optimizer's step count, a
    Python int) and, to be serializable, ``get_config()``. ``from_config(config)`` is
    ``cls(**config)``. ``fastsgd.SGD`` accepts any instance as ``learning_rate`` and calls it
    once per update step.
    """

    def __call__(self, step: Any) -> Any:
        """The learning rate at ``step``; subclasses must override this."""
        raise NotImplementedError(f"{type(self).__name__} has to implement `__call__(self, step)`")

    def get_config(self) -> dict:
        """The constructor arguments as a dict; subclasses must override this to serialize."""
        raise NotImplementedError(f"{type(self).__name__} has to implement `get_config()` to be serializable")

    @classmethod
    def from_config(cls, config: dict) -> "LearningRateSchedule":
        """A schedule built from ``get_config()`` output: ``cls(**config)``."""
        return cls(**config)


class _BuiltinSchedule(LearningRateSchedule):
    """Shared plumbing of the built-in schedules.

    The public attributes (the constructor arguments) may be reassigned after construction,
    as with Keras; the cast constants that ``__call__`` uses are then rebuilt on the next call.
    """

    _fields: tuple = ()
    _c: Optional[tuple] = None

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in self._fields:
            object.__setattr__(self, "_c", None)

    def _constants(self) -> tuple:
        c = self._prepare()
        object.__setattr__(self, "_c", c)
        return c

    def _prepare(self) -> tuple:  # pragma: no cover - overridden
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _check_positive(arg: str, value: Any) -> None:
    if value <= 0:
        raise ValueError(f"`{arg}` must be > 0, got {arg}={value!r}")


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


class ExponentialDecay(_BuiltinSchedule):
    """Exponential decay: ``lr0 * decay_rate ** p``.

    With ``s`` = the step cast to the compute dtype::

        p = s / decay_steps
        if staircase: p = floor(p)
        lr = initial_learning_rate * decay_rate ** p

    Args:
        initial_learning_rate: the rate at step 0 (its type picks the compute dtype, see the
            module docstring).
        decay_steps: steps per factor of ``decay_rate``; must be > 0 (``ValueError``).
        decay_rate: the factor per ``decay_steps`` steps.
        staircase: decay in whole multiples of ``decay_steps`` (integer ``p``).
        name: kept for config compatibility with Keras.

    Example: ``ExponentialDecay(0.1, 10, 0.5)(5) == 0.1 * 0.5 ** 0.5``.
    """

    _fields = ("initial_learning_rate", "decay_steps", "decay_rate", "staircase")

    def __init__(self, initial_learning_rate: float, decay_steps: float, decay_rate: float, staircase: bool = False,
                 name: str = "ExponentialDecay") -> None:
        _check_positive("decay_steps", decay_steps)
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = staircase
        self.name = name
        self._constants()

    def _prepare(self):
        dt = _compute_dtype(self.initial_learning_rate)
        return (dt, _caster(dt), dt(self.initial_learning_rate), dt(self.decay_steps), dt(self.decay_rate),
                bool(self.staircase))

    def __call__(self, step: Any) -> float:
        """``initial_learning_rate * decay_rate ** p`` at ``step`` (see the class docstring)."""
        c = self._c or self._constants()
        dt, cast, lr0, d, rate, staircase = c
        if type(step) is not int:
            step = _as_number(step)
        p = cast(step) / d
        if staircase:
            p = _floor(p, cast)
        return float(lr0 * _pow(rate, p, cast))

    def get_config(self) -> dict:
        """``initial_learning_rate, decay_steps, decay_rate, staircase, name``."""
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
            "staircase": self.staircase,
            "name": self.name,
        }


class PiecewiseConstantDecay(_BuiltinSchedule):
    """Piecewise-constant rate: ``values[i]`` on ``boundaries[i-1] < step <= boundaries[i]``.

    With ``b = boundaries`` and ``v = values`` (``len(v) == len(b) + 1``, else ``ValueError``)::

        lr = v[0]     if step <= b[0]
             v[i]     if b[i-1] < step <= b[i]
             v[-1]    if step > b[-1]

    i.e. ``v[bisect_left(b, step)]``. As in Keras, an integer step is compared with the
    boundaries cast to integers (truncated toward zero) and a float step with the boundaries
    in float32. The result has the type of ``values[0]``: an integer ``values[0]`` gives Python
    ``int`` results (each value truncated like an integer cast); a Python float gives the
    value rounded to float32 (e.g. ``0.1 -> 0.10000000149011612``, as Keras returns it); a NumPy
    float gives the value in its dtype; all are returned as Python numbers. No boundaries
    (``values`` of length 1) gives a constant schedule.

    When the boundaries are not strictly increasing or a value is not finite, the result is the
    literal Keras computation ``sum(mask_i * v[i])`` (which may add several values, or give NaN
    from ``0 * inf``); otherwise a binary search.

    The lists are read when the schedule is built and whenever ``boundaries`` or ``values`` is
    reassigned; edit them by reassigning, not in place.

    Args:
        boundaries: step boundaries, increasing.
        values: one more value than boundaries.
        name: kept for config compatibility with Keras.
    """

    _fields = ("boundaries", "values")

    def __init__(self, boundaries: Any, values: Any, name: str = "PiecewiseConstant") -> None:
        if len(boundaries) != len(values) - 1:
            raise ValueError(
                f"`boundaries` must have one element less than `values`; got {len(boundaries)} boundaries "
                f"({boundaries!r}) and {len(values)} values ({values!r})")
        self.boundaries = boundaries
        self.values = values
        self.name = name
        self._constants()

    def _prepare(self):
        bounds = list(self.boundaries)
        vals = list(self.values)
        first = vals[0]
        if isinstance(first, (int, np.integer)) or (isinstance(first, np.ndarray) and first.dtype.kind in "iub"):
            out = [int(v) for v in vals]
            zero: Any = 0
        else:
            dt = _compute_dtype(first)
            out = [float(dt(v)) for v in vals]
            zero = dt(0)
        # A float step meets the boundaries in float32; an integer step meets them cast to
        # integers (truncated toward zero), as Keras casts the boundaries to the step's dtype.
        float_bounds = [float(np.float32(b)) for b in bounds]
        int_bounds = [int(b) if isinstance(b, (int, np.integer)) else
                      (math.trunc(fb) if math.isfinite(fb) else fb) for b, fb in zip(bounds, float_bounds)]
        simple = all(isinstance(v, int) or math.isfinite(v) for v in out) and all(
            x < y for x, y in zip(float_bounds, float_bounds[1:])) and all(
            x < y for x, y in zip(int_bounds, int_bounds[1:]))
        return out, int_bounds, float_bounds, simple, zero

    def __call__(self, step: Any) -> Any:
        """``values[i]`` for the interval holding ``step`` (see the class docstring)."""
        c = self._c or self._constants()
        out, int_bounds, float_bounds, simple, zero = c
        if type(step) is int:
            bounds = int_bounds
        else:
            step = _as_number(step)
            if type(step) is int:
                bounds = int_bounds
            else:
                step = float(np.float32(step))
                bounds = float_bounds
        if simple:
            return out[bisect.bisect_left(bounds, step)]
        return self._masked_sum(step, bounds, out, zero)

    @staticmethod
    def _masked_sum(step, bounds, out, zero):
        """Keras's formula, term by term: v0*(s<=b0) + v[-1]*(s>b[-1]) + sum v[i]*(b[i-1]<s<=b[i])."""
        if not bounds:
            return out[0]
        if isinstance(zero, int):
            conv = int
        else:
            dt = type(zero)
            out = [dt(v) for v in out]
            conv = dt
        terms = [(step <= bounds[0], out[0]), (step > bounds[-1], out[-1])]
        terms += [(lo < step <= hi, v) for lo, hi, v in zip(bounds[:-1], bounds[1:], out[1:-1])]
        total = zero
        with np.errstate(all="ignore"):
            for mask, v in terms:
                total = total + conv(mask) * v
        return int(total) if isinstance(zero, int) else float(total)

    def get_config(self) -> dict:
        """``boundaries, values, name``."""
        return {"boundaries": self.boundaries, "values": self.values, "name": self.name}


class PolynomialDecay(_BuiltinSchedule):
    """Polynomial decay from ``initial_learning_rate`` to ``end_learning_rate``.

    With ``s`` = the step cast to the compute dtype and ``D = decay_steps``::

        if cycle: D = D * (1 if s == 0 else ceil(s / D))
        else:     s = min(s, D)
        p = s / D
        lr = (initial_learning_rate - end_learning_rate) * (1 - p) ** power + end_learning_rate

    With ``cycle`` an exact multiple ``s = j * D`` (j >= 1) gives ``p = 1``, i.e.
    ``end_learning_rate``; the restart is at ``j * D + 1``.

    Args:
        initial_learning_rate: the rate at step 0 (picks the compute dtype).
        decay_steps: length of the decay; must be > 0 (``ValueError``).
        end_learning_rate: the final rate (default ``0.0001``).
        power: the polynomial's power (default ``1.0``, linear).
        cycle: restart the decay every ``decay_steps`` instead of staying at the end.
        name: kept for config compatibility with Keras.
    """

    _fields = ("initial_learning_rate", "decay_steps", "end_learning_rate", "power", "cycle")

    def __init__(self, initial_learning_rate: float, decay_steps: float, end_learning_rate: float = 0.0001,
                 power: float = 1.0, cycle: bool = False, name: str = "PolynomialDecay") -> None:
        _check_positive("decay_steps", decay_steps)
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.end_learning_rate = end_learning_rate
        self.power = power
        self.cycle = cycle
        self.name = name
        self._constants()

    def _prepare(self):
        dt = _compute_dtype(self.initial_learning_rate)
        lr0, end = dt(self.initial_learning_rate), dt(self.end_learning_rate)
        return (dt, _caster(dt), lr0 - end, end, dt(self.power), dt(self.decay_steps), bool(self.cycle),
                dt(1), dt(0))

    def __call__(self, step: Any) -> float:
        """``(lr0 - end) * (1 - p) ** power + end`` at ``step`` (see the class docstring)."""
        c = self._c or self._constants()
        dt, cast, span, end, power, d, cycle, one, zero = c
        if type(step) is not int:
            step = _as_number(step)
        s = cast(step)
        if cycle:
            if s != zero:
                d = d * _ceil(s / d, cast)
        elif s > d:
            s = d
        p = s / d
        return float(span * _pow(one - p, power, cast) + end)

    def get_config(self) -> dict:
        """``initial_learning_rate, decay_steps, end_learning_rate, power, cycle, name``."""
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "end_learning_rate": self.end_learning_rate,
            "power": self.power,
            "cycle": self.cycle,
            "name": self.name,
        }


class InverseTimeDecay(_BuiltinSchedule):
    """Inverse-time decay: ``lr0 / (1 + decay_rate * p)``.

    With ``s`` = the step cast to the compute dtype::

        p = s / decay_steps
        if staircase: p = floor(p)
        lr = initial_learning_rate / (1 + decay_rate * p)

    Args:
        initial_learning_rate: the rate at step 0 (picks the compute dtype).
        decay_steps: steps per unit of ``p``; must be > 0 (``ValueError``).
        decay_rate: the rate's growth of the denominator per unit of ``p``.
        staircase: use whole multiples of ``decay_steps`` (integer ``p``).
        name: kept for config compatibility with Keras.

    Example: ``InverseTimeDecay(0.1, 10, 0.5)(5) == 0.1 / 1.25 == 0.08``.
    """

    _fields = ("initial_learning_rate", "decay_steps", "decay_rate", "staircase")

    def __init__(self, initial_learning_rate: float, decay_steps: float, decay_rate: float, staircase: bool = False,
                 name: str = "InverseTimeDecay") -> None:
        _check_positive("decay_steps", decay_steps)
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = staircase
        self.name = name
        self._constants()

    def _prepare(self):
        dt = _compute_dtype(self.initial_learning_rate)
        return (dt, _caster(dt), dt(self.initial_learning_rate), dt(self.decay_steps), dt(self.decay_rate),
                bool(self.staircase), dt(1))

    def __call__(self, step: Any) -> float:
        """``initial_learning_rate / (1 + decay_rate * p)`` at ``step`` (see the class docstring)."""
        c = self._c or self._constants()
        dt, cast, lr0, d, rate, staircase, one = c
        if type(step) is not int:
            step = _as_number(step)
        p = cast(step) / d
        if staircase:
            p = _floor(p, cast)
        denom = one + rate * p
        if denom == 0:
            with np.errstate(all="ignore"):
                return float(lr0 / denom)
        return float(lr0 / denom)

    def get_config(self) -> dict:
        """``initial_learning_rate, decay_steps, decay_rate, staircase, name``."""
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
            "staircase": self.staircase,
            "name": self.name,
        }


class CosineDecay(_BuiltinSchedule):
    """Cosine decay, with an optional linear warm-up first.

    With ``s`` = the step cast to the compute dtype, ``D = decay_steps``, ``W = warmup_steps``
    and ``decay(t, top) = top * ((1 - alpha) * 0.5 * (1 + cos(pi * t / D)) + alpha)``::

        if warmup_target is None:
            lr = decay(min(s, D), initial_learning_rate)
        else:
            s = min(s, D + W)
            if s < W:
                lr = (warmup_target - initial_learning_rate) * (s / W) + initial_learning_rate
            else:
                lr = decay(s - W, warmup_target)

    So with ``warmup_target`` set the decay starts from ``warmup_target`` (even when
    ``warmup_steps == 0``) and ends at ``alpha * warmup_target``; without it, it runs from
    ``initial_learning_rate`` to ``alpha * initial_learning_rate``. As in Keras, ``1 - alpha`` is
    formed in Python double precision and then rounded to the compute dtype.

    Args:
        initial_learning_rate: the rate at step 0 (picks the compute dtype).
        decay_steps: length of the cosine phase; must be > 0 (``ValueError``).
        alpha: the final rate as a fraction of the decay's start value.
        name: kept for config compatibility with Keras.
        warmup_target: the rate reached at the end of the warm-up, or ``None`` for no warm-up.
        warmup_steps: length of the warm-up.

    Example: ``CosineDecay(0.0, 10, warmup_target=0.2, warmup_steps=4)`` gives 0.1 at step 2
    (half-way up) and 0.1 at step 9 (half-way down).
    """

    _fields = ("initial_learning_rate", "decay_steps", "alpha", "warmup_target", "warmup_steps")

    def __init__(self, initial_learning_rate: float, decay_steps: float, alpha: float = 0.0, name: str = "CosineDecay",
                 warmup_target: Optional[float] = None, warmup_steps: float = 0) -> None:
        _check_positive("decay_steps", decay_steps)
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.alpha = alpha
        self.name = name
        self.warmup_steps = warmup_steps
        self.warmup_target = warmup_target
        self._constants()

    def _prepare(self):
        dt = _compute_dtype(self.initial_learning_rate)
        d = dt(self.decay_steps)
        warm = self.warmup_target is not None
        target = dt(self.warmup_target) if warm else None
        w = dt(self.warmup_steps)
        return (dt, _caster(dt), dt(self.initial_learning_rate), d, dt(1 - self.alpha), dt(self.alpha),
                dt(math.pi), dt(0.5), dt(1), warm, target, w, d + w)

    def __call__(self, step: Any) -> float:
        """The warm-up or cosine value at ``step`` (see the class docstring)."""
        c = self._c or self._constants()
        dt, cast, lr0, d, keep, alpha, pi, half, one, warm, target, w, dw = c
        if type(step) is not int:
            step = _as_number(step)
        s = cast(step)
        if not warm:
            if s > d:
                s = d
            top = lr0
        else:
            if s > dw:
                s = dw
            if s < w:
                return float((target - lr0) * (s / w) + lr0)
            s = s - w
            top = target
        cosine = half * (one + _cos(pi * (s / d), cast))
        return float(top * (keep * cosine + alpha))

    def get_config(self) -> dict:
        """``initial_learning_rate, decay_steps, alpha, name, warmup_target, warmup_steps``."""
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "alpha": self.alpha,
            "name": self.name,
            "warmup_target": self.warmup_target,
            "warmup_steps": self.warmup_steps,
        }


class CosineDecayRestarts(_BuiltinSchedule):
    """Cosine decay with warm restarts (SGDR, Loshchilov & Hutter 2016).

    Period ``i`` (from 0) lasts ``first_decay_steps * t_mul ** i`` steps and starts at
    ``m_mul ** i`` times ``initial_learning_rate``. With ``s`` = the step cast to the compute
    dtype::

        f = s / first_decay_steps
        if t_mul == 1:
            i = floor(f);  f = f - i
        else:
            i = floor(log(1 - f * (1 - t_mul)) / log(t_mul))
            f = (f - (1 - t_mul ** i) / (1 - t_mul)) / t_mul ** i
        lr = initial_learning_rate * ((1 - alpha) * 0.5 * m_mul ** i * (1 + cos(pi * f)) + alpha)

    Everything is computed as Keras does, in the compute dtype, except the period index ``i``
    when ``t_mul != 1``. In float32 the restart points ``S(k) * first_decay_steps``, with
    ``S(k) = (t_mul**k - 1) / (t_mul - 1)``, are blurred by the rounding of ``t_mul``, ``f`` and
    the ``log`` ratio, so at some exact restarts Keras returns the end of the previous period
    (about ``alpha * lr0``) instead of the restart peak (e.g. ``t_mul=1.2``,
    ``first_decay_steps=5``, step 11). fastsgd computes ``i`` in float64 from the arguments as
    given, ``f64 = step / first_decay_steps``, and picks the ``i`` with
    ``S(i) <= f64 < S(i+1)``, where a ``f64`` within a relative ``1e-9`` of ``S(i+1)`` counts as
    reaching it. Away from restart points this is the ``i`` Keras computes. (If the float64
    ``log`` has no value, e.g. past the finite total length when ``t_mul < 1``, the Keras formula
    is used as is and gives NaN like Keras.)

    Args:
        initial_learning_rate: the rate at step 0 (picks the compute dtype).
        first_decay_steps: length of the first period; must be > 0 (``ValueError``).
        t_mul: growth factor of the period length.
        m_mul: factor on the peak rate per period.
        alpha: the minimum rate as a fraction of ``initial_learning_rate``.
        name: kept for config compatibility with Keras (default ``"SGDRDecay"``).

    Example: ``CosineDecayRestarts(0.1, 2, t_mul=2, m_mul=0.5)`` at steps 0..7 gives
    0.1, 0.05, 0.05, 0.042678, 0.025, 0.007322, 0.025, 0.024048.
    """

    _fields = ("initial_learning_rate", "first_decay_steps", "_t_mul", "_m_mul", "alpha")

    def __init__(self, initial_learning_rate: float, first_decay_steps: float, t_mul: float = 2.0, m_mul: float = 1.0,
                 alpha: float = 0.0, name: str = "SGDRDecay") -> None:
        _check_positive("first_decay_steps", first_decay_steps)
        self.initial_learning_rate = initial_learning_rate
        self.first_decay_steps = first_decay_steps
        self._t_mul = t_mul
        self._m_mul = m_mul
        self.alpha = alpha
        self.name = name
        self._constants()

    @property
    def t_mul(self):
        """The period-length factor (stored as ``_t_mul``, as in Keras)."""
        return self._t_mul

    @t_mul.setter
    def t_mul(self, value):
        self._t_mul = value

    @property
    def m_mul(self):
        """The peak factor per period (stored as ``_m_mul``, as in Keras)."""
        return self._m_mul

    @m_mul.setter
    def m_mul(self, value):
        self._m_mul = value

    def _prepare(self):
        dt = _compute_dtype(self.initial_learning_rate)
        cast = _caster(dt)
        one = dt(1)
        t = dt(self._t_mul)
        alpha = dt(self.alpha)
        t64, fds64 = float(self._t_mul), float(self.first_decay_steps)
        return (dt, cast, dt(self.initial_learning_rate), dt(self.first_decay_steps), t, dt(self._m_mul), alpha,
                one - alpha, one - t, _log(t, cast), t != one, dt(math.pi), dt(0.5), one, t64, fds64,
                t64 > 0 and math.isfinite(t64))

    def __call__(self, step: Any) -> float:
        """The SGDR value at ``step`` (see the class docstring)."""
        c = self._c or self._constants()
        dt, cast, lr0, fds, t, m, alpha, keep, one_minus_t, log_t, geometric, pi, half, one, t64, fds64, t_ok = c
        if type(step) is not int:
            step = _as_number(step)
        f = cast(step) / fds
        if not geometric:
            i = _floor(f, cast)
            f = f - i
        else:
            i = self._period_index(step / fds64, t64) if t_ok else None
            if i is None:
                return self._keras_formula(f, c)
            i = cast(i)
            t_i = _pow(t, i, cast)
            f = (f - (one - t_i) / one_minus_t) / t_i
        cosine = half * _pow(m, i, cast) * (one + _cos(pi * f, cast))
        return float(lr0 * (keep * cosine + alpha))

    @staticmethod
    def _period_index(f: float, t: float) -> Optional[int]:
        """The ``i`` with ``S(i) <= f < S(i+1)``, ``S(k) = (t**k - 1) / (t - 1)``, in float64.

        ``f`` within a relative 1e-9 below ``S(i+1)`` counts as ``S(i+1)`` (an exact restart
        blurred by rounding). None when the logarithm is undefined (Keras formula then).
        """
        try:
            d = t - 1.0
            i = math.floor(math.log1p(f * d) / math.log(t))
            for _ in range(4):  # the estimate is off by at most one; settle it on S itself
                lo = (t ** i - 1.0) / d
                hi = (t ** (i + 1) - 1.0) / d
                if f < lo - 1e-9 * abs(lo):
                    i -= 1
                elif f >= hi - 1e-9 * abs(hi):
                    i += 1
                else:
                    break
            return i
        except (ValueError, OverflowError, ZeroDivisionError):
            return None

    @staticmethod
    def _keras_formula(f, c) -> float:
        """Keras's geometric branch verbatim, in the compute dtype (the NaN/inf cases)."""
        dt, cast, lr0, fds, t, m, alpha, keep, one_minus_t, log_t, geometric, pi, half, one, t64, fds64, t_ok = c
        with np.errstate(all="ignore"):
            i = _floor(_log(one - f * one_minus_t, cast) / log_t, cast)
            t_i = _pow(t, i, cast)
            f = (f - (one - t_i) / one_minus_t) / t_i
            cosine = half * _pow(m, i, cast) * (one + _cos(pi * f, cast))
            return float(lr0 * (keep * cosine + alpha))

    def get_config(self) -> dict:
        """``initial_learning_rate, first_decay_steps, t_mul, m_mul, alpha, name``."""
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "first_decay_steps": self.first_decay_steps,
            "t_mul": self._t_mul,
            "m_mul": self._m_mul,
            "alpha": self.alpha,
            "name": self.name,
        }


# ----------------------------------------------------------------------------------------------
# Serialization
# ----------------------------------------------------------------------------------------------

_BUILTINS: Dict[str, type] = {
    cls.__name__: cls
    for cls in (ExponentialDecay, PiecewiseConstantDecay, PolynomialDecay, InverseTimeDecay, CosineDecay,
                CosineDecayRestarts)
}


def serialize(schedule: LearningRateSchedule) -> dict:
    """A schedule as Keras's serialized dict.

    Returns ``{"module": "keras.optimizers.schedules", "class_name": type(schedule).__name__,
    "config": schedule.get_config(), "registered_name": None}``, exactly what
    ``keras.optimizers.schedules.serialize`` gives for the Keras schedule of the same class and
    arguments (NumPy scalars in the config become Python numbers, ``np.float64`` stays, arrays
    become Keras's ``"__numpy__"`` dicts). Keras can load it with
    ``keras.optimizers.schedules.deserialize``. A user subclass gets its own module and
    ``registered_name=class_name``; load it with ``deserialize(d, custom_objects={...})``.
    """
    if not isinstance(schedule, LearningRateSchedule):
        raise TypeError(f"serialize() expects a fastsgd LearningRateSchedule, got {type(schedule).__name__}")
    cls = type(schedule)
    config = _plain(schedule.get_config())
    if _BUILTINS.get(cls.__name__) is cls:
        return {"module": KERAS_MODULE, "class_name": cls.__name__, "config": config, "registered_name": None}
    return {"module": cls.__module__, "class_name": cls.__name__, "config": config,
            "registered_name": cls.__name__}


def deserialize(config: Any, custom_objects: Optional[dict] = None) -> LearningRateSchedule:
    """A fastsgd schedule from a serialized dict (fastsgd's, Keras 3's or TF-Keras 2's).

    ``config`` is ``{"class_name": name, "config": {...}}`` with optional ``"module"`` and
    ``"registered_name"``, as written by :func:`serialize` or
    ``keras.optimizers.schedules.serialize``. ``name`` is looked up in ``custom_objects``
    (by ``registered_name`` or ``class_name``), then among the six built-in schedules, and the
    class is built with ``cls.from_config(config["config"])``. Also accepted: a fastsgd schedule
    (returned as is) and a Keras schedule object of a built-in class (converted through its
    ``get_config()``).

    Raises:
        ValueError: unknown ``class_name`` (the message names it) or a dict without one.
        TypeError: anything that is not a dict or a schedule.
    """
    if isinstance(config, LearningRateSchedule):
        return config
    if not isinstance(config, dict):
        kind = type(config)
        if hasattr(config, "get_config") and any(c.__name__ == "LearningRateSchedule" for c in kind.__mro__):
            config = {"class_name": kind.__name__, "config": config.get_config()}
        else:
            raise TypeError(f"deserialize() expects a dict with 'class_name' and 'config', got {kind.__name__}")
    if "class_name" not in config:
        raise ValueError(f"Cannot deserialize a learning rate schedule without 'class_name': {config!r}")
    name = config["class_name"]
    cls = None
    if custom_objects:
        cls = custom_objects.get(config.get("registered_name") or name) or custom_objects.get(name)
    if cls is None:
        cls = _BUILTINS.get(name)
    if cls is None:
        raise ValueError(f"Unknown learning rate schedule: {name!r} (built-in: {', '.join(sorted(_BUILTINS))}; "
                         "pass other classes through `custom_objects`)")
    inner = _unplain(config.get("config") or {})
    return cls.from_config(inner)
