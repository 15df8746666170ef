"""fastsgd.SGD: Keras 3's SGD, with every update step done by the native engine in place."""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Iterable, Optional

import numpy as np

from . import _core, schedules

_SLOT_KINDS = {"momentum": _core.SlotKind.momentum, "average": _core.SlotKind.average,
               "accumulator": _core.SlotKind.accumulator}
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
    return float(value)


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
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - _LEGACY_KWARGS)
        if unknown:
            raise ValueError(f"Argument(s) not recognized: {unknown}")
        if "decay" in kwargs:
            warnings.warn("`decay` is deprecated and ignored by fastsgd.SGD (use a learning rate schedule)",
                          stacklevel=2)
        if "lr" in kwargs:
            warnings.warn("`lr` is deprecated, use `learning_rate`", DeprecationWarning, stacklevel=2)
            learning_rate = kwargs["lr"]
        self.jit_compile = bool(kwargs.get("jit_compile", True))

        # Types are checked here; ranges once, in the engine (Keras's wording), below.
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.integer, np.floating)):
            raise ValueError("`momentum` must be a float between [0, 1].")
        self.momentum = float(momentum)
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
        self.ema_momentum = float(ema_momentum) if isinstance(ema_momentum, (int, float, np.integer, np.floating)) \
            else ema_momentum
        self.ema_overwrite_frequency = int(ema_overwrite_frequency) if ema_overwrite_frequency else None
        if slot_dtype not in ("float32", "variable"):
            raise ValueError(f"`slot_dtype` must be 'float32' or 'variable', got {slot_dtype!r}")
        self.slot_dtype = slot_dtype
        self.skip_nonfinite = bool(skip_nonfinite)
        self.name = name if name is not None else _auto_name("sgd")

        self._set_learning_rate(learning_rate, initial=True)
        self._engine = _core.Engine(self._engine_options())
        self._variables: list = []
        self._excluded_ids: set = set()
        self._excluded_names: Optional[str] = None
        self._all_torch = False
        self._pending_state: Optional[dict] = None
        self._increment_version: Optional[Callable] = None

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
            self._lr_kind, self._lr = "float", float(np.float32(value))
        else:
            raise ValueError("Argument `learning_rate` should be float, or an instance of LearningRateSchedule, "
                             f"or a callable (that takes in the current iteration value and returns the "
                             f"corresponding learning rate value). Received instead: learning_rate={value!r}")

    def _current_learning_rate(self) -> float:
        if self._lr_kind == "float":
            return self._lr
        if self._lr_kind == "schedule":
            return float(self._lr(self._engine.raw_iterations))
        return float(self._lr())

    @property
    def learning_rate(self) -> float:
        """The rate the next update step would use (a schedule is read at the current step)."""
        return self._current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
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
        of these variables, matched by identity as Keras does.
        """
        if self.built:
            raise ValueError("The optimizer is already built")
        variables = list(variables)
        self._engine.build(variables, [self._decays(v) for v in variables])
        self._variables = variables
        torch_flags = [_is_torch(v) for v in variables]
        self._all_torch = bool(variables) and all(torch_flags)
        if any(torch_flags):
            import torch

            self._increment_version = torch.autograd.graph.increment_version
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

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
        self._excluded_ids = {id(v) for v in (var_list or [])}
        names = set(var_names or [])
        self._excluded_names = "|".join(sorted(names)) if names else None
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
        Every input is checked before anything is written: on error, variables, slots and
        ``iterations`` are unchanged.

        Inputs decided outside this process (a GradScaler, an all-reduce across ranks):
        ``grad_scale`` multiplies every gradient first (``g * grad_scale``, e.g. ``1 / scale``);
        ``found_inf=True`` skips the call as ``skip_nonfinite`` would (``False``: no local check);
        ``global_sum_squares`` is the squared global gradient norm over all ranks (the sum of
        every rank's ``grad_stats(...).total``), used by ``global_clipnorm`` instead of the
        local one.
        """
        if not isinstance(grads, (list, tuple)):
            grads = list(grads)
        if len(grads) == 0:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError("The first call to apply() must pass trainable_variables")
            variables = None
        else:
            variables = trainable_variables if isinstance(trainable_variables, (list, tuple)) \
                else list(trainable_variables)
            if not self.built:
                self.build(variables)
        engine = self._engine
        lr = self._current_learning_rate() if engine.update_is_due else 0.0
        _, _, missing = engine.step(grads, variables, learning_rate=lr,
                                    stream=None if stream is None else int(stream), grad_scale=float(grad_scale),
                                    found_inf=None if found_inf is None else bool(found_inf),
                                    global_sum_squares=None if global_sum_squares is None
                                    else float(global_sum_squares))
        if missing:
            warnings.warn(f"Gradients do not exist for {missing} variable(s) when applying this step; "
                          "those variables are left out of the update", stacklevel=2)
        if self._increment_version is not None:
            # Raw-pointer writes are invisible to autograd's version counter unless bumped.
            if variables is None or self._all_torch:
                self._increment_version(self._variables if variables is None else variables)
            else:
                self._increment_version([v for v in variables if _is_torch(v)])

    def grad_stats(self, grads: Iterable, trainable_variables: Optional[Iterable] = None, *,
                   grad_scale: float = 1.0) -> "_core.GradStats":
        """What the next ``apply`` would measure, without changing anything: per variable and in
        total, the sum of squares of the effective gradient (unscaled, and merged with the
        accumulator at the end of a window), and whether any element is Inf or NaN.

        The sums are deterministic (fixed blocks, fixed order). For a model sharded over ranks,
        all-reduce ``total`` and ``nonfinite`` and pass them to ``apply(global_sum_squares=...,
        found_inf=...)``: ``global_clipnorm`` and the skip then act on the whole model.
        """
        grads = list(grads)
        variables = None if trainable_variables is None else list(trainable_variables)
        if not self.built:
            if variables is None:
                raise ValueError("The first call to grad_stats() must pass trainable_variables")
            self.build(variables)
        return self._engine.grad_stats(grads, variables, grad_scale=float(grad_scale))

    def apply_gradients(self, grads_and_vars: Iterable) -> int:
        """Keras's ``apply_gradients(zip(grads, vars))``. Like Keras, returns the raw call
        counter (``_iterations``: every call, accumulation calls included)."""
        pairs = list(grads_and_vars)
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

    def finalize_variable_values(self, var_list: Iterable) -> None:
        """With ``use_ema``, copies each moving average into the variable at the same position
        of ``var_list`` (which must hold every built variable). Without EMA, does nothing."""
        if not self.use_ema or not self.built:
            return
        var_list = list(var_list)
        if len(var_list) != len(self._variables):
            raise ValueError(f"The length of `var_list` ({len(var_list)}) does not match the number of "
                             f"moving averages ({len(self._variables)})")
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
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects: Optional[dict] = None) -> "SGD":
        """Creates an optimizer from ``get_config()`` output, fastsgd's or Keras's own."""
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(config["learning_rate"])
        return cls(**config)

    def state_dict(self) -> dict:
        """A checkpoint of the optimizer state as NumPy copies: iteration counter, learning rate
        (for float rates) and every slot, in build order. Resuming from it gives bit-identical
        results to never stopping."""
        state: dict = {"iterations": int(self._engine.raw_iterations), "slots": {}}
        if self._lr_kind == "float":
            state["learning_rate"] = self._lr
        if self.built:
            for kind, code in _SLOT_KINDS.items():
                if self._engine.has_slot(code):
                    state["slots"][kind] = [self._engine.read_slot(code, i) for i in range(len(self._variables))]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()`` output. Before build the state is kept and applied when the
        variables are known. Slots must match the built variables in count and size."""
        if not self.built:
            self._pending_state = state
            return
        slots = state.get("slots", {})
        for kind, arrays in slots.items():
            if kind not in _SLOT_KINDS:
                raise ValueError(f"unknown slot kind {kind!r} in state (known: {sorted(_SLOT_KINDS)})")
            if not self._engine.has_slot(_SLOT_KINDS[kind]):
                raise ValueError(f"this optimizer has no {kind} slots (check momentum / use_ema / "
                                 "gradient_accumulation_steps)")
            if len(arrays) != len(self._variables):
                raise ValueError(f"state has {len(arrays)} {kind} slots, the optimizer {len(self._variables)}")
        for kind, code in _SLOT_KINDS.items():
            if self._engine.has_slot(code) and kind not in slots:
                raise ValueError(f"state has no {kind} slots but this optimizer needs them")
        prepared = []
        for kind, arrays in slots.items():
            for i, arr in enumerate(arrays):
                numel, dtype = self._engine.slot_spec(i)
                flat = np.ascontiguousarray(np.asarray(arr)).reshape(-1)
                if dtype == "bfloat16":
                    if flat.dtype.itemsize != 2:
                        raise ValueError(f"{kind} slot {i}: expected bfloat16 values")
                    flat = flat.view(np.uint16)
                else:
                    flat = flat.astype(dtype, copy=False)
                if flat.size != numel:
                    raise ValueError(f"{kind} slot {i} has {flat.size} values, expected {numel}")
                prepared.append((_SLOT_KINDS[kind], i, flat))
        iterations = int(state.get("iterations", 0))
        if iterations < 0:
            raise ValueError("state iterations must be >= 0")
        for code, i, flat in prepared:
            self._engine.write_slot(code, i, flat)
        self._engine.raw_iterations = iterations
        if "learning_rate" in state and self._lr_kind == "float":
            self._lr = float(np.float32(state["learning_rate"]))

    def __repr__(self) -> str:
        return (f"fastsgd.SGD(name={self.name!r}, learning_rate={self._lr!r}, momentum={self.momentum}, "
                f"nesterov={self.nesterov})")
