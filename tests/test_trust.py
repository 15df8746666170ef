"""Issue 14: every refused call changes nothing, no crash under threads, NumPy scalars.

One test (or a few) per item of the issue; each failed before the fix. The random hostile-input
suite is tests/test_hostile.py.
"""

import copy
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

import fastsgd
from fastsgd import _core

try:
    import torch
except ImportError:  # the torch cases skip, saying so
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def _snapshot(opt, variables):
    """Everything a refused call must leave alone, as bytes."""
    state = opt.state_dict()
    slots = {k: [a.tobytes() for a in v] for k, v in state.get("slots", {}).items()}
    return ([np.asarray(v).tobytes() for v in variables], slots, state["iterations"], opt.built,
            opt.iterations, state.get("learning_rate"))


def _momentum_opt(**kw):
    return fastsgd.SGD(learning_rate=0.1, momentum=0.9, **kw)


# ---- 1. a refused first call builds nothing ---------------------------------------------

def test_refused_first_apply_leaves_the_optimizer_unbuilt():
    w3 = np.ones(3, np.float32)
    opt = _momentum_opt()
    with pytest.raises(ValueError, match="shape"):
        opt.apply([np.ones(4, np.float32)], [w3])
    assert not opt.built
    np.testing.assert_array_equal(w3, 1)
    opt.apply([np.ones(3, np.float32)], [w3])  # was "Unknown variable"
    assert opt.built and opt.iterations == 1
    np.testing.assert_allclose(w3, 0.9)


def test_refused_build_keeps_the_pending_state():
    w = np.ones(3, np.float32)
    opt = _momentum_opt()
    opt.build([w])
    opt.apply([np.ones(3, np.float32)], [w])
    state = opt.state_dict()

    twin = _momentum_opt()
    twin.load_state_dict(state)
    with pytest.raises(ValueError, match="shape"):
        twin.build([np.ones(4, np.float32)])  # the state does not fit
    assert not twin.built
    w2 = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="shape"):
        twin.apply([np.ones(5, np.float32)], [w2])  # a failing first apply keeps the state too
    twin.apply([np.ones(3, np.float32)], [w2])
    assert twin.iterations == 2  # resumed from step 1, not restarted


# ---- 2. checkpoints are all-or-nothing --------------------------------------------------

def _built_with_state():
    w = np.ones((3, 4), np.float32)
    opt = _momentum_opt(use_ema=True)
    opt.apply([np.full((3, 4), 0.5, np.float32)], [w])
    return opt, w


@pytest.mark.parametrize("bad_key, bad_value, exc", [
    ("learning_rate", "abc", TypeError),
    ("learning_rate", 10**400, ValueError),
    ("learning_rate", None, TypeError),
    ("learning_rate", float("nan"), ValueError),
    ("learning_rate", 1e300, ValueError),
    ("iterations", 2**63, ValueError),
    ("iterations", 2**63 - 1, ValueError),
    ("iterations", 1e30, TypeError),
    ("iterations", -1, ValueError),
    ("iterations", True, TypeError),
    ("iterations", "3", TypeError),
])
def test_bad_scalar_in_a_checkpoint_changes_nothing(bad_key, bad_value, exc):
    opt, w = _built_with_state()
    state = opt.state_dict()
    state["slots"]["momentum"][0] = state["slots"]["momentum"][0] + 1  # would be written first
    state["iterations"] = 7
    state[bad_key] = bad_value
    before = _snapshot(opt, [w])
    with pytest.raises(exc):
        opt.load_state_dict(state)
    assert _snapshot(opt, [w]) == before


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda s: s["slots"]["momentum"].__setitem__(0, np.zeros((4, 3), np.float32)), ValueError, "shape"),
    (lambda s: s["slots"]["momentum"].__setitem__(0, np.zeros(12, np.float32)), ValueError, "shape"),
    (lambda s: s["slots"]["momentum"].__setitem__(0, np.zeros((3, 4), np.float64)), ValueError, "dtype"),
    (lambda s: s["slots"]["momentum"].__setitem__(0, np.zeros((3, 4), np.int32)), TypeError, "dtype"),
    (lambda s: s["slots"]["momentum"].__setitem__(0, "abc"), TypeError, "momentum slot 0"),
    (lambda s: s["slots"].__setitem__("momentum", np.zeros((3, 4), np.float32)), TypeError, "list"),
    (lambda s: s["slots"].pop("average"), ValueError, "average"),
    (lambda s: s["slots"].__setitem__("velocity", []), ValueError, "velocity"),
    (lambda s: s.__setitem__("shapes", [[4, 3]]), ValueError, "shape"),
    (lambda s: s.__setitem__("slots", None), TypeError, "slots"),
    (lambda s: s.__setitem__("extra", 1), ValueError, "extra"),
])
def test_corrupt_checkpoint_changes_nothing(mutate, exc, match):
    opt, w = _built_with_state()
    state = opt.state_dict()
    state["slots"]["average"][0] = state["slots"]["average"][0] + 1
    state["iterations"] = 9
    mutate(state)
    before = _snapshot(opt, [w])
    with pytest.raises(exc, match=match):
        opt.load_state_dict(state)
    assert _snapshot(opt, [w]) == before


def test_permuted_model_is_refused():
    a, b = np.ones((3, 4), np.float32), np.ones((4, 3), np.float32)
    opt = _momentum_opt()
    opt.apply([np.ones_like(a), np.ones_like(b)], [a, b])
    state = opt.state_dict()
    twin = _momentum_opt()
    twin.build([b.copy(), a.copy()])
    with pytest.raises(ValueError, match="shape"):
        twin.load_state_dict(state)
    assert twin.iterations == 0


@pytest.mark.parametrize("state", [None, "abc", 3, [("iterations", 1)]])
def test_non_dict_state_is_refused_before_and_after_build(state):
    opt = _momentum_opt()
    with pytest.raises(TypeError, match="state"):
        opt.load_state_dict(state)  # before build: no longer stored unchecked
    w = np.ones(2, np.float32)
    opt.apply([np.ones(2, np.float32)], [w])
    with pytest.raises(TypeError, match="state"):
        opt.load_state_dict(state)


def test_bfloat16_slots_take_only_bfloat16_values():
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes")
    w = np.ones(4, ml_dtypes.bfloat16)
    opt = _momentum_opt(slot_dtype="variable")
    opt.apply([np.full(4, 0.5, ml_dtypes.bfloat16)], [w])
    state = opt.state_dict()
    assert state["slots"]["momentum"][0].dtype == ml_dtypes.bfloat16
    before = _snapshot(opt, [w])
    for bad in (np.full(4, 0.5, np.float16), np.full(4, 1, np.int16)):
        corrupt = copy.deepcopy(state)
        corrupt["slots"]["momentum"][0] = bad  # was bit-reinterpreted: 0.5 -> 3.05e-5
        with pytest.raises((TypeError, ValueError), match="dtype"):
            opt.load_state_dict(corrupt)
        assert _snapshot(opt, [w]) == before
    good = copy.deepcopy(state)
    good["slots"]["momentum"][0] = np.full(4, 0.25, ml_dtypes.bfloat16)
    opt.load_state_dict(good)
    np.testing.assert_array_equal(opt.state_dict()["slots"]["momentum"][0].astype(np.float32), 0.25)


def test_checkpoint_round_trip_is_bit_identical():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((5, 3)).astype(np.float32)
    w2 = w1.copy()
    grads = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(4)]
    a = _momentum_opt(use_ema=True, gradient_accumulation_steps=2)
    for g in grads[:3]:
        a.apply([g], [w1])
    saved = pickle.loads(pickle.dumps(a.state_dict()))
    b = _momentum_opt(use_ema=True, gradient_accumulation_steps=2)
    w2[...] = w1
    b.load_state_dict(saved)
    a.apply([grads[3]], [w1])
    b.apply([grads[3]], [w2])
    assert w1.tobytes() == w2.tobytes()


# ---- 3. threads -------------------------------------------------------------------------

def _run_isolated(code):
    """Runs `code` in a fresh interpreter (a crash must fail the test, not end the run)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_gradient_dropped_during_the_call_is_kept_alive():
    # grads[1]'s exporter drops the list's (last) reference to grads[0] after grads[0] was
    # imported: the step must still read grads[0]'s values, not freed memory.
    out = _run_isolated("""
        import numpy as np, fastsgd
        n = 1 << 22                                    # large: freed with munmap, not cached
        w0, w1 = np.zeros(n, np.float32), np.zeros(4, np.float32)
        class Dropper:
            def __init__(self, arr, owner): self.arr, self.owner = arr, owner
            def __dlpack_device__(self): return self.arr.__dlpack_device__()
            def __dlpack__(self, **kw):
                self.owner[0] = None                   # the last reference to grads[0]
                return self.arr.__dlpack__(**kw)
        for _ in range(3):
            grads = [np.full(n, 2.0, np.float32)]
            grads.append(Dropper(np.ones(4, np.float32), grads))
            fastsgd.SGD(0.5).apply(grads, [w0, w1])
        assert np.all(w0 == -3.0), np.unique(w0)[:5]
        print("ok")
    """)
    assert "ok" in out


def _large_momentum_problem(n=1 << 21):
    w = np.zeros(n, np.float32)
    opt = fastsgd.SGD(learning_rate=0.5, momentum=0.5)
    opt.apply([np.ones(n, np.float32)], [w])
    return opt, w


def test_state_dict_during_a_step_is_never_torn():
    opt, w = _large_momentum_problem()
    g = np.ones_like(w)
    stop = threading.Event()
    torn = []

    def stepper():
        while not stop.is_set():
            opt.apply([g], [w])

    t = threading.Thread(target=stepper)
    t.start()
    try:
        for _ in range(40):
            m = opt.state_dict()["slots"]["momentum"][0]
            if m.min() != m.max():  # every element gets the same update: a mix is a torn read
                torn.append((m.min(), m.max()))
    finally:
        stop.set()
        t.join(30)
    assert not torn, torn[:3]


def test_load_state_dict_and_setters_during_a_step_are_excluded():
    opt, w = _large_momentum_problem()
    state = opt.state_dict()
    g = np.ones_like(w)
    stop = threading.Event()
    errors = []

    def stepper():
        try:
            while not stop.is_set():
                opt.apply([g], [w])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=stepper)
    t.start()
    try:
        for i in range(30):
            state["slots"]["momentum"][0][...] = i
            opt.load_state_dict(state)
            opt.exclude_from_weight_decay(var_names=["x"])
            m = opt.state_dict()["slots"]["momentum"][0]
            assert m.min() == m.max()
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors


def test_concurrent_applies_wait_for_each_other():
    opt, w = _large_momentum_problem(1 << 18)
    g = np.ones_like(w)
    errors = []

    def stepper():
        try:
            for _ in range(10):
                opt.apply([g], [w])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=stepper) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert opt.iterations == 31


@needs_torch
def test_callers_flush_to_zero_reaches_the_worker_threads():
    if _core.cpu_info()["threads"] < 2:
        pytest.skip("one CPU thread configured: there is no worker to carry the mode to")
    n = 1 << 20  # split across threads (>= 64K elements per thread)
    results = []
    # Workers created while the caller's mode is set would inherit it: start them first.
    _core.set_num_threads(2)
    fastsgd.SGD(0.1).apply([np.ones(n, np.float32)], [np.ones(n, np.float32)])
    torch.set_flush_denormal(True)
    try:
        for threads in (1, 2):
            _core.set_num_threads(threads)
            w = np.full(n, 2e-38, np.float32)  # normal inputs, subnormal result 1e-39
            fastsgd.SGD(learning_rate=1.0).apply([np.full(n, 1.9e-38, np.float32)], [w])
            results.append(w)
    finally:
        torch.set_flush_denormal(False)
        _core.set_num_threads(0)
    assert results[0].tobytes() == results[1].tobytes()
    assert np.all(results[0] == 0)  # 5e-39 is subnormal: flushed on every thread


# ---- 4. inputs wrongly refused or wrongly read ------------------------------------------

@pytest.mark.parametrize("grad", [np.float32(0.5), np.array(0.5, np.float32)])
def test_numpy_scalar_and_0d_gradients_work_as_in_keras(grad):
    w = np.array(1.0, np.float32)
    fastsgd.SGD(learning_rate=0.5).apply([grad], [w])
    assert w == np.float32(0.75)


def test_numpy_scalar_variable_is_refused():
    with pytest.raises(TypeError, match="NumPy scalar"):
        fastsgd.SGD().apply([np.array(0.5, np.float32)], [np.float32(1.0)])


@pytest.mark.parametrize("options", [dict(use_ema=True), dict(gradient_accumulation_steps=2),
                                     dict(use_ema=True, momentum=0.9)])
@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_empty_variable_without_gradient(options, dtype):
    w, empty = np.ones(3, np.float32), np.zeros(0, dtype)
    opt = fastsgd.SGD(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # the second call ends the accumulation window
            opt.apply([np.ones(3, np.float32), None], [w, empty])
    assert opt.iterations == 1 + ("gradient_accumulation_steps" not in options)


@needs_torch
def test_apply_without_variables_on_mixed_numpy_and_torch():
    a, t = np.ones(2, np.float32), torch.ones(2)
    opt = fastsgd.SGD(0.5)
    opt.apply([np.ones(2, np.float32), torch.ones(2)], [a, t])
    version = t._version
    opt.apply([np.ones(2, np.float32), torch.ones(2)])  # raised from increment_version
    np.testing.assert_array_equal(a, 0)
    assert t._version > version and torch.all(t == 0)


@needs_torch
@pytest.mark.parametrize("make", [lambda: torch.full((3,), 2.0)._neg_view(),
                                  lambda: (torch.full((3,), 1j * 2.0, dtype=torch.complex64)).conj().imag])
def test_negative_bit_gradients_are_read_with_their_sign(make):
    g = make()
    assert g.is_neg()
    w = torch.zeros(3)
    fastsgd.SGD(0.5).apply([g], [w])
    torch.testing.assert_close(w, torch.full((3,), 1.0))  # w - 0.5 * (-2)


@needs_torch
def test_negative_bit_variable_is_refused():
    base = torch.ones(3)
    v = base._neg_view()
    with pytest.raises(ValueError, match="negative bit"):
        fastsgd.SGD(0.5).apply([torch.ones(3)], [v])
    assert torch.all(base == 1)


@pytest.mark.parametrize("where", ["grads", "variables"])
def test_bare_array_where_a_list_is_expected(where):
    w = np.ones((2, 3), np.float32)
    g = np.ones((2, 3), np.float32)
    opt = fastsgd.SGD(0.5)
    with pytest.raises(TypeError, match="list"):
        if where == "grads":
            opt.apply(g, [w])
        else:
            opt.apply([g], w)
    assert not opt.built and np.all(w == 1)


def test_lr_and_learning_rate_together_are_refused():
    with pytest.raises(ValueError, match="lr"):
        fastsgd.SGD(learning_rate=0.5, lr=0.1)
    with pytest.warns(DeprecationWarning):
        assert fastsgd.SGD(lr=0.25).learning_rate == 0.25


@needs_torch
def test_non_leaf_torch_variable_is_refused():
    leaf = torch.ones(3, requires_grad=True)
    non_leaf = leaf * 2
    opt = fastsgd.SGD(0.5)
    with pytest.raises(ValueError, match="leaf"):
        opt.apply([torch.ones(3)], [non_leaf])
    assert not opt.built
    with torch.no_grad():
        assert torch.all(non_leaf == 2)


@needs_torch
@pytest.mark.parametrize("where", ["grads", "variables"])
def test_misaligned_dlpack_tensor_is_refused(where):
    raw = torch.frombuffer(bytearray(20), dtype=torch.float32, offset=1, count=4)
    good = torch.ones(4)
    grads, variables = ([raw], [good]) if where == "grads" else ([good], [raw])
    with pytest.raises(ValueError, match="aligned"):
        fastsgd.SGD(0.5).apply(grads, variables)


def test_copy_gives_an_independent_optimizer():
    w = np.ones(3, np.float32)
    opt = _momentum_opt(use_ema=True)
    opt.apply([np.ones(3, np.float32)], [w])
    for twin in (copy.copy(opt), copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        before = opt.state_dict()
        w2 = w.copy()
        twin.apply([np.ones(3, np.float32)], [w2])
        assert twin.iterations == 2
        after = opt.state_dict()
        assert after["iterations"] == before["iterations"]
        for kind in before["slots"]:
            assert before["slots"][kind][0].tobytes() == after["slots"][kind][0].tobytes()
        # The twin continues exactly where the original was.
        w3 = w.copy()
        ref = copy.deepcopy(opt)
        ref.apply([np.ones(3, np.float32)], [w3])
        assert w2.tobytes() == w3.tobytes()


def test_learning_rate_setter_refuses_without_changing():
    opt = fastsgd.SGD(0.5)
    for bad, exc in ((10**400, ValueError), (float("inf"), ValueError), (None, ValueError), ("x", ValueError)):
        with pytest.raises(exc):
            opt.learning_rate = bad
        assert opt.learning_rate == 0.5


# ---- 5. exception types -----------------------------------------------------------------

@pytest.mark.parametrize("stream, exc", [(2**70, ValueError), (-1, ValueError), ("0", TypeError), (1.5, TypeError)])
def test_bad_stream_is_a_typed_refusal(stream, exc):
    w = np.ones(2, np.float32)
    opt = fastsgd.SGD(0.5)
    with pytest.raises(exc, match="stream"):
        opt.apply([np.ones(2, np.float32)], [w], stream=stream)
    assert not opt.built and np.all(w == 1)


@pytest.mark.parametrize("kwargs", [dict(learning_rate=10**400), dict(clipnorm=10**400),
                                    dict(weight_decay=10**400), dict(global_clipnorm=float("inf")),
                                    dict(gradient_accumulation_steps=2**64)])
def test_out_of_range_hyper_parameters_are_typed(kwargs):
    with pytest.raises((TypeError, ValueError)):
        fastsgd.SGD(**kwargs)


@needs_torch
@pytest.mark.parametrize("make", [lambda: torch.ones(4).to_sparse(),
                                  lambda: torch.ones(4, device="meta"),
                                  lambda: torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)])
def test_unreadable_torch_gradients_are_type_errors(make):
    w = torch.ones(4)
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        fastsgd.SGD(0.5).apply([make()], [w])
    assert torch.all(w == 1)


def test_producer_failure_is_a_type_error():
    class Broken:
        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, **kw):
            raise BufferError("object dtype cannot be exported")

    w = np.ones(2, np.float32)
    with pytest.raises(TypeError, match=r"grads\[0\].*object dtype"):
        fastsgd.SGD(0.5).apply([Broken()], [w])
    assert np.all(w == 1)


# ---- 6. Keras at the float32 edges ------------------------------------------------------
# Decision (README, "Deliberate differences"): Keras's float32 results at the overflow edges
# are kept, since a Keras-exact optimizer must not change what a Keras config does; only a
# clip threshold that float32 cannot hold (Keras: NaN) is refused. The engine treats a sum of
# squares beyond float32's range as inf for float32-computed variables (math::keras_sum_squares)
# and refuses thresholds beyond float32 under the keras convention.

def test_norm_beyond_float32_leaves_the_variable_as_in_keras():
    # sum of squares 1.8e77 and norm 4.2e38 both overflow float32: Keras's step is g * 1 / inf.
    w = np.full(2, 0.5, np.float32)
    fastsgd.SGD(learning_rate=0.5, clipnorm=1.0).apply([np.full(2, 3e38, np.float32)], [w])
    np.testing.assert_array_equal(w, np.float32(0.5))


def test_sum_of_squares_beyond_float32_leaves_the_variable_as_in_keras():
    # (-3.4e38)**2 overflows float32 though the norm would not: Keras's norm is inf, w stays.
    w = np.zeros(1, np.float32)
    fastsgd.SGD(learning_rate=1.0, clipnorm=0.1).apply([np.full(1, -3.4e38, np.float32)], [w])
    np.testing.assert_array_equal(w, np.float32(0))


def test_global_sum_of_squares_beyond_float32_gives_keras_nan():
    # Each tensor's sum fits in float32, their total does not: Keras's global norm is inf, and
    # its clip_by_global_norm turns an infinite norm into a NaN scale (checked against Keras
    # 3.15.1: both variables become NaN).
    ws = [np.zeros(1, np.float32), np.zeros(1, np.float32)]
    fastsgd.SGD(learning_rate=1.0, global_clipnorm=1.0).apply([np.full(1, 1.5e19, np.float32)] * 2, ws)
    for w in ws:
        assert np.isnan(w).all()
    # float64 variables keep the float64 sum: the same gradients are clipped to a finite step.
    w64 = [np.zeros(1), np.zeros(1)]
    fastsgd.SGD(learning_rate=1.0, global_clipnorm=1.0).apply([np.full(1, 1.5e19)] * 2, w64)
    np.testing.assert_allclose(w64[0], -np.sqrt(0.5), rtol=1e-12)


def test_clip_threshold_beyond_float32_is_refused():
    # Keras rounds 1e300 to a float32 inf and every step is NaN; fastsgd refuses the setting.
    with pytest.raises(ValueError, match="global_clipnorm"):
        fastsgd.SGD(learning_rate=0.1, global_clipnorm=1e300)
