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
import numpy as np
from keras.src.backend.common.stateless_scope import in_stateless_scope

from . import _core
from ._lowp import check_lowp_options, refuse_float16_remainder

__all__ = ["SGD"]

_LOWP = ("float16", "bfloat16")


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
                 constrained: list, cuda_device: Optional[Any], lowp: list) -> None:
        self.engine = engine
        self.signature = signature      # hyper-parameters the engine was made with
        self.variables = variables      # build order: torch tensors of the model variables
        self.slots = slots              # SlotKind -> torch tensors of the slot variables, build order
        self.ids = ids                  # id() of each built keras.Variable, build order
        self.constrained = constrained  # built keras.Variables that have a constraint
        self.cuda_device = cuda_device  # torch.device when the variables live on CUDA
        self.lowp = lowp                # torch tensors of the variables with a master, master order
        self.raw_iterations = 0         # what the engine's counter holds (mirrors `_iterations`)


class _MasterSync:
    """When the masters last matched the variables, by torch's version counters (a plain object,
    so that Keras's attribute tracking does not walk the tuple at every step)."""

    def __init__(self) -> None:
        self.versions: tuple = ()  # the variables' ``_version``s then, master order
        self.trust = False         # a state load wrote the masters: take the weights as they are
        self.split = None          # the split record's value, (stochastic, seed bits)


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

    Low-precision extras (what Keras lacks; off by default, then nothing above changes), for
    float16/bfloat16 variables (e.g. under ``keras.config.set_dtype_policy("bfloat16")``;
    float32 variables are unaffected):

    * ``master_weights="float32"``: one more optimizer variable per 16-bit variable,
      ``<variable path>_master`` (float32, the variable widened at ``build()``); each step runs
      the rule above on it in float32 and stores ``w = round(master)`` in the same pass.
    * ``master_weights="remainder"`` (bfloat16 variables only; float16 ones are refused at
      ``build()``): ``<variable path>_remainder`` holds the float32 master's low 16 bits, so
      that ``w`` and the remainder together are the master exactly: ``bits(master) =
      (bits(w) - up) << 16 | low``, ``up = 1`` when ``w`` was rounded up in magnitude (to
      nearest: ``low >= 0x8000``). Keras has no 16-bit unsigned variables on the torch
      backend (``uint16`` is stored as int32), so the remainder is an ``int16`` variable
      holding the same 16 bits: read it with ``.value.view(torch.uint16)``.
    * With either master, the momentums and accumulators of 16-bit variables are float32
      (Keras's SGD keeps them in the variable's dtype); names, order and count are unchanged,
      and the masters come after them in ``optimizer.variables`` (with remainders, then one
      ``remainder_split`` int64 variable: how they were split, see below), so ``model.save`` /
      ``keras.models.load_model`` restore them.
    * The weights win over the masters: at the first ``apply`` (``iterations == 0``) every
      master is taken from its variable again, and at every later ``apply`` the masters of
      the variables written from outside since the previous step (``assign``,
      ``model.set_weights``, ``model.load_weights`` of a file without this optimizer's state,
      ``EarlyStopping(restore_best_weights=True)``; seen by torch's version counter), so the
      next step starts from what was written. **Writes torch cannot see** (through memory
      shared with NumPy or DLPack) **need** ``optimizer.resync_masters()``, as do writes made
      between a load of the optimizer state and the next step: a state load marks the
      weights loaded with it as matching the loaded masters.
    * Loading optimizer state (``model.load_weights``, ``load_own_variables``) is checked:
      same variable count, and at each position the same shape and dtype (a remainder never
      lands in a float32 master, nor the reverse), and remainders split as this optimizer
      splits them. A mismatch is a ValueError and loads nothing into the optimizer (see
      ``load_own_variables``; Keras would warn and skip a count mismatch).
    * ``stochastic_rounding=True``: each updated 16-bit variable is stored rounded up or down
      with probability proportional to its distance (unbiased), with random bits keyed by
      (``seed``, ``iterations``, variable index, element): identical after a save/load resume.
      ``seed`` (an int in [0, 2**64)) is part of ``get_config()``. With remainders, the split
      rounds the same way (keyed by ``seed`` and the variable's index), and a remainder joins
      back into its master only with the split that made it: ``remainder_split`` records
      (``stochastic_rounding``, ``seed``); a state split otherwise is refused on load, and so
      is a step after either attribute changed once remainders were split.

    Neither combines with ``use_ema``; both need the in-place step (``stateless_apply`` is
    refused with them). CUDA variables run them with the CPU's bits (checked by a host
    replay; not yet run on a GPU). A constraint's writes reach the masters: the elements it
    changes take the constrained value as their exact value.

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
        master_weights: Optional[str] = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        _require_torch_backend()
        # fastsgd.SGD's checks and wording, before Keras's constructor runs.
        master_weights, stochastic_rounding, seed = check_lowp_options(master_weights, stochastic_rounding, seed)
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
        self.master_weights = master_weights
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self._masters: list = []
        self._split = None  # the remainder-split record variable (only when there are remainders)
        self._sync = _MasterSync()
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
                getattr(self, "_exclusions_version", 0), self.master_weights, self.stochastic_rounding, self.seed)

    @staticmethod
    def _engine_options(signature: tuple) -> Any:
        (momentum, nesterov, weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
         ema_overwrite_frequency, loss_scale_factor, accumulation, _, master_weights, stochastic_rounding,
         seed) = signature

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
        if master_weights is not None:
            options.master_weights = getattr(_core.MasterForm, master_weights)
            options.slots_in_variable_dtype = False  # a float32 master comes with float32 slots
        options.stochastic_rounding = bool(stochastic_rounding)
        options.seed = seed
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
        if self.master_weights is not None:
            masters = iter(self._masters)
            wanted = [next(masters).value if v.dtype in _LOWP else None for v in built]
            if self.master_weights == "remainder":
                import torch  # the engine takes remainders as raw 16-bit (bfloat16-typed) words

                slots[_core.SlotKind.remainder] = [None if t is None else t.view(torch.bfloat16) for t in wanted]
            else:
                slots[_core.SlotKind.master] = wanted
        devices = {t.device for t in variables}
        cuda = next((d for d in devices if d.type == "cuda"), None)
        lowp = [t for v, t in zip(built, variables) if v.dtype in _LOWP] if self.master_weights else []
        self._native = _Native(engine, signature, variables, slots, [id(v) for v in built],
                               [v for v in built if v.constraint is not None], cuda, lowp)
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
        if self.master_weights == "remainder":
            for v in variables:
                if v.dtype == "float16":
                    refuse_float16_remainder(v.path)
        super().build(variables)
        if self.master_weights is not None:
            masters = []
            for v in variables:
                if v.dtype not in _LOWP:
                    continue
                if self.master_weights == "float32":
                    init = _widened(v)
                    dtype = "float32"
                else:
                    init, dtype = "zeros", "int16"
                masters.append(self.add_variable(shape=v.shape, initializer=init, dtype=dtype,
                                                 name=f"{v.path.replace('/', '_')}_{_MASTER_NAME[self.master_weights]}"))
            self._masters = masters
            if masters and self.master_weights == "remainder":
                # Saved with the remainders: they join back into the master only with the
                # rounding (and seed) that split them, and Keras restores state by position.
                split = self._split_mode()
                self._split = self.add_variable(shape=(2,), initializer=_constant(split), dtype="int64",
                                                name="remainder_split")
                self._sync.split = split
            self._sync.versions = tuple(v.value._version for v in variables if v.dtype in _LOWP)
            self._sync.trust = False  # the masters were just taken from the weights
        self._native = None

    def _split_mode(self) -> tuple:
        """(1, seed as int64 bits) for stochastic remainder splits, (0, 0) for splits to nearest
        (which no seed changes)."""
        if not self.stochastic_rounding:
            return (0, 0)
        return (1, self.seed - (1 << 64) if self.seed >= 1 << 63 else self.seed)

    def load_own_variables(self, store: Any) -> None:
        """Keras's loading of the optimizer state (``model.load_weights``, ``load_model``), checked.

        Keras assigns optimizer variables by position ("0", "1", ...). Here every stored
        variable must have this optimizer's shape and dtype at its position (so a remainder
        never lands in a float32 master or the reverse), stored remainders must have been split
        as this optimizer splits them (``stochastic_rounding``, and ``seed`` with it), and a
        built optimizer refuses a state with another variable count (another ``momentum``,
        ``master_weights``, accumulation, ...) where Keras would warn and skip it: ValueError,
        nothing assigned. (Inside ``model.load_weights`` Keras reports it as its own
        ValueError, or as a warning with ``skip_mismatch=True``; the layers' weights it loaded
        first stay loaded, and the masters then follow them.) Kept from Keras, with its warning
        and nothing loaded: a state without per-variable entries (a file saved before the
        optimizer was built, or without one) and loading into an optimizer not yet built.
        """
        ours = list(self.variables)
        keys = list(store.keys())
        base = 2 if isinstance(getattr(self, "_learning_rate", None), keras.Variable) else 1
        if len(keys) != len(ours) and (not self.built or len(keys) <= base):
            return super().load_own_variables(store)
        if sorted(keys) != sorted(str(i) for i in range(len(keys))):
            raise ValueError(f"fastsgd.keras.SGD {self.name!r}: an optimizer state is keyed '0', '1', ... by "
                             f"position (Keras's layout); got keys {sorted(keys)[:8]}. Nothing was loaded.")
        kinds = self._variable_kinds()
        differs = ""
        split = None
        for i, variable in enumerate(ours[:len(keys)]):
            value = store[str(i)]
            shape = tuple(getattr(value, "shape", ()))
            dtype = keras.backend.standardize_dtype(getattr(value, "dtype", type(value)))
            if shape != tuple(variable.shape) or dtype != variable.dtype:
                hint = ""
                if self.master_weights is not None or dtype == "int16":
                    hint = ("; an int16 variable is a remainder of master_weights='remainder', a float32 one "
                            "may be a master of master_weights='float32'")
                differs = (f"variable {i}, {variable.path} ({kinds.get(id(variable), 'a variable')}), is "
                           f"{variable.dtype} {tuple(variable.shape)} here but {dtype} {shape} in the store{hint}")
                break
            if variable is self._split:
                split = tuple(int(x) for x in np.asarray(value).reshape(-1))
        if differs or len(keys) != len(ours):
            count = f"the store holds {len(keys)} variables, this optimizer {len(ours)}"
            what = f"{count}; {differs}" if differs and len(keys) != len(ours) else (differs or count)
            raise ValueError(
                f"fastsgd.keras.SGD {self.name!r} cannot load this optimizer state: {what}. Create the "
                "optimizer with the arguments it was saved with (`momentum`, `master_weights`, ...; "
                "keras.models.load_model restores them). Nothing was loaded.")
        if split is not None and split != self._sync.split:
            raise ValueError(
                f"fastsgd.keras.SGD {self.name!r} cannot load these remainders: they were split with "
                f"{_describe_split(split)}, this optimizer splits with {_describe_split(self._sync.split)}, and a "
                "remainder joins back into its float32 master only with the rounding that split it. Create "
                f"the optimizer with {_describe_split(split)} (keras.models.load_model restores them). "
                "Nothing was loaded.")
        for i, variable in enumerate(ours):
            variable.assign(store[str(i)])
        # The weights loaded with this state (before or after it, in Keras's walk) match it.
        self._sync.trust = True

    def _variable_kinds(self) -> dict:
        kinds = {id(self._iterations): "the iteration counter"}
        if isinstance(getattr(self, "_learning_rate", None), keras.Variable):
            kinds[id(self._learning_rate)] = "the learning rate"
        for name, what in (("momentums", "a momentum"), ("_accumulated_gradients", "a gradient accumulator"),
                           ("_model_variables_moving_average", "an EMA average")):
            for v in getattr(self, name, None) or []:
                kinds[id(v)] = what
        for v in self._masters:
            kinds[id(v)] = "a float32 master" if self.master_weights == "float32" else "an int16 remainder"
        if self._split is not None:
            kinds[id(self._split)] = "the remainder-split record"
        return kinds

    def resync_masters(self) -> None:
        """Takes every master from its variable as it is now (widened; a zero remainder).

        ``apply`` does this by itself for each variable written in place since the last step
        (``assign``, ``set_weights``, ``load_weights``, ``EarlyStopping(restore_best_weights=True)``),
        by torch's version counter. Call it after writing variables some other way (through
        memory shared with NumPy or DLPack, say), or after a state load that was followed by
        other writes before the next step. No-op without masters or before ``build()``.
        """
        if not self._masters:
            return
        self._reread_masters(range(len(self._masters)))
        self._sync.versions = tuple(t._version for t in self._lowp_variables())
        self._sync.trust = False

    def add_variable_from_reference(self, reference_variable: Any, name: Optional[str] = None,
                                    initializer: Any = "zeros") -> Any:
        """Keras's, except that under ``master_weights`` the slots of 16-bit variables are
        float32 (the engine computes on the float32 master and keeps its slots in float32)."""
        if self.master_weights is not None and getattr(reference_variable, "dtype", None) in _LOWP:
            name = f"{reference_variable.path.replace('/', '_')}_{name or 'var'}"
            return self.add_variable(shape=reference_variable.shape, initializer=initializer, dtype="float32",
                                     name=name, layout=getattr(reference_variable, "_layout", None))
        return super().add_variable_from_reference(reference_variable, name=name, initializer=initializer)

    def get_config(self) -> dict:
        """Keras SGD's config, plus the low-precision extras when they are not the defaults."""
        config = super().get_config()
        if self.master_weights is not None:
            config["master_weights"] = self.master_weights
        if self.stochastic_rounding:
            config["stochastic_rounding"] = True
        if self.seed != 0:
            config["seed"] = self.seed
        return config

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
            self._refuse_stateless()
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
        # Last before the step, so that nothing that can still raise follows a master re-read.
        saved = self._sync_masters(native, raw) if self._masters else None
        try:
            try:
                updated, _, missing = engine.step(full, None, learning_rate=lr, slots=native.slots, stream=stream)
            except TypeError:
                # Not torch tensors (NumPy arrays, keras.Variables, lists): convert, then retry.
                converted = [None if g is None else keras.ops.convert_to_tensor(g) for g in full]
                updated, _, missing = engine.step(converted, None, learning_rate=lr, slots=native.slots,
                                                  stream=stream)
        except BaseException:
            if saved:  # a refused step leaves the masters as they were
                for i, value in saved:
                    self._masters[i].value.copy_(value)
            raise
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
            with_master = {t.data_ptr(): i for i, t in enumerate(native.lowp)} if self._masters else {}
            for v in native.constrained:
                if passed is None or id(v) in passed:
                    i = with_master.get(v.value.data_ptr())
                    before = None if i is None else v.value.clone()
                    v.assign(v.constraint(v))
                    if i is not None:
                        self._constrain_master(i, before, native.lowp)
        _bump_versions(native.variables)
        if native.lowp:
            self._sync.versions = tuple(t._version for t in native.lowp)
            self._sync.trust = False
            if self._split is not None and self._sync.split != self._split_mode():  # first step, new mode
                self._sync.split = self._split_mode()
                self._split.assign(np.asarray(self._sync.split, np.int64))

    def _sync_masters(self, native: _Native, raw: int) -> list:
        """Before an update: re-reads the masters of the variables written from outside since
        the masters last matched them (all of them before the first update), and returns their
        previous values, [(master index, tensor)], for a refused step to put back. Refuses a
        split mode changed after remainders were split with another."""
        split = self._split_mode() if self._split is not None else None
        if split is not None and split != self._sync.split:
            if raw != 0:
                raise ValueError(
                    f"fastsgd.keras.SGD {self.name!r}: the remainders were split with "
                    f"{_describe_split(self._sync.split)} and cannot be joined with {_describe_split(split)}; "
                    "set `stochastic_rounding` and `seed` back (they may change before the first step only)")
        versions = tuple(t._version for t in native.lowp)
        if raw == 0:
            stale = range(len(self._masters))
        elif self._sync.trust:
            stale = ()
        else:
            stale = [i for i, (now, then) in enumerate(zip(versions, self._sync.versions)) if now != then]
        if not stale:
            return []
        saved = [(i, self._masters[i].value.clone()) for i in stale]
        self._reread_masters(stale, native.lowp)
        return saved

    def _lowp_variables(self) -> list:
        return [v.value for v in self._trainable_variables if v.dtype in _LOWP]

    def _reread_masters(self, indices: Any, lowp: Optional[list] = None) -> None:
        """Masters ``indices`` become their variables as they are now: widened, or a zero
        remainder (which joins back into the variable exactly, with either split)."""
        lowp = self._lowp_variables() if lowp is None else lowp
        for i in indices:
            master = self._masters[i].value
            if self.master_weights == "float32":
                master.copy_(lowp[i])
            else:
                master.zero_()

    def _constrain_master(self, i: int, before: Any, lowp: list) -> None:
        """After a constraint wrote variable ``i``: the elements it changed take their new value
        as their exact value (widened master, zero remainder), as a float32 run would hold the
        constrained value; the others keep their master's extra bits."""
        import torch

        after = lowp[i]
        changed = before.view(torch.int16) != after.view(torch.int16)  # bit by bit, NaN included
        master = self._masters[i].value
        if self.master_weights == "float32":
            master[changed] = after[changed].float()
        else:
            master[changed] = 0

    def _refuse_stateless(self) -> None:
        if self.master_weights is not None or self.stochastic_rounding:
            raise ValueError("fastsgd.keras.SGD with `master_weights` or `stochastic_rounding` updates variables "
                             "in place only; stateless_apply (Keras's functional step) would bypass the master "
                             "and the rounding")

    def stateless_apply(self, optimizer_variables: list, grads: list, trainable_variables: list) -> tuple:
        """Keras's functional step (JAX-style trainers): runs Keras's own Python walk, since
        the engine only updates tensors in place (refused with the low-precision extras)."""
        self._refuse_stateless()
        return super().stateless_apply(optimizer_variables, grads, trainable_variables)


_MASTER_NAME = {"float32": "master", "remainder": "remainder"}


def _constant(values: tuple) -> Any:
    def init(shape: Any, dtype: Any = None) -> Any:
        return keras.ops.convert_to_tensor(list(values), dtype=dtype)
    return init


def _describe_split(split: tuple) -> str:
    if not split[0]:
        return "stochastic_rounding=False"
    return f"stochastic_rounding=True, seed={split[1] % (1 << 64)}"


def _widened(variable: Any) -> Any:
    """An initializer giving ``variable``'s current value in float32 (a master's start)."""
    def init(shape: Any, dtype: Any = None) -> Any:
        return keras.ops.cast(variable.value, "float32")
    return init


def _bump_versions(tensors: list) -> None:
    """Tells autograd the tensors changed (writes through raw pointers do not bump the
    version counter that guards tensors saved for backward)."""
    import torch

    torch.autograd.graph.increment_version(tensors)
