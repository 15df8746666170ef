"""The CPU walk on every ISA level this machine has: counts x misalignments x sentinels,
bit-identical results across levels and thread counts.

The ISA level is chosen once per process (FASTSGD_CPU_ISA), so each level runs the sweep in
a subprocess that saves its results; the parent compares them.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastsgd

SENTINEL = 12345.0
COUNTS = list(range(0, 68))
MISALIGN = [0, 1, 3, 7]
CONFIGS = {
    "plain": dict(learning_rate=0.1),
    "momentum": dict(learning_rate=0.1, momentum=0.9),
    "nesterov_wd_clipvalue": dict(learning_rate=0.05, momentum=0.8, nesterov=True, weight_decay=0.01,
                                  clipvalue=0.3),
    "ema_overwrite_lossscale": dict(learning_rate=0.2, momentum=0.5, use_ema=True, ema_momentum=0.9,
                                    ema_overwrite_frequency=2, loss_scale_factor=8.0),
    "accumulate_ema": dict(learning_rate=0.3, gradient_accumulation_steps=2, use_ema=True),
    "clipnorm": dict(learning_rate=0.1, momentum=0.9, clipnorm=0.5),
    "global_clipnorm": dict(learning_rate=0.1, nesterov=True, momentum=0.9, global_clipnorm=0.7),
}
ELEMENTWISE = ["plain", "momentum", "nesterov_wd_clipvalue", "ema_overwrite_lossscale", "accumulate_ema"]
STEPS = 3


def aligned_buffer(n, dtype, fill):
    """A 64-byte aligned array of n elements filled with `fill`."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n * itemsize + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    arr = raw[start:start + n * itemsize].view(dtype)
    arr[...] = fill
    return arr


def run_sweep(dtype):
    """Runs every config x count x misalignment; returns {key: full buffer incl. sentinels}."""
    out = {}
    rng = np.random.default_rng(1234)
    for name, cfg in CONFIGS.items():
        for off in MISALIGN:
            for n in COUNTS:
                buf = aligned_buffer(n + off + 16, dtype, SENTINEL)
                w = buf[off:off + n]
                w[...] = rng.standard_normal(n)
                gbufs = [aligned_buffer(n + off + 16, dtype, SENTINEL) for _ in range(STEPS)]
                for gb in gbufs:
                    gb[off:off + n] = rng.standard_normal(n) * 2
                opt = fastsgd.SGD(**cfg)
                for s in range(STEPS):
                    opt.apply([gbufs[s][off:off + n]], [w])
                for gb in gbufs:
                    assert np.all(gb[:off] == SENTINEL) and np.all(gb[off + n:] == SENTINEL), "gradient written"
                out[f"{name}/{off}/{n}"] = buf.copy()
    return out


def expected_elementwise(name, w, grads, dtype):
    """The update rule of math.h written again with NumPy, in the same operation order."""
    cfg = CONFIGS[name]
    f = np.dtype(dtype).type
    # a float learning rate is held in float32, as in Keras
    lr, mu = f(np.float32(cfg["learning_rate"])), f(cfg.get("momentum", 0.0))
    wd, cv = cfg.get("weight_decay"), cfg.get("clipvalue")
    lsf, k = cfg.get("loss_scale_factor"), cfg.get("gradient_accumulation_steps")
    beta, freq = f(cfg.get("ema_momentum", 0.99)), cfg.get("ema_overwrite_frequency")
    w = w.copy()
    m, acc, avg = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
    for call, g in enumerate(grads):
        g = g * (f(1) / f(lsf)) if lsf else g.copy()
        it = call // k if k else call
        update = not k or (call + 1) % k == 0
        if k and not update:
            acc = acc + g
        else:
            if k:
                g = (g + acc) / f(k)
                acc = np.zeros_like(acc)
            if cv:
                g = np.clip(g, -f(cv), f(cv))
            if wd:
                w = w * (f(1) - f(wd) * lr)
            if mu == 0:
                w = w - lr * g
            else:
                m = mu * m - lr * g
                w = (w - lr * g) + mu * m if cfg.get("nesterov") else w + m
        if cfg.get("use_ema"):
            keep = f(0) if it == 0 else beta
            avg = keep * avg + (f(1) - keep) * w
            if freq and (it + 1) % freq == 0:
                w = avg.copy()
    return w


SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {here!r})
    import test_kernels as t, fastsgd
    assert fastsgd.cpu_info()["active"] == {level!r}, fastsgd.cpu_info()
    for dt in ("float32", "float64"):
        np.savez({out!r} + "_" + dt + ".npz", **t.run_sweep(dt))
    """
)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    levels = fastsgd.cpu_info()["available"]
    results = {}
    tmp = tmp_path_factory.mktemp("isa")
    for level in levels:
        out = str(tmp / level)
        env = dict(os.environ, FASTSGD_CPU_ISA=level)
        code = SCRIPT.format(here=os.path.dirname(__file__), level=level, out=out)
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        results[level] = {dt: dict(np.load(f"{out}_{dt}.npz")) for dt in ("float32", "float64")}
    return results


def test_every_level_matches_the_formula_and_keeps_sentinels(sweeps):
    for level, by_dtype in sweeps.items():
        for dt, results in by_dtype.items():
            rng = np.random.default_rng(1234)
            for name in CONFIGS:
                for off in MISALIGN:
                    for n in COUNTS:
                        w0 = rng.standard_normal(n).astype(dt)
                        grads = [(rng.standard_normal(n) * 2).astype(dt) for _ in range(STEPS)]
                        buf = results[f"{name}/{off}/{n}"]
                        assert np.all(buf[:off] == SENTINEL), (level, dt, name, off, n, "head sentinel")
                        assert np.all(buf[off + n:] == SENTINEL), (level, dt, name, off, n, "tail sentinel")
                        if name in ELEMENTWISE:
                            want = expected_elementwise(name, w0, grads, dt)
                            got = buf[off:off + n]
                            assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (
                                level, dt, name, off, n, got, want)


def test_levels_are_bit_identical(sweeps):
    levels = list(sweeps)
    if len(levels) < 2:
        pytest.skip(f"this CPU offers only one ISA level ({levels}); nothing to compare")
    first = sweeps[levels[0]]
    for level in levels[1:]:
        for dt in first:
            for key, buf in first[dt].items():
                other = sweeps[level][dt][key]
                assert np.array_equal(buf.view(np.uint8), other.view(np.uint8)), (levels[0], level, dt, key)


def test_unknown_isa_level_fails_clearly():
    env = dict(os.environ, FASTSGD_CPU_ISA="pentium-mmx")
    code = "import numpy as np, fastsgd; fastsgd.SGD(0.1).apply([np.ones(2, np.float32)], [np.ones(2, np.float32)])"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "unknown level" in proc.stderr and "pentium-mmx" in proc.stderr


def _multi_tensor_run(threads, cfg):
    fastsgd.set_num_threads(threads)
    try:
        rng = np.random.default_rng(7)
        sizes = [300_001, 1, 4096, 65_537, 129, 200_000] + [int(s) for s in rng.integers(1, 5000, 200)]
        variables = [rng.standard_normal(s).astype(np.float32) for s in sizes]
        opt = fastsgd.SGD(**cfg)
        for _ in range(3):
            grads = [rng.standard_normal(s).astype(np.float32) for s in sizes]
            opt.apply(grads, variables)
        return variables, opt.state_dict()
    finally:
        fastsgd.set_num_threads(0)


@pytest.mark.parametrize("cfg", [
    dict(learning_rate=0.1, momentum=0.9, global_clipnorm=5.0, use_ema=True),
    dict(learning_rate=0.1, momentum=0.9, nesterov=True, clipnorm=2.0, weight_decay=0.01),
])
def test_one_and_two_threads_are_bit_identical(cfg):
    v1, s1 = _multi_tensor_run(1, cfg)
    v2, s2 = _multi_tensor_run(2, cfg)
    for a, b in zip(v1, v2):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    for kind in s1["slots"]:
        for a, b in zip(s1["slots"][kind], s2["slots"][kind]):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_cpu_info_reports_levels():
    info = fastsgd.cpu_info()
    assert info["active"] in info["available"]
    assert info["threads"] >= 1
    json.dumps(info)
