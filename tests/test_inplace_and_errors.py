"""Zero-copy updates and all-or-nothing validation of fastsgd.SGD.apply on NumPy arrays."""

import numpy as np
import pytest

import fastsgd


def _state(opt, variables):
    return ([v.copy() for v in variables], opt.state_dict(), opt.iterations)


def _assert_unchanged(before, opt, variables):
    old_vars, old_state, old_it = before
    for a, b in zip(old_vars, variables):
        np.testing.assert_array_equal(a, b)
    new_state = opt.state_dict()
    assert new_state["iterations"] == old_state["iterations"]
    assert opt.iterations == old_it
    for kind, arrays in old_state["slots"].items():
        for a, b in zip(arrays, new_state["slots"][kind]):
            np.testing.assert_array_equal(a, b)


def test_updates_the_callers_own_buffer():
    buf = np.zeros(64, np.float32)
    a, b = buf[:10], buf[10:30].reshape(4, 5)
    opt = fastsgd.SGD(learning_rate=0.5, momentum=0.9)
    opt.apply([np.ones(10, np.float32), np.full((4, 5), 2, np.float32)], [a, b])
    np.testing.assert_array_equal(buf[:10], np.float32(-0.5))
    np.testing.assert_array_equal(buf[10:30], np.float32(-1.0))
    np.testing.assert_array_equal(buf[30:], 0)  # nothing written past the views


def test_data_pointer_is_stable_across_steps():
    w = np.ones(1000, np.float32)
    ptr = w.ctypes.data
    opt = fastsgd.SGD(0.1, momentum=0.5, use_ema=True)
    for _ in range(3):
        opt.apply([np.ones_like(w)], [w])
    assert w.ctypes.data == ptr
    assert not np.all(w == 1)


def _make_opt():
    return fastsgd.SGD(0.1, momentum=0.9, use_ema=True, gradient_accumulation_steps=2)


def _good(variables):
    return [np.full_like(v, 0.5) for v in variables]


@pytest.mark.parametrize(
    "breaker, exc, match",
    [
        (lambda v, g: (v, g[:-1] + [g[-1][::2]]), (ValueError, TypeError), "grads\\[2\\]"),
        (lambda v, g: (v, g[:-1] + [g[-1].astype(np.float64)]), TypeError, "dtype"),
        (lambda v, g: (v, g[:-1] + [g[-1].astype(np.int32)]), TypeError, "dtype"),
        (lambda v, g: (v, g[:-1] + [np.ones(7, np.float32)]), ValueError, "shape"),
        (lambda v, g: (v, g[:-1] + [g[-1].reshape(-1)]), ValueError, "shape"),
        (lambda v, g: (v, g[:-1] + [v[-1]]), ValueError, "share memory"),
        (lambda v, g: (v, g[:-1] + [[1.0] * v[-1].size]), TypeError, "grads\\[2\\]"),
        (lambda v, g: (v, g[:-1]), ValueError, "length"),
        (lambda v, g: (v[:-1] + [v[0]], g), ValueError, "more than once"),
        (lambda v, g: (v[:-1] + [np.zeros_like(v[-1])], g), ValueError, "Unknown variable"),
    ],
)
def test_bad_input_raises_before_any_write(breaker, exc, match):
    variables = [np.linspace(-1, 1, 5, dtype=np.float32), np.ones(3, np.float32),
                 np.arange(12, dtype=np.float32).reshape(3, 4)]
    opt = _make_opt()
    for _ in range(3):  # leaves the optimizer mid-window with non-zero slots
        opt.apply(_good(variables), variables)
    before = _state(opt, variables)
    bad_vars, bad_grads = breaker(list(variables), _good(variables))
    with pytest.raises(exc, match=match):
        opt.apply(bad_grads, bad_vars)
    _assert_unchanged(before, opt, variables)
    opt.apply(_good(variables), variables)  # still usable afterwards
    assert opt.iterations == 2


def test_read_only_variable_refused_without_write():
    variables = [np.ones(4, np.float32), np.ones(4, np.float32)]
    opt = fastsgd.SGD(0.1, momentum=0.9)
    opt.apply(_good(variables), variables)
    before = _state(opt, variables)
    variables[1].setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        opt.apply(_good(variables), variables)
    _assert_unchanged(before, opt, variables)


def test_non_contiguous_variable_refused_at_build():
    base = np.ones((4, 4), np.float32)
    opt = fastsgd.SGD(0.1)
    with pytest.raises(ValueError, match="contiguous"):
        opt.apply([np.ones(4, np.float32)], [base[:, 0]])
    assert not opt.built
    np.testing.assert_array_equal(base, 1)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64])
def test_non_float_variable_refused(dtype):
    with pytest.raises(TypeError, match="dtype"):
        fastsgd.SGD(0.1).apply([np.ones(3, np.float32)], [np.ones(3, dtype)])


def test_non_native_byte_order_refused():
    w = np.ones(3, np.dtype(">f4"))
    with pytest.raises(TypeError, match="byte order"):
        fastsgd.SGD(0.1).apply([np.ones(3, np.dtype(">f4"))], [w])


def test_aliasing_variables_refused():
    buf = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="share memory"):
        fastsgd.SGD(0.1).apply([np.ones(6, np.float32), np.ones(6, np.float32)], [buf[:6], buf[4:]])


def test_all_none_gradients():
    w = np.ones(3, np.float32)
    opt = fastsgd.SGD(0.1)
    with pytest.raises(ValueError, match="No gradients provided for any variable."):
        opt.apply([None], [w])
    np.testing.assert_array_equal(w, 1)


def test_none_gradient_skips_its_variable_with_warning():
    v1, v2 = np.ones((2, 2), np.float32), np.array([[3, 4], [5, 6]], np.float32)
    opt = fastsgd.SGD(1.0)
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        opt.apply([None, np.ones((2, 2), np.float32)], [v1, v2])
    np.testing.assert_array_equal(v1, 1)
    np.testing.assert_array_equal(v2, [[2, 3], [4, 5]])


def test_empty_gradient_list_is_a_no_op():
    opt = fastsgd.SGD(0.1)
    opt.apply([], [])
    assert opt.iterations == 0 and not opt.built


def test_permuted_and_subset_variable_lists_use_identity():
    a, b = np.ones(3, np.float32), np.ones(5, np.float32)
    ref_a, ref_b = a.copy(), b.copy()
    opt = fastsgd.SGD(0.1, momentum=0.9)
    ref = fastsgd.SGD(0.1, momentum=0.9)
    ga, gb = np.full(3, 0.5, np.float32), np.full(5, 2.0, np.float32)
    opt.apply([ga, gb], [a, b])
    ref.apply([ga, gb], [ref_a, ref_b])
    opt.apply([gb, ga], [b, a])      # permuted
    ref.apply([ga, gb], [ref_a, ref_b])
    opt.apply([gb], [b])             # subset
    ref.apply([gb], [ref_b])
    np.testing.assert_array_equal(a, ref_a)
    np.testing.assert_array_equal(b, ref_b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(momentum=-1.0), "momentum"),
        (dict(momentum=2.0), "momentum"),
        (dict(clipnorm=1.0, clipvalue=1.0), "Only one of"),
        (dict(clipnorm=0.0, global_clipnorm=1.0), "Only one of"),
        (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps"),
        (dict(use_ema=True, ema_momentum=1.5), "ema_momentum"),
        (dict(use_ema=True, ema_overwrite_frequency=1.5), "ema_overwrite_frequency"),
        (dict(learning_rate="fast"), "learning_rate"),
        (dict(bogus=1), "not recognized"),
        (dict(loss_scale_factor=-2.0), "loss_scale_factor"),
        (dict(slot_dtype="int8"), "slot_dtype"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastsgd.SGD(**kwargs)


def test_weight_decay_type_error():
    with pytest.raises(TypeError, match="weight_decay"):
        fastsgd.SGD(weight_decay="a lot")
