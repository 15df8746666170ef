"""fastsgd.keras.SGD: ``keras.optimizers.SGD`` for ``model.compile`` / ``model.fit``, stepped natively.

Keras 3 on the torch backend only. The optimizer *is* a ``keras.optimizers.SGD`` (same
arguments, validation, config, variables and names); only ``apply`` differs: instead of
Keras's Python walk over clipping, weight decay, the update, EMA and accumulation, every
trainable variable of the step goes to fastsgd's engine in one native call. The optimizer
state stays in Keras variables (``iterations``, ``learning_rate``, ``*_average``,
``*_gradient_accumulator``, ``*_momentum``) whose torch tensors the engine updates in place as
caller-owned slots, so ``model.save`` / ``keras.models.load_model``, callbacks, schedules and
``LossScaleOptimizer`` see exactly what they would see with Keras's own SGD.

Importing this module imports Keras; ``import fastsgd`` does not.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import keras
from keras.src.backend.common.stateless_scope import in_stateless_scope

from . import _core

__all__ = ["SGD"]


def _require_torch_backend() -> None:
    backend = keras.backend.backend()
    if backend != "torch":
        raise ValueError(
            "fastsgd.keras.SGD runs on Keras's torch backend only (set KERAS_BACKEND=torch before "
            f"importing keras); the current backend is {backend!r}. With other backends use "
            "keras.optimizers.SGD, or fastsgd.SGD on arrays.")


def _scalar(value: Any) -> float:
    """A Python float from a Keras variable, a 0-d tensor or a number."""
    value = getattr(value, "value", value)  # keras.Variable -> its torch tensor
    item = getattr(value, "item", None)
    return float(item()) if item is not None else float(value)


class _Native:
    """What the adapter keeps next to the Keras state: the engine and cached tensor lists.

    Kept in one plain object so that Keras's attribute tracking never sees the tensor lists.
    """

    def __init__(self, engine: Any, signature: tuple, variables: list, slots: dict, ids: list,
                 constrained: list, cuda_device: Optional[Any]) -> None:
        self.engine = engine
        self.signature = signature      # hyper-parameters the engine was made with
        self.variables = variables      # build order: torch tensors of the model variables
        self.slots = slots              # SlotKind -> torch tensors of the slot variables, build order
        self.ids = ids                  # id() of each built keras.Variable, build order
        self.constrained = constrained  # built keras.Variables that have a constraint
        self.cuda_device = cuda_device  # torch.device when the variables live on CUDA
        self.raw_iterations = 0         # what the engine's counter holds (mirrors `_iterations`)


@keras.saving.register_keras_serializable(package="fastsgd")
class SGD(keras.optimizers.SGD):
    r"""``keras.optimizers.SGD`` with the whole optimizer step done by fastsgd's native engine.

    For a variable ``w`` with gradient ``g``, learning rate ``lr`` and momentum ``m``:

    * ``momentum == 0``: ``w = w - lr * g``
    * ``momentum > 0``:  ``velocity = m * velocity - lr * g``; ``w = w + velocity``
    * ``nesterov=True``: ``velocity = m * velocity - lr * g``; ``w = w + m * velocity - lr * g``

    around which, in Keras's order: ``g /= loss_scale_factor``, the mean over
    ``gradient_accumulation_steps`` calls, clipping (``clipnorm`` / ``global_clipnorm`` /
    ``clipvalue``), decoupled weight decay ``w *= 1 - weight_decay * lr``, the update, then with
    ``use_ema`` ``avg = ema_momentum * avg + (1 - ema_momentum) * w`` (``avg = w`` on the first
    step) and every ``ema_overwrite_frequency`` steps ``w = avg``; finally ``iterations += 1``.

    The arguments, their validation, ``get_config()`` and the optimizer variables are Keras's
    own (this class subclasses ``keras.optimizers.SGD``); results match Keras's SGD within
    float32 rounding. Needs ``KERAS_BACKEND=torch`` (CPU or CUDA tensors).

    Example:
        >>> import os; os.environ["KERAS_BACKEND"] = "torch"
        >>> import keras, fastsgd.keras
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
        >>> model.compile(optimizer=fastsgd.keras.SGD(learning_rate=0.1, momentum=0.9), loss="mse")
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
        **kwargs: Any,
    ) -> None:
        _require_torch_backend()
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
            **kwargs,
        )
        # Construction refuses what the engine would refuse, with the engine's wording.
        _core.Engine(self._engine_options(self._signature()))
        self._native = None
        self._exclusions_version = 0

    # ---- engine configuration ---------------------------------------------------------------

    def _signature(self) -> tuple:
        """Every hyper-parameter the engine is built from, read from the Keras attributes (a
        change after build, e.g. LossScaleOptimizer clearing loss_scale_factor, rebuilds it)."""
        return (self.momentum, self.nesterov, self.weight_decay, self.clipnorm, self.clipvalue,
                self.global_clipnorm, self.use_ema, self.ema_momentum, self.ema_overwrite_frequency,
                self.loss_scale_factor, self.gradient_accumulation_steps,
                getattr(self, "_exclusions_version", 0))

    @staticmethod
    def _engine_options(signature: tuple) -> Any:
        (momentum, nesterov, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
         ema_overwrite_frequency, loss_scale_factor, accumulation, _) = signature

        # Keras's own values pass through: the engine reads None / 0 / negative clips as off,
        # None as no loss scale or accumulation, with Keras's rules and wording.
        options = _core.Options()
        options.convention = _core.Convention.keras
        options.group = _core.Group(momentum=float(momentum), nesterov=bool(nesterov),
                                    weight_decay=float(weight_decay or 0.0))
        options.clipnorm = clipnorm
        options.clipvalue = clipvalue
        options.global_clipnorm = global_clipnorm
        options.use_ema = bool(use_ema)
        if use_ema:
            options.ema_momentum = ema_momentum
            options.ema_overwrite_frequency = ema_overwrite_frequency
        options.loss_scale_factor = loss_scale_factor
        options.gradient_accumulation_steps = accumulation or None
        options.slots_in_variable_dtype = True  # Keras's slots take the variable's dtype
        options.caller_owned_slots = True       # the slots are the Keras variables below
        return options

    def _native_state(self) -> _Native:
        """The engine for the current hyper-parameters, built on the optimizer's variables."""
        signature = self._signature()
        native = self._native
        if native is not None and native.signature == signature:
            return native
        engine = _core.Engine(self._engine_options(signature))
        built = self._trainable_variables
        variables = [v.value for v in built]
        engine.build(variables, [bool(self._use_weight_decay(v)) for v in built])
        slots = {}
        if self.use_ema:
            slots[_core.SlotKind.average] = [v.value for v in self._model_variables_moving_average]
        if self.gradient_accumulation_steps:
            slots[_core.SlotKind.accumulator] = [v.value for v in self._accumulated_gradients]
        if self.momentum != 0:
            slots[_core.SlotKind.momentum] = [v.value for v in self.momentums]
        devices = {t.device for t in variables}
        cuda = next((d for d in devices if d.type == "cuda"), None)
        self._native = _Native(engine, signature, variables, slots, [id(v) for v in built],
                               [v for v in built if v.constraint is not None], cuda)
        return self._native

    # ---- Keras API --------------------------------------------------------------------------

    def build(self, variables: list) -> None:
        """Creates Keras SGD's optimizer variables (same names, order and count as
        ``keras.optimizers.SGD``); the engine is attached on the first ``apply``."""
        if self.built:
            return
        variables = list(variables)
        for v in variables:
            if self._overwrite_variable_with_gradient(v):
                raise ValueError(
                    f"fastsgd.keras.SGD does not support variables with overwrite_with_gradient=True "
                    f"(float8 training): {v.path}")
        super().build(variables)
        self._native = None

    def exclude_from_weight_decay(self, var_list: Optional[list] = None,
                                  var_names: Optional[list] = None) -> None:
        """Keras's ``exclude_from_weight_decay``: ``var_list`` by variable, ``var_names`` by a
        regular-expression search in ``variable.name``; each call replaces the previous one."""
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        self._exclusions_version = getattr(self, "_exclusions_version", 0) + 1

    def apply(self, grads: Any, trainable_variables: Optional[Any] = None) -> None:
        """One optimizer step, as ``keras.optimizers.SGD.apply`` does it, in one native call.

        ``grads[i]`` (a torch tensor or None) belongs to ``trainable_variables[i]`` (any subset
        or permutation of the variables the optimizer was built with; the built list when
        omitted). Everything is validated before anything is written: a refused step changes
        no variable, slot or ``iterations``.
        """
        if len(grads) == 0:
            return
        if in_stateless_scope():
            # stateless_apply: Keras's own (functional) walk; the engine writes in place.
            return super().apply(grads, trainable_variables)
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be built on "
                    "a list of variables. Call `optimizer.build(trainable_variables)` first. ")
            if len(grads) != len(self._trainable_variables_indices):
                raise ValueError(
                    "When passing `grads` as a list of gradient tensors, the gradients must match "
                    f"`optimizer.variables` one-to-on. Received a list of {len(grads)} gradients, but "
                    f"the optimizer is tracking {len(self._trainable_variables)} trainable variables.")
            native = self._native_state()
            full = list(grads)
            variables = None
        else:
            variables = trainable_variables if isinstance(trainable_variables, list) \
                else list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
                self.built = True
            native = self._native_state()
            if len(variables) == len(native.ids) and list(map(id, variables)) == native.ids:
                full = list(grads)
            else:
                self._check_variables_are_known(variables)
                full = [None] * len(native.ids)
                index = self._trainable_variables_indices
                for g, v in zip(grads, variables):
                    full[index[id(v)]] = g
        if full[0] is None and all(g is None for g in full):
            raise ValueError("No gradients provided for any variable.")

        engine = native.engine
        raw = int(self._iterations.value.item())
        if raw != native.raw_iterations:  # loaded, set_weights, or assigned by the user
            engine.raw_iterations = raw
            native.raw_iterations = raw
        lr = _scalar(self._get_current_learning_rate()) if engine.update_is_due else None
        stream = None
        if native.cuda_device is not None:
            import torch

            stream = torch.cuda.current_stream(native.cuda_device).cuda_stream
        try:
            updated, _, missing = engine.step(full, None, learning_rate=lr, slots=native.slots, stream=stream)
        except TypeError:
            # Not torch tensors (NumPy arrays, keras.Variables, lists): convert, then retry.
            converted = [None if g is None else keras.ops.convert_to_tensor(g) for g in full]
            updated, _, missing = engine.step(converted, None, learning_rate=lr, slots=native.slots,
                                              stream=stream)
        native.raw_iterations = raw + 1
        self._iterations.value.add_(1)
        if missing:
            built = self._trainable_variables
            names = [v.path for v, g in zip(built, full) if g is None]
            if variables is not None:  # only the variables of this call count, as in Keras
                passed = set(map(id, variables))
                names = [v.path for v, g in zip(built, full) if g is None and id(v) in passed]
            if names:
                warnings.warn(f"Gradients do not exist for variables {names} when minimizing the loss. "
                              "If using `model.compile()`, did you forget to provide a `loss` argument?",
                              stacklevel=2)
        if native.constrained and updated:
            passed = None if variables is None else set(map(id, variables))
            for v in native.constrained:
                if passed is None or id(v) in passed:
                    v.assign(v.constraint(v))
        _bump_versions(native.variables)

    def stateless_apply(self, optimizer_variables: list, grads: list, trainable_variables: list) -> tuple:
        """Keras's functional step (JAX-style trainers): runs Keras's own Python walk, since
        the engine only updates tensors in place."""
        return super().stateless_apply(optimizer_variables, grads, trainable_variables)


def _bump_versions(tensors: list) -> None:
    """Tells autograd the tensors changed (writes through raw pointers do not bump the
    version counter that guards tensors saved for backward)."""
    import torch

    torch.autograd.graph.increment_version(tensors)
