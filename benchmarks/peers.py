"""The contenders of bench_step.py: fastsgd, its peers and the C roofline loop.

Every peer implements the same Keras-3 SGD step on float32 tensors for one of the configs
below, and exposes ``step()``. Variables and gradients are shared by all peers of a workload
(the update is in place and the timing does not depend on the values); each peer owns its
optimizer state (momentum, EMA). Keras keeps its own variables when it copies on creation.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
EMA_MOMENTUM = 0.99
GLOBAL_CLIPNORM = 1.0

#: config name -> fastsgd/Keras SGD keyword arguments (learning_rate=LR is added).
CONFIGS: dict = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=MOMENTUM),
    "nesterov": dict(momentum=MOMENTUM, nesterov=True),
    "momentum_wd": dict(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
    "momentum_ema": dict(momentum=MOMENTUM, use_ema=True, ema_momentum=EMA_MOMENTUM),
    "momentum_gclip": dict(momentum=MOMENTUM, global_clipnorm=GLOBAL_CLIPNORM),
}

#: Minimum memory traffic of one step, bytes per fp32 element, and what it counts.
BYTE_MODEL: dict = {
    "plain": (12, "read w, g; write w"),
    "momentum": (20, "read w, g, m; write w, m"),
    "nesterov": (20, "read w, g, m; write w, m"),
    "momentum_wd": (20, "read w, g, m; write w, m (decay folded in)"),
    "momentum_ema": (28, "read w, g, m, avg; write w, m, avg"),
    "momentum_gclip": (24, "norm pass: read g; update pass: read w, g, m; write w, m"),
}


def slots_of(config: dict) -> int:
    """Optimizer state buffers per variable element (momentum, EMA)."""
    return int(config.get("momentum", 0) > 0) + int(bool(config.get("use_ema")))


@dataclass
class Data:
    """The shared tensors of one workload: NumPy arrays and torch views of the same memory."""

    shapes: list
    w: list = field(default_factory=list)   # NumPy variables
    g: list = field(default_factory=list)   # NumPy gradients
    tw: list = field(default_factory=list)  # torch.nn.Parameter over the same memory as w (grad = tg)
    tg: list = field(default_factory=list)  # torch tensors over the same memory as g

    @property
    def numel(self) -> int:
        return int(sum(a.size for a in self.w))

    @classmethod
    def make(cls, shapes: list, seed: int = 0, with_torch: bool = True) -> "Data":
        """Allocates seeded float32 variables and gradients (gradients are small normals)."""
        rng = np.random.default_rng(seed)
        d = cls(shapes=list(shapes))
        for s in shapes:
            d.w.append(rng.standard_normal(s, dtype=np.float32))
            g = rng.standard_normal(s, dtype=np.float32)
            g *= np.float32(1e-2)
            d.g.append(g)
        if with_torch:
            import torch

            for w, g in zip(d.w, d.g):
                p = torch.nn.Parameter(torch.from_numpy(w))
                tg = torch.from_numpy(g)
                p.grad = tg
                d.tw.append(p)
                d.tg.append(tg)
        return d


class Peer:
    """One contender. ``threaded`` peers are run at each thread count of the benchmark."""

    name = "?"
    threaded = True
    #: extra float32 buffers per element this peer allocates beyond its slots (Keras's own
    #: variables, NumPy temporaries), for the memory estimate
    extra_buffers = 0

    @staticmethod
    def available() -> Optional[str]:
        """None when usable here, else why not."""
        return None

    def __init__(self, data: Data, config: dict) -> None:
        self.data, self.config = data, config
        self.threads = 1

    def step(self) -> None:
        raise NotImplementedError


# ---- fastsgd ----------------------------------------------------------------------------------


class FastSGD(Peer):
    """fastsgd.SGD.apply on NumPy arrays: one native call per step."""

    name = "fastsgd"

    @staticmethod
    def available() -> Optional[str]:
        try:
            import fastsgd  # noqa: F401
        except Exception as e:  # pragma: no cover - reported, not raised
            return f"import fastsgd failed: {e}"
        return None

    def __init__(self, data: Data, config: dict) -> None:
        super().__init__(data, config)
        import fastsgd

        self.opt = fastsgd.SGD(learning_rate=LR, **config)
        self.vars, self.grads = self._tensors(data)

    def _tensors(self, data: Data):
        return data.w, data.g

    def step(self) -> None:
        self.opt.apply(self.grads, self.vars)


class FastSGDTorch(FastSGD):
    """fastsgd.SGD.apply on torch CPU tensors (nn.Parameter variables, plain-tensor gradients)."""

    name = "fastsgd[torch]"

    @staticmethod
    def available() -> Optional[str]:
        return FastSGD.available() or TorchSGD.available()

    def _tensors(self, data: Data):
        return data.tw, data.tg


class FastSGDTorchOptimizer(Peer):
    """fastsgd.torch.SGD: the drop-in torch.optim.Optimizer, timed as ``opt.step()`` on
    nn.Parameters whose ``.grad`` is set (what a training loop calls)."""

    name = "fastsgd.torch.SGD"

    @staticmethod
    def available() -> Optional[str]:
        return FastSGD.available() or TorchSGD.available()

    def __init__(self, data: Data, config: dict) -> None:
        super().__init__(data, config)
        import fastsgd.torch

        extras = {}
        if config.get("use_ema"):
            extras = dict(use_ema=True, ema_momentum=float(config.get("ema_momentum", EMA_MOMENTUM)))
        if config.get("global_clipnorm"):
            extras["global_clipnorm"] = float(config["global_clipnorm"])
        self.opt = fastsgd.torch.SGD(data.tw, lr=LR, momentum=float(config.get("momentum", 0.0)),
                                     nesterov=bool(config.get("nesterov")),
                                     weight_decay=float(config.get("weight_decay") or 0.0), **extras)

    def step(self) -> None:
        self.opt.step()


# ---- the C roofline ---------------------------------------------------------------------------

_C_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "roofline.c")
_C_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]
_lib = None
_lib_error: Optional[str] = None
#: C loop thread rule, the same as fastsgd's cpu_backend.cpp: one thread per 64K elements.
C_MIN_ELEMENTS_PER_THREAD = 65536


class _Set(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int), ("w", ctypes.c_void_p), ("g", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("avg", ctypes.c_void_p), ("offs", ctypes.c_void_p)]


class _Config(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("decay", ctypes.c_int), ("ema", ctypes.c_int), ("gclip", ctypes.c_int),
                ("lr", ctypes.c_float), ("momentum", ctypes.c_float), ("decay_factor", ctypes.c_float),
                ("keep", ctypes.c_float), ("take", ctypes.c_float), ("clipnorm", ctypes.c_double)]


def c_library():
    """Compiles roofline.c with cc into a temporary directory (once) and loads it."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        _lib_error = f"no C compiler ({cc})"
        return None
    tmp = tempfile.mkdtemp(prefix="fastsgd_roofline_")
    out = os.path.join(tmp, "libroofline.so")
    proc = subprocess.run([cc, *_C_FLAGS, _C_SOURCE, "-o", out, "-lm"], capture_output=True, text=True)
    if proc.returncode != 0:
        _lib_error = f"{cc} failed: {proc.stderr.strip()[:400]}"
        return None
    lib = ctypes.CDLL(out)
    lib.rl_step.argtypes = [ctypes.POINTER(_Set), ctypes.POINTER(_Config), ctypes.c_int]
    lib.rl_step.restype = None
    lib.rl_time_step.argtypes = [ctypes.POINTER(_Set), ctypes.POINTER(_Config), ctypes.c_int, ctypes.c_int]
    lib.rl_time_step.restype = ctypes.c_double
    lib.rl_triad.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64,
                             ctypes.c_int]
    lib.rl_triad.restype = None
    _lib = lib
    return lib


def c_compiler_line() -> str:
    """The compile command, for the report."""
    return f"{os.environ.get('CC', 'cc')} {' '.join(_C_FLAGS)} roofline.c"


def c_threads(requested: int, numel: int) -> int:
    """Threads the C loop uses: as fastsgd, at most one per C_MIN_ELEMENTS_PER_THREAD elements."""
    return max(1, min(requested, numel // C_MIN_ELEMENTS_PER_THREAD))


class CLoop(Peer):
    """The one-pass fused update in plain C (restrict, -O3 -march=native, no contraction)."""

    name = "C loop"

    @staticmethod
    def available() -> Optional[str]:
        c_library()
        return _lib_error

    def __init__(self, data: Data, config: dict) -> None:
        super().__init__(data, config)
        self.lib = c_library()
        n = len(data.w)
        ptrs = lambda arrays: (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])  # noqa: E731
        mom = float(config.get("momentum", 0.0))
        self.m = [np.zeros(a.size, np.float32) for a in data.w] if mom > 0 else None
        self.avg = [a.copy().reshape(-1) for a in data.w] if config.get("use_ema") else None
        self._keep = [ptrs(data.w), ptrs(data.g), ptrs(self.m) if self.m else None,
                      ptrs(self.avg) if self.avg else None,
                      np.concatenate([[0], np.cumsum([a.size for a in data.w])]).astype(np.int64)]
        w, g, m, avg, offs = self._keep
        self.set = _Set(n, ctypes.cast(w, ctypes.c_void_p), ctypes.cast(g, ctypes.c_void_p),
                        ctypes.cast(m, ctypes.c_void_p) if m else None,
                        ctypes.cast(avg, ctypes.c_void_p) if avg else None, offs.ctypes.data)
        kind = 0 if mom == 0 else (2 if config.get("nesterov") else 1)
        wd = config.get("weight_decay")
        lr = np.float32(LR)
        decay_factor = np.float32(1) - np.float32(wd or 0) * lr
        keep = np.float32(config.get("ema_momentum", EMA_MOMENTUM))
        self.cfg = _Config(kind, int(bool(wd)), int(bool(config.get("use_ema"))),
                           int(bool(config.get("global_clipnorm"))), lr, mom, decay_factor, keep,
                           np.float32(1) - keep, float(config.get("global_clipnorm") or 0.0))
        self._set_ref, self._cfg_ref = ctypes.byref(self.set), ctypes.byref(self.cfg)
        self.numel = data.numel

    def effective_threads(self) -> int:
        return c_threads(self.threads, self.numel)

    def step(self) -> None:
        self.lib.rl_step(self._set_ref, self._cfg_ref, self.effective_threads())

    def time_in_c(self, reps: int) -> float:
        """Median seconds per step timed inside C (no Python or ctypes call in it)."""
        return self.lib.rl_time_step(self._set_ref, self._cfg_ref, self.effective_threads(), reps) * 1e-9


def triad_gbps(numel: int, threads: int, repeats: int = 7) -> float:
    """STREAM triad a = b + s*c over ``numel`` float32s, best-of-``repeats`` GB/s (12 B/element:
    two reads and one write, no write-allocate counted, as STREAM does)."""
    import time

    lib = c_library()
    if lib is None:
        return float("nan")
    a = np.zeros(numel, np.float32)
    b = np.ones(numel, np.float32)
    c = np.full(numel, 2.0, np.float32)
    lib.rl_triad(a.ctypes.data, b.ctypes.data, c.ctypes.data, 3.0, numel, threads)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        lib.rl_triad(a.ctypes.data, b.ctypes.data, c.ctypes.data, 3.0, numel, threads)
        best = min(best, time.perf_counter() - t0)
    return 12.0 * numel / best / 1e9


# ---- naive NumPy ------------------------------------------------------------------------------


class NaiveNumPy(Peer):
    """Per-tensor NumPy ops spelling Keras's rule (single-threaded; temporaries as written)."""

    name = "numpy"
    threaded = False
    extra_buffers = 1

    def __init__(self, data: Data, config: dict) -> None:
        super().__init__(data, config)
        self.mom = float(config.get("momentum", 0.0))
        self.m = [np.zeros_like(a) for a in data.w] if self.mom > 0 else None
        self.avg = [a.copy() for a in data.w] if config.get("use_ema") else None
        wd = config.get("weight_decay")
        self.df = np.float32(1 - wd * LR) if wd else None
        self.keep = np.float32(config.get("ema_momentum", EMA_MOMENTUM))
        self.clip = config.get("global_clipnorm")
        self.nesterov = bool(config.get("nesterov"))

    def step(self) -> None:
        lr, mom = np.float32(LR), np.float32(self.mom)
        grads = self.data.g
        if self.clip:
            norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads))
            scale = np.float32(self.clip / max(norm, self.clip))
            grads = [g * scale for g in grads]
        for i, (w, g) in enumerate(zip(self.data.w, grads)):
            if self.df is not None:
                w *= self.df
            if self.m is None:
                w -= lr * g
            else:
                m = self.m[i]
                m *= mom
                m -= lr * g
                if self.nesterov:
                    w += mom * m - lr * g
                else:
                    w += m
            if self.avg is not None:
                a = self.avg[i]
                a *= self.keep
                a += (np.float32(1) - self.keep) * w


# ---- torch.optim.SGD --------------------------------------------------------------------------


class TorchSGD(Peer):
    """torch.optim.SGD with weight_decay as torch defines it (L2 added to g: same bytes as
    Keras's decoupled decay), EMA as one torch._foreach_lerp_ pass after the step, global
    clipping by torch.nn.utils.clip_grad_norm_ before it."""

    name = "torch"
    mode: dict = {}

    @staticmethod
    def available() -> Optional[str]:
        try:
            import torch  # noqa: F401
        except Exception as e:  # pragma: no cover
            return f"torch not importable: {e}"
        return None

    def __init__(self, data: Data, config: dict) -> None:
        super().__init__(data, config)
        import torch

        self.torch = torch
        self.opt = torch.optim.SGD(data.tw, lr=LR, momentum=float(config.get("momentum", 0.0)),
                                   nesterov=bool(config.get("nesterov")),
                                   weight_decay=float(config.get("weight_decay") or 0.0), **self.mode)
        self.params = [p.detach() for p in data.tw]
        self.avg = [p.clone() for p in self.params] if config.get("use_ema") else None
        self.weight = 1.0 - float(config.get("ema_momentum", EMA_MOMENTUM))
        self.clip = config.get("global_clipnorm")

    def step(self) -> None:
        torch = self.torch
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.data.tw, self.clip)
        self.opt.step()
        if self.avg is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.avg, self.params, self.weight)


class TorchForLoop(TorchSGD):
    name = "torch for-loop"
    mode = {"foreach": False}


class TorchForeach(TorchSGD):
    name = "torch foreach"
    mode = {"foreach": True}


class TorchFused(TorchSGD):
    name = "torch fused"
    mode = {"fused": True}


# ---- Keras 3 ----------------------------------------------------------------------------------


class KerasSGD(Peer):
    """keras.optimizers.SGD (Keras 3, torch backend): keras.Variable + opt.apply(grads, vars)."""

    name = "keras"
    extra_buffers = 1

    @staticmethod
    def available() -> Optional[str]:
        os.environ.setdefault("KERAS_BACKEND", "torch")
        try:
            import keras
        except Exception as e:
            return f"keras not importable: {e}"
        if keras.backend.backend() != "torch":
            return f"keras backend is {keras.backend.backend()!r}, not torch (set KERAS_BACKEND=torch)"
        return None

    def __init__(self, data: Data, config: dict) -> None:
        super().__init__(data, config)
        import keras

        self.vars = [keras.Variable(w.copy()) for w in data.w]
        self.grads = data.tg
        self.opt = keras.optimizers.SGD(learning_rate=LR, **config)

    def step(self) -> None:
        self.opt.apply(self.grads, self.vars)


class FastSGDKeras(KerasSGD):
    """fastsgd.keras.SGD (the Keras 3 optimizer of model.fit): the same keras.Variables and
    opt.apply(grads, vars) as the keras peer, one native call per step."""

    name = "fastsgd.keras"

    @staticmethod
    def available() -> Optional[str]:
        reason = KerasSGD.available()
        if reason:
            return reason
        try:
            import fastsgd.keras  # noqa: F401
        except Exception as e:
            return f"import fastsgd.keras failed: {e}"
        return None

    def __init__(self, data: Data, config: dict) -> None:
        Peer.__init__(self, data, config)
        import keras

        import fastsgd.keras

        self.vars = [keras.Variable(w.copy()) for w in data.w]
        self.grads = data.tg
        self.opt = fastsgd.keras.SGD(learning_rate=LR, **config)


# ---- optax (only when jax and optax are importable) -------------------------------------------


class Optax(Peer):
    """optax.sgd under jax.jit with donated buffers (JAX picks its own threads)."""

    name = "optax"
    threaded = False
    extra_buffers = 2

    @staticmethod
    def available() -> Optional[str]:
        try:
            import jax  # noqa: F401
            import optax  # noqa: F401
        except Exception as e:
            return f"jax/optax not importable ({type(e).__name__}: {e})"
        return None

    def __init__(self, data: Data, config: dict) -> None:
        super().__init__(data, config)
        import jax
        import jax.numpy as jnp
        import optax

        parts = []
        if config.get("global_clipnorm"):
            parts.append(optax.clip_by_global_norm(float(config["global_clipnorm"])))
        mom = float(config.get("momentum", 0.0))
        parts.append(optax.sgd(LR, momentum=mom or None, nesterov=bool(config.get("nesterov"))))
        tx = optax.chain(*parts)
        wd = config.get("weight_decay")
        ema = 1.0 - float(config.get("ema_momentum", EMA_MOMENTUM)) if config.get("use_ema") else None

        def update(params, state, avg, grads):
            if wd:
                params = [p * (1 - wd * LR) for p in params]
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            if ema is not None:
                avg = optax.incremental_update(params, avg, ema)
            return params, state, avg

        self.fn = jax.jit(update, donate_argnums=(0, 1, 2))
        self.params = [jnp.asarray(w) for w in data.w]
        self.grads = [jnp.asarray(g) for g in data.g]
        self.state = tx.init(self.params)
        self.avg = [jnp.array(p) for p in self.params] if ema is not None else None
        self.jax = jax

    def step(self) -> None:
        self.params, self.state, self.avg = self.fn(self.params, self.state, self.avg, self.grads)
        self.jax.block_until_ready(self.params)


#: Every peer, in report order.
PEERS: list = [CLoop, FastSGD, FastSGDTorch, FastSGDTorchOptimizer, TorchForLoop, TorchForeach, TorchFused, KerasSGD,
               FastSGDKeras, NaiveNumPy, Optax]
PEER_BY_NAME: dict = {p.name: p for p in PEERS}
