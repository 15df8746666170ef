"""fastsgd.SGD bookkeeping: iterations, learning rate, config, checkpoints, EMA finalisation,
weight-decay exclusion, legacy arguments."""

import warnings

import numpy as np
import pytest

import fastsgd
from fastsgd import schedules


def _vars(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (7,), (1,)]]


def _grads(rng, variables):
    return [rng.standard_normal(v.shape).astype(np.float32) for v in variables]


FULL = dict(learning_rate=schedules.ExponentialDecay(0.1, 3, 0.5), momentum=0.9, nesterov=True,
            weight_decay=0.01, global_clipnorm=1.0, use_ema=True, ema_momentum=0.8,
            ema_overwrite_frequency=3, loss_scale_factor=4.0, gradient_accumulation_steps=2)


@pytest.mark.parametrize("cfg", [FULL, dict(learning_rate=0.05, momentum=0.5, clipnorm=0.3),
                                 dict(learning_rate=0.05)])
def test_resume_from_state_dict_is_bit_identical(cfg):
    rng = np.random.default_rng(1)
    grads = [_grads(rng, _vars()) for _ in range(12)]
    straight, resumed = _vars(), _vars()
    opt = fastsgd.SGD(**cfg)
    for g in grads:
        opt.apply(g, straight)
    first = fastsgd.SGD(**cfg)
    for g in grads[:7]:
        first.apply(g, resumed)
    state = first.state_dict()
    second = fastsgd.SGD(**cfg)
    second.load_state_dict(state)  # before build: applied when the variables arrive
    for g in grads[7:]:
        second.apply(g, resumed)
    for a, b in zip(straight, resumed):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert second.iterations == opt.iterations


def test_load_state_dict_validates_before_writing():
    variables = _vars()
    opt = fastsgd.SGD(0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    opt.apply(_grads(rng, variables), variables)
    state = opt.state_dict()
    bad = {"iterations": 5, "slots": {"momentum": state["slots"]["momentum"][:-1] + [np.zeros(3)]}}
    with pytest.raises(ValueError, match="momentum slot 2"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["iterations"] == 1
    for a, b in zip(state["slots"]["momentum"], after["slots"]["momentum"]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="no average slots"):
        opt.load_state_dict({"iterations": 1, "slots": {"momentum": state["slots"]["momentum"],
                                                         "average": state["slots"]["momentum"]}})


def test_iterations_under_accumulation_and_lr_evaluation():
    calls = []

    def lr():
        calls.append(1)
        return 1.0

    v = np.array([[1, 2], [3, 4]], np.float32)
    opt = fastsgd.SGD(learning_rate=lr, gradient_accumulation_steps=3)
    seen = []
    for _ in range(4):
        opt.apply([np.ones((2, 2), np.float32)], [v])
        seen.append((opt.iterations, v.copy()))
    assert [s[0] for s in seen] == [0, 0, 1, 1]
    np.testing.assert_array_equal(seen[1][1], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(seen[2][1], [[0, 1], [2, 3]])
    np.testing.assert_array_equal(seen[3][1], [[0, 1], [2, 3]])
    assert len(calls) == 1  # only the update call reads the learning rate
    np.testing.assert_array_equal(opt.state_dict()["slots"]["accumulator"][0], np.ones((2, 2)))


def test_schedule_sees_raw_iterations():
    v = np.zeros(1, np.float32)
    sched = schedules.PiecewiseConstantDecay([1, 3], [1.0, 10.0, 100.0])
    opt = fastsgd.SGD(learning_rate=sched, gradient_accumulation_steps=2)
    deltas = []
    for _ in range(6):
        before = v.copy()
        opt.apply([np.full(1, -1.0, np.float32)], [v])
        deltas.append(float((v - before)[0]))
    # update calls are raw iterations 1, 3, 5 -> rates 1, 10, 100
    assert deltas == [0.0, 1.0, 0.0, 10.0, 0.0, 100.0]


def test_learning_rate_property_and_setter():
    opt = fastsgd.SGD(0.1)
    assert opt.learning_rate == pytest.approx(0.1) and opt.learning_rate == float(np.float32(0.1))
    opt.learning_rate = 0.5
    assert opt.learning_rate == 0.5
    opt.learning_rate = lambda: 0.25
    assert opt.learning_rate == 0.25
    sched_opt = fastsgd.SGD(schedules.ExponentialDecay(0.1, 10, 0.5))
    with pytest.raises(TypeError, match="LearningRateSchedule"):
        sched_opt.learning_rate = 0.3


def test_get_config_round_trip_and_float32_rate():
    opt = fastsgd.SGD(learning_rate=0.1, momentum=0.06, nesterov=True, weight_decay=0.004, name="my_sgd")
    cfg = opt.get_config()
    assert cfg["learning_rate"] == 0.10000000149011612
    assert set(cfg) == {"name", "learning_rate", "weight_decay", "clipnorm", "global_clipnorm", "clipvalue",
                        "use_ema", "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
                        "gradient_accumulation_steps", "momentum", "nesterov"}
    again = fastsgd.SGD.from_config(cfg)
    assert again.get_config() == cfg


def test_schedule_config_round_trip():
    opt = fastsgd.SGD(learning_rate=schedules.CosineDecay(0.05, 10, 0.1, warmup_target=0.2, warmup_steps=2))
    cfg = opt.get_config()
    assert isinstance(cfg["learning_rate"], dict)
    again = fastsgd.SGD.from_config(cfg)
    assert isinstance(again._lr, schedules.CosineDecay)
    assert again.learning_rate == opt.learning_rate


def test_tf_keras_config_keys_are_accepted():
    cfg = {"name": "SGD", "learning_rate": 0.01, "momentum": 0.0, "nesterov": False, "jit_compile": True,
           "is_legacy_optimizer": False, "weight_decay": None, "clipnorm": None, "global_clipnorm": None,
           "clipvalue": None, "use_ema": False, "ema_momentum": 0.99, "ema_overwrite_frequency": None}
    assert fastsgd.SGD.from_config(cfg).name == "SGD"


def test_legacy_lr_and_decay():
    with pytest.warns(DeprecationWarning):
        opt = fastsgd.SGD(lr=0.3)
    assert opt.learning_rate == float(np.float32(0.3))
    with pytest.warns(UserWarning, match="decay"):
        fastsgd.SGD(decay=0.1)


def test_auto_names_count_up():
    names = [fastsgd.SGD().name for _ in range(2)]
    assert names[0].startswith("sgd") and names[0] != names[1]


def test_finalize_variable_values_copies_averages():
    v = np.array([[3, 4], [5, 6]], np.float32)
    opt = fastsgd.SGD(1.0, use_ema=True, ema_momentum=0.9)
    for _ in range(2):
        opt.apply([np.ones((2, 2), np.float32)], [v])
    np.testing.assert_array_equal(v, [[1, 2], [3, 4]])
    out = v.copy()
    opt.finalize_variable_values([out])
    np.testing.assert_allclose(out, [[1.9, 2.9], [3.9, 4.9]], rtol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        opt.finalize_variable_values([out, out])
    plain = fastsgd.SGD(1.0)
    plain.apply([np.ones((2, 2), np.float32)], [v])
    before = v.copy()
    plain.finalize_variable_values([v])
    np.testing.assert_array_equal(v, before)


def test_exclude_from_weight_decay_by_identity_and_name():
    class Named(np.ndarray):
        pass

    a, b = np.full(2, 2.0, np.float32), np.full(2, 2.0, np.float32)
    c = np.full(2, 2.0, np.float32).view(Named)
    c.name = "dense/exclude_me"
    opt = fastsgd.SGD(1.0, weight_decay=0.004)
    opt.exclude_from_weight_decay(var_list=[b], var_names=["exclude"])
    zero = [np.zeros(2, np.float32)] * 3
    opt.apply(zero, [a, b, c])
    np.testing.assert_allclose(a, 1.992, rtol=1e-7)
    np.testing.assert_array_equal(b, 2.0)
    np.testing.assert_array_equal(np.asarray(c), 2.0)
    opt.exclude_from_weight_decay()  # replaces the exclusions, also after build
    opt.apply(zero, [a, b, c])
    np.testing.assert_allclose(b, 1.992, rtol=1e-7)


def test_apply_gradients_returns_iterations_and_scale_loss():
    v = np.ones(2, np.float32)
    opt = fastsgd.SGD(0.5, loss_scale_factor=1024.0)
    assert opt.scale_loss(1.0) == 1024.0
    assert opt.apply_gradients(zip([np.full(2, 1024.0, np.float32)], [v])) == 1
    np.testing.assert_array_equal(v, 0.5)


def test_keras_docstring_example():
    w = np.ones(3, np.float32)
    opt = fastsgd.SGD(learning_rate=0.1, momentum=0.9)
    opt.apply([np.ones(3, np.float32)], [w])
    np.testing.assert_array_equal(w, np.float32(0.9))


def test_no_warning_for_complete_gradients():
    v = np.ones(2, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastsgd.SGD(0.1).apply([np.ones(2, np.float32)], [v])
