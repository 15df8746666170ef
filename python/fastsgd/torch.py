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

The per-element rule is torch's ``_single_tensor_sgd`` with its roundings, computed by the C++
engine (cpp/include/fastsgd/math.h, ``Convention.torch``); this module only maps torch's objects
onto the engine's caller-owned slots. It is imported only when used (``fastsgd`` never imports
torch).
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from itertools import chain, repeat
from operator import attrgetter, is_, is_not
from typing import Any, Callable, Iterable, Optional

import torch
from torch.optim.optimizer import Optimizer, _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import _core

__all__ = ["SGD"]

_grad_of = attrgetter("grad")
_MOMENTUM_KEY = {"torch": "momentum_buffer", "keras": "velocity"}
_EMA_KEY = "ema"
_ACC_KEY = "accumulator"
_COUNTERS_KEY = "fastsgd"   # extra top-level state_dict entry, only when counters matter
_NO_STATE: dict = {}        # stands for a parameter without state (never written)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return None
    return DTensor


class _State(defaultdict):
    """``Optimizer.state`` that counts structural changes (a parameter's dict added, replaced or
    removed), so ``step`` can cache the per-parameter dicts instead of hashing 161 tensors a step.
    The dicts' contents (the buffers themselves) are read afresh every step."""

    def __init__(self, *args: Any) -> None:
        super().__init__(dict, *args)
        self.version = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.version += 1
        super().__delitem__(key)

    def _bump(name: str):  # noqa: N805 - a decorator factory used in the class body only
        base = getattr(defaultdict, name)

        @functools.wraps(base)
        def method(self, *args: Any, **kwargs: Any) -> Any:
            self.version += 1
            return base(self, *args, **kwargs)

        return method

    pop = _bump("pop")
    popitem = _bump("popitem")
    clear = _bump("clear")
    update = _bump("update")
    setdefault = _bump("setdefault")
    del _bump

    def __reduce__(self):
        return (_State, (), None, None, iter(self.items()))


def _float_arg(name: str, value: Any, allow_none: bool = True) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value)
        raise TypeError(f"`{name}` must be a float{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


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

    __slots__ = ("groups", "group_params", "group_lens", "params", "locals", "group_of", "spans", "dtensor",
                 "sharded", "engine", "keys", "state_version", "dicts", "decays")


def _local(t: Any, dtensor_type: Any) -> Any:
    if dtensor_type is not None and isinstance(t, dtensor_type):
        return t._local_tensor
    return t


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
            FSDP2 DTensor parameters, one all-reduce).
        use_ema, ema_momentum, ema_overwrite_frequency: keep ``a = k*a + (1-k)*p`` (``a = p``
            on the first step) in ``state[p]["ema"]``; see ``swap_ema()`` and ``finalize()``.
        skip_nonfinite: a step whose gradients hold Inf/NaN changes nothing (GradScaler's
            ``found_inf`` skips a step in any case).
        gradient_accumulation_steps: update every N steps with the mean of the N gradients
            (accumulators in ``state[p]["accumulator"]``).

    One native call per ``step()``; no per-step allocation once the buffers exist.
    """

    def __init__(self, params: Any, lr: Any = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: Any = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 convention: str = "torch", clipnorm: Optional[float] = None, clipvalue: Optional[float] = None,
                 global_clipnorm: Optional[float] = None, use_ema: bool = False, ema_momentum: float = 0.99,
                 ema_overwrite_frequency: Optional[int] = None, skip_nonfinite: bool = False,
                 gradient_accumulation_steps: Optional[int] = None) -> None:
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
        self._plan = None

    def _config(self) -> dict:
        o = self._options
        return {"convention": self._convention, "clipnorm": o.clipnorm, "clipvalue": o.clipvalue,
                "global_clipnorm": o.global_clipnorm, "use_ema": o.use_ema, "ema_momentum": o.ema_momentum,
                "ema_overwrite_frequency": o.ema_overwrite_frequency, "skip_nonfinite": o.skip_nonfinite,
                "gradient_accumulation_steps": o.gradient_accumulation_steps, "counters": self._counters}

    def _restore_config(self, c: dict) -> None:
        o = _core.Options()
        o.convention = getattr(_core.Convention, c["convention"])
        o.caller_owned_slots = True
        o.slots_in_variable_dtype = True
        for k in ("clipnorm", "clipvalue", "global_clipnorm", "use_ema", "ema_momentum", "ema_overwrite_frequency",
                  "skip_nonfinite", "gradient_accumulation_steps"):
            setattr(o, k, c[k])
        self._options, self._convention = o, c["convention"]
        self._momentum_key = _MOMENTUM_KEY[self._convention]
        self._accumulating = (o.gradient_accumulation_steps or 0) > 1
        self._counters = tuple(c["counters"])

    @torch._disable_dynamo
    def add_param_group(self, param_group: dict) -> None:
        """Adds a parameter group (torch's semantics); the engine is rebuilt on the next step,
        the buffers already in ``state`` are kept."""
        super().add_param_group(param_group)
        self._plan = None

    def state_dict(self) -> dict:
        """torch's format: ``{"state": {i: {"momentum_buffer": tensor}}, "param_groups": [...]}``.
        With EMA or gradient accumulation the engine's counters ride along under ``"fastsgd"``."""
        out = super().state_dict()
        o = self._options
        if o.use_ema or self._accumulating:
            raw, skipped = self._live_counters()
            out[_COUNTERS_KEY] = {"raw_iterations": raw, "skipped_steps": skipped}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads torch's format (from this class or ``torch.optim.SGD``); buffers are cast to
        each parameter's dtype and device as torch does."""
        counters = state_dict.get(_COUNTERS_KEY) if isinstance(state_dict, dict) else None
        if counters is not None:
            state_dict = {k: v for k, v in state_dict.items() if k != _COUNTERS_KEY}
        super().load_state_dict(state_dict)
        if counters is not None:
            self._counters = (int(counters["raw_iterations"]), int(counters["skipped_steps"]))
            if self._plan is not None:
                self._plan.engine.raw_iterations, self._plan.engine.skipped_steps = self._counters

    def _live_counters(self) -> tuple:
        if self._plan is not None:
            e = self._plan.engine
            return int(e.raw_iterations), int(e.skipped_steps)
        return self._counters

    # ---- the engine --------------------------------------------------------------------------

    def _build_plan(self) -> _Plan:
        dtensor_type = _dtensor_type()
        plan = _Plan()
        plan.groups = self.param_groups
        plan.group_params = [g["params"] for g in plan.groups]
        plan.group_lens = [len(ps) for ps in plan.group_params]
        plan.params = list(chain.from_iterable(plan.group_params))
        plan.dtensor = dtensor_type is not None and any(isinstance(p, dtensor_type) for p in plan.params)
        plan.sharded = [dtensor_type is not None and isinstance(p, dtensor_type) for p in plan.params]
        if plan.dtensor and self._options.clipnorm is not None:
            raise ValueError("`clipnorm` (per-tensor norms) is not supported with sharded DTensor parameters; "
                             "use `global_clipnorm`")
        plan.locals = [_local(p, dtensor_type) for p in plan.params] if plan.dtensor else plan.params
        plan.group_of = [i for i, n in enumerate(plan.group_lens) for _ in range(n)]
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
        plan.dicts = []
        self._plan = plan
        return plan

    def _current_plan(self) -> _Plan:
        plan = self._plan
        groups = self.param_groups
        if (plan is None or groups is not plan.groups or len(groups) != len(plan.group_params)
                or any(g["params"] is not ps or len(ps) != n
                       for g, ps, n in zip(groups, plan.group_params, plan.group_lens))):
            plan = self._build_plan()
        st = self._state
        if plan.state_version != st.version:
            plan.dicts = list(map(st.get, plan.params, repeat(_NO_STATE)))
            plan.state_version = st.version
        # Schedulers rewrite lr / momentum in the group dicts: push what changed.
        keys = plan.keys
        for i, group in enumerate(groups):
            key = _group_key(group)
            if key != keys[i]:
                plan.engine.set_group(i, _engine_group(group, self._convention))
                keys[i] = key
        return plan

    def _missing_slots(self, plan: _Plan, grads: list, bufs: list, update_due: bool) -> tuple:
        """Creates the buffers this step needs (momentum for parameters with a gradient in a
        group with momentum != 0, EMA and accumulators for all). Returns (fresh flags, created)."""
        created = []
        fresh = None
        key = self._momentum_key
        groups = plan.groups
        if update_due:
            for i, b in enumerate(bufs):
                if b is None and grads[i] is not None and groups[plan.group_of[i]]["momentum"] != 0:
                    p = plan.params[i]
                    if self._convention == "torch":
                        b = torch.empty_like(p, memory_format=torch.contiguous_format)
                        if fresh is None:
                            fresh = [False] * len(bufs)
                        fresh[i] = True
                    else:
                        b = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    self._slot_dict(plan, i)[key] = b
                    bufs[i] = b
                    created.append((p, key))
        return fresh, created

    def _aux_slots(self, plan: _Plan, key: str, init: Callable, created: list) -> list:
        dicts = plan.dicts
        out = list(map(dict.get, dicts, repeat(key)))
        for i, b in enumerate(out):
            if b is None:
                p = plan.params[i]
                with torch.no_grad():
                    b = init(p)
                self._slot_dict(plan, i)[key] = b
                out[i] = b
                created.append((p, key))
        return out

    def _step_impl(self) -> None:
        plan = self._current_plan()
        if not plan.params:
            return
        engine = plan.engine
        o = self._options
        grads = list(map(_grad_of, plan.params))
        # GradScaler's fused protocol: grad_scale (the scale, or None once unscaled) and found_inf
        # are 0-d tensors set as attributes around this call.
        grad_scale = 1.0
        found_inf = None
        scale = getattr(self, "grad_scale", None)
        if scale is not None:
            grad_scale = float(scale.double().reciprocal().float())
        inf = getattr(self, "found_inf", None)
        if inf is not None:
            found_inf = bool(inf)
        slots = {}
        created: list = []      # momentum buffers made for this step: dropped unless it updates
        aux_created: list = []  # EMA / accumulators made now: dropped if the step is skipped
        # The engine wants every slot of a would-be update even when found_inf skips it; what is
        # made for a skipped step is dropped again below.
        update_due = not self._accumulating or engine.update_is_due
        key = self._momentum_key
        bufs = list(map(dict.get, plan.dicts, repeat(key)))
        fresh = None
        if any(map(is_, bufs, repeat(None))):
            fresh, created = self._missing_slots(plan, grads, bufs, update_due)
        if plan.dtensor:
            grads = [None if g is None else _local(g, _dtensor_type()) for g in grads]
            bufs = [None if b is None else _local(b, _dtensor_type()) for b in bufs]
        if any(map(is_not, bufs, repeat(None))):
            slots[_core.SlotKind.momentum] = bufs
        if o.use_ema:
            ema = self._aux_slots(plan, _EMA_KEY, lambda p: p.detach().clone(memory_format=torch.contiguous_format),
                                  aux_created)
            slots[_core.SlotKind.average] = [_local(t, _dtensor_type()) for t in ema] if plan.dtensor else ema
        if self._accumulating:
            acc = self._aux_slots(plan, _ACC_KEY, lambda p: torch.zeros_like(p, memory_format=torch.contiguous_format),
                                  aux_created)
            slots[_core.SlotKind.accumulator] = [_local(t, _dtensor_type()) for t in acc] if plan.dtensor else acc
        global_sum_squares = None
        if plan.dtensor and (o.global_clipnorm is not None or o.skip_nonfinite) and found_inf is not True:
            global_sum_squares, nonfinite = self._global_stats(plan, grads, slots or None, grad_scale)
            if nonfinite and o.skip_nonfinite:
                found_inf = True
        variables = [_local(p, _dtensor_type()) for p in plan.params] if plan.dtensor else None
        try:
            try:
                updated, skipped, _ = engine.step(grads, variables, slots=slots or None, fresh_momentum=fresh,
                                                  grad_scale=grad_scale, found_inf=found_inf,
                                                  global_sum_squares=global_sum_squares)
            except (TypeError, ValueError, RuntimeError) as refusal:
                # Slow path, only after the engine refused (and so changed nothing): torch accepts
                # strided gradients and buffers, so retry once with contiguous copies.
                grads, slots = self._contiguous_or_raise(refusal, plan, grads, slots)
                updated, skipped, _ = engine.step(grads, variables, slots=slots or None, fresh_momentum=fresh,
                                                  grad_scale=grad_scale, found_inf=found_inf,
                                                  global_sum_squares=global_sum_squares)
        except BaseException:
            self._forget(created + aux_created)
            raise
        if created and not updated:
            self._forget(created)
        if aux_created and skipped:
            self._forget(aux_created)

    def _contiguous_or_raise(self, refusal: Exception, plan: _Plan, grads: list, slots: dict) -> tuple:
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
                  _core.SlotKind.accumulator: _ACC_KEY}
        for kind, bufs in slots.items():
            for i, b in enumerate(bufs):
                if b is not None and not b.is_contiguous():
                    if plan.dtensor:
                        raise refusal
                    b = bufs[i] = b.contiguous()
                    self._slot_dict(plan, i)[key_of[kind]] = b
                    changed = True
        if not changed:
            if isinstance(refusal, RuntimeError):  # a framework error surfaced through DLPack
                raise TypeError(f"fastsgd.torch.SGD cannot use these tensors: {str(refusal).splitlines()[0]}") \
                    from refusal
            raise refusal
        return out, slots

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
        that updates every parameter with a gradient (``p.grad is None``: skipped, as torch).
        Step pre/post hooks run as with any ``torch.optim.Optimizer``."""
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
