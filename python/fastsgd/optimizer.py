"""fastsgd.SGD: Keras 3's SGD, with every update step done by the native engine in place."""

from __future__ import annotations

import copy
import math
import re
import threading
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional

import numpy as np

from . import _core, schedules
from ._lowp import check_lowp_options, check_remainder_split, refuse_split_mismatch, remainder_split

_SLOT_KINDS = {"momentum": _core.SlotKind.momentum, "average": _core.SlotKind.average,
               "accumulator": _core.SlotKind.accumulator, "master": _core.SlotKind.master,
               "remainder": _core.SlotKind.remainder}
# Slots that only 16-bit variables have (master_weights): their lists hold None for the others,
# and their dtypes are fixed (float32 masters, uint16 remainders) rather than in slot_dtypes.
_MASTER_KINDS = {"master": "float32", "remainder": "uint16"}
_MASTER_FORMS = {"float32": _core.MasterForm.float32, "remainder": _core.MasterForm.remainder}
_LEGACY_KWARGS = {"decay", "lr", "jit_compile", "is_legacy_optimizer", "amsgrad"}
_name_counts: dict = {}


def _auto_name(base: str) -> str:
    count = _name_counts.get(base, 0)
    _name_counts[base] = count + 1
    return base if count == 0 else f"{base}_{count}"


def _is_schedule(value: Any) -> bool:
    """True for fastsgd schedules and for Keras LearningRateSchedule objects (called with the step)."""
    if isinstance(value, schedules.LearningRateSchedule):
        return True
    return any(c.__name__ == "LearningRateSchedule" for c in type(value).__mro__[1:])


def _optional_float(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a float or None, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"`{name}` is too large for a float: {value!r}") from None


def _float_arg(name: str, value: Any) -> float:
    """A required float argument: TypeError for a non-number, ValueError beyond float range."""
    result = _optional_float(name, value)
    if result is None:
        raise TypeError(f"`{name}` must be a float, got None")
    return result


# Checkpoint limits: the raw counter is an int64 that every apply() increments, so a restored
# value keeps 2**62 steps of headroom instead of wrapping negative one step later.
_MAX_ITERATIONS = 2**62
_STATE_KEYS = {"iterations", "learning_rate", "slots", "shapes", "slot_dtypes", "seed", "remainder_split"}


def _is_array_like(x: Any) -> bool:
    """One array or tensor (not a list of them)."""
    return isinstance(x, (np.ndarray, np.generic, str, bytes)) or hasattr(x, "__dlpack__") \
        or hasattr(x, "__array_interface__")


def _as_list(x: Any, name: str) -> list:
    """``x`` as a list or tuple of per-variable entries; a bare array is refused, since iterating
    it would silently turn its rows into separate entries."""
    if isinstance(x, (list, tuple)):
        return x
    if _is_array_like(x):
        raise TypeError(f"`{name}` must be a list of arrays, got a single {type(x).__name__}; "
                        f"wrap it in a list: [{name}]")
    try:
        return list(x)
    except TypeError:
        raise TypeError(f"`{name}` must be a list of arrays, got {type(x).__name__}") from None


def _float32_rate(value: Any, name: str = "learning_rate") -> float:
    """A float learning rate as Keras stores it (float32), refusing what float32 cannot hold."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a float, got {value!r}")
    try:
        f = float(value)
    except OverflowError:
        raise ValueError(f"`{name}` is too large for a float32: {value!r}") from None
    with np.errstate(over="ignore"):
        f32 = np.float32(f)
    if not math.isfinite(f32):
        raise ValueError(f"`{name}` must be finite in float32, got {value!r}")
    return float(f32)


def _bfloat16_dtype() -> Optional[np.dtype]:
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _shape_of(x: Any) -> tuple:
    return tuple(int(d) for d in x.shape)


def _restore(cls: type, config: dict, extra: dict) -> "SGD":
    """Unpickling: a fresh, unbuilt optimizer holding the pickled state until it is built."""
    opt = cls.from_config(config)
    opt._adopt(extra)
    return opt


def _is_torch(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch")


def _to_numpy(x: Any) -> np.ndarray:
    """A NumPy view or copy of any array (torch tensors are detached and moved to the CPU)."""
    if _is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _like(values: np.ndarray, template: Any) -> Any:
    """`values` as an array of the same framework as `template`."""
    module = type(template).__module__
    if module.startswith("jax"):
        import jax.numpy as jnp

        return jnp.asarray(values)
    if module.startswith("torch"):
        import torch

        return torch.from_numpy(values).to(template.device)
    return values


class SGD:
    r"""Gradient descent (with momentum) optimizer, exactly as ``keras.optimizers.SGD``.

    For a variable ``w`` with gradient ``g``, learning rate ``lr`` and momentum ``m``:

    * ``momentum == 0``: ``w = w - lr * g``
    * ``momentum > 0``:  ``velocity = m * velocity - lr * g``; ``w = w + velocity``
    * ``nesterov=True``: ``velocity = m * velocity - lr * g``; ``w = w + m * velocity - lr * g``

    Around that rule, in Keras's order: gradients are divided by ``loss_scale_factor``, averaged
    over ``gradient_accumulation_steps`` calls, clipped (``clipnorm`` per tensor,
    ``global_clipnorm`` over all, or ``clipvalue`` per element), then variables decay by
    ``w *= 1 - weight_decay * lr``, take the step, and with ``use_ema`` an exponential moving
    average ``avg = ema_momentum * avg + (1 - ema_momentum) * w`` is kept (``avg = w`` on the
    first step) and copied into the variables every ``ema_overwrite_frequency`` steps.

    Variables are updated in place, zero-copy: NumPy arrays, PyTorch tensors and any DLPack
    producer (float16, bfloat16, float32, float64; C-contiguous and writeable). One native call
    updates every tensor of a step.

    Args:
        learning_rate: a float, a ``fastsgd.schedules`` schedule (called with the iteration
            count), or a zero-argument callable returning the rate. Defaults to 0.01.
        momentum: float in [0, 1]. Defaults to 0.
        nesterov: whether to use Nesterov momentum.
        weight_decay: decoupled weight decay factor, or None.
        clipnorm: clip each gradient to this L2 norm, or None.
        clipvalue: clip each gradient element into [-clipvalue, clipvalue], or None.
        global_clipnorm: clip all gradients together to this global L2 norm, or None.
        use_ema: keep an exponential moving average of the variables.
        ema_momentum: the average's momentum. Defaults to 0.99.
        ema_overwrite_frequency: every N update steps, overwrite variables with their average.
        loss_scale_factor: gradients are divided by it (see ``scale_loss``).
        gradient_accumulation_steps: update every N calls with the mean gradient (N >= 2).
        name: the optimizer's name ("sgd", "sgd_1", ... by default).
        slot_dtype: "float32" (default) keeps the slots of float16/bfloat16 variables in float32;
            "variable" keeps them in the variable's dtype.
        skip_nonfinite: if True, a call whose gradients (after unscaling and accumulation) hold an
            Inf or NaN changes nothing at all: variables, slots, EMA and ``iterations`` stay as
            they were, and ``skipped_steps`` counts it. Off by default, as in Keras.
        master_weights: for float16/bfloat16 variables (others are unaffected), where the exact
            value lives between steps: None (the variable itself), "float32" (a float32 master
            slot: the step runs on it and stores the rounded variable in the same pass), or
            "remainder" (bfloat16 only: a uint16 slot with the low 16 bits of the float32 master,
            whose high 16 bits are the variable, rounded to nearest with ties away from zero).
            Not with ``use_ema`` or ``slot_dtype="variable"``.
        stochastic_rounding: for float16/bfloat16 variables, store the updated value rounded up
            or down with probability proportional to its distance (unbiased), using random bits
            from (``seed``, step, variable index, element index): the same on every CPU, thread
            count and device, and after a ``state_dict`` resume. Not with ``use_ema``.
        seed: an int in [0, 2**64), the stochastic rounding key (part of the config and state).
        **kwargs: ``jit_compile`` and TF-Keras's ``is_legacy_optimizer`` are accepted and unused;
            ``lr`` is a deprecated alias of ``learning_rate``; ``decay`` is ignored with a warning.

    Example:
        >>> import numpy as np, fastsgd
        >>> w = np.ones(3, np.float32)
        >>> opt = fastsgd.SGD(learning_rate=0.1, momentum=0.9)
        >>> opt.apply([np.ones(3, np.float32)], [w])
        >>> w
        array([0.9, 0.9, 0.9], dtype=float32)
    """

    def __init__(
        self,
        learning_rate: Any = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: Optional[float] = None,
        clipnorm: Optional[float] = None,
        clipvalue: Optional[float] = None,
        global_clipnorm: Optional[float] = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: Optional[int] = None,
        loss_scale_factor: Optional[float] = None,
        gradient_accumulation_steps: Optional[int] = None,
        name: Optional[str] = None,
        slot_dtype: str = "float32",
        skip_nonfinite: bool = False,
        master_weights: Optional[str] = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - _LEGACY_KWARGS)
        if unknown:
            raise ValueError(f"Argument(s) not recognized: {unknown}")
        if "decay" in kwargs:
            warnings.warn("`decay` is deprecated and ignored by fastsgd.SGD (use a learning rate schedule)",
                          stacklevel=2)
        if "lr" in kwargs:
            if learning_rate is not SGD.__init__.__defaults__[0]:
                raise ValueError("Pass only one of `learning_rate` and its deprecated alias `lr`; got "
                                 f"learning_rate={learning_rate!r}, lr={kwargs['lr']!r}")
            warnings.warn("`lr` is deprecated, use `learning_rate`", DeprecationWarning, stacklevel=2)
            learning_rate = kwargs["lr"]
        self.jit_compile = bool(kwargs.get("jit_compile", True))

        # Types are checked here; ranges once, in the engine (Keras's wording), below.
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.integer, np.floating)):
            raise ValueError("`momentum` must be a float between [0, 1].")
        self.momentum = _float_arg("momentum", momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = _optional_float("weight_decay", weight_decay)
        self.clipnorm = _optional_float("clipnorm", clipnorm)
        self.clipvalue = _optional_float("clipvalue", clipvalue)
        self.global_clipnorm = _optional_float("global_clipnorm", global_clipnorm)
        self.loss_scale_factor = _optional_float("loss_scale_factor", loss_scale_factor)
        if gradient_accumulation_steps:
            if isinstance(gradient_accumulation_steps, bool) or \
                    not isinstance(gradient_accumulation_steps, (int, np.integer)):
                raise ValueError("`gradient_accumulation_steps` must be an integer >= 2. Received: "
                                 f"gradient_accumulation_steps={gradient_accumulation_steps}")
            if not 2 <= gradient_accumulation_steps < 2**62:
                raise ValueError("`gradient_accumulation_steps` must be an integer >= 2 (and below 2**62). "
                                 f"Received: gradient_accumulation_steps={gradient_accumulation_steps}")
            gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.gradient_accumulation_steps = gradient_accumulation_steps or None
        self.use_ema = bool(use_ema)
        if self.use_ema:
            if isinstance(ema_momentum, bool) or not isinstance(ema_momentum, (int, float, np.integer, np.floating)):
                raise ValueError(f"`ema_momentum` must be in the range [0, 1]. Received: ema_momentum={ema_momentum}")
            if ema_overwrite_frequency and (isinstance(ema_overwrite_frequency, bool) or
                                            not isinstance(ema_overwrite_frequency, (int, np.integer))):
                raise ValueError("`ema_overwrite_frequency` must be an integer >= 1 or None. Received: "
                                 f"ema_overwrite_frequency={ema_overwrite_frequency}")
        self.ema_momentum = _float_arg("ema_momentum", ema_momentum) \
            if isinstance(ema_momentum, (int, float, np.integer, np.floating)) \
            else ema_momentum
        if ema_overwrite_frequency and self.use_ema and not 1 <= ema_overwrite_frequency < 2**62:
            raise ValueError("`ema_overwrite_frequency` must be an integer >= 1 or None (and below 2**62). "
                             f"Received: ema_overwrite_frequency={ema_overwrite_frequency}")
        self.ema_overwrite_frequency = int(ema_overwrite_frequency) if ema_overwrite_frequency else None
        if slot_dtype not in ("float32", "variable"):
            raise ValueError(f"`slot_dtype` must be 'float32' or 'variable', got {slot_dtype!r}")
        self.slot_dtype = slot_dtype
        self.skip_nonfinite = bool(skip_nonfinite)
        self.master_weights, self.stochastic_rounding, self.seed = check_lowp_options(
            master_weights, stochastic_rounding, seed)
        self.name = name if name is not None else _auto_name("sgd")

        self._set_learning_rate(learning_rate, initial=True)
        self._engine = _core.Engine(self._engine_options())
        self._variables: list = []
        self._excluded_ids: set = set()
        self._excluded_names: Optional[str] = None
        self._all_torch = False
        self._torch_variables: list = []
        self._pending_state: Optional[dict] = None
        self._increment_version: Optional[Callable] = None
        # Held by every call that reads or writes the engine's state (apply, state_dict,
        # load_state_dict, ...): the engine runs with the GIL released, and a checkpoint taken
        # or restored during a step would be torn. Reentrant for callbacks on the same thread.
        self._lock = threading.RLock()

    # ---- configuration --------------------------------------------------------------------

    def _engine_options(self) -> "_core.Options":
        options = _core.Options()
        options.group = _core.Group(momentum=self.momentum, nesterov=self.nesterov,
                                    weight_decay=self.weight_decay or 0.0)
        options.clipnorm = self.clipnorm
        options.clipvalue = self.clipvalue
        options.global_clipnorm = self.global_clipnorm
        options.use_ema = self.use_ema
        if self.use_ema:
            options.ema_momentum = self.ema_momentum
            options.ema_overwrite_frequency = self.ema_overwrite_frequency
        options.loss_scale_factor = self.loss_scale_factor
        options.gradient_accumulation_steps = self.gradient_accumulation_steps
        options.slots_in_variable_dtype = self.slot_dtype == "variable"
        options.skip_nonfinite = self.skip_nonfinite
        options.master_weights = None if self.master_weights is None else _MASTER_FORMS[self.master_weights]
        options.stochastic_rounding = self.stochastic_rounding
        options.seed = self.seed
        return options

    def _set_learning_rate(self, value: Any, initial: bool = False) -> None:
        if _is_schedule(value):
            self._lr_kind, self._lr = "schedule", value
        elif callable(value):
            self._lr_kind, self._lr = "callable", value
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            if not initial and self._lr_kind == "schedule":
                raise TypeError("This optimizer was created with a `LearningRateSchedule`; "
                                "a float learning rate cannot replace it (assign a schedule or callable)")
            # Keras keeps a float rate in a float32 variable.
            self._lr_kind, self._lr = "float", _float32_rate(value)
        else:
            raise ValueError("Argument `learning_rate` should be float, or an instance of LearningRateSchedule, "
                             f"or a callable (that takes in the current iteration value and returns the "
                             f"corresponding learning rate value). Received instead: learning_rate={value!r}")

    def _current_learning_rate(self, engine: Any = None) -> float:
        if self._lr_kind == "float":
            return self._lr
        if self._lr_kind == "schedule":
            return float(self._lr((self._engine if engine is None else engine).raw_iterations))
        return float(self._lr())

    @property
    def learning_rate(self) -> float:
        """The rate the next update step would use (a schedule is read at the current step)."""
        return self._current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        with self._lock:
            self._set_learning_rate(value)

    @property
    def iterations(self) -> int:
        """Completed update steps (apply() calls, divided by gradient_accumulation_steps)."""
        return int(self._engine.iterations)

    @property
    def skipped_steps(self) -> int:
        """Calls skipped because their gradients held an Inf or NaN (``skip_nonfinite``) or
        because ``found_inf`` said so; they count nowhere else."""
        return int(self._engine.skipped_steps)

    @property
    def built(self) -> bool:
        """Whether the optimizer has its variables and slots."""
        return bool(self._engine.built)

    # ---- variables and slots --------------------------------------------------------------

    def build(self, variables: Iterable) -> None:
        """Declares the variables (in order) and creates zero-filled slots for them.

        ``apply`` calls this on its first use; later calls may pass any subset or permutation
        of these variables, matched by identity as Keras does. A state loaded before build is
        checked against the variables here; if anything is refused the optimizer stays unbuilt.
        """
        with self._lock:
            if self.built:
                raise ValueError("The optimizer is already built")
            self._commit_build(*self._prepare_build(_as_list(variables, "variables")))

    def _new_engine(self) -> Any:
        return _core.Engine(self._engine_options())

    def _prepare_build(self, variables: Any) -> tuple:
        """A built engine for ``variables`` (with any pending state loaded), not yet adopted:
        nothing of this optimizer changes until ``_commit_build``."""
        variables = list(variables)
        torch_variables = [v for v in variables if _is_torch(v)]
        for i, v in enumerate(variables):
            if _is_torch(v) and v.requires_grad and not v.is_leaf:
                raise ValueError(f"variables[{i}] is a non-leaf torch tensor (the result of an operation); "
                                 "like torch.optim, fastsgd only updates leaf tensors")
        engine = self._new_engine()
        engine.build(variables, [self._decays(v) for v in variables])
        learning_rate = None
        if self._pending_state is not None:
            learning_rate = self._write_state(engine, variables, self._pending_state)
        return engine, variables, torch_variables, learning_rate

    def _commit_build(self, engine: Any, variables: list, torch_variables: list,
                      learning_rate: Optional[float]) -> None:
        self._engine = engine
        self._variables = variables
        self._torch_variables = torch_variables
        self._all_torch = bool(variables) and len(torch_variables) == len(variables)
        if torch_variables:
            import torch

            self._increment_version = torch.autograd.graph.increment_version
        if learning_rate is not None and self._lr_kind == "float":
            self._lr = learning_rate
        self.seed = int(engine.seed)
        self._pending_state = None

    def _decays(self, variable: Any) -> bool:
        if id(variable) in self._excluded_ids:
            return False
        if self._excluded_names:
            name = getattr(variable, "name", None)
            if isinstance(name, str) and re.search(self._excluded_names, name):
                return False
        return True

    def exclude_from_weight_decay(self, var_list: Optional[Iterable] = None,
                                  var_names: Optional[Iterable[str]] = None) -> None:
        """Excludes variables from weight decay: ``var_list`` by identity, ``var_names`` by a
        substring of the variable's ``name`` attribute (torch/NumPy arrays have none). Each call
        replaces the previous exclusions, before or after build."""
        var_list = _as_list(var_list, "var_list") if var_list is not None else []
        if isinstance(var_names, str):
            raise TypeError("`var_names` must be a list of strings, got a single string; wrap it: [var_names]")
        names = set(var_names or [])
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"`var_names` must hold strings, got {bad[0]!r}")
        pattern = "|".join(sorted(names)) if names else None
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"`var_names` do not form a valid pattern: {e}") from None
        with self._lock:
            self._excluded_ids = {id(v) for v in var_list}
            self._excluded_names = pattern
            for i, v in enumerate(self._variables):
                self._engine.set_decays(i, self._decays(v))

    @property
    def variables(self) -> list:
        """The built variables, in build order."""
        return list(self._variables)

    # ---- the step -------------------------------------------------------------------------

    def apply(self, grads: Iterable, trainable_variables: Optional[Iterable] = None, *,
              stream: Optional[int] = None, grad_scale: float = 1.0, found_inf: Optional[bool] = None,
              global_sum_squares: Optional[float] = None) -> None:
        """Applies one step: updates ``trainable_variables`` in place with ``grads``.

        ``grads[i]`` belongs to ``trainable_variables[i]``; a None gradient leaves its variable
        out of this step (with a warning). Without ``trainable_variables`` the built list is
        used. ``stream`` is the CUDA stream (an int handle) to launch on for CUDA tensors.
        Every input is checked before anything is written: on error, variables, slots,
        ``iterations`` and whether the optimizer is built are unchanged.

        Inputs decided outside this process (a GradScaler, an all-reduce across ranks):
        ``grad_scale`` multiplies every gradient first (``g * grad_scale``, e.g. ``1 / scale``);
        ``found_inf=True`` skips the call as ``skip_nonfinite`` would (``False``: no local check);
        ``global_sum_squares`` is the squared global gradient norm over all ranks (the sum of
        every rank's ``grad_stats(...).total``), used by ``global_clipnorm`` instead of the
        local one.
        """
        grads = _as_list(grads, "grads")
        if stream is not None and (isinstance(stream, bool) or not isinstance(stream, (int, np.integer))
                                   or not 0 <= int(stream) < 2**63):
            raise (ValueError if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool)
                   else TypeError)(f"`stream` must be a CUDA stream handle (an int in [0, 2**63)), got {stream!r}")
        if len(grads) == 0:
            return
        with self._lock:
            pending_build = None
            if trainable_variables is None:
                if not self.built:
                    raise ValueError("The first call to apply() must pass trainable_variables")
                variables = None
            else:
                variables = _as_list(trainable_variables, "trainable_variables")
                if not self.built:
                    # Built into a separate engine and adopted only once the step succeeds: a
                    # refused first call leaves the optimizer unbuilt, with its pending state.
                    pending_build = self._prepare_build(variables)
            engine = self._engine if pending_build is None else pending_build[0]
            if pending_build is not None and pending_build[3] is not None and self._lr_kind == "float":
                lr = pending_build[3] if engine.update_is_due else 0.0
            else:
                lr = self._current_learning_rate(engine) if engine.update_is_due else 0.0
            _, _, missing = engine.step(
                grads, variables, learning_rate=lr, stream=None if stream is None else int(stream),
                grad_scale=_float_arg("grad_scale", grad_scale),
                found_inf=None if found_inf is None else bool(found_inf),
                global_sum_squares=None if global_sum_squares is None
                else _float_arg("global_sum_squares", global_sum_squares))
            if pending_build is not None:
                self._commit_build(*pending_build)
            if self._increment_version is not None:
                # Raw-pointer writes are invisible to autograd's version counter unless bumped.
                if variables is None:
                    self._increment_version(self._torch_variables)
                elif self._all_torch:
                    self._increment_version(variables)
                else:
                    self._increment_version([v for v in variables if _is_torch(v)])
        if missing:
            warnings.warn(f"Gradients do not exist for {missing} variable(s) when applying this step; "
                          "those variables are left out of the update", stacklevel=2)

    def grad_stats(self, grads: Iterable, trainable_variables: Optional[Iterable] = None, *,
                   grad_scale: float = 1.0) -> "_core.GradStats":
        """What the next ``apply`` would measure, without changing anything: per variable and in
        total, the sum of squares of the effective gradient (unscaled, and merged with the
        accumulator at the end of a window), and whether any element is Inf or NaN.

        The sums are deterministic (fixed blocks, fixed order). For a model sharded over ranks,
        all-reduce ``total`` and ``nonfinite`` and pass them to ``apply(global_sum_squares=...,
        found_inf=...)``: ``global_clipnorm`` and the skip then act on the whole model.
        """
        grads = _as_list(grads, "grads")
        variables = None if trainable_variables is None else _as_list(trainable_variables, "trainable_variables")
        with self._lock:
            if not self.built:
                if variables is None:
                    raise ValueError("The first call to grad_stats() must pass trainable_variables")
                self.build(variables)
            return self._engine.grad_stats(grads, variables, grad_scale=_float_arg("grad_scale", grad_scale))

    def apply_gradients(self, grads_and_vars: Iterable) -> int:
        """Keras's ``apply_gradients(zip(grads, vars))``. Like Keras, returns the raw call
        counter (``_iterations``: every call, accumulation calls included)."""
        pairs = _as_list(grads_and_vars, "grads_and_vars")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"grads_and_vars[{i}] must be a (gradient, variable) pair, got {type(pair).__name__}")
        grads = [g for g, _ in pairs]
        variables = [v for _, v in pairs]
        self.apply(grads, variables)
        return int(self._engine.raw_iterations)

    def minimize(self, loss: Any, var_list: Iterable, tape: Any = None) -> None:
        """Computes gradients of ``loss`` with respect to ``var_list`` and applies them.

        * torch tensors: ``loss`` is a zero-argument callable returning a scalar tensor (or that
          tensor itself); gradients come from ``torch.autograd.grad``.
        * any arrays: ``loss`` is a zero-argument callable returning ``(loss_value, grads)``.

        ``tape`` is accepted for TF-Keras compatibility and must be None. Returns None.
        """
        if tape is not None:
            raise ValueError("fastsgd.SGD.minimize() takes no GradientTape; pass a callable")
        var_list = list(var_list)
        if var_list and all(_is_torch(v) for v in var_list):
            import torch

            value = loss() if callable(loss) else loss
            if isinstance(value, tuple):
                _, grads = value
            else:
                grads = torch.autograd.grad(value, var_list, allow_unused=True)
        else:
            if not callable(loss):
                raise TypeError("for non-torch variables, `loss` must be a callable returning (loss, grads)")
            value = loss()
            if not (isinstance(value, tuple) and len(value) == 2):
                raise TypeError("for non-torch variables, `loss()` must return (loss_value, grads)")
            _, grads = value
        self.apply(list(grads), var_list)

    def stateless_apply(self, state: Optional[dict], grads: Iterable,
                        trainable_variables: Iterable) -> tuple:
        """Functional form of ``apply`` for immutable arrays (JAX) or when nothing may change.

        Takes a state from ``state_dict()`` (or None for a fresh optimizer), gradients and
        variables of any array type; returns ``(new_variables, new_state)``. The inputs and
        this optimizer are left untouched; new variables come back as the input's array type
        (JAX, torch or NumPy).
        """
        variables = list(trainable_variables)
        grads = list(grads)
        copies = [np.array(_to_numpy(v), copy=True, order="C") for v in variables]
        grad_arrays = [None if g is None else np.ascontiguousarray(_to_numpy(g)) for g in grads]
        twin = type(self).from_config(self.get_config())
        twin._lr_kind, twin._lr = self._lr_kind, self._lr
        twin.exclude_from_weight_decay(var_list=[c for c, v in zip(copies, variables) if not self._decays(v)])
        twin.build(copies)
        if state is not None:
            twin.load_state_dict(state)
        twin.apply(grad_arrays, copies)
        return [_like(c, v) for c, v in zip(copies, variables)], twin.state_dict()

    def scale_loss(self, loss: Any) -> Any:
        """Multiplies a loss by ``loss_scale_factor`` (gradients are divided by it in apply)."""
        return loss * self.loss_scale_factor if self.loss_scale_factor is not None else loss

    def resync_masters(self) -> None:
        """Takes every 16-bit variable's current value as its exact value again: a float32 master
        becomes the variable widened, a remainder 0 (so variable and remainder join to that same
        widened value), as at build. With ``master_weights`` the update runs on the master, so a
        variable written from outside (model weights loaded, a best checkpoint restored) is
        overwritten by the next step (float32 masters) or joined with a stale low half
        (remainders) unless this is called first. Before build, or without masters, does nothing."""
        with self._lock:
            if not self.built or self.master_weights is None:
                return
            kind = "master" if self.master_weights == "float32" else "remainder"
            code = _SLOT_KINDS[kind]
            for i, v in enumerate(self._variables):
                if not self._engine.has_slot(code, i):
                    continue
                if kind == "master":
                    widened = v.detach().float().cpu().numpy() if _is_torch(v) else np.asarray(v).astype(np.float32)
                    self._engine.write_slot(code, i, np.ascontiguousarray(widened.reshape(-1)))
                else:
                    self._engine.write_slot(code, i, np.zeros(int(np.prod(_shape_of(v), dtype=np.int64)), np.uint16))

    def finalize_variable_values(self, var_list: Iterable) -> None:
        """With ``use_ema``, copies each moving average into the variable at the same position
        of ``var_list`` (which must hold every built variable). Without EMA, does nothing."""
        var_list = _as_list(var_list, "var_list")
        if not self.use_ema or not self.built:
            return
        if len(var_list) != len(self._variables):
            raise ValueError(f"The length of `var_list` ({len(var_list)}) does not match the number of "
                             f"moving averages ({len(self._variables)})")
        with self._lock:
            self._engine.finalize(var_list)
            if self._increment_version is not None:
                self._increment_version([v for v in var_list if _is_torch(v)])

    # ---- configuration and state ----------------------------------------------------------

    def get_config(self) -> dict:
        """The constructor arguments, with Keras's keys (a float rate is float32-rounded)."""
        if self._lr_kind == "schedule":
            lr = schedules.serialize(self._lr) if isinstance(self._lr, schedules.LearningRateSchedule) \
                else self._lr
        else:
            lr = self._lr
        return {
            "name": self.name,
            "learning_rate": lr,
            "weight_decay": self.weight_decay,
            "clipnorm": self.clipnorm,
            "global_clipnorm": self.global_clipnorm,
            "clipvalue": self.clipvalue,
            "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": self.ema_overwrite_frequency,
            "loss_scale_factor": self.loss_scale_factor,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            # fastsgd's own arguments, only when set: keras.optimizers.SGD refuses unknown keys.
            **({"slot_dtype": self.slot_dtype} if self.slot_dtype != "float32" else {}),
            **({"skip_nonfinite": True} if self.skip_nonfinite else {}),
            **({"master_weights": self.master_weights} if self.master_weights is not None else {}),
            **({"stochastic_rounding": True} if self.stochastic_rounding else {}),
            **({"seed": self.seed} if self.seed != 0 else {}),
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects: Optional[dict] = None) -> "SGD":
        """Creates an optimizer from ``get_config()`` output, fastsgd's or Keras's own."""
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(config["learning_rate"])
        return cls(**config)

    def state_dict(self) -> dict:
        """A checkpoint of the optimizer state as NumPy copies: ``iterations`` (the raw call
        counter), ``learning_rate`` (for float rates), every slot in build order shaped like
        its variable (``slots[kind][i]``; ``master`` and ``remainder`` lists hold None for
        variables that are not 16-bit), the variables' ``shapes`` and the slots' ``slot_dtypes``,
        which ``load_state_dict`` checks, with stochastic rounding the ``seed``, and with remainder
        slots their ``remainder_split`` ("nearest" or "stochastic"): a remainder is only the
        master's low half under the rule (and seed) that split it, so a state is refused by an
        optimizer whose rule differs. Resuming from it gives bit-identical results to never
        stopping. Before build, a state loaded earlier is returned as is."""
        with self._lock:
            if not self.built and self._pending_state is not None:
                return copy.deepcopy(self._pending_state)
            state: dict = {"iterations": int(self._engine.raw_iterations), "slots": {}}
            if self._lr_kind == "float":
                state["learning_rate"] = self._lr
            if self.stochastic_rounding:
                state["seed"] = int(self._engine.seed)
            if self.built:
                shapes = [_shape_of(v) for v in self._variables]
                state["shapes"] = [list(shape) for shape in shapes]
                bf16 = _bfloat16_dtype()
                dtypes = None
                for kind, code in _SLOT_KINDS.items():
                    if not self._engine.has_slot(code):
                        continue
                    arrays, kind_dtypes = [], []
                    for i, shape in enumerate(shapes):
                        if kind in _MASTER_KINDS and not self._engine.has_slot(code, i):
                            arrays.append(None)
                            continue
                        arr, dtype = self._read_slot(self._engine, code, i, bf16, kind)
                        arrays.append(arr.reshape(shape))
                        kind_dtypes.append(dtype)
                    state["slots"][kind] = arrays
                    if kind == "remainder":
                        state["remainder_split"] = remainder_split(self.stochastic_rounding)
                    if kind not in _MASTER_KINDS:
                        dtypes = kind_dtypes
                if dtypes is not None:
                    state["slot_dtypes"] = dtypes
            return state

    @staticmethod
    def _read_slot(engine: Any, code: int, i: int, bf16: Optional[np.dtype], kind: str = "") -> tuple:
        """(flat copy of a slot, its dtype name); bfloat16 slots come back as ml_dtypes
        bfloat16 when it is installed, else as their raw uint16 bits; remainders as uint16."""
        arr = np.asarray(engine.read_slot(code, i))
        if arr.dtype == np.uint16 and kind == "remainder":
            return arr, "uint16"
        if arr.dtype == np.uint16:
            return (arr.view(bf16) if bf16 is not None else arr), "bfloat16"
        return arr, arr.dtype.name

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()`` output, all or nothing: every value is checked (types,
        ranges, and each slot's shape and dtype against its variable's) before anything is
        written; a refused state raises TypeError/ValueError and changes nothing. Before build
        the state is checked, copied and applied when the variables are known (by ``build`` or
        the first ``apply``, which then refuse a state that does not fit)."""
        normalized = self._check_state(state)
        if "remainder_split" in normalized:
            refuse_split_mismatch(normalized["remainder_split"], self.stochastic_rounding, "state['remainder_split']")
        with self._lock:
            if not self.built:
                self._pending_state = normalized
                return
            learning_rate = self._write_state(self._engine, self._variables, normalized)
            if learning_rate is not None and self._lr_kind == "float":
                self._lr = learning_rate
            if "seed" in normalized:
                self.seed = normalized["seed"]

    @staticmethod
    def _check_state(state: Any) -> dict:
        """The checks that need no variables; returns a private, normalized copy."""
        if not isinstance(state, Mapping):
            raise TypeError(f"`state` must be a dict from state_dict(), got {type(state).__name__}")
        unknown = sorted(str(k) for k in state if k not in _STATE_KEYS)
        if unknown:
            raise ValueError(f"`state` has unknown keys {unknown} (known: {sorted(_STATE_KEYS)})")
        out: dict = {}
        iterations = state.get("iterations", 0)
        if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)):
            raise TypeError(f"state['iterations'] must be an int, got {iterations!r}")
        if not 0 <= int(iterations) < _MAX_ITERATIONS:
            raise ValueError(f"state['iterations'] must be in [0, 2**62), got {iterations!r}")
        out["iterations"] = int(iterations)
        if "learning_rate" in state:
            out["learning_rate"] = _float32_rate(state["learning_rate"], "state['learning_rate']")
        shapes = state.get("shapes")
        if shapes is not None:
            if not isinstance(shapes, (list, tuple)):
                raise TypeError("state['shapes'] must be a list of shapes")
            checked = []
            for i, shape in enumerate(shapes):
                if not isinstance(shape, (list, tuple)) or any(
                        isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
                    raise TypeError(f"state['shapes'][{i}] must be a list of non-negative ints, got {shape!r}")
                checked.append([int(d) for d in shape])
            out["shapes"] = checked
        if "remainder_split" in state:
            out["remainder_split"] = check_remainder_split(state["remainder_split"], "state['remainder_split']")
        dtypes = state.get("slot_dtypes")
        if dtypes is not None:
            if not isinstance(dtypes, (list, tuple)) or not all(isinstance(d, str) for d in dtypes):
                raise TypeError("state['slot_dtypes'] must be a list of dtype names")
            out["slot_dtypes"] = list(dtypes)
        slots = state.get("slots", {})
        if not isinstance(slots, Mapping):
            raise TypeError(f"state['slots'] must be a dict of slot lists, got {type(slots).__name__}")
        if "seed" in state:
            seed = state["seed"]
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
                raise ValueError(f"state['seed'] must be an int in [0, 2**64), got {seed!r}")
            out["seed"] = int(seed)
        out["slots"] = {}
        for kind, arrays in slots.items():
            if kind not in _SLOT_KINDS:
                raise ValueError(f"unknown slot kind {kind!r} in state (known: {sorted(_SLOT_KINDS)})")
            if not isinstance(arrays, (list, tuple)):
                raise TypeError(f"state['slots'][{kind!r}] must be a list of arrays, got {type(arrays).__name__}")
            copies = []
            for i, arr in enumerate(arrays):
                if arr is None and kind in _MASTER_KINDS:
                    copies.append(None)
                    continue
                if not (isinstance(arr, np.ndarray) or _is_torch(arr)):
                    raise TypeError(f"{kind} slot {i} must be a NumPy array, got {type(arr).__name__}")
                a = np.array(_to_numpy(arr), copy=True, order="C")
                if not (a.dtype.kind == "f" or a.dtype == np.uint16 or a.dtype.name == "bfloat16"):
                    raise TypeError(f"{kind} slot {i} has dtype {a.dtype}; slots are floating point (remainders uint16)")
                copies.append(a)
            out["slots"][kind] = copies
        return out

    @staticmethod
    def _write_state(engine: Any, variables: list, state: dict) -> Optional[float]:
        """Checks a normalized state against the built ``engine`` and its ``variables``, then
        writes slots and the counter; on a failure part-way the old contents are put back.
        Returns the state's float learning rate (or None), for the caller to adopt."""
        n = len(variables)
        slots = state["slots"]
        for kind, code in _SLOT_KINDS.items():
            has = engine.has_slot(code)
            if has and kind in _MASTER_KINDS and kind in slots and len(slots[kind]) == n:
                for i in range(n):
                    if engine.has_slot(code, i) != (slots[kind][i] is not None):
                        raise ValueError(f"state's {kind} slot {i} is {'missing' if slots[kind][i] is None else 'present'}"
                                         f", but variables[{i}] {'has' if engine.has_slot(code, i) else 'has no'} "
                                         f"{kind} slot (only 16-bit variables have one)")
            if has and kind not in slots:
                raise ValueError(f"state has no {kind} slots but this optimizer needs them")
            if not has and kind in slots and any(a is not None for a in slots[kind]):
                raise ValueError(f"this optimizer has no {kind} slots (check momentum / use_ema / "
                                 "gradient_accumulation_steps / master_weights)")
            if has and len(slots[kind]) != n:
                raise ValueError(f"state has {len(slots[kind])} {kind} slots, the optimizer {n}")
        shapes = [_shape_of(v) for v in variables]
        if "shapes" in state:
            saved = [tuple(s) for s in state["shapes"]]
            if len(saved) != n:
                raise ValueError(f"state was saved for {len(saved)} variables, the optimizer has {n}")
            for i, (a, b) in enumerate(zip(saved, shapes)):
                if a != b:
                    raise ValueError(f"state was saved for variables[{i}] of shape {a}, "
                                     f"but variables[{i}] has shape {b}")
        bf16 = _bfloat16_dtype()
        prepared, backup = [], []
        for kind, arrays in slots.items():
            code = _SLOT_KINDS[kind]
            if not engine.has_slot(code):
                continue
            for i, arr in enumerate(arrays):
                if kind in _MASTER_KINDS:
                    if arr is None:
                        continue
                    current, dtype = SGD._read_slot(engine, code, i, bf16, kind)
                    if arr.shape != shapes[i]:
                        raise ValueError(f"{kind} slot {i} has shape {arr.shape}, its variable {shapes[i]}")
                    if arr.dtype.name != _MASTER_KINDS[kind]:
                        raise ValueError(f"{kind} slot {i} has dtype {arr.dtype}; this slot is {_MASTER_KINDS[kind]}")
                    prepared.append((code, i, np.ascontiguousarray(arr.reshape(-1))))
                    backup.append((code, i, current))
                    continue
                current, dtype = SGD._read_slot(engine, code, i, bf16)
                if "slot_dtypes" in state and i < len(state["slot_dtypes"]) and state["slot_dtypes"][i] != dtype:
                    raise ValueError(f"{kind} slot {i} was saved as {state['slot_dtypes'][i]}, "
                                     f"this optimizer keeps it in {dtype}")
                if arr.shape != shapes[i]:
                    raise ValueError(f"{kind} slot {i} has shape {arr.shape}, its variable {shapes[i]}")
                if dtype == "bfloat16":
                    # Raw bits are taken only from a checkpoint that says they are bfloat16.
                    if arr.dtype.name == "bfloat16" or (
                            arr.dtype == np.uint16 and state.get("slot_dtypes", [None] * (i + 1))[i] == "bfloat16"):
                        flat = arr.reshape(-1).view(np.uint16)
                    else:
                        raise ValueError(f"{kind} slot {i} has dtype {arr.dtype}; this slot is bfloat16 "
                                         "(pass ml_dtypes.bfloat16 values)")
                elif arr.dtype != current.dtype:
                    raise ValueError(f"{kind} slot {i} has dtype {arr.dtype}; this slot is {dtype}")
                else:
                    flat = arr.reshape(-1)
                prepared.append((code, i, np.ascontiguousarray(flat)))
                backup.append((code, i, current.view(np.uint16) if dtype == "bfloat16" else current))
        old_iterations, old_seed = engine.raw_iterations, engine.seed
        try:
            for code, i, flat in prepared:
                engine.write_slot(code, i, flat)
            engine.raw_iterations = state["iterations"]
            if "seed" in state:
                engine.seed = state["seed"]
        except BaseException:
            for code, i, flat in backup:
                engine.write_slot(code, i, np.ascontiguousarray(flat))
            engine.raw_iterations = old_iterations
            engine.seed = old_seed
            raise
        return state.get("learning_rate")

    # ---- copying and pickling -------------------------------------------------------------

    def _snapshot(self, deep: bool, memo: Optional[dict] = None) -> dict:
        lr = copy.deepcopy(self._lr, memo) if deep else self._lr
        return {"lr": (self._lr_kind, lr), "state": self.state_dict(),
                "excluded_ids": set(self._excluded_ids), "excluded_names": self._excluded_names,
                "slot_dtype": self.slot_dtype}

    def _adopt(self, extra: dict) -> None:
        """Takes a snapshot's learning rate, exclusions and (pending) state."""
        self._lr_kind, self._lr = extra["lr"]
        self._excluded_ids = set(extra.get("excluded_ids", ()))
        self._excluded_names = extra.get("excluded_names")
        self.load_state_dict(extra["state"])

    def _twin(self, deep: bool, memo: Optional[dict] = None) -> "SGD":
        with self._lock:
            config = self.get_config()
            snapshot = self._snapshot(deep, memo)
        twin = type(self).from_config({**config, "slot_dtype": self.slot_dtype})
        twin._adopt(snapshot)
        return twin

    def __copy__(self) -> "SGD":
        """An independent optimizer with the same configuration, learning rate and state. It
        has its own engine and slots and is unbuilt: its first ``apply`` (or ``build``) takes
        the state, checked against the variables it is given."""
        return self._twin(deep=False)

    def __deepcopy__(self, memo: dict) -> "SGD":
        """As ``__copy__``, with the learning rate (schedule or callable) deep-copied too."""
        return self._twin(deep=True, memo=memo)

    def __reduce__(self) -> tuple:
        """Pickles the configuration (``get_config``) and the state (``state_dict``); the
        unpickled optimizer is unbuilt and takes the state on its first ``apply``. The variables
        are not pickled (they belong to the model)."""
        with self._lock:
            snapshot = self._snapshot(deep=False)
        snapshot["excluded_ids"] = set()  # ids mean nothing in another process
        return (_restore, (type(self), {**self.get_config(), "slot_dtype": self.slot_dtype}, snapshot))

    def __repr__(self) -> str:
        return (f"fastsgd.SGD(name={self.name!r}, learning_rate={self._lr!r}, momentum={self.momentum}, "
                f"nesterov={self.nesterov})")
