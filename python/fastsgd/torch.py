"""fastsgd.torch.SGD: a drop-in ``torch.optim.SGD`` whose every step is one native call.

    import fastsgd.torch
    opt = fastsgd.torch.SGD(model.parameters(), lr=0.1, momentum=0.9)   # was torch.optim.SGD
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

The class is a real ``torch.optim.Optimizer``: ``param_groups``, ``add_param_group``, hooks,
``state_dict()`` in torch's own format (``state[i]["momentum_buffer"]`` are torch tensors, and
they *are* the buffers the engine updates), every ``torch.optim.lr_scheduler``,
``torch.amp.GradScaler`` (fused-optimizer protocol), DDP, ``ZeroRedundancyOptimizer`` and FSDP2
(DTensor parameters: the local shards are updated in place; global norms take one all-reduce).

bfloat16/float16 parameters can keep a float32 master (``state[p]["master"]``) or the master's
low half (``state[p]["remainder"]``, torch.uint16) and be stored with stochastic rounding; see
``SGD``'s ``master_weights``, ``stochastic_rounding`` and ``seed``.

The per-element rule is torch's ``_single_tensor_sgd`` with its roundings, computed by the C++
engine (cpp/include/fastsgd/math.h, ``Convention.torch``); this module only maps torch's objects
onto the engine's caller-owned slots. It is imported only when used (``fastsgd`` never imports
torch).
"""

from __future__ import annotations

import functools
import numbers
import sys
from collections import defaultdict
from itertools import chain, repeat
from operator import attrgetter
from typing import Any, Callable, Optional

import torch
from torch.optim.optimizer import Optimizer, _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import _core
from ._lowp import (check_lowp_options, check_remainder_split, refuse_float16_remainder, refuse_split_mismatch,
                    remainder_split)

__all__ = ["SGD"]

_grad_of = attrgetter("grad")
_MOMENTUM_KEY = {"torch": "momentum_buffer", "keras": "velocity"}
_EMA_KEY = "ema"
_ACC_KEY = "accumulator"
_MASTER_KEY = "master"        # float32 copy of a 16-bit parameter (master_weights="float32")
_REMAINDER_KEY = "remainder"  # uint16 low half of that float32 master (master_weights="remainder")
_MASTER_FORMS = {"float32": ("master", _MASTER_KEY), "remainder": ("remainder", _REMAINDER_KEY)}
_LOWP = (torch.float16, torch.bfloat16)
_COUNTERS_KEY = "fastsgd"   # extra top-level state_dict entry, only when counters matter
_COUNTER_KEYS = ("raw_iterations", "skipped_steps", "seed", "remainder_split")
_MAX_ITERATIONS = 2**62     # the array API's bound (optimizer.py): headroom, never a wrap
_NO_STATE: dict = {}        # stands for a parameter without state (never written)


def _dtensor_type():
    """DTensor's class if torch.distributed.tensor is loaded (a DTensor parameter implies it is);
    importing it here would cost seconds on the first step of every single-process run."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


class _Counter:
    """A shared mutation counter (a plain int would be copied, not shared)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def _bumping(base: type, name: str) -> Callable:
    method = getattr(base, name)

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        self._counter.n += 1
        return method(self, *args, **kwargs)

    return wrapper


class _SlotDict(dict):
    """One parameter's state dict: any change (a buffer added, replaced, removed) bumps the
    optimizer's counter, so ``step`` may reuse its lists of buffers until something changes."""

    __slots__ = ("_counter",)

    def __init__(self, counter: _Counter, *args: Any) -> None:
        super().__init__(*args)
        self._counter = counter

    for _name in ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update", "setdefault"):
        locals()[_name] = _bumping(dict, _name)
    del _name

    def __reduce__(self):  # pickles (and deep-copies) as a plain dict
        return (dict, (dict(self),))


class _State(defaultdict):
    """``Optimizer.state`` that counts every structural change, its per-parameter dicts' included:
    parameters' dicts are stored as ``_SlotDict``s sharing the counter (a plain dict assigned
    from outside, as ``ZeroRedundancyOptimizer`` does, is wrapped on the way in)."""

    def __init__(self, *args: Any) -> None:
        self._counter = _Counter()
        super().__init__(self._new_dict)
        if args:
            self.update(*args)

    def _new_dict(self) -> _SlotDict:
        return _SlotDict(self._counter)

    @property
    def version(self) -> int:
        return self._counter.n

    def __setitem__(self, key: Any, value: Any) -> None:
        self._counter.n += 1
        if type(value) is dict:
            value = _SlotDict(self._counter, value)
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    for _name in ("__delitem__", "pop", "popitem", "clear"):
        locals()[_name] = _bumping(defaultdict, _name)
    del _name

    def __reduce__(self):  # pickles (and deep-copies) as torch's own defaultdict(dict)
        return (_plain_state, (dict(self),))


def _plain_state(items: dict) -> defaultdict:
    return defaultdict(dict, {k: dict(v) if isinstance(v, dict) else v for k, v in items.items()})


def _float_arg(name: str, value: Any, allow_none: bool = True) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value)
        raise TypeError(f"`{name}` must be a float{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def _checked_counters(block: Any) -> dict:
    """``state_dict["fastsgd"]`` checked whole (types, ranges, known keys) before a load writes
    anything; returns it normalised."""
    where = f"state_dict[{_COUNTERS_KEY!r}]"
    if not isinstance(block, dict):
        raise TypeError(f"{where} must be a dict from state_dict(), got {type(block).__name__}")
    unknown = sorted(str(k) for k in block if k not in _COUNTER_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown} (known: {list(_COUNTER_KEYS)})")
    out = {}
    for key, bound, text in (("raw_iterations", _MAX_ITERATIONS, "2**62"), ("skipped_steps", _MAX_ITERATIONS, "2**62"),
                             ("seed", 2**64, "2**64")):
        if key not in block:
            if key == "seed":
                continue
            raise ValueError(f"{where} has no {key!r} (a checkpoint's counters come as a whole)")
        v = block[key]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{where}[{key!r}] must be an int in [0, {text}), got {v!r}")
        if not 0 <= int(v) < bound:
            raise ValueError(f"{where}[{key!r}] must be an int in [0, {text}), got {v!r}")
        out[key] = int(v)
    if "remainder_split" in block:
        out["remainder_split"] = check_remainder_split(block["remainder_split"], f"{where}['remainder_split']")
    return out


def _set_lowp_options(options: Any, master_weights: Any, stochastic_rounding: Any, seed: Any) -> None:
    """Checks the low-precision extras (fastsgd.SGD's wording) and writes them into ``options``.
    A float32 master makes every other slot of a 16-bit parameter float32 (the engine's rule)."""
    master_weights, stochastic_rounding, seed = check_lowp_options(master_weights, stochastic_rounding, seed)
    if master_weights is not None:
        options.master_weights = getattr(_core.MasterForm, master_weights)
        options.slots_in_variable_dtype = False
    options.stochastic_rounding = stochastic_rounding
    options.seed = seed


def _check_master(t: Any, p: Any, key: str, where: str, same_device: bool) -> None:
    """A master (float32) or remainder (torch.uint16) entry for parameter ``p``: TypeError for a
    wrong type, dtype or device, ValueError for a wrong shape, naming ``where``. Loads skip the
    device check: they move entries to the parameter's device, as torch moves buffers."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != (torch.float32 if key == _MASTER_KEY else torch.uint16):
        raise TypeError(f"{where} has dtype {t.dtype}; " + (
            "masters are float32 tensors" if key == _MASTER_KEY else
            "remainders are torch.uint16 tensors (the float32 master's low 16 bits)"))
    if same_device and t.device != p.device:
        raise TypeError(f"{where} is on {t.device}, its parameter on {p.device}")
    if t.shape != p.shape:
        raise ValueError(f"{where} has shape {tuple(t.shape)}, its parameter {tuple(p.shape)}")


def _master_name(options: Any) -> Optional[str]:
    form = options.master_weights
    return None if form is None else form.name


def _engine_group(group: dict, convention: str) -> Any:
    """The engine's record of one torch parameter group (lr may be a 1-element tensor)."""
    return _core.Group(learning_rate=float(group["lr"]), momentum=float(group["momentum"]),
                       dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]),
                       weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]))


def _group_key(group: dict) -> tuple:
    lr = group["lr"]
    if type(lr) is not float:  # a tensor lr is updated in place by schedulers: compare its value
        lr = float(lr)
    return (lr, group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"],
            group["maximize"])


class _Plan:
    """What ``step`` reuses while the parameter groups keep their structure: the flat parameter
    list, the tensors the engine sees (DTensor local shards), group membership and the engine."""

    __slots__ = ("groups", "group_params", "group_lens", "params", "locals", "group_of", "dtensor", "sharded",
                 "engine", "keys", "state_version", "dicts", "slots", "momentum_none", "aux_missing", "dt",
                 "master_none")


def _local(t: Any, dtensor_type: Any) -> Any:
    if dtensor_type is not None and isinstance(t, dtensor_type):
        return t._local_tensor
    return t


def _sharded(p: Any) -> bool:
    """Whether a DTensor's local tensor is a shard (summed over ranks for global norms) or a
    replica (counted once). Meshes of more than one dimension (HSDP, TP) are not handled."""
    if p.device_mesh.ndim != 1:
        raise ValueError("fastsgd.torch.SGD supports DTensor parameters on 1-D device meshes (FSDP2's "
                         f"fully_shard), got a {p.device_mesh.ndim}-D mesh")
    return p.placements[0].is_shard()


class _SwapBack:
    """Returned by ``SGD.swap_ema()``: used as a context manager, swaps back on exit."""

    def __init__(self, opt: "SGD") -> None:
        self._opt = opt

    def __enter__(self) -> "_SwapBack":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._opt.swap_ema()


class SGD(Optimizer):
    r"""Stochastic gradient descent with momentum, exactly as ``torch.optim.SGD`` (and faster).

    Per parameter ``p`` with gradient ``g`` (torch's ``_single_tensor_sgd``, same roundings):

    * ``g = -g`` if ``maximize``; ``g = g + weight_decay * p`` (L2, coupled)
    * momentum ``m != 0``: first step ``b = g``, later ``b = m * b + (1 - dampening) * g``;
      Nesterov ``u = g + m * b``, else ``u = b``
    * ``p = p - lr * u`` (``u = g`` without momentum)

    Momentum buffers live in ``self.state[p]["momentum_buffer"]`` as torch tensors of the
    parameter's dtype; the engine updates them in place, and ``state_dict()`` is torch's own
    format, interchangeable with ``torch.optim.SGD``'s both ways.

    Args (torch's, same defaults and errors):
        params: iterable of parameters, of ``(name, parameter)`` pairs, or of group dicts.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD``.
        foreach, fused: accepted for compatibility and recorded in the groups; the engine is
            always one fused native call.
        differentiable: must be False (the update runs outside autograd).

    Keyword-only extras (what torch lacks; optimizer-wide, off by default):
        convention: ``"torch"`` (default) or ``"keras"`` (``v = m*v - lr*g; p += v``, decoupled
            weight decay ``p *= 1 - lr*wd``; buffers under ``state[p]["velocity"]``).
        clipnorm: clip each gradient to this L2 norm. clipvalue: clip each element into
            ``[-clipvalue, clipvalue]``. global_clipnorm: scale all gradients by
            ``min(1, c / ||g||)`` with ``||g||`` over every parameter (over every rank for
            FSDP2 DTensor parameters, one all-reduce). Under ``ZeroRedundancyOptimizer`` each
            rank's optimizer holds only its partition, so its norm would be partial: clip the
            gradients before ``step()`` there instead.
        use_ema, ema_momentum, ema_overwrite_frequency: keep ``a = k*a + (1-k)*p`` (``a = p``
            on the first step) in ``state[p]["ema"]``; see ``swap_ema()`` and ``finalize()``.
        skip_nonfinite: a step whose gradients hold Inf/NaN changes nothing (GradScaler's
            ``found_inf`` skips a step in any case).
        gradient_accumulation_steps: update every N steps with the mean of the N gradients
            (accumulators in ``state[p]["accumulator"]``).
        master_weights: for float16/bfloat16 parameters (others are unaffected), where the exact
            value lives between steps. ``None``: the parameter itself (torch's behaviour).
            ``"float32"``: ``state[p]["master"]``, a float32 tensor of the parameter's shape that
            starts as the widened parameter; each step updates the master in float32 (the rule
            above, bit for bit what ``torch.optim.SGD`` does to a float32 copy) and stores
            ``p = round(master)`` in the same pass. ``"remainder"`` (bfloat16 only; a float16
            parameter is refused by the constructor and ``add_param_group``):
            ``state[p]["remainder"]``, a ``torch.uint16``
            tensor holding the master's low 16 bits and starting at 0, so that ``p`` and the
            remainder together are the float32 master: ``bits(master) = (bits(p) - up) << 16 |
            remainder``, where ``up = 1`` when ``p`` was rounded up in magnitude (to nearest:
            ``remainder >= 0x8000``). Either way the other buffers (``momentum_buffer``,
            ``accumulator``) of 16-bit parameters are float32. Masters are made at a
            parameter's first update.

            **Once a master exists it is the parameter's value**: a write to the parameter from
            outside (``p.data.copy_(...)``, ``model.load_state_dict(...)`` without the
            optimizer's state, an EMA swap of your own) is overwritten by the next step from the
            float32 master, or, with remainders, joined with the old remainder's low bits (up
            to one bfloat16 ulp off the written value). After such a write call
            ``opt.resync_masters()`` (or ``opt.resync_masters([p, ...])``), which makes the
            masters the current parameters, or load the optimizer state saved with the model.

            Checkpoints across modes (``load_state_dict``): a checkpoint without masters
            (``torch.optim.SGD``'s, or this class's without ``master_weights``) starts the
            masters from the parameters at their next update, as a fresh optimizer does; into an
            optimizer without ``master_weights`` (or for a parameter that is not 16-bit) a
            checkpoint's masters are dropped, the parameters keeping their rounded values, as
            ``torch.optim.SGD`` would. A master of the other form (float32 <-> remainder) is
            refused (ValueError), and so are remainders split under the other
            ``stochastic_rounding`` setting (``state_dict()["fastsgd"]["remainder_split"]``):
            joined under the wrong rule they would be a different master.
        stochastic_rounding: store each updated 16-bit parameter rounded up or down with
            probability proportional to its distance to either neighbour (unbiased: ``E[p] =
            the float32 result``), with random bits from a counter-based generator keyed by
            (``seed``, step, parameter index, element): the same on every CPU, thread count and
            after a ``state_dict()`` resume.
        seed: an int in [0, 2**64), the stochastic rounding key. With stochastic rounding
            ``state_dict()["fastsgd"]`` carries it with the step counter, and
            ``load_state_dict`` adopts both.

    ``master_weights`` and ``stochastic_rounding`` cannot be combined with ``use_ema``. CUDA
    parameters run them with the CPU's bits (checked by a host replay of the CUDA blocks; not
    yet run on a GPU).

    One native call per ``step()``; no per-step allocation once the buffers exist.
    """

    def __init__(self, params: Any, lr: Any = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: Any = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 convention: str = "torch", clipnorm: Optional[float] = None, clipvalue: Optional[float] = None,
                 global_clipnorm: Optional[float] = None, use_ema: bool = False, ema_momentum: float = 0.99,
                 ema_overwrite_frequency: Optional[int] = None, skip_nonfinite: bool = False,
                 gradient_accumulation_steps: Optional[int] = None, master_weights: Optional[str] = None,
                 stochastic_rounding: bool = False, seed: int = 0) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise ValueError("`differentiable=True` is not supported: fastsgd.torch.SGD updates parameters "
                             "outside autograd")
        if convention not in _MOMENTUM_KEY:
            raise ValueError(f"`convention` must be 'torch' or 'keras', got {convention!r}")
        options = _core.Options()
        options.convention = getattr(_core.Convention, convention)
        options.caller_owned_slots = True
        options.slots_in_variable_dtype = True
        for name, value in (("clipnorm", clipnorm), ("clipvalue", clipvalue), ("global_clipnorm", global_clipnorm)):
            value = _float_arg(name, value)
            if value is not None:
                if not value > 0.0:
                    raise ValueError(f"`{name}` must be > 0 or None, got {value}")
                setattr(options, name, value)
        if sum(v is not None for v in (clipnorm, global_clipnorm)) > 1:
            raise ValueError("Only one of `clipnorm` and `global_clipnorm` can be set")
        if not isinstance(use_ema, bool):
            raise TypeError(f"`use_ema` must be a bool, got {use_ema!r}")
        options.use_ema = use_ema
        options.ema_momentum = _float_arg("ema_momentum", ema_momentum, allow_none=False)
        if ema_overwrite_frequency is not None:
            if isinstance(ema_overwrite_frequency, bool) or not isinstance(ema_overwrite_frequency, int):
                raise TypeError(f"`ema_overwrite_frequency` must be an int or None, got {ema_overwrite_frequency!r}")
            options.ema_overwrite_frequency = ema_overwrite_frequency or None
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"`skip_nonfinite` must be a bool, got {skip_nonfinite!r}")
        options.skip_nonfinite = skip_nonfinite
        if gradient_accumulation_steps is not None:
            if isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int):
                raise TypeError("`gradient_accumulation_steps` must be an int or None, "
                                f"got {gradient_accumulation_steps!r}")
            options.gradient_accumulation_steps = gradient_accumulation_steps
        _set_lowp_options(options, master_weights, stochastic_rounding, seed)
        options.group = _engine_group({"lr": lr, "momentum": momentum, "dampening": dampening,
                                       "nesterov": nesterov, "weight_decay": weight_decay,
                                       "maximize": maximize}, convention)
        _core.validate(options)  # the engine's own range checks and wording, now
        self._options = options
        self._convention = convention
        self._momentum_key = _MOMENTUM_KEY[convention]
        self._accumulating = (gradient_accumulation_steps or 0) > 1
        self._plan: Optional[_Plan] = None
        self._counters = (0, 0)  # (raw_iterations, skipped_steps) carried across engine rebuilds
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
                    "nesterov": nesterov, "maximize": maximize, "foreach": foreach,
                    "differentiable": differentiable, "fused": fused}
        super().__init__(params, defaults)
        # GradScaler hands grad_scale / found_inf to step() instead of unscaling on the host.
        self._step_supports_amp_scaling = True

    # ---- torch.optim.Optimizer plumbing ------------------------------------------------------

    @property
    def state(self) -> _State:
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        self._state = value if isinstance(value, _State) else _State(value)
        self._plan_dicts_stale()

    def _plan_dicts_stale(self) -> None:
        plan = getattr(self, "_plan", None)
        if plan is not None:
            plan.state_version = -1

    def __getstate__(self) -> dict:
        out = super().__getstate__()
        out["_fastsgd_config"] = self._config()
        return out

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        st = state.pop("state", None)
        config = state.pop("_fastsgd_config", None)
        super().__setstate__(state)
        if st is not None:
            self.state = st
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
        if config is not None:
            self._restore_config(config)
        elif getattr(self, "_plan", None) is not None:  # load_state_dict: keep the engine's counters
            self._counters = self._live_counters()
        self._plan = None

    def _config(self) -> dict:
        o = self._options
        return {"convention": self._convention, "clipnorm": o.clipnorm, "clipvalue": o.clipvalue,
                "global_clipnorm": o.global_clipnorm, "use_ema": o.use_ema, "ema_momentum": o.ema_momentum,
                "ema_overwrite_frequency": o.ema_overwrite_frequency, "skip_nonfinite": o.skip_nonfinite,
                "gradient_accumulation_steps": o.gradient_accumulation_steps, "counters": self._live_counters(),
                "master_weights": _master_name(o), "stochastic_rounding": o.stochastic_rounding, "seed": int(o.seed)}

    def _restore_config(self, c: dict) -> None:
        o = _core.Options()
        o.convention = getattr(_core.Convention, c["convention"])
        o.caller_owned_slots = True
        o.slots_in_variable_dtype = True
        for k in ("clipnorm", "clipvalue", "global_clipnorm", "use_ema", "ema_momentum", "ema_overwrite_frequency",
                  "skip_nonfinite", "gradient_accumulation_steps"):
            setattr(o, k, c[k])
        _set_lowp_options(o, c.get("master_weights"), c.get("stochastic_rounding", False), c.get("seed", 0))
        self._options, self._convention = o, c["convention"]
        self._momentum_key = _MOMENTUM_KEY[self._convention]
        self._accumulating = (o.gradient_accumulation_steps or 0) > 1
        self._counters = tuple(c["counters"])

    @torch._disable_dynamo
    def add_param_group(self, param_group: dict) -> None:
        """Adds a parameter group (torch's semantics); the engine is rebuilt on the next step,
        the buffers already in ``state`` and the step counters are kept. A float16 parameter
        under ``master_weights="remainder"`` is refused (ValueError), changing nothing."""
        before = dict(param_group) if isinstance(param_group, dict) else None
        super().add_param_group(param_group)
        if _master_name(self._options) == "remainder":
            offset = sum(len(g["params"]) for g in self.param_groups[:-1])
            for j, p in enumerate(self.param_groups[-1]["params"]):
                if p.dtype == torch.float16:
                    self.param_groups.pop()
                    param_group.clear()
                    param_group.update(before)
                    refuse_float16_remainder(f"params[{offset + j}]")
        # The engine is rebuilt, its counters carry over (stochastic rounding's stream and the
        # accumulation phase depend on them).
        self._counters = self._live_counters()
        self._plan = None

    def state_dict(self) -> dict:
        """torch's format: ``{"state": {i: {"momentum_buffer": tensor}}, "param_groups": [...]}``
        (plus ``"master"`` / ``"remainder"`` under ``master_weights``). With EMA, gradient
        accumulation, stochastic rounding or remainders the engine's counters ride along under
        ``"fastsgd"``, with the stochastic rounding ``seed`` and how remainders were split
        (``"remainder_split"``: ``"nearest"`` or ``"stochastic"``)."""
        out = super().state_dict()
        out["state"] = {k: dict(v) if type(v) is _SlotDict else v for k, v in out["state"].items()}
        o = self._options
        remainders = _master_name(o) == "remainder"
        if o.use_ema or self._accumulating or o.stochastic_rounding or remainders:
            raw, skipped = self._live_counters()
            out[_COUNTERS_KEY] = {"raw_iterations": raw, "skipped_steps": skipped}
            if o.stochastic_rounding:
                out[_COUNTERS_KEY]["seed"] = int(o.seed)
            if remainders:
                out[_COUNTERS_KEY]["remainder_split"] = remainder_split(self._options.stochastic_rounding)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads torch's format (from this class or ``torch.optim.SGD``); buffers are cast to
        each parameter's dtype and device as torch does, except the float32 masters, the
        uint16 remainders and, under ``master_weights``, the float32 buffers of 16-bit
        parameters, which keep their dtype (torch's cast would round them to the parameter's).
        Masters follow the rule in the class docstring. A state that does not fit is refused
        (TypeError/ValueError) before anything changes."""
        counters = None
        if isinstance(state_dict, dict) and _COUNTERS_KEY in state_dict:
            counters = _checked_counters(state_dict[_COUNTERS_KEY])
            state_dict = {k: v for k, v in state_dict.items() if k != _COUNTERS_KEY}
        wide: dict = {}
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict) and \
                isinstance(state_dict.get("param_groups"), list):
            state_dict, wide = self._split_wide_state(state_dict, counters)
        super().load_state_dict(state_dict)
        for p, entries in wide.items():
            d = self.state[p]
            for key, t in entries.items():
                d[key] = t
        if counters is not None:
            self._counters = (counters["raw_iterations"], counters["skipped_steps"])
            seed = counters.get("seed", int(self._options.seed))
            self._options.seed = seed
            if self._plan is not None:
                e = self._plan.engine
                e.raw_iterations, e.skipped_steps = self._counters
                e.seed = seed

    def _split_wide_state(self, state_dict: dict, counters: Optional[dict]) -> tuple:
        """Takes the buffers torch must not cast out of ``state_dict["state"]``: returns the
        rest, and {parameter: {key: tensor on the parameter's device, in the dtype its slot
        needs}}. Masters follow the class docstring's rule: this optimizer's form is checked and
        kept, the other form refused, any master dropped where this optimizer keeps none.
        Raises (changing nothing) for a master or remainder that cannot fit."""
        saved_ids = list(chain.from_iterable(g.get("params", ()) for g in state_dict["param_groups"]))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        if len(saved_ids) != len(params):
            return state_dict, {}  # torch's own check raises with its wording
        param_of = dict(zip(saved_ids, params))
        index_of = {k: i for i, k in enumerate(saved_ids)}
        form = _master_name(self._options)
        ours = _MASTER_FORMS[form][1] if form is not None else None
        kept, wide = {}, {}
        for k, entry in state_dict["state"].items():
            p = param_of.get(k)
            if p is None or not isinstance(entry, dict):
                kept[k] = entry
                continue
            low = p.dtype in _LOWP
            rest, taken = {}, {}
            for key, t in entry.items():
                if key in (_MASTER_KEY, _REMAINDER_KEY):
                    _check_master(t, p, key, f"state_dict['state'][{k!r}][{key!r}]", same_device=False)
                    if ours is None or not low:
                        continue  # no master kept here: the parameter holds the rounded value
                    if key != ours:
                        theirs = "float32" if key == _MASTER_KEY else "remainder"
                        raise ValueError(
                            f"params[{index_of[k]}]'s checkpoint keeps a master_weights={theirs!r} master, this "
                            f"optimizer master_weights={form!r}; construct the optimizer with "
                            f"master_weights={theirs!r} to resume it (or None to drop the masters)")
                    if key == _REMAINDER_KEY and counters is not None and "remainder_split" in counters:
                        refuse_split_mismatch(counters["remainder_split"], self._options.stochastic_rounding,
                                              "state_dict['fastsgd']['remainder_split']")
                    taken[key] = self._fitted(t, p, t.dtype, key, k)  # dtype checked above
                elif not isinstance(t, torch.Tensor):
                    rest[key] = t
                elif form is not None and low and key in (self._momentum_key, _ACC_KEY):
                    taken[key] = self._fitted(t, p, torch.float32, key, k)
                else:
                    rest[key] = t
            if rest or not taken:
                kept[k] = rest
            if taken:
                wide[p] = taken
        return {**state_dict, "state": kept}, wide

    @staticmethod
    def _fitted(t: torch.Tensor, p: torch.Tensor, dtype: torch.dtype, key: str, k: Any) -> torch.Tensor:
        if t.shape != p.shape:
            raise ValueError(f"state[{k}][{key!r}] has shape {tuple(t.shape)}, its parameter {tuple(p.shape)}")
        return t.to(device=p.device, dtype=dtype, memory_format=torch.contiguous_format)

    def _live_counters(self) -> tuple:
        if self._plan is not None:
            e = self._plan.engine
            return int(e.raw_iterations), int(e.skipped_steps)
        return self._counters

    # ---- the engine --------------------------------------------------------------------------

    def _build_plan(self) -> _Plan:
        dtensor_type = _dtensor_type()
        plan = _Plan()
        plan.dt = dtensor_type
        plan.groups = self.param_groups
        plan.group_params = [g["params"] for g in plan.groups]
        plan.group_lens = [len(ps) for ps in plan.group_params]
        plan.params = list(chain.from_iterable(plan.group_params))
        plan.dtensor = dtensor_type is not None and any(isinstance(p, dtensor_type) for p in plan.params)
        plan.sharded = [dtensor_type is not None and isinstance(p, dtensor_type) and _sharded(p) for p in plan.params]
        if plan.dtensor and self._options.clipnorm is not None:
            raise ValueError("`clipnorm` (per-tensor norms) is not supported with sharded DTensor parameters; "
                             "use `global_clipnorm`")
        plan.locals = [_local(p, dtensor_type) for p in plan.params] if plan.dtensor else plan.params
        plan.group_of = [i for i, n in enumerate(plan.group_lens) for _ in range(n)]
        if _master_name(self._options) == "remainder":
            for i, p in enumerate(plan.params):
                if p.dtype == torch.float16:
                    refuse_float16_remainder(f"params[{i}]")
        engine = _core.Engine(self._options)
        for i, group in enumerate(plan.groups):
            g = _engine_group(group, self._convention)
            if i == 0:
                engine.set_group(0, g)
            else:
                engine.add_group(g)
        plan.keys = [_group_key(g) for g in plan.groups]
        if plan.params:
            engine.build(plan.locals, [], plan.group_of)
        if self._plan is not None:
            self._counters = self._live_counters()
        engine.raw_iterations, engine.skipped_steps = self._counters
        plan.engine = engine
        plan.state_version = -1
        self._plan = plan
        return plan

    def _current_plan(self) -> _Plan:
        plan = self._plan
        groups = self.param_groups
        if plan is None or groups is not plan.groups or len(groups) != len(plan.group_params):
            plan = self._build_plan()
        else:
            for g, ps, n in zip(groups, plan.group_params, plan.group_lens):
                if g["params"] is not ps or len(ps) != n:
                    plan = self._build_plan()
                    break
        # Schedulers rewrite lr / momentum in the group dicts: push what changed.
        keys = plan.keys
        for i, group in enumerate(groups):
            key = _group_key(group)
            if key != keys[i]:
                plan.engine.set_group(i, _engine_group(group, self._convention))
                keys[i] = key
        return plan

    def _refresh_slots(self, plan: _Plan) -> None:
        """Re-reads every buffer from ``state`` (after anything in it changed): the lists the
        engine gets, the parameters still without momentum buffer, whether EMA/accumulators
        are missing."""
        st = self._state
        plan.dicts = list(map(st.get, plan.params, repeat(_NO_STATE)))
        slots = {}
        bufs = list(map(dict.get, plan.dicts, repeat(self._momentum_key)))
        plan.momentum_none = [i for i, b in enumerate(bufs) if b is None]
        slots[_core.SlotKind.momentum] = bufs
        plan.aux_missing = False
        o = self._options
        for kind, key, on in ((_core.SlotKind.average, _EMA_KEY, o.use_ema),
                              (_core.SlotKind.accumulator, _ACC_KEY, self._accumulating)):
            if on:
                slots[kind] = list(map(dict.get, plan.dicts, repeat(key)))
                plan.aux_missing = plan.aux_missing or None in slots[kind]
        for kind, key in ((_core.SlotKind.momentum, self._momentum_key), (_core.SlotKind.average, _EMA_KEY),
                          (_core.SlotKind.accumulator, _ACC_KEY)):
            for i, t in enumerate(slots.get(kind, ())):
                if t is not None and not isinstance(t, torch.Tensor):
                    raise TypeError(f"state[params[{i}]][{key!r}] must be a torch.Tensor, got {type(t).__name__}")
        plan.master_none = []
        form = _master_name(o)
        if form is not None:
            kind, key = _MASTER_FORMS[form]
            kind = getattr(_core.SlotKind, kind)
            masters = [d.get(key) if p.dtype in _LOWP else None for p, d in zip(plan.params, plan.dicts)]
            plan.master_none = [i for i, (p, t) in enumerate(zip(plan.params, masters)) if t is None and p.dtype in _LOWP]
            for i, (p, t) in enumerate(zip(plan.params, masters)):
                if t is not None:
                    _check_master(t, p, key, f"state[params[{i}]][{key!r}]", same_device=True)
            slots[kind] = masters
        if plan.dtensor:
            slots = {k: [None if t is None else _local(t, plan.dt) for t in v] for k, v in slots.items()}
        rem = slots.get(_core.SlotKind.remainder)
        if rem is not None:  # the engine takes remainders as raw 16-bit (bfloat16-typed) words
            slots[_core.SlotKind.remainder] = [None if t is None else t.view(torch.bfloat16) for t in rem]
        plan.slots = slots
        plan.state_version = st.version

    def _missing_slots(self, plan: _Plan, grads: list, update_due: bool) -> tuple:
        """Creates what this step needs: momentum buffers for parameters with a gradient in a
        group with momentum != 0 (torch: uninitialised, the engine writes ``b = g``; Keras:
        zeros), EMA averages (a copy of the parameter) and accumulators (zeros) for all.
        Returns (fresh flags or None, momentum created, aux created)."""
        created, aux_created = [], []
        fresh = None
        key = self._momentum_key
        groups = plan.groups
        bufs = plan.slots[_core.SlotKind.momentum]
        wide = self._options.master_weights is not None
        if update_due:
            for i in plan.momentum_none:
                if bufs[i] is None and grads[i] is not None and groups[plan.group_of[i]]["momentum"] != 0:
                    p = plan.params[i]
                    dtype = torch.float32 if wide and p.dtype in _LOWP else p.dtype
                    if self._convention == "torch":
                        b = torch.empty_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                        if fresh is None:
                            fresh = [False] * len(bufs)
                        fresh[i] = True
                    else:
                        b = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                    self._slot_dict(plan, i)[key] = b
                    bufs[i] = _local(b, plan.dt) if plan.dtensor else b
                    created.append((p, key))
            if plan.master_none:
                self._missing_masters(plan, grads, created)
        if plan.aux_missing:
            with torch.no_grad():
                for kind, key, init in (
                        (_core.SlotKind.average, _EMA_KEY,
                         lambda p: p.detach().clone(memory_format=torch.contiguous_format)),
                        (_core.SlotKind.accumulator, _ACC_KEY,
                         lambda p: torch.zeros_like(p, dtype=torch.float32 if wide and p.dtype in _LOWP else p.dtype,
                                                    memory_format=torch.contiguous_format))):
                    out = plan.slots.get(kind)
                    for i in range(len(out) if out is not None else 0):
                        if out[i] is None:
                            p = plan.params[i]
                            t = init(p)
                            self._slot_dict(plan, i)[key] = t
                            out[i] = _local(t, plan.dt) if plan.dtensor else t
                            aux_created.append((p, key))
        return fresh, created, aux_created

    @torch.no_grad()
    def _missing_masters(self, plan: _Plan, grads: list, created: list) -> None:
        """Masters for the 16-bit parameters this step updates for the first time, made as the
        engine makes its own: the widened parameter, or a zero remainder (the parameter's bits
        with a zero low half are the master exactly)."""
        form = _master_name(self._options)
        kind, key = _MASTER_FORMS[form]
        out = plan.slots[getattr(_core.SlotKind, kind)]
        for i in plan.master_none:
            if out[i] is not None or grads[i] is None:
                continue
            p = plan.params[i]
            if form == "float32":
                t = p.detach().to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
            else:
                t = torch.zeros_like(p, dtype=torch.uint16, memory_format=torch.contiguous_format)
            self._slot_dict(plan, i)[key] = t
            local = _local(t, plan.dt) if plan.dtensor else t
            out[i] = local.view(torch.bfloat16) if form == "remainder" else local
            created.append((p, key))

    def _step_impl(self) -> None:
        plan = self._current_plan()
        if not plan.params:
            return
        engine = plan.engine
        if plan.state_version != self._state.version:
            self._refresh_slots(plan)
        grads = list(map(_grad_of, plan.params))
        if grads.count(None) == len(grads):
            return  # torch.optim.SGD's no-op: nothing updated, no counter advanced
        # GradScaler's fused protocol: grad_scale (the scale, or None once unscaled) and found_inf
        # are 0-d tensors set as instance attributes around this call.
        attrs = self.__dict__
        grad_scale = 1.0
        found_inf = None
        scale = attrs.get("grad_scale")
        if scale is not None:
            grad_scale = float(scale.double().reciprocal().float())
        inf = attrs.get("found_inf")
        if inf is not None:
            found_inf = bool(inf)
        fresh = None
        created = aux_created = ()
        if plan.momentum_none or plan.aux_missing or plan.master_none:
            # The engine wants every slot of a would-be update even when found_inf skips it;
            # what is made for a skipped step is dropped again below.
            fresh, created, aux_created = self._missing_slots(
                plan, grads, not self._accumulating or engine.update_is_due)
        slots = plan.slots
        if plan.dtensor:
            grads = [None if g is None else _local(g, plan.dt) for g in grads]
        o = self._options
        global_sum_squares = None
        if plan.dtensor and (o.global_clipnorm is not None or o.skip_nonfinite) and found_inf is not True:
            global_sum_squares, nonfinite = self._global_stats(plan, grads, slots, grad_scale)
            if nonfinite and o.skip_nonfinite:
                found_inf = True
        variables = [_local(p, plan.dt) for p in plan.params] if plan.dtensor else None
        try:
            try:
                if fresh is None and found_inf is None and global_sum_squares is None and grad_scale == 1.0:
                    updated, skipped, _ = engine.step(grads, variables, slots=slots)  # fewer keywords to parse
                else:
                    updated, skipped, _ = engine.step(grads, variables, slots=slots, fresh_momentum=fresh,
                                                      grad_scale=grad_scale, found_inf=found_inf,
                                                      global_sum_squares=global_sum_squares)
            except (TypeError, ValueError, RuntimeError) as refusal:
                # Slow path, only after the engine refused (and so changed nothing): torch accepts
                # strided gradients and buffers, so retry once with contiguous copies.
                grads = self._contiguous_or_raise(refusal, plan, grads)
                updated, skipped, _ = engine.step(grads, variables, slots=plan.slots, fresh_momentum=fresh,
                                                  grad_scale=grad_scale, found_inf=found_inf,
                                                  global_sum_squares=global_sum_squares)
        except BaseException:
            self._forget(list(created) + list(aux_created))
            raise
        if created and not updated:
            self._forget(created)
        if aux_created and skipped:
            self._forget(aux_created)

    def _contiguous_or_raise(self, refusal: Exception, plan: _Plan, grads: list) -> list:
        """After a refused step: a sparse gradient is a TypeError naming its parameter; strided
        gradients are replaced by contiguous copies, strided buffers by contiguous ones (written
        back into ``state``); with nothing to fix, the engine's refusal is raised as it was."""
        for i, g in enumerate(grads):
            if g is not None and g.layout != torch.strided:
                raise TypeError(f"params[{i}].grad is {g.layout}: fastsgd.torch.SGD supports dense (strided) "
                                "gradients only") from None
        changed = False
        out = []
        for g in grads:
            if g is not None and not g.is_contiguous():
                g, changed = g.contiguous(), True
            out.append(g)
        key_of = {_core.SlotKind.momentum: self._momentum_key, _core.SlotKind.average: _EMA_KEY,
                  _core.SlotKind.accumulator: _ACC_KEY, _core.SlotKind.master: _MASTER_KEY,
                  _core.SlotKind.remainder: _REMAINDER_KEY}
        for kind, bufs in plan.slots.items():
            for i, b in enumerate(bufs):
                if b is not None and not b.is_contiguous():
                    if plan.dtensor:
                        raise refusal
                    b = bufs[i] = b.contiguous()
                    self._slot_dict(plan, i)[key_of[kind]] = \
                        b.view(torch.uint16) if kind == _core.SlotKind.remainder else b
                    changed = True
        if not changed:
            if isinstance(refusal, RuntimeError):  # a framework error surfaced through DLPack
                raise TypeError(f"fastsgd.torch.SGD cannot use these tensors: {str(refusal).splitlines()[0]}") \
                    from refusal
            raise refusal
        return out

    def _slot_dict(self, plan: _Plan, i: int) -> dict:
        d = plan.dicts[i]
        if d is _NO_STATE:
            d = plan.dicts[i] = self._state[plan.params[i]]
        return d

    def _forget(self, created: list) -> None:
        """A refused or skipped step leaves no state behind (torch's fused kernel leaves
        uninitialised momentum after an overflowing first step; this class does not)."""
        st = self._state
        for p, k in created:
            d = st.get(p)
            if d is not None:
                d.pop(k, None)
                if not d:
                    del st[p]

    def _global_stats(self, plan: _Plan, grads: list, slots: Any, grad_scale: float) -> tuple:
        """The squared global gradient norm and the non-finite flag over every rank: local
        sums from the engine (``grad_stats``), one all-reduce over the DTensors' process group."""
        import torch.distributed as dist

        stats = plan.engine.grad_stats(grads, plan.locals, slots=slots, grad_scale=grad_scale)
        sharded = sum(s for s, sh in zip(stats.sum_squares, plan.sharded) if sh)
        replicated = sum(s for s, sh in zip(stats.sum_squares, plan.sharded) if not sh)
        mesh = next(p.device_mesh for p, sh in zip(plan.params, plan.sharded) if sh)
        buf = torch.tensor([sharded, 1.0 if stats.nonfinite else 0.0], dtype=torch.float64,
                           device="cpu" if dist.get_backend(mesh.get_group()) == "gloo" else plan.params[0].device)
        dist.all_reduce(buf, group=mesh.get_group())
        total, nonfinite = buf.tolist()
        return total + replicated, nonfinite > 0 or total != total

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimization step: the closure (if any) under ``enable_grad``, then one native call
        that updates every parameter with a gradient (``p.grad is None``: skipped, as torch;
        when no parameter has one the step does nothing and advances no counter). Step pre/post
        hooks run as with any ``torch.optim.Optimizer``."""
        pre = self._optimizer_step_pre_hooks
        args, kwargs = (self,), ({"closure": closure} if closure is not None else {})
        if pre or _global_optimizer_pre_hooks:
            for hook in chain(_global_optimizer_pre_hooks.values(), pre.values()):
                result = hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(f"{self.step} must return None or a tuple of (new_args, new_kwargs), "
                                           f"but got {result}.")
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                self._step_impl()
        else:
            self._step_impl()
        post = self._optimizer_step_post_hooks
        if post or _global_optimizer_post_hooks:
            for hook in chain(post.values(), _global_optimizer_post_hooks.values()):
                hook(self, args, kwargs)
        return loss

    # Hooks and profiling are handled above; this tells Optimizer not to wrap step() again.
    step.hooked = True  # type: ignore[attr-defined]

    # ---- extras --------------------------------------------------------------------------------

    @torch.no_grad()
    def swap_ema(self) -> _SwapBack:
        """Swaps every parameter with its EMA average (``state[p]["ema"]``). Call again to swap
        back, or use it as a context manager: ``with opt.swap_ema(): evaluate(model)``."""
        if not self._options.use_ema:
            raise ValueError("swap_ema() needs `use_ema=True`")
        pairs = [(p, self.state[p].get(_EMA_KEY)) for g in self.param_groups for p in g["params"]]
        pairs = [(p, a) for p, a in pairs if a is not None]
        if pairs:
            params, avgs = [p for p, _ in pairs], [a for _, a in pairs]
            tmp = [p.detach().clone() for p in params]
            torch._foreach_copy_([p.detach() for p in params], avgs)
            torch._foreach_copy_(avgs, tmp)
        return _SwapBack(self)

    @torch.no_grad()
    def finalize(self) -> None:
        """Copies the EMA averages into the parameters (Keras's ``finalize_variable_values``)."""
        if not self._options.use_ema:
            return
        for g in self.param_groups:
            for p in g["params"]:
                a = self.state[p].get(_EMA_KEY)
                if a is not None:
                    p.detach().copy_(a)

    @torch.no_grad()
    def resync_masters(self, params: Optional[Any] = None) -> None:
        """Makes the masters of ``params`` (default: every parameter) the parameters' current
        values, after the parameters were written from outside (``p.data.copy_(...)``, a model
        ``load_state_dict`` without the optimizer's): float32 masters become the widened
        parameters, remainders zero. Parameters without a master are left alone."""
        ours = list(chain.from_iterable(g["params"] for g in self.param_groups))
        if params is None:
            chosen = ours
        else:
            if isinstance(params, torch.Tensor):
                params = [params]
            try:
                chosen = list(params)
            except TypeError:
                raise TypeError(f"`params` must be a parameter, an iterable of parameters or None, "
                                f"got {type(params).__name__}") from None
            known = set(map(id, ours))
            for j, p in enumerate(chosen):
                if not isinstance(p, torch.Tensor) or id(p) not in known:
                    raise ValueError(f"`params[{j}]` is not a parameter of this optimizer")
        for p in chosen:
            d = self._state.get(p)
            if d is None:
                continue
            m = d.get(_MASTER_KEY)
            if isinstance(m, torch.Tensor):
                m.copy_(p.detach())
            r = d.get(_REMAINDER_KEY)
            if isinstance(r, torch.Tensor):
                r.zero_()

    @property
    def engine(self) -> Any:
        """The ``fastsgd._core.Engine`` behind this optimizer (built on first use)."""
        return self._current_plan().engine

    @property
    def iterations(self) -> int:
        """Update steps taken (Keras's count; skipped steps and accumulation calls excluded)."""
        return int(self.engine.iterations)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients or GradScaler's ``found_inf``."""
        return int(self.engine.skipped_steps)
