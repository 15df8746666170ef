"""The NumPy reference (fastsgd.reference.ReferenceSGD) against Keras's own numbers.

Every expected value here comes from shared/KERAS_SEMANTICS.md: the worked numbers of §6 (all
checked on Keras 3.15.1/torch) and the numbers Keras's own test-suite asserts (§11). The last
part runs the reference beside real Keras, rule by rule, when Keras is installed.
"""

import os
import warnings

import numpy as np
import pytest

from fastsgd.reference import ReferenceSGD

F32 = np.float32

# Keras's torch backend converts tensors with np.array(x) and NumPy 2 warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def f32(values):
    """A fresh float32 array (a variable the reference may update in place)."""
    return np.array(values, dtype=F32)


# ---------------------------------------------------------------------------------------------
# The seed's docstring examples (TF-Keras SGD docstring), §6.1 and §6.2.


def test_seed_doctest_plain_step_gives_0_9():
    opt = ReferenceSGD(learning_rate=0.1)
    var = f32(1.0)
    opt.apply([var.copy()], [var])  # loss = var**2 / 2, so the gradient is var
    assert var == F32(0.9)
    assert float(var) == pytest.approx(0.8999999762, abs=1e-10)


def test_seed_doctest_momentum_steps_are_0_1_then_0_18():
    opt = ReferenceSGD(0.1, momentum=0.9)
    var = f32(1.0)
    val0 = var.copy()
    opt.apply([var.copy()], [var])
    val1 = var.copy()
    opt.apply([var.copy()], [var])
    val2 = var.copy()
    assert float(val0 - val1) == pytest.approx(0.1, abs=1e-6)
    assert float(val0 - val1) == pytest.approx(0.10000002, abs=1e-8)  # the float32 difference
    assert float(val1 - val2) == pytest.approx(0.18, abs=1e-6)
    assert float(val2) == pytest.approx(0.72, abs=1e-6)


def test_nesterov_first_step_is_lr_times_one_plus_mu():
    opt = ReferenceSGD(0.1, momentum=0.9, nesterov=True)
    var = f32([1.0])
    opt.apply([f32([1.0])], [var])
    assert float(1.0 - var[0]) == pytest.approx(0.19, abs=1e-6)


def test_nesterov_without_momentum_is_plain_sgd():
    a, b = f32([1.0, -2.0]), f32([1.0, -2.0])
    ReferenceSGD(0.1, nesterov=True).apply([f32([0.5, 3.0])], [a])
    ReferenceSGD(0.1).apply([f32([0.5, 3.0])], [b])
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# §6.3 EMA, §6.4 EMA with accumulation, §6.5 weight decay.


def test_ema_example():
    v = f32([[3, 4], [5, 6]])
    g = np.ones((2, 2), F32)
    opt = ReferenceSGD(learning_rate=1.0, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3)
    opt.apply([g], [v])
    np.testing.assert_allclose(v, [[2, 3], [4, 5]])
    np.testing.assert_allclose(opt.averages[0], [[2, 3], [4, 5]])  # set to v on the first step
    opt.apply([g], [v])
    np.testing.assert_allclose(v, [[1, 2], [3, 4]])
    np.testing.assert_allclose(opt.averages[0], [[1.9, 2.9], [3.9, 4.9]], rtol=1e-6)
    opt.apply([g], [v])  # v would be 0, but step 3 overwrites it with the average
    np.testing.assert_allclose(v, [[1.71, 2.71], [3.71, 4.71]], rtol=1e-6)
    np.testing.assert_allclose(opt.averages[0], [[1.71, 2.71], [3.71, 4.71]], rtol=1e-6)
    assert opt.iterations == 3


def test_ema_with_accumulation_example():
    v = f32([10.0])
    opt = ReferenceSGD(1.0, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2,
                       gradient_accumulation_steps=2)
    expected = [(10, 10), (9, 9), (9, 9), (8.5, 8.5), (8.5, 8.5), (7.5, 8.0)]
    for call, (var, avg) in enumerate(expected, start=1):
        opt.apply([f32([1.0])], [v])
        assert (float(v[0]), float(opt.averages[0][0])) == pytest.approx((var, avg), abs=1e-6), call


def test_ema_model_fit_example_and_finalize():
    # Dense(2, ones, no bias), x = 1, y = 0, mse: the gradient of each weight is the weight.
    w = f32([[1.0, 1.0]])
    opt = ReferenceSGD(0.1, use_ema=True, ema_momentum=0.9)
    for _ in range(2):
        opt.apply([w.copy()], [w])
    np.testing.assert_allclose(opt.averages[0], [[0.891, 0.891]], atol=1e-5)
    np.testing.assert_allclose(w, [[0.81, 0.81]], atol=1e-6)
    opt.finalize_variable_values([w])
    np.testing.assert_allclose(w, [[0.891, 0.891]], atol=1e-5)
    assert opt.iterations == 2  # finalize does not count


def test_finalize_checks_length_and_is_a_noop_without_ema():
    a, b = f32([1.0]), f32([2.0])
    opt = ReferenceSGD(0.1, use_ema=True)
    opt.apply([f32([1.0]), f32([1.0])], [a, b])
    with pytest.raises(ValueError):
        opt.finalize_variable_values([a])
    plain = ReferenceSGD(0.1)
    plain.apply([f32([1.0])], [a])
    before = a.copy()
    plain.finalize_variable_values([a])
    np.testing.assert_array_equal(a, before)


class Named(np.ndarray):
    """A NumPy array with a ``name``, to exercise ``var_names`` exclusion."""


def named(value, name):
    arr = f32(value).view(Named)
    arr.name = name
    return arr


def test_weight_decay_golden_1_9760959_and_exclusions():
    zero = f32(0.0)
    var1, var2, var3 = f32(2.0), named(2.0, "dense/exclude_me"), f32(2.0)

    ReferenceSGD(learning_rate=1.0, weight_decay=0.004).apply_gradients(zip([zero], [var1]))
    assert float(var1) == pytest.approx(1.992, abs=1e-6)

    opt2 = ReferenceSGD(learning_rate=1.0, weight_decay=0.004)
    opt2.exclude_from_weight_decay(var_names=["exclude"])
    opt2.apply_gradients(zip([zero, zero], [var1, var2]))

    opt3 = ReferenceSGD(learning_rate=1.0, weight_decay=0.004)
    opt3.exclude_from_weight_decay(var_list=[var3])
    opt3.apply_gradients(zip([zero, zero], [var1, var3]))

    assert float(var1) == pytest.approx(1.9760959, abs=1e-6)
    assert float(var2) == 2.0
    assert float(var3) == 2.0


def test_weight_decay_exclusion_is_replaced_and_works_after_build():
    a, b = f32([1.0]), f32([1.0])
    opt = ReferenceSGD(1.0, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_list=[a])
    opt.apply([f32([0.0]), f32([0.0])], [a, b])
    assert (a[0], b[0]) == (1.0, 0.5)
    opt.exclude_from_weight_decay(var_list=[b])  # replaces [a]; after build is allowed
    opt.apply([f32([0.0]), f32([0.0])], [a, b])
    assert (a[0], b[0]) == (0.5, 0.5)


def test_weight_decay_uses_the_same_learning_rate_as_the_step():
    class LearningRateSchedule:
        pass

    class Sched(LearningRateSchedule):
        """A duck-typed schedule: 1.0, 0.5, 0.25, ... by raw call count."""

        def __call__(self, step):
            return 0.5 ** int(step)

    v = f32([2.0])
    opt = ReferenceSGD(Sched(), weight_decay=0.1)
    opt.apply([f32([1.0])], [v])  # lr 1: 2 * 0.9 - 1
    assert v[0] == pytest.approx(0.8, abs=1e-6)
    opt.apply([f32([1.0])], [v])  # lr 0.5: 0.8 * 0.95 - 0.5
    assert v[0] == pytest.approx(0.26, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# §11.1 sgd_test.py and §11.2 optimizer_test.py numbers.


def test_single_step():
    v = f32([1.0, 2.0, 3.0, 4.0])
    opt = ReferenceSGD(learning_rate=0.5)
    opt.apply_gradients(zip([f32([1.0, 6.0, 7.0, 2.0])], [v]))
    np.testing.assert_allclose(v, [0.5, -1.0, -0.5, 3.0], rtol=1e-4, atol=1e-4)
    assert opt.iterations == 1
    assert opt.learning_rate == 0.5


def test_golden_nesterov_table():
    golden = np.array([
        [0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999],
        [0.9989, 0.9979, 0.9969, 0.9959, 0.9949, 0.9939, 0.9929, 0.9919, 0.9909, 0.9899],
        [0.9979, 0.9959, 0.9939, 0.9919, 0.9899, 0.9879, 0.9859, 0.9839, 0.9819, 0.9799],
        [0.9969, 0.9939, 0.9909, 0.9879, 0.9849, 0.9819, 0.9789, 0.9759, 0.9729, 0.9699],
        [0.9959, 0.9919, 0.9879, 0.9839, 0.9799, 0.9759, 0.9719, 0.9679, 0.9639, 0.9599],
    ])
    opt = ReferenceSGD(nesterov=True)  # lr 0.01 and momentum 0: Nesterov is a no-op
    x = np.ones(10, F32)
    grads = np.arange(0.1, 1.1, 0.1).astype(F32)
    opt.apply_gradients(zip([np.full(10, 0.01, F32)], [x]))
    for row in golden:
        np.testing.assert_allclose(x, row, rtol=5e-4, atol=5e-4)
        # The table is exact to 1e-4 places; hold the reference to that too.
        np.testing.assert_allclose(x, row, atol=2e-6)
        opt.apply_gradients(zip([grads], [x]))


def _step_with_clip(grad, **clip):
    """The gradient as the update sees it: lr 1 from a zero variable gives -g."""
    v = np.zeros(np.shape(grad), F32)
    ReferenceSGD(1.0, **clip).apply([f32(grad)], [v])
    return -v


def test_clip_norm():
    np.testing.assert_allclose(_step_with_clip([100.0, 100.0], clipnorm=1.0), [2 ** 0.5 / 2] * 2, rtol=1e-6)
    # A norm below the threshold is returned unchanged: (g * c) / c.
    np.testing.assert_allclose(_step_with_clip([0.3, 0.4], clipnorm=1.0), [0.3, 0.4], rtol=1e-7)
    np.testing.assert_array_equal(_step_with_clip([0.0, 0.0], clipnorm=1.0), [0.0, 0.0])


def test_clip_value():
    np.testing.assert_array_equal(_step_with_clip([100.0, 100.0], clipvalue=1.0), [1.0, 1.0])
    np.testing.assert_array_equal(_step_with_clip([-3.0, 0.25], clipvalue=1.0), [-1.0, 0.25])


def test_global_clip_norm():
    np.testing.assert_allclose(_step_with_clip([50.0, 100.0], global_clipnorm=1.0), [0.4472136, 0.8944272],
                               rtol=1e-6)
    # Across tensors: [3] and [4] have global norm 5.
    a, b = np.zeros(1, F32), np.zeros(1, F32)
    ReferenceSGD(1.0, global_clipnorm=1.0).apply([f32([3.0]), f32([4.0])], [a, b])
    np.testing.assert_allclose([-a[0], -b[0]], [0.6, 0.8], rtol=1e-6)
    # All-zero gradients: scale c * (1/c), no NaN.
    np.testing.assert_array_equal(_step_with_clip([0.0, 0.0], global_clipnorm=1.0), [0.0, 0.0])


def test_non_positive_clip_values_disable_clipping():
    for clip in ({"clipnorm": 0.0}, {"clipvalue": -1.0}, {"global_clipnorm": 0.0}):
        np.testing.assert_array_equal(_step_with_clip([100.0, -7.0], **clip), [100.0, -7.0])


def test_non_finite_gradients_under_clipping():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = _step_with_clip([np.inf, 1.0], clipnorm=1.0)
        assert np.isnan(out[0]) and out[1] == 0.0
        assert np.isnan(_step_with_clip([np.nan, 1.0], clipnorm=1.0)).all()
        # The global norm is inf, so (N - N) is NaN and every gradient of the call is NaN.
        a, b = np.zeros(2, F32), np.zeros(1, F32)
        ReferenceSGD(1.0, global_clipnorm=1.0).apply([f32([np.inf, 1.0]), f32([2.0])], [a, b])
        assert np.isnan(a).all() and np.isnan(b).all()
        out = _step_with_clip([np.nan, 5.0], clipvalue=1.0)
        assert np.isnan(out[0]) and out[1] == 1.0


def test_ema_first_step_and_no_overwrite_without_frequency():
    v = f32([4.0])
    opt = ReferenceSGD(1.0, use_ema=True, ema_momentum=0.5)
    for _ in range(4):
        opt.apply([f32([1.0])], [v])
    assert v[0] == 0.0  # never overwritten
    # averages: 3, 0.5*3+0.5*2, ... = 3, 2.5, 1.75, 0.875
    assert opt.averages[0][0] == pytest.approx(0.875)


def test_static_loss_scaling():
    v = f32([[1.0, 2.0], [3.0, 4.0]])
    opt = ReferenceSGD(learning_rate=1.0, loss_scale_factor=1024.0)
    opt.apply([v * 1024], [v])
    np.testing.assert_allclose(v, np.zeros((2, 2)), atol=1e-7)


def test_loss_scale_comes_before_clipping_and_accumulation():
    v = f32([0.0])
    opt = ReferenceSGD(1.0, loss_scale_factor=4.0, clipvalue=1.0, gradient_accumulation_steps=2)
    opt.apply([f32([8.0])], [v])
    assert opt.accumulators[0][0] == 2.0  # unscaled
    opt.apply([f32([2.0])], [v])  # mean (0.5 + 2) / 2 = 1.25, clipped to 1
    assert v[0] == -1.0


def test_gradient_accumulation_example():
    v = f32([[1.0, 2.0], [3.0, 4.0]])
    g = np.ones((2, 2), F32)
    opt = ReferenceSGD(learning_rate=1.0, gradient_accumulation_steps=3)
    expected = [
        ([[1, 2], [3, 4]], 1, 1, 0),
        ([[1, 2], [3, 4]], 2, 2, 0),
        ([[0, 1], [2, 3]], 0, 3, 1),
        ([[0, 1], [2, 3]], 1, 4, 1),
    ]
    for var, acc, raw, it in expected:
        opt.apply([g], [v])
        np.testing.assert_array_equal(v, var)
        np.testing.assert_array_equal(opt.accumulators[0], np.full((2, 2), acc))
        assert (opt.raw_iterations, opt.iterations) == (raw, it)


def test_gradient_accumulation_equals_mean_gradient_with_weight_decay():
    rng = np.random.RandomState(0)
    v1, v3 = f32([[0.9], [0.5]]), f32([[0.9], [0.5]])
    opt1 = ReferenceSGD(weight_decay=0.05)
    opt3 = ReferenceSGD(weight_decay=0.05, gradient_accumulation_steps=3)
    for _ in range(8):
        grads3 = rng.random_sample([3, 2, 1]).astype(F32)
        opt1.apply_gradients([(grads3.mean(axis=0), v1)])
        for batch in range(3):
            opt3.apply_gradients([(grads3[batch], v3)])
    np.testing.assert_allclose(v1, v3, rtol=1e-6, atol=1e-7)


def test_schedule_sees_raw_call_count_and_callable_is_not_called_on_accumulation_calls():
    class LearningRateSchedule:
        pass

    seen = []

    class Recording(LearningRateSchedule):
        def __call__(self, step):
            seen.append(int(step))
            return 0.1

    calls = []

    def callable_lr():
        calls.append(1)
        return 0.1

    v = f32([1.0])
    opt = ReferenceSGD(Recording(), weight_decay=0.01, gradient_accumulation_steps=3)
    for _ in range(6):
        opt.apply([f32([1.0])], [v])
    assert seen == [2, 5]  # once per update call, read before the increment
    w = f32([1.0])
    opt = ReferenceSGD(callable_lr, gradient_accumulation_steps=2)
    for _ in range(4):
        opt.apply([f32([1.0])], [w])
    assert len(calls) == 2


def test_callable_learning_rate():
    v = f32([[1.0, 2.0], [3.0, 4.0]])
    opt = ReferenceSGD(learning_rate=lambda: 0.1)
    opt.apply([np.ones((2, 2), F32)], [v])
    np.testing.assert_allclose(v, [[0.9, 1.9], [2.9, 3.9]], rtol=1e-6)
    assert opt.iterations == 1


def test_float_learning_rate_is_kept_in_float32():
    opt = ReferenceSGD(0.1)
    assert opt.learning_rate == float(F32(0.1)) == 0.10000000149011612


def test_apply_gradients_returns_the_raw_call_count_like_keras():
    v = f32([1.0])
    opt = ReferenceSGD(0.1, gradient_accumulation_steps=2)
    returned = [opt.apply_gradients([(f32([1.0]), v)]) for _ in range(3)]
    assert returned == [1, 2, 3]
    assert opt.iterations == 1


def test_iterations_counter():
    v = f32([1.0])
    opt = ReferenceSGD(0.1)
    assert opt.iterations == 0
    opt.apply([f32([1.0])], [v])
    assert opt.iterations == 1
    opt.apply([f32([1.0])], [v])
    assert opt.iterations == 2


def test_empty_gradients():
    v, v2 = f32([[3.0, 4.0], [5.0, 6.0]]), f32([[3.0, 4.0], [5.0, 6.0]])
    opt = ReferenceSGD(learning_rate=1.0)
    with pytest.raises(ValueError, match="No gradients provided for any variable"):
        opt.apply([None], [v])
    assert opt.iterations == 0
    opt = ReferenceSGD(learning_rate=1.0)
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        opt.apply_gradients([(None, v), (np.ones((2, 2), F32), v2)])
    np.testing.assert_array_equal(v, [[3, 4], [5, 6]])
    np.testing.assert_array_equal(v2, [[2, 3], [4, 5]])
    opt.apply([], [])  # an empty list changes nothing, not even iterations
    assert opt.iterations == 1


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_none_gradient_skips_decay_and_momentum():
    a, b = f32([1.0]), f32([1.0])
    opt = ReferenceSGD(0.5, momentum=0.5, weight_decay=0.5, use_ema=True, ema_momentum=0.5)
    opt.apply([f32([1.0]), f32([1.0])], [a, b])  # both: 1 * 0.75 - 0.5
    assert (a[0], b[0]) == (0.25, 0.25)
    opt.apply([None, f32([0.0])], [a, b])
    assert a[0] == 0.25  # untouched: no decay, no momentum carry
    assert opt.momentums[0][0] == -0.5
    assert b[0] == 0.25 * 0.75 - 0.25  # decay, then m = -0.25
    assert opt.averages[1][0] == 0.5 * 0.25 + 0.5 * b[0]
    assert opt.iterations == 2


def test_slots_follow_variable_identity():
    a, b = f32([1.0]), f32([10.0])
    opt = ReferenceSGD(1.0, momentum=0.5)
    opt.apply([f32([1.0]), f32([2.0])], [a, b])  # m = [-1, -2]
    opt.apply([f32([0.0]), f32([0.0])], [b, a])  # permuted: m = [-0.5, -1]
    assert (a[0], b[0]) == (-0.5, 7.0)
    opt.apply([f32([0.0])], [b])  # a subset
    assert (a[0], b[0]) == (-0.5, 6.5)
    with pytest.raises(ValueError, match="Unknown variable"):
        opt.apply([f32([0.0])], [f32([0.0])])


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_accumulators_all_reset_on_update_call():
    a, b = f32([0.0]), f32([0.0])
    opt = ReferenceSGD(1.0, gradient_accumulation_steps=2)
    opt.apply([f32([1.0]), f32([3.0])], [a, b])
    opt.apply([f32([1.0]), None], [a, b])  # update call; b's accumulator is dropped as well
    assert (a[0], b[0]) == (-1.0, 0.0)
    assert opt.accumulators[1][0] == 0.0


def test_float64_variables_compute_in_float64():
    v = np.array([1.0], np.float64)
    ReferenceSGD(0.1).apply([np.array([1.0])], [v])
    assert v.dtype == np.float64
    assert v[0] == 1.0 - float(F32(0.1))  # the rate is the float32 value, the step in float64


@pytest.mark.parametrize(
    "kwargs",
    [
        {"momentum": -1.0},
        {"momentum": 2.0},
        {"clipnorm": 1.0, "clipvalue": 1.0},
        {"clipnorm": 0.0, "global_clipnorm": 1.0},
        {"gradient_accumulation_steps": 1},
        {"use_ema": True, "ema_momentum": 1.5},
        {"use_ema": True, "ema_overwrite_frequency": 1.5},
        {"use_ema": True, "ema_overwrite_frequency": -2},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        ReferenceSGD(**kwargs)


def test_ema_arguments_are_not_validated_without_ema():
    ReferenceSGD(use_ema=False, ema_momentum=1.5, ema_overwrite_frequency=-2)


# ---------------------------------------------------------------------------------------------
# The reference beside real Keras (torch backend), one rule at a time.


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    return pytest.importorskip("keras", reason="Keras is needed to compare the reference with Keras")


def _close(actual, expected, scale):
    """The acceptance tolerance: |d| <= 1e-5 |keras| + 1e-6 max(1, max |value| so far)."""
    expected = np.asarray(expected, np.float64)
    bound = 1e-5 * np.abs(expected) + 1e-6 * max(1.0, scale)
    return np.all(np.abs(np.asarray(actual, np.float64) - expected) <= bound)


KERAS_RULES = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"weight_decay": 0.1},
    {"momentum": 0.5, "weight_decay": 0.05, "nesterov": True},
    {"clipnorm": 0.5},
    {"clipnorm": 1e3},
    {"clipvalue": 0.3},
    {"global_clipnorm": 1.0},
    {"global_clipnorm": 1e4},
    {"use_ema": True, "ema_momentum": 0.8},
    {"use_ema": True, "ema_momentum": 0.7, "ema_overwrite_frequency": 2},
    {"loss_scale_factor": 3.0},
    {"gradient_accumulation_steps": 2},
    {"gradient_accumulation_steps": 3, "momentum": 0.9, "weight_decay": 0.02},
    {"gradient_accumulation_steps": 2, "use_ema": True, "ema_momentum": 0.6, "ema_overwrite_frequency": 2},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "global_clipnorm": 2.0, "use_ema": True,
     "ema_momentum": 0.9, "ema_overwrite_frequency": 3, "loss_scale_factor": 64.0,
     "gradient_accumulation_steps": 2},
]


@pytest.mark.parametrize("lr_kind", ["float", "schedule", "callable"])
@pytest.mark.parametrize("rule", KERAS_RULES, ids=lambda r: ",".join(f"{k}={v}" for k, v in r.items()) or "plain")
def test_reference_matches_keras(rule, lr_kind):
    keras = _keras()
    rng = np.random.RandomState(len(KERAS_RULES) * 7 + KERAS_RULES.index(rule))
    shapes = [(1,), (1031,), (3, 5)]
    inits = [rng.standard_normal(s).astype(F32) for s in shapes]
    box = {"lr": 0.05}
    if lr_kind == "float":
        lr_k = lr_r = 0.05
    elif lr_kind == "schedule":
        lr_k = lr_r = keras.optimizers.schedules.ExponentialDecay(0.1, 3, 0.5)  # both call it with the step
    else:
        lr_k = lr_r = lambda: box["lr"]  # noqa: E731

    kvars = [keras.Variable(x.copy()) for x in inits]
    rvars = [x.copy() for x in inits]
    kopt = keras.optimizers.SGD(learning_rate=lr_k, **rule)
    ropt = ReferenceSGD(learning_rate=lr_r, **rule)
    scale = max(float(np.max(np.abs(x))) for x in inits)
    lsf = rule.get("loss_scale_factor", 1.0)
    for step in range(7):
        box["lr"] = 0.01 * (step + 1)
        grads = [(rng.standard_normal(s) * lsf).astype(F32) for s in shapes]
        if step == 3:
            grads[1] = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kopt.apply([None if g is None else keras.ops.convert_to_tensor(g) for g in grads], kvars)
            ropt.apply(grads, rvars)
        for i, (kv, rv) in enumerate(zip(kvars, rvars)):
            kval = keras.ops.convert_to_numpy(kv)
            scale = max(scale, float(np.max(np.abs(kval))))
            assert _close(rv, kval, scale), (rule, lr_kind, step, i, np.max(np.abs(rv - kval)))
        assert ropt.iterations == int(keras.ops.convert_to_numpy(kopt.iterations))
    if rule.get("use_ema"):
        kopt.finalize_variable_values(kvars)
        ropt.finalize_variable_values(rvars)
        for kv, rv in zip(kvars, rvars):
            assert _close(rv, keras.ops.convert_to_numpy(kv), scale)
