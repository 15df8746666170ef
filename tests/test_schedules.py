"""fastsgd.schedules: Keras 3's learning-rate schedules in pure Python/NumPy.

1. Golden numbers: KERAS_SEMANTICS.md §7 examples and Keras's own test values (§11.3), with the
   expected values computed from the formulas as Keras's tests do, plus exact float32 checks.
2. Config: get_config keys, from_config round trips, serialize/deserialize, and interchange
   with real Keras (its serialize output, its SGD config, JSON).
3. A seeded parity sweep against keras.optimizers.schedules (torch backend), steps 0..300.
4. The ValueError (and TypeError) cases.

Keras is only needed by the tests that compare with it; they skip, with a reason, without it.
"""

import json
import math
import os
import random
from fractions import Fraction

import numpy as np
import pytest

from fastsgd import schedules
from fastsgd.schedules import (
    CosineDecay,
    CosineDecayRestarts,
    ExponentialDecay,
    InverseTimeDecay,
    LearningRateSchedule,
    PiecewiseConstantDecay,
    PolynomialDecay,
)

F32 = np.float32

pytestmark = [
    # Keras's torch backend converts NumPy inputs with np.array(x); NumPy 2 may warn about it.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def f32(x):
    """``x`` rounded to float32, as a Python float."""
    return float(np.float32(x))


@pytest.fixture(scope="module")
def K():
    """keras.optimizers.schedules on the torch backend (skips without keras)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="comparing with Keras needs keras (torch backend) installed")
    return keras.optimizers.schedules


def kval(schedule, step):
    """A Keras schedule's value at ``step`` as a Python float."""
    return float(np.asarray(schedule(step)))


# Reference formulas (double precision), written the way Keras's own tests write them.


def np_cosine_decay(step, decay_steps, alpha=0.0):
    step = min(step, decay_steps)
    decay = 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))
    return (1.0 - alpha) * decay + alpha


def linear_warmup(step, warmup_steps, initial_lr, target_lr):
    return initial_lr + step / warmup_steps * (target_lr - initial_lr)


def np_cosine_decay_restarts(step, decay_steps, t_mul=2.0, m_mul=1.0, alpha=0.0):
    fac = 1.0
    while step >= decay_steps:
        step -= decay_steps
        decay_steps *= t_mul
        fac *= m_mul
    decay = fac * 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))
    return (1.0 - alpha) * decay + alpha


# =============================================================================================
# 1. Golden numbers


def test_exponential_decay_examples():
    # §7.1: (0.1, 10, 0.5) at 5 -> 0.0707107; staircase at 15 -> 0.05.
    assert ExponentialDecay(0.1, 10, 0.5)(5) == pytest.approx(0.0707107, abs=5e-8)
    assert ExponentialDecay(0.1, 10, 0.5, staircase=True)(15) == pytest.approx(0.05, rel=1e-6)
    # §11.3.2
    assert ExponentialDecay(0.05, 10, 0.96)(5) == pytest.approx(0.05 * 0.96 ** (5.0 / 10.0), rel=1e-6)
    stair = ExponentialDecay(0.1, 3, 0.96, staircase=True)
    assert stair(1) == pytest.approx(0.1, rel=1e-6)
    assert stair(2) == pytest.approx(0.1, rel=1e-6)
    assert stair(100) == pytest.approx(0.1 * 0.96 ** (100 // 3), rel=1e-6)
    # the staircase holds within a period and drops at its end
    assert stair(3) == pytest.approx(0.1 * 0.96, rel=1e-6) and stair(5) == stair(3)


def test_piecewise_constant_examples():
    # §11.3.3
    pcd = PiecewiseConstantDecay([100, 110, 120], [1.0, 0.1, 0.01, 0.001])
    got = [pcd(x) for x in (-999, 100, 105, 110, 120, 999)]
    assert got == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.001], rel=1e-6)
    # the value is returned float32-rounded, as Keras's float32 tensor gives it
    assert pcd(105) == f32(0.1) and pcd(105) != 0.1
    pcd = PiecewiseConstantDecay([1, 2, 3], [0.4, 0.5, 0.6, 0.7])
    got = [pcd(np.int64(i)) for i in range(5)]
    assert got == pytest.approx([0.4, 0.4, 0.5, 0.6, 0.7], rel=1e-6)
    # integer values give integer results (Keras: an int32 tensor)
    ints = PiecewiseConstantDecay([10, 20], [1, 2, 3])
    assert [ints(s) for s in (0, 10, 11, 20, 21)] == [1, 1, 2, 2, 3]
    assert type(ints(15)) is int
    # float64 values keep float64
    assert PiecewiseConstantDecay([5], [np.float64(0.1), 0.2])(0) == 0.1


def test_piecewise_constant_keras_edge_semantics():
    # An integer step meets boundaries cast to int (truncated toward zero): -0.5 -> 0.
    pcd = PiecewiseConstantDecay([-0.5], [0.1, 0.2])
    assert pcd(0) == f32(0.1) and pcd(1) == f32(0.2)
    # Non-increasing boundaries: Keras's sum of masked values (here v0 + v2 between 5 and 10).
    odd = PiecewiseConstantDecay([10, 5], [1.0, 2.0, 3.0])
    assert [odd(3), odd(7), odd(12)] == [1.0, 4.0, 3.0]
    # A non-finite value poisons every other interval through 0 * inf = NaN.
    inf = PiecewiseConstantDecay([5], [0.1, math.inf])
    assert math.isnan(inf(3)) and inf(7) == math.inf
    # No boundaries: a constant (Keras raises IndexError when called).
    assert PiecewiseConstantDecay([], [0.5])(123) == 0.5


def test_polynomial_decay_examples():
    lr, end = 0.05, 0.001
    # §11.3.4
    assert PolynomialDecay(lr, 10, 0.0)(5) == pytest.approx(lr * 0.5, rel=1e-6)
    assert PolynomialDecay(lr, 10, end)(10) == pytest.approx(end, rel=1e-6)
    assert PolynomialDecay(lr, 10, end)(5) == pytest.approx((lr + end) * 0.5, rel=1e-6)
    assert PolynomialDecay(lr, 10, end)(15) == pytest.approx(end, rel=1e-6)
    assert PolynomialDecay(lr, 10, end, cycle=True)(15) == pytest.approx((lr - end) * 0.25 + end, rel=1e-6)
    assert PolynomialDecay(lr, 10, 0.0, power=0.5)(5) == pytest.approx(lr * 0.5 ** 0.5, rel=1e-6)
    assert PolynomialDecay(lr, 10, end, power=0.5)(10) == pytest.approx(end, rel=1e-6)
    assert PolynomialDecay(lr, 10, end, power=0.5)(5) == pytest.approx((lr - end) * 0.5 ** 0.5 + end, rel=1e-6)
    assert PolynomialDecay(lr, 10, end, power=0.5)(15) == pytest.approx(end, rel=1e-6)
    assert PolynomialDecay(lr, 10, end, power=0.5, cycle=True)(15) == pytest.approx(
        (lr - end) * 0.25 ** 0.5 + end, rel=1e-6)
    assert PolynomialDecay(0.001, 10, cycle=True)(0) == pytest.approx(0.001, rel=1e-6)
    # §7.3: with cycle an exact multiple is the end of a period, the restart comes one step later
    cyc = PolynomialDecay(1.0, 10, 0.0, cycle=True)
    assert cyc(20) == 0.0
    assert cyc(21) == pytest.approx(1 - 21 / 30, rel=1e-6)  # D = 10 * ceil(21/10) = 30: back up
    # default end_learning_rate is 1e-4
    assert PolynomialDecay(1.0, 10)(10) == pytest.approx(1e-4, rel=1e-6)


def test_inverse_time_decay_examples():
    # §7.4
    assert InverseTimeDecay(0.1, 10, 0.5)(5) == pytest.approx(0.08, rel=1e-6)
    assert InverseTimeDecay(0.1, 10, 0.5, staircase=True)(15) == pytest.approx(0.0666667, rel=1e-6)
    # §11.3.5
    cont = InverseTimeDecay(0.1, 10, 0.96)
    stair = InverseTimeDecay(0.1, 10, 0.96, staircase=True)
    for i in range(11):
        assert cont(i) == pytest.approx(0.1 / (1 + i / 10 * 0.96), rel=1e-6)
        assert stair(i) == pytest.approx(0.1 / (1 + 0.96 * (i // 10)), rel=1e-6)


def test_float32_arithmetic_is_emulated_exactly():
    # No transcendental functions involved: the result must be the float32 chain bit for bit.
    for step in (0, 1, 7, 13, 299):
        expected = F32(0.1) / (F32(1) + F32(0.37) * (F32(step) / F32(3)))
        assert InverseTimeDecay(0.1, 3, 0.37)(step) == float(expected)
        p = F32(min(step, 11)) / F32(11)
        expected = (F32(0.3) - F32(0.01)) * (F32(1) - p) + F32(0.01)  # power 1: pow is exact
        assert PolynomialDecay(0.3, 11, 0.01)(step) == float(expected)
        warm = (F32(0.2) - F32(0.05)) * (F32(min(step, 40)) / F32(40)) + F32(0.05)
        if step < 40:
            assert CosineDecay(0.05, 10, warmup_target=0.2, warmup_steps=40)(step) == float(warm)
    # step 0 returns the float32-rounded initial rate, not the double
    assert ExponentialDecay(0.1, 10, 0.5)(0) == f32(0.1) != 0.1
    assert CosineDecay(0.1, 10)(0) == f32(0.1)


def test_float64_initial_rate_computes_in_float64():
    sched = ExponentialDecay(np.float64(0.1), 3, 0.96)
    assert sched(0) == 0.1
    assert sched(1) == pytest.approx(0.1 * 0.96 ** (1 / 3), rel=1e-15)
    assert ExponentialDecay(0.1, 3, 0.96)(1) != sched(1)  # the float32 result differs
    assert CosineDecay(np.float64(1.0), 1000)(250) == pytest.approx(np_cosine_decay(250, 1000), rel=1e-15)
    assert CosineDecayRestarts(np.float64(1.0), 10)(25) == pytest.approx(np_cosine_decay_restarts(25, 10),
                                                                        rel=1e-14)


def test_integer_initial_rate_computes_in_float32():
    # Keras would use int32 for the int 0 and truncate warmup_target to 0; fastsgd uses float32.
    sched = CosineDecay(0, 10, warmup_target=0.2, warmup_steps=4)
    assert sched(2) == pytest.approx(0.1, rel=1e-6)
    assert ExponentialDecay(1, 10, 0.5)(10) == 0.5


def test_cosine_decay_examples():
    # §7.5: (0, 10, warmup_target=0.2, warmup_steps=4) at 2 -> 0.1 and at 9 -> 0.1.
    sched = CosineDecay(0.0, 10, warmup_target=0.2, warmup_steps=4)
    assert sched(2) == pytest.approx(0.1, rel=1e-6)
    assert sched(9) == pytest.approx(0.1, rel=1e-6)
    assert sched(14) == 0.0 and sched(100) == 0.0
    # §11.3.6
    for step in range(0, 1500, 250):
        assert CosineDecay(1.0, 1000)(step) == pytest.approx(np_cosine_decay(step, 1000), rel=1e-6, abs=1e-7)
        assert CosineDecay(1.0, 1000, 0.1)(step) == pytest.approx(np_cosine_decay(step, 1000, 0.1), rel=1e-6)
        assert CosineDecay(np.float64(1.0), 1000)(step) == pytest.approx(np_cosine_decay(step, 1000), rel=1e-6,
                                                                         abs=1e-12)
        warm = CosineDecay(0.0, 10, warmup_target=10.0, warmup_steps=1500)
        assert warm(step) == pytest.approx(linear_warmup(step, 1500, 0.0, 10.0), rel=1e-6)
    for step in range(0, 3000, 250):
        sched = CosineDecay(0.0, 1000, warmup_target=10.0, warmup_steps=2000)
        if step < 2000:
            expected = linear_warmup(step, 2000, 0.0, 10.0)
        else:
            expected = 10.0 * np_cosine_decay(step - 2000, 1000)
        assert sched(step) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # warm-up from a non-zero start (the code's "+ initial_learning_rate")
    assert CosineDecay(0.1, 10, warmup_target=0.5, warmup_steps=4)(1) == pytest.approx(0.2, rel=1e-6)
    # warmup_target with warmup_steps=0 decays from warmup_target, alpha is a fraction of it
    sched = CosineDecay(0.1, 10, alpha=0.1, warmup_target=0.4)
    assert sched(0) == pytest.approx(0.4, rel=1e-6)
    assert sched(10) == pytest.approx(0.04, rel=1e-6)
    assert sched(5) == pytest.approx(0.4 * (0.9 * 0.5 + 0.1), rel=1e-6)


def test_cosine_decay_restarts_examples():
    # §7.6
    sched = CosineDecayRestarts(0.1, 2, t_mul=2, m_mul=0.5)
    expected = [0.1, 0.05, 0.05, 0.042678, 0.025, 0.007322, 0.025, 0.024048]
    assert [sched(s) for s in range(8)] == pytest.approx(expected, abs=1e-6)
    # §11.3.7
    for step in range(0, 1500, 250):
        for kwargs in ({}, {"alpha": 0.1}, {"m_mul": 0.9}, {"t_mul": 1.0}):
            got = CosineDecayRestarts(1.0, 1000, **kwargs)(step)
            assert got == pytest.approx(np_cosine_decay_restarts(step, 1000, **kwargs), rel=1e-6, abs=1e-7)
        got = CosineDecayRestarts(np.float64(1.0), 1000)(step)
        assert got == pytest.approx(np_cosine_decay_restarts(step, 1000), rel=1e-6, abs=1e-12)
    # t_mul == 1: every period is the same
    flat = CosineDecayRestarts(1.0, 4, t_mul=1.0, m_mul=0.5)
    assert flat(4) == 0.5 and flat(8) == 0.25 and flat(6) == pytest.approx(0.5 * 0.5 * (1 + 0), rel=1e-6)
    # t_mul < 1: NaN once the finite total length 1 / (1 - t_mul) periods is passed (as Keras)
    assert math.isnan(CosineDecayRestarts(0.1, 2, t_mul=0.5)(100))


def exact_restarts_reference(step, first, t_mul, m_mul=1.0, alpha=0.0):
    """SGDR with the period found in exact rational arithmetic (t_mul taken as its decimal repr).

    Returns (value, whether ``step`` starts a period). For t_mul < 1, only steps before the
    finite total length ``first / (1 - t_mul)``.
    """
    t = Fraction(repr(t_mul))
    assert t >= 1 or step < Fraction(first) / (1 - t)
    start, length, i = Fraction(0), Fraction(first), 0
    while start + length <= step:
        start, length, i = start + length, length * t, i + 1
    decay = m_mul ** i * 0.5 * (1.0 + math.cos(math.pi * float((step - start) / length)))
    return (1.0 - alpha) * decay + alpha, start == step


@pytest.mark.parametrize("t_mul, first", [(1.2, 5), (1.2, 10), (1.1, 10), (1.5, 2), (1.5, 4), (1.25, 3),
                                          (2.5, 2), (3.0, 1), (2.0, 5), (0.75, 20), (1.3, 10), (1.6, 25)])
def test_cosine_decay_restarts_period_index_is_exact(t_mul, first):
    # Keras's float32 period index misses some exact restarts (here t_mul=1.2: steps 11 with
    # first=5 and 22 with first=10; t_mul=1.1: step 21 with first=10 give ~alpha*lr0 instead of
    # the peak); fastsgd finds the right period at every step. For (1.3, 10) and (1.6, 25)
    # the float64 S(k) lands a hair above the restart (2.3000000000000003 for step 23).
    sched = CosineDecayRestarts(1.0, first, t_mul=t_mul, m_mul=0.75, alpha=0.05)
    restarts = 0
    for step in range(301):
        if t_mul < 1 and step >= first / (1 - t_mul):
            assert math.isnan(sched(step)), step  # past the finite total length, as Keras
            continue
        expected, is_restart = exact_restarts_reference(step, first, t_mul, m_mul=0.75, alpha=0.05)
        # float32 tolerance: f - S(i) cancels in float32 (as in Keras); a wrong period is off by O(0.1)
        assert sched(step) == pytest.approx(expected, rel=2e-6, abs=2e-6), step
        restarts += is_restart and step > 0
    assert restarts >= 1  # the sweep meets at least one exact restart step
    if (t_mul, first) == (1.2, 5):
        assert sched(11) == pytest.approx(0.75 ** 2 * 0.95 + 0.05, rel=1e-6)  # a restart peak


def test_cosine_decay_restarts_matches_keras_away_from_blurred_restarts(K):
    # The three restart steps where Keras (torch, float32) lands in the previous period; every
    # other step of these schedules agrees with Keras.
    for t_mul, first, blurred in [(1.2, 5, 11), (1.2, 10, 22), (1.1, 10, 21)]:
        ksched, sched = K.CosineDecayRestarts(1.0, first, t_mul=t_mul), CosineDecayRestarts(1.0, first, t_mul=t_mul)
        for step in range(60):
            want, got = kval(ksched, step), sched(step)
            if step == blurred:
                assert got == pytest.approx(1.0, rel=1e-6)
                continue
            assert got == pytest.approx(want, rel=1e-6, abs=1e-9 + 2.0 ** -23), (t_mul, first, step)


def test_step_types():
    sched = ExponentialDecay(0.1, 10, 0.5)
    ref = sched(5)
    for step in (np.int64(5), np.int32(5), np.uint8(5), 5.0, np.float32(5), np.array(5), True + 4):
        assert sched(step) == ref, type(step)
    pcd = PiecewiseConstantDecay([10], [0.1, 0.2])
    assert pcd(np.int64(10)) == pcd(10.0) == pcd(np.float32(10)) == f32(0.1)
    assert pcd(10.5) == f32(0.2)
    with pytest.raises(TypeError):
        sched(None)


@pytest.mark.parametrize("sched", [
    ExponentialDecay(0.1, 10, 0.5),
    PiecewiseConstantDecay([3], [0.1, 0.01]),
    PolynomialDecay(0.1, 10, cycle=True),
    InverseTimeDecay(0.1, 10, 0.5, staircase=True),
    CosineDecay(0.0, 10, warmup_target=0.1, warmup_steps=3),
    CosineDecayRestarts(0.1, 3),
], ids=lambda s: type(s).__name__)
def test_calls_return_python_floats(sched):
    for step in (0, 1, 5, 50, np.int64(7)):
        assert type(sched(step)) is float


def test_attributes_can_be_reassigned():
    sched = ExponentialDecay(0.1, 10, 0.5)
    before = sched(10)
    sched.decay_rate = 0.25
    assert sched(10) == pytest.approx(0.025, rel=1e-6) and before == pytest.approx(0.05, rel=1e-6)
    sched.initial_learning_rate = np.float64(1.0)
    assert sched(10) == 0.25
    restarts = CosineDecayRestarts(1.0, 2, t_mul=2.0)
    restarts.t_mul = 1.0  # stored as _t_mul, like Keras
    assert restarts.get_config()["t_mul"] == 1.0 and restarts(4) == 1.0
    pcd = PiecewiseConstantDecay([5], [1.0, 2.0])
    pcd.values = [3.0, 4.0]
    assert pcd(6) == 4.0


def test_base_class():
    base = LearningRateSchedule()
    with pytest.raises(NotImplementedError):
        base(0)
    with pytest.raises(NotImplementedError):
        base.get_config()

    class Halving(LearningRateSchedule):
        def __init__(self, lr, every):
            self.lr, self.every = lr, every

        def __call__(self, step):
            return self.lr * 0.5 ** (step // self.every)

        def get_config(self):
            return {"lr": self.lr, "every": self.every}

    again = Halving.from_config(Halving(0.2, 4).get_config())
    assert isinstance(again, Halving) and again(9) == 0.05
    ser = schedules.serialize(Halving(0.2, 4))
    assert ser["class_name"] == "Halving" and ser["config"] == {"lr": 0.2, "every": 4}
    assert schedules.deserialize(ser, custom_objects={"Halving": Halving})(8) == 0.05
    with pytest.raises(ValueError, match="Halving"):
        schedules.deserialize(ser)


# =============================================================================================
# 2. Config, serialize, deserialize

CONFIG_CASES = [
    (ExponentialDecay, dict(initial_learning_rate=0.05, decay_steps=10, decay_rate=0.96, staircase=True,
                            name="my_ed")),
    (PiecewiseConstantDecay, dict(boundaries=[10, 20], values=[1, 2, 3], name="my_pcd")),
    (PiecewiseConstantDecay, dict(boundaries=[100, 110], values=[0.5, 0.1, 0.01], name="PiecewiseConstant")),
    (PolynomialDecay, dict(initial_learning_rate=0.1, decay_steps=100, end_learning_rate=0.005, power=1.0,
                           cycle=False, name="my_ld")),
    (PolynomialDecay, dict(initial_learning_rate=0.1, decay_steps=7, end_learning_rate=0.0, power=0.5,
                           cycle=True, name="PolynomialDecay")),
    (InverseTimeDecay, dict(initial_learning_rate=0.05, decay_steps=10, decay_rate=0.96, staircase=True,
                            name="my_itd")),
    (CosineDecay, dict(initial_learning_rate=0.05, decay_steps=10, alpha=0.1, name="my_cd", warmup_target=0.2,
                       warmup_steps=2)),
    (CosineDecay, dict(initial_learning_rate=0.05, decay_steps=10, alpha=0.0, name="CosineDecay",
                       warmup_target=None, warmup_steps=0)),
    (CosineDecayRestarts, dict(initial_learning_rate=0.05, first_decay_steps=10, t_mul=3.0, m_mul=4.0, alpha=0.1,
                               name="my_cdr")),
]
CONFIG_IDS = [f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(CONFIG_CASES)]

DEFAULT_CONFIGS = {
    # Keras 3's get_config keys, in order, and the defaults of the optional arguments.
    ExponentialDecay: ({"initial_learning_rate": 0.1, "decay_steps": 5, "decay_rate": 0.5},
                       {"staircase": False, "name": "ExponentialDecay"}),
    PiecewiseConstantDecay: ({"boundaries": [5], "values": [0.1, 0.2]}, {"name": "PiecewiseConstant"}),
    PolynomialDecay: ({"initial_learning_rate": 0.1, "decay_steps": 5},
                      {"end_learning_rate": 0.0001, "power": 1.0, "cycle": False, "name": "PolynomialDecay"}),
    InverseTimeDecay: ({"initial_learning_rate": 0.1, "decay_steps": 5, "decay_rate": 0.5},
                       {"staircase": False, "name": "InverseTimeDecay"}),
    CosineDecay: ({"initial_learning_rate": 0.1, "decay_steps": 5},
                  {"alpha": 0.0, "name": "CosineDecay", "warmup_target": None, "warmup_steps": 0}),
    CosineDecayRestarts: ({"initial_learning_rate": 0.1, "first_decay_steps": 5},
                          {"t_mul": 2.0, "m_mul": 1.0, "alpha": 0.0, "name": "SGDRDecay"}),
}
KEY_ORDER = {
    ExponentialDecay: ["initial_learning_rate", "decay_steps", "decay_rate", "staircase", "name"],
    PiecewiseConstantDecay: ["boundaries", "values", "name"],
    PolynomialDecay: ["initial_learning_rate", "decay_steps", "end_learning_rate", "power", "cycle", "name"],
    InverseTimeDecay: ["initial_learning_rate", "decay_steps", "decay_rate", "staircase", "name"],
    CosineDecay: ["initial_learning_rate", "decay_steps", "alpha", "name", "warmup_target", "warmup_steps"],
    CosineDecayRestarts: ["initial_learning_rate", "first_decay_steps", "t_mul", "m_mul", "alpha", "name"],
}


@pytest.mark.parametrize("cls", list(DEFAULT_CONFIGS), ids=lambda c: c.__name__)
def test_defaults_and_config_keys(cls):
    required, defaults = DEFAULT_CONFIGS[cls]
    config = cls(**required).get_config()
    assert list(config) == KEY_ORDER[cls]
    assert config == {**required, **defaults}


@pytest.mark.parametrize("cls, kwargs", CONFIG_CASES, ids=CONFIG_IDS)
def test_config_round_trip(cls, kwargs):
    sched = cls(**kwargs)
    assert sched.get_config() == kwargs
    again = cls.from_config(sched.get_config())
    assert type(again) is cls and again.get_config() == kwargs
    assert [again(s) for s in range(40)] == [sched(s) for s in range(40)]


@pytest.mark.parametrize("cls, kwargs", CONFIG_CASES, ids=CONFIG_IDS)
def test_serialize_deserialize(cls, kwargs):
    sched = cls(**kwargs)
    ser = schedules.serialize(sched)
    assert ser == {"module": "keras.optimizers.schedules", "class_name": cls.__name__, "config": kwargs,
                   "registered_name": None}
    via_json = schedules.deserialize(json.loads(json.dumps(ser)))
    assert type(via_json) is cls and via_json.get_config() == kwargs
    assert [via_json(s) for s in range(40)] == [sched(s) for s in range(40)]
    # the TF-Keras 2 form (no module / registered_name) and an instance are accepted too
    legacy = schedules.deserialize({"class_name": cls.__name__, "config": dict(kwargs)})
    assert legacy.get_config() == kwargs
    assert schedules.deserialize(sched) is sched


def test_serialize_converts_numpy_config_values():
    ser = schedules.serialize(ExponentialDecay(np.float32(0.1), np.int64(10), np.float64(0.5)))
    cfg = ser["config"]
    assert cfg["initial_learning_rate"] == f32(0.1) and type(cfg["initial_learning_rate"]) is float
    assert cfg["decay_steps"] == 10 and type(cfg["decay_steps"]) is int
    assert type(cfg["decay_rate"]) is np.float64  # a float subclass, kept as Keras keeps it
    json.dumps(ser)
    ser = schedules.serialize(PiecewiseConstantDecay(np.array([10, 20]), (0.1, 0.2, 0.3)))
    assert ser["config"]["boundaries"] == {"class_name": "__numpy__",
                                           "config": {"value": [10, 20], "dtype": "int64"}}
    assert ser["config"]["values"] == (0.1, 0.2, 0.3)
    back = schedules.deserialize(json.loads(json.dumps(ser)))
    assert [back(s) for s in (10, 11, 21)] == [f32(0.1), f32(0.2), f32(0.3)]


def test_deserialize_errors():
    with pytest.raises(ValueError, match="NoSuchDecay"):
        schedules.deserialize({"module": "keras.optimizers.schedules", "class_name": "NoSuchDecay", "config": {}})
    with pytest.raises(ValueError, match="class_name"):
        schedules.deserialize({"config": {"initial_learning_rate": 0.1}})
    with pytest.raises(TypeError):
        schedules.deserialize("ExponentialDecay")
    with pytest.raises(TypeError):
        schedules.serialize(lambda step: 0.1)
    with pytest.raises(TypeError):  # missing constructor arguments
        schedules.deserialize({"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1}})


@pytest.mark.parametrize("cls, kwargs", CONFIG_CASES, ids=CONFIG_IDS)
def test_keras_interchange(K, cls, kwargs):
    ksched = getattr(K, cls.__name__)(**kwargs)
    kser = K.serialize(ksched)
    # Keras's dict -> fastsgd, directly and through JSON
    for source in (kser, json.loads(json.dumps(kser))):
        sched = schedules.deserialize(source)
        assert type(sched) is cls
        assert sched.get_config() == ksched.get_config()
        for step in (0, 1, 3, 9, 10, 11, 25, 150):
            assert sched(step) == pytest.approx(kval(ksched, step), rel=1e-6, abs=1e-9)
    # fastsgd's dict is the same as Keras's, and Keras loads it
    ours = schedules.serialize(cls(**kwargs))
    assert ours == kser
    assert K.deserialize(json.loads(json.dumps(ours))).get_config() == ksched.get_config()


def test_keras_sgd_config_and_schedule_objects(K):
    import keras

    ksched = K.CosineDecay(0.1, 100, alpha=0.05, warmup_target=0.5, warmup_steps=3)
    lr_config = keras.optimizers.SGD(learning_rate=ksched).get_config()["learning_rate"]
    sched = schedules.deserialize(lr_config)
    assert isinstance(sched, CosineDecay) and sched.get_config() == ksched.get_config()
    # a Keras schedule object converts through its config
    conv = schedules.deserialize(K.CosineDecayRestarts(0.1, 7, t_mul=1.0))
    assert isinstance(conv, CosineDecayRestarts) and conv.get_config()["first_decay_steps"] == 7


# =============================================================================================
# 3. Parity sweep against Keras (torch backend)

STEPS = range(301)
N_CASES = 8


def _random_lr(rng):
    return rng.choice([0.1, 1.0, 0.05, 3e-4, rng.uniform(1e-4, 2.0)])


def _random_cases(name, rng):
    """(positional args, keyword args) for ``N_CASES`` random valid schedules."""
    cases = []
    for _ in range(N_CASES):
        if name == "ExponentialDecay":
            cases.append(((_random_lr(rng), rng.randint(1, 60), rng.uniform(0.05, 1.5)),
                          dict(staircase=rng.random() < 0.5)))
        elif name == "InverseTimeDecay":
            cases.append(((_random_lr(rng), rng.randint(1, 60), rng.uniform(0.0, 3.0)),
                          dict(staircase=rng.random() < 0.5)))
        elif name == "PolynomialDecay":
            cases.append(((_random_lr(rng), rng.randint(1, 120)),
                          dict(end_learning_rate=rng.uniform(0, 1e-3), cycle=rng.random() < 0.5,
                               power=rng.choice([1.0, 0.5, 2.0, rng.uniform(0.1, 3.0)]))))
        elif name == "CosineDecay":
            cases.append(((rng.choice([0.0, _random_lr(rng)]), rng.randint(1, 200)),
                          dict(alpha=rng.choice([0.0, rng.uniform(0, 0.5)]),
                               warmup_target=rng.choice([None, _random_lr(rng)]),
                               warmup_steps=rng.randint(0, 50))))
        elif name == "CosineDecayRestarts":
            cases.append(((_random_lr(rng), rng.randint(1, 30)),
                          dict(t_mul=rng.choice([1.0, 2.0, 3.0, rng.uniform(1.05, 3.5)]),
                               m_mul=rng.uniform(0.3, 1.0), alpha=rng.choice([0.0, rng.uniform(0, 0.3)]))))
        else:  # PiecewiseConstantDecay (Keras needs at least one boundary)
            n = rng.randint(1, 5)
            boundaries = sorted(rng.sample(range(0, 300), n))
            cases.append(((boundaries, [_random_lr(rng) for _ in range(n + 1)]), {}))
    return cases


def _restart_boundary(step, first, t_mul):
    """True if ``step`` starts a CosineDecayRestarts period (where Keras's float32 index may slip)."""
    return step > 0 and exact_restarts_reference(step, first, t_mul)[1]


def _top(name, args, kwargs):
    if name == "PiecewiseConstantDecay":
        return 0.0
    return max(abs(args[0]), abs(kwargs.get("warmup_target") or 0.0))


@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ["ExponentialDecay", "PiecewiseConstantDecay", "PolynomialDecay",
                                  "InverseTimeDecay", "CosineDecay", "CosineDecayRestarts"])
def test_parity_with_keras(K, name, float64):
    """fastsgd == Keras within |d| <= 1e-6 |keras| + 1e-9 (+ one float32 ulp of the peak rate for
    the cosine schedules), and mostly bit for bit.

    The cosine allowance: torch evaluates cos with SLEEF's vectorised cosf (1 ulp), fastsgd rounds
    the double-precision cos once; where they differ by one ulp near cos = -1, ``1 + cos`` is
    tiny and the difference is ~2**-24 * peak in absolute terms, not small relatively.
    For float64 Keras gets the rate (PiecewiseConstantDecay: the values) as 0-d float64 arrays
    (its torch backend would turn a bare np.float64 into float32), fastsgd as np.float64.
    """
    rng = random.Random(f"{name}-{float64}")
    ours_cls, keras_cls = getattr(schedules, name), getattr(K, name)
    total = identical = 0
    for args, kwargs in _random_cases(name, rng):
        kargs, fargs = list(args), list(args)
        if float64 and name == "PiecewiseConstantDecay":  # the values carry the dtype
            kargs[1] = [np.array(v, dtype=np.float64) for v in args[1]]
            fargs[1] = [np.float64(v) for v in args[1]]
        elif float64:
            kargs[0], fargs[0] = np.array(args[0], dtype=np.float64), np.float64(args[0])
        ksched, sched = keras_cls(*kargs, **kwargs), ours_cls(*fargs, **kwargs)
        atol = 1e-9 + (2.0 ** -23 * _top(name, args, kwargs) if "Cosine" in name else 0.0)
        for step in STEPS:
            if name == "CosineDecayRestarts" and kwargs["t_mul"] not in (1.0, 2.0, 3.0) and \
                    _restart_boundary(step, args[1], kwargs["t_mul"]):
                continue  # §12.1: Keras's float32 period index can be off by one exactly here
            want, got = kval(ksched, step), sched(step)
            assert type(got) is float
            total += 1
            identical += got == want
            assert abs(got - want) <= 1e-6 * abs(want) + atol, (name, args, kwargs, step, got, want)
    # Emulating the compute dtype op by op gives mostly bit-identical results (98-100% here;
    # the rest is cos/pow rounding); computing float32 schedules in double precision would not.
    assert identical >= 0.97 * total, f"only {identical}/{total} bit-identical"


def test_parity_piecewise_edge_cases_with_keras(K):
    cases = [([10, 5], [1.0, 2.0, 3.0]), ([-0.5], [0.1, 0.2]), ([10.5, 20], [0.1, 0.2, 0.3]),
             ([5], [0.1, math.inf]), ([10, 20], [1, 2, 3])]
    for boundaries, values in cases:
        ksched, sched = K.PiecewiseConstantDecay(boundaries, values), PiecewiseConstantDecay(boundaries, values)
        for step in (-3, 0, 3, 5, 6, 10, 11, 20, 21):
            want, got = kval(ksched, step), sched(step)
            assert got == want or (math.isnan(got) and math.isnan(want)), (boundaries, values, step, got, want)


def test_cosine_alpha_rounding_matches_keras(K):
    # CosineDecay forms 1 - alpha in double and rounds it once (Keras multiplies a Python float);
    # CosineDecayRestarts casts alpha first and subtracts in float32. At these steps the two
    # orders give different float32 results, so only the right one is bit-identical to Keras.
    for alpha, steps in [(0.33, (2, 3, 4, 5, 11)), (0.9, (1, 2, 7)), (0.6, (5, 7))]:
        ksched, sched = K.CosineDecay(1.0, 16, alpha=alpha), CosineDecay(1.0, 16, alpha=alpha)
        for step in steps:
            assert sched(step) == kval(ksched, step), (alpha, step)
    for alpha in (0.33, 0.9, 0.6, 0.1):
        ksched, sched = K.CosineDecayRestarts(1.0, 16, alpha=alpha), CosineDecayRestarts(1.0, 16, alpha=alpha)
        same = sum(sched(step) == kval(ksched, step) for step in range(48))
        assert same >= 45, (alpha, same)


# =============================================================================================
# 4. Errors


@pytest.mark.parametrize("cls", [ExponentialDecay, InverseTimeDecay])
@pytest.mark.parametrize("bad", [0, -1, -0.5])
def test_decay_steps_must_be_positive(cls, bad):
    with pytest.raises(ValueError, match="decay_steps"):
        cls(0.1, bad, 0.5)


@pytest.mark.parametrize("cls", [PolynomialDecay, CosineDecay])
@pytest.mark.parametrize("bad", [0, -10])
def test_decay_steps_must_be_positive_2(cls, bad):
    with pytest.raises(ValueError, match="decay_steps"):
        cls(0.1, bad)


@pytest.mark.parametrize("bad", [0, -3])
def test_first_decay_steps_must_be_positive(bad):
    with pytest.raises(ValueError, match="first_decay_steps"):
        CosineDecayRestarts(0.1, bad)


@pytest.mark.parametrize("boundaries, values", [([10, 20], [0.1, 0.2]), ([10], [0.1, 0.2, 0.3]), ([], [])])
def test_piecewise_length_mismatch(boundaries, values):
    with pytest.raises(ValueError, match="boundaries"):
        PiecewiseConstantDecay(boundaries, values)


def test_keras_raises_the_same_value_errors(K):
    for make in (lambda S: S.ExponentialDecay(0.1, 0, 0.5), lambda S: S.PolynomialDecay(0.1, -1),
                 lambda S: S.InverseTimeDecay(0.1, 0, 0.5), lambda S: S.CosineDecay(0.1, 0),
                 lambda S: S.CosineDecayRestarts(0.1, 0), lambda S: S.PiecewiseConstantDecay([1], [0.1])):
        with pytest.raises(ValueError):
            make(K)
        with pytest.raises(ValueError):
            make(schedules)
