"""Low-precision variables: float32 master weights, remainders and stochastic rounding.

Oracles: a float32 run of the same gradients (the master a 16-bit run must reproduce bit for
bit), NumPy's own float32 arithmetic (the value stochastic rounding must be unbiased about), and
the engine itself under other ISA levels, thread counts and a checkpoint resume.
"""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import fastsgd
from fastsgd import _core

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _grads(rng, steps, n, dtype):
    return [(rng.standard_normal(n) * 1e-2).astype(dtype) for _ in range(steps)]


# ---- remainders and masters reproduce a float32 run bit for bit ---------------------------------

@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, True)])
def test_remainder_and_master_reproduce_float32_run(momentum, nesterov, stochastic):
    rng = np.random.default_rng(7)
    n, steps = 4099, 200
    w0 = rng.standard_normal(n).astype(BF16)
    grads = _grads(rng, steps, n, BF16)
    kw = dict(learning_rate=0.05, momentum=momentum, nesterov=nesterov, weight_decay=0.01)
    ref = w0.astype(np.float32)
    opt_ref = fastsgd.SGD(**kw)
    w_rem, w_mas = w0.copy(), w0.copy()
    opt_rem = fastsgd.SGD(master_weights="remainder", stochastic_rounding=stochastic, seed=3, **kw)
    opt_mas = fastsgd.SGD(master_weights="float32", stochastic_rounding=stochastic, seed=3, **kw)
    for g in grads:
        opt_ref.apply([g.astype(np.float32)], [ref])
        opt_rem.apply([g], [w_rem])
        opt_mas.apply([g], [w_mas])
    u = _bits(ref)
    rem = opt_rem.state_dict()["slots"]["remainder"][0]
    assert rem.dtype == np.uint16
    np.testing.assert_array_equal(rem, (u & 0xFFFF).astype(np.uint16))
    up = _bits(w_rem).astype(np.int64) - (u >> 16).astype(np.int64)
    assert set(np.unique(up)) <= {0, 1}
    master = opt_mas.state_dict()["slots"]["master"][0]
    np.testing.assert_array_equal(_bits(master), u)
    if not stochastic:
        # The master form stores round-to-nearest-even; remainders round ties away from zero,
        # which differs only where the low half is exactly 0x8000.
        np.testing.assert_array_equal(_bits(w_mas), _bits(ref.astype(BF16)))
        np.testing.assert_array_equal(up, ((u & 0xFFFF) >= 0x8000).astype(np.int64))
    else:
        # Rounded up or down, never further: the stored variable brackets the master.
        lo = (u >> 16).astype(np.int64)
        assert set(np.unique(_bits(w_mas).astype(np.int64) - lo)) <= {0, 1}
        assert 0 < up.mean() < 1


def test_bfloat16_to_nearest_stalls_where_the_master_moves():
    """The motivating failure: updates below half a bfloat16 ulp vanish without a master."""
    n = 1024
    w_plain = np.ones(n, BF16)
    w_rem = np.ones(n, BF16)
    g = np.full(n, 1e-3, BF16)
    plain = fastsgd.SGD(learning_rate=1.0)
    rem = fastsgd.SGD(learning_rate=1.0, master_weights="remainder")
    for _ in range(100):
        plain.apply([g], [w_plain])
        rem.apply([g], [w_rem])
    assert np.all(w_plain.astype(np.float32) == 1.0)
    assert np.all(np.abs(w_rem.astype(np.float32) - (1.0 - 100 * float(g[0]))) < 2**-7)


# ---- stochastic rounding is unbiased -------------------------------------------------------------

@pytest.mark.parametrize("dtype,x,g,lr", [
    ("bfloat16", 1.0, 2**-8, 0.25),      # a quarter of bfloat16's ulp below 1 (ulp 2^-8 there)
    ("bfloat16", 3.0, -2**-6, 1 / 3),    # a third of an ulp above 3
    ("float16", 1.0, -2**-10, 0.3),      # 0.3 of float16's ulp above 1 (ulp 2^-10)
    ("float16", 2**-20, -2**-24, 0.7),   # subnormal float16, ulp 2^-24
])
def test_stochastic_rounding_is_unbiased(dtype, x, g, lr):
    """E[SR(y)] = y exactly (P(up) = (y - lo) / ulp), so the mean of N independent roundings
    has standard deviation ulp * sqrt(p (1 - p) / N) <= ulp / (2 sqrt(N)); it must lie within
    5 of them of y, where round to nearest is a whole |y - nearest| away."""
    dt = BF16 if dtype == "bfloat16" else np.dtype(np.float16)
    n = 1 << 17
    w = np.full(n, x, dt)
    g = np.full(n, g, dt)
    lr = np.float32(lr)
    y = np.float32(np.float32(w[0]) - lr * np.float32(g[0]))   # what the engine computes
    opt = fastsgd.SGD(learning_rate=float(lr), stochastic_rounding=True, seed=11)
    opt.apply([g], [w])
    vals = w.astype(np.float64)
    lo, hi = np.unique(vals)[[0, -1]]
    assert lo < y < hi, "the rounding must bracket the exact value"
    ulp = hi - lo
    p = (float(y) - lo) / ulp
    sigma = ulp * np.sqrt(p * (1 - p) / n)
    assert abs(vals.mean() - float(y)) <= 5 * sigma
    assert abs(np.float64(np.float32(y).astype(dt)) - float(y)) > 20 * sigma  # RN's bias, for scale


def test_stochastic_rounding_draws_fresh_bits_each_step():
    """The same update every step must not round the same way every step (the key has the step)."""
    n = 1 << 14
    w = np.ones(n, BF16)
    g = np.full(n, 2**-11, BF16)   # an eighth of an ulp below 1.0 (ulp 2^-8 under 1: a quarter)
    opt = fastsgd.SGD(learning_rate=1.0, stochastic_rounding=True, seed=5)
    first = []
    for _ in range(2):
        w[:] = np.ones(n, BF16)
        opt.apply([g], [w])
        first.append(_bits(w).copy())
    assert not np.array_equal(first[0], first[1])


# ---- reproducible: ISA levels, threads, resume -----------------------------------------------------

_SCRIPT = r"""
import hashlib, sys, numpy as np, ml_dtypes, fastsgd
BF16 = np.dtype(ml_dtypes.bfloat16)
fastsgd.set_num_threads(int(sys.argv[1]))
h = hashlib.sha256()
for form in (None, "float32", "remainder"):
    for dt in (BF16, np.dtype(np.float16)):
        if form == "remainder" and dt != BF16:
            continue
        rng = np.random.default_rng(1)
        ws = [rng.standard_normal(n).astype(dt) for n in (200_003, 77, 1)]
        opt = fastsgd.SGD(learning_rate=0.01, momentum=0.9, master_weights=form, stochastic_rounding=True, seed=99)
        for _ in range(3):
            opt.apply([rng.standard_normal(w.size).astype(dt) for w in ws], ws)
        for w in ws:
            h.update(w.tobytes())
print(h.hexdigest())
"""


def _run_script(threads, isa=None):
    env = dict(os.environ)
    env.pop("FASTSGD_CPU_ISA", None)
    if isa:
        env["FASTSGD_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(threads)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_stochastic_rounding_identical_across_isa_levels_and_threads():
    levels = fastsgd.cpu_info()["available"]
    digests = {(isa, 1): _run_script(1, isa) for isa in levels}
    digests[(levels[-1], 2)] = _run_script(2, levels[-1])
    assert len(set(digests.values())) == 1, digests


def test_two_threads_really_split_and_agree():
    rng = np.random.default_rng(3)
    n = 300_001
    w0 = rng.standard_normal(n).astype(BF16)
    grads = _grads(rng, 4, n, BF16)
    outs = []
    for threads in (1, 2):
        fastsgd.set_num_threads(threads)
        try:
            w = w0.copy()
            opt = fastsgd.SGD(learning_rate=0.1, master_weights="remainder", stochastic_rounding=True, seed=4)
            for g in grads:
                opt.apply([g], [w])
            outs.append((_bits(w).copy(), opt.state_dict()["slots"]["remainder"][0]))
        finally:
            fastsgd.set_num_threads(0)
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("form", [None, "float32", "remainder"])
def test_resume_reproduces_stochastic_rounding(form):
    rng = np.random.default_rng(9)
    w0 = [rng.standard_normal(513).astype(BF16), rng.standard_normal(7).astype(np.float32)]
    grads = [[rng.standard_normal(w.size).astype(w.dtype) for w in w0] for _ in range(12)]
    kw = dict(learning_rate=0.03, momentum=0.5, master_weights=form, stochastic_rounding=True)
    straight = [w.copy() for w in w0]
    opt = fastsgd.SGD(seed=1234, **kw)
    for g in grads:
        opt.apply(g, straight)

    first = [w.copy() for w in w0]
    opt1 = fastsgd.SGD(seed=1234, **kw)
    for g in grads[:5]:
        opt1.apply(g, first)
    state = opt1.state_dict()
    assert state["seed"] == 1234
    if form is not None:
        kind = "master" if form == "float32" else "remainder"
        assert state["slots"][kind][1] is None   # the float32 variable has no master
    resumed = [w.copy() for w in first]
    opt2 = fastsgd.SGD(**kw)                     # default seed: the checkpoint carries it
    opt2.load_state_dict(state)
    for g in grads[5:]:
        opt2.apply(g, resumed)
    assert opt2.seed == 1234
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("saved_sr", [False, True])
def test_remainder_state_refused_under_the_other_split(saved_sr):
    """A remainder is the master's low half only under the rule that split it: a state saved
    with (without) stochastic rounding is refused by an optimizer without (with) it, changing
    nothing, and accepted by one with the same rule."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal(300).astype(BF16)
    g = (rng.standard_normal(300) * 0.01).astype(BF16)
    src = fastsgd.SGD(learning_rate=0.1, master_weights="remainder", stochastic_rounding=saved_sr, seed=8)
    for _ in range(3):
        src.apply([g], [w])
    state = src.state_dict()
    assert state["remainder_split"] == ("stochastic" if saved_sr else "nearest")
    other_w = w.copy()
    other = fastsgd.SGD(learning_rate=0.1, master_weights="remainder", stochastic_rounding=not saved_sr, seed=8)
    other.apply([g], [other_w])
    before = other.state_dict()
    with pytest.raises(ValueError, match="remainder_split"):
        other.load_state_dict(state)
    after = other.state_dict()
    assert after["iterations"] == before["iterations"]
    np.testing.assert_array_equal(after["slots"]["remainder"][0], before["slots"]["remainder"][0])
    same = fastsgd.SGD(learning_rate=0.1, master_weights="remainder", stochastic_rounding=saved_sr)
    same.load_state_dict(state)
    with pytest.raises(ValueError, match="remainder_split"):
        fastsgd.SGD(master_weights="remainder").load_state_dict({**state, "remainder_split": "up"})


# ---- modes off, other dtypes, refusals ----------------------------------------------------------

def test_wide_variables_are_unaffected_by_the_modes():
    rng = np.random.default_rng(2)
    w = [rng.standard_normal(300).astype(np.float32), rng.standard_normal(30)]
    g = [rng.standard_normal(300).astype(np.float32), rng.standard_normal(30)]
    a, b = [x.copy() for x in w], [x.copy() for x in w]
    fastsgd.SGD(learning_rate=0.1, momentum=0.9).apply(g, a)
    opt = fastsgd.SGD(learning_rate=0.1, momentum=0.9, master_weights="float32", stochastic_rounding=True, seed=8)
    opt.apply(g, b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert "master" not in opt.state_dict()["slots"]   # no 16-bit variable, no master slot


def test_modes_off_match_plain_16bit_step():
    rng = np.random.default_rng(4)
    w = rng.standard_normal(1000).astype(BF16)
    g = rng.standard_normal(1000).astype(BF16)
    a, b = w.copy(), w.copy()
    fastsgd.SGD(learning_rate=0.1).apply([g], [a])
    fastsgd.SGD(learning_rate=0.1, master_weights=None, stochastic_rounding=False, seed=5).apply([g], [b])
    np.testing.assert_array_equal(_bits(a), _bits(b))
    assert "master_weights" not in fastsgd.SGD().get_config()
    cfg = fastsgd.SGD(master_weights="remainder", stochastic_rounding=True, seed=5).get_config()
    assert (cfg["master_weights"], cfg["stochastic_rounding"], cfg["seed"]) == ("remainder", True, 5)
    assert fastsgd.SGD.from_config(cfg).seed == 5


def test_refusals_name_the_option_and_change_nothing():
    with pytest.raises(ValueError, match="master_weights"):
        fastsgd.SGD(master_weights="float64")
    with pytest.raises(ValueError, match="stochastic_rounding"):
        fastsgd.SGD(stochastic_rounding=True, use_ema=True)
    with pytest.raises(ValueError, match="master_weights"):
        fastsgd.SGD(master_weights="float32", slot_dtype="variable")
    with pytest.raises(ValueError, match="seed"):
        fastsgd.SGD(seed=-1)
    with pytest.raises(TypeError, match="seed"):
        fastsgd.SGD(seed=1.5)
    w = np.ones(4, np.float16)
    opt = fastsgd.SGD(master_weights="remainder")
    with pytest.raises(ValueError, match="master_weights"):
        opt.apply([np.ones(4, np.float16)], [w])
    assert not opt.built and opt.iterations == 0 and np.all(w == 1)


def test_master_starts_from_the_variable_and_caller_owned_slots_change_in_place():
    w = np.array([1.5, -2.25, 3.0], BF16)
    opt = fastsgd.SGD(master_weights="float32")
    opt.build([w])
    np.testing.assert_array_equal(opt.state_dict()["slots"]["master"][0], w.astype(np.float32))

    options = _core.Options(master_weights=_core.MasterForm.remainder, caller_owned_slots=True,
                            stochastic_rounding=True, seed=3)
    engine = _core.Engine(options)
    v = np.ones(5, BF16)
    rem = np.zeros(5, BF16)   # remainder slots travel as 16-bit (bfloat16-typed) raw bits
    engine.build([v])
    with pytest.raises(ValueError, match=r"slots\[remainder\]"):
        engine.step([np.ones(5, BF16)], learning_rate=1e-3)
    assert engine.raw_iterations == 0 and np.all(v.astype(np.float32) == 1)
    ptr = rem.ctypes.data
    engine.step([np.ones(5, BF16)], learning_rate=1e-3, slots={_core.SlotKind.remainder: [rem]})
    assert rem.ctypes.data == ptr and np.any(rem.view(np.uint16) != 0)
    joined_hi = v.view(np.uint16).astype(np.uint32)
    assert np.all((joined_hi - (np.float32(1 - np.float32(1e-3)).view(np.uint32) >> 16)) <= 1)


@pytest.mark.parametrize("form", ["float32", "remainder"])
def test_outside_writes_are_overwritten_unless_masters_are_resynced(form):
    """The update runs on the master: a variable written from outside is replaced by the next
    step (a float32 master) or joined with a stale low half (a remainder), unless
    resync_masters() takes the variables' values as the masters again; after it the step
    moves from the written value exactly as a fresh optimizer would."""
    rng = np.random.default_rng(12)
    w = rng.standard_normal(257).astype(BF16)
    g = (rng.standard_normal(257) * 0.01).astype(BF16)
    written = (rng.standard_normal(257) * 3).astype(BF16)
    expect = written.copy()
    fresh = fastsgd.SGD(learning_rate=0.5, master_weights=form)
    fresh.apply([g], [expect])       # built on `written`: its master is `written` widened
    opt = fastsgd.SGD(learning_rate=0.5, master_weights=form)
    for _ in range(3):
        opt.apply([g], [w])
    w[...] = written
    opt.apply([g], [w])
    if form == "float32":            # runs from the old master: the write is lost
        assert np.abs(w.astype(np.float32) - expect.astype(np.float32)).max() > 1.0
    else:                            # joined with the old low halves: the write is kept, inexactly
        assert not np.array_equal(_bits(w), _bits(expect))
    w[...] = written
    opt.resync_masters()
    opt.apply([g], [w])
    np.testing.assert_array_equal(_bits(w), _bits(expect))
