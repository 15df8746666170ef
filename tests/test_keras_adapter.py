"""fastsgd.keras.SGD inside model.compile / model.fit, against keras.optimizers.SGD (torch backend).

Each parity case trains the same small model twice with ``model.fit`` on a seeded synthetic
classification set (same initial weights, same batches): once with ``keras.optimizers.SGD``,
once with ``fastsgd.keras.SGD`` and the same arguments. After every epoch the model weights
*and every optimizer variable* (iterations, learning rate, averages, accumulators, momentums,
loss-scale state) must agree within the parity suite's tolerance
``|d| <= 1e-5 * |keras| + 1e-6 * max(1, largest |value| so far)`` (tests/test_keras_parity.py).
Then: save / load / resume equals never stopping, config interchange, callbacks, weight-decay
exclusions, Keras's own single-step numbers, zero-copy, refusals, mixed precision.
"""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="the Keras adapter tests need keras (torch backend)")
torch = pytest.importorskip("torch", reason="the Keras adapter runs on Keras's torch backend")
if keras.backend.backend() != "torch":
    pytest.skip(f"Keras's backend is {keras.backend.backend()!r}; fastsgd.keras needs KERAS_BACKEND=torch",
                allow_module_level=True)

import fastsgd.keras  # noqa: E402

F32 = np.float32
KERAS_RTOL, KERAS_ATOL = 1e-5, 1e-6  # the acceptance tolerance against Keras (test_keras_parity.py)
SCHEDULES = keras.optimizers.schedules

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Gradients do not exist"),
]


# =============================================================================================
# Helpers


def assert_close(actual, expected, scale, what, rtol=KERAS_RTOL, atol=KERAS_ATOL):
    """``|actual - expected| <= rtol * |expected| + atol * max(1, scale)``."""
    actual = np.asarray(actual, np.float64).reshape(-1)
    expected = np.asarray(expected, np.float64).reshape(-1)
    assert actual.shape == expected.shape, f"{what}: {actual.shape} values, expected {expected.shape}"
    bound = rtol * np.abs(expected) + atol * max(1.0, scale)
    bad = np.flatnonzero(~((actual == expected) | (np.abs(actual - expected) <= bound)))
    if bad.size:
        i = bad[0]
        raise AssertionError(f"{what}: {bad.size} of {actual.size} values outside tolerance; first at {i}: "
                             f"got {actual[i]!r}, expected {expected[i]!r} (bound {bound[i]:.3g}); "
                             f"largest |d| = {np.max(np.abs(actual - expected)):.3g}")


def numpy_of(x):
    return np.array(keras.ops.convert_to_numpy(x))


def dataset(n=192, features=12, classes=4, seed=0):
    """A seeded linearly separable-ish classification set (inputs ~ N(0, 1), 4 classes)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(F32)
    w = rng.standard_normal((features, classes))
    y = np.argmax(x @ w + 0.5 * rng.standard_normal((n, classes)), axis=1).astype(np.int32)
    return x, y


X, Y = dataset()
BATCH = 32  # 6 steps per epoch


def make_model(seed=7):
    """Dense(16, tanh) -> BatchNormalization -> Dense(4): kernels, biases, gamma and beta."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((X.shape[1],)),
        keras.layers.Dense(16, activation="tanh", name="hidden"),
        keras.layers.BatchNormalization(name="norm"),
        keras.layers.Dense(4, name="logits"),
    ], name="net")


class Record(keras.callbacks.Callback):
    """After every epoch: the model's weights, then every optimizer variable, then the current
    learning rate and ``iterations`` (all as NumPy)."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        opt = self.model.optimizer
        values = [numpy_of(w) for w in self.model.weights] + [numpy_of(v) for v in opt.variables]
        values += [numpy_of(opt.learning_rate), numpy_of(opt.iterations)]
        self.epochs.append(values)


def train(optimizer_class, kwargs, epochs=3, callbacks=(), configure=None):
    """Fits a fresh model (same seed, same batches) with ``optimizer_class(**kwargs())``.
    Returns (per-epoch records, final weights, model)."""
    model = make_model()
    opt = optimizer_class(**kwargs())
    if configure is not None:
        configure(opt, model)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    record = Record()
    model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[record, *[c() for c in callbacks]])
    return record.epochs, [numpy_of(w) for w in model.weights], model


def assert_runs_match(ours, theirs, what, rtol=KERAS_RTOL, atol=KERAS_ATOL):
    """Per-epoch records and final weights of two ``train`` runs agree at the parity tolerance."""
    (our_epochs, our_final, _), (keras_epochs, keras_final, _) = ours, theirs
    assert len(our_epochs) == len(keras_epochs)
    scale = 0.0
    for epoch, (a, b) in enumerate(zip(our_epochs, keras_epochs)):
        assert len(a) == len(b), f"{what}: epoch {epoch}: {len(a)} recorded values, Keras {len(b)}"
        scale = max([scale] + [float(np.max(np.abs(v))) if v.size else 0.0 for v in b])
        for i, (x, y) in enumerate(zip(a, b)):
            assert x.shape == y.shape, f"{what}: epoch {epoch} value {i}: shape {x.shape} vs {y.shape}"
            assert_close(x, y, scale, f"{what}: epoch {epoch} value {i}", rtol, atol)
    for i, (x, y) in enumerate(zip(our_final, keras_final)):
        assert_close(x, y, scale, f"{what}: final weight {i}", rtol, atol)


def exclude_kernel_and_names(opt, model):
    """Weight-decay exclusions by variable (the output kernel) and by name (biases, gamma)."""
    opt.exclude_from_weight_decay(var_list=[model.get_layer("logits").kernel], var_names=["bias", "gamma"])


# name -> (kwargs factory (fresh schedules per optimizer), configure, epochs)
PARITY_CASES = {
    "plain": (lambda: dict(learning_rate=0.2), None, 3),
    "momentum": (lambda: dict(learning_rate=0.05, momentum=0.9), None, 3),
    "nesterov": (lambda: dict(learning_rate=0.05, momentum=0.9, nesterov=True), None, 3),
    "weight_decay_exclusions": (lambda: dict(learning_rate=0.05, momentum=0.9, weight_decay=0.2),
                                exclude_kernel_and_names, 3),
    "clipnorm": (lambda: dict(learning_rate=0.1, momentum=0.5, clipnorm=0.02), None, 3),
    "clipvalue": (lambda: dict(learning_rate=0.1, momentum=0.5, clipvalue=0.004), None, 3),
    "global_clipnorm": (lambda: dict(learning_rate=0.1, momentum=0.5, global_clipnorm=0.05), None, 3),
    "ema_overwrite": (lambda: dict(learning_rate=0.05, momentum=0.9, use_ema=True, ema_momentum=0.8,
                                   ema_overwrite_frequency=4), None, 3),
    "accumulation": (lambda: dict(learning_rate=0.1, momentum=0.9, gradient_accumulation_steps=4), None, 4),
    "schedule": (lambda: dict(learning_rate=SCHEDULES.ExponentialDecay(0.2, decay_steps=4, decay_rate=0.6),
                              momentum=0.9, weight_decay=0.05), None, 3),
    "loss_scale_factor": (lambda: dict(learning_rate=0.05, momentum=0.9, loss_scale_factor=256.0), None, 2),
    "everything": (lambda: dict(learning_rate=SCHEDULES.CosineDecay(0.1, decay_steps=12, alpha=0.1),
                                momentum=0.8, nesterov=True, weight_decay=0.1, global_clipnorm=0.5,
                                use_ema=True, ema_momentum=0.7, ema_overwrite_frequency=3,
                                gradient_accumulation_steps=2),
                   exclude_kernel_and_names, 4),
}


# =============================================================================================
# model.fit parity


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_fit_matches_keras_every_epoch(case):
    kwargs, configure, epochs = PARITY_CASES[case]
    theirs = train(keras.optimizers.SGD, kwargs, epochs, configure=configure)
    ours = train(fastsgd.keras.SGD, kwargs, epochs, configure=configure)
    assert isinstance(ours[2].optimizer, fastsgd.keras.SGD)
    # The run must have trained: the weights moved from their initial values.
    initial = [numpy_of(w) for w in make_model().weights]
    assert any(not np.array_equal(a, b) for a, b in zip(ours[1], initial))
    assert_runs_match(ours, theirs, case)


def test_clip_thresholds_are_active():
    """The clip cases above would prove nothing if nothing were clipped: each threshold must
    change Keras's own training."""
    unclipped = train(keras.optimizers.SGD, lambda: dict(learning_rate=0.1, momentum=0.5), 1)[1]
    for clip in (dict(clipnorm=0.02), dict(clipvalue=0.004), dict(global_clipnorm=0.05)):
        clipped = train(keras.optimizers.SGD, lambda: dict(learning_rate=0.1, momentum=0.5, **clip), 1)[1]
        assert any(not np.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(clipped, unclipped)), clip


def test_reduce_lr_on_plateau_and_iterations():
    """ReduceLROnPlateau assigns ``optimizer.learning_rate`` (a float) after each epoch; the
    engine must step with the new rate, as Keras does."""
    def plateau():
        return keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=100.0,
                                                 verbose=0)

    kwargs = lambda: dict(learning_rate=0.2, momentum=0.9, gradient_accumulation_steps=2)  # noqa: E731
    theirs = train(keras.optimizers.SGD, kwargs, 3, callbacks=[plateau])
    ours = train(fastsgd.keras.SGD, kwargs, 3, callbacks=[plateau])
    # Recorded before the callback runs; the first epoch sets its baseline, later ones halve.
    rates = [float(epoch[-2]) for epoch in ours[0]] + [float(numpy_of(ours[2].optimizer.learning_rate))]
    np.testing.assert_allclose(rates, [0.2, 0.2, 0.1, 0.05], rtol=1e-6)  # the callback acted on ours
    assert [int(epoch[-1]) for epoch in ours[0]] == [3, 6, 9]        # iterations = calls // 2
    assert_runs_match(ours, theirs, "ReduceLROnPlateau")


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_matches_keras(policy):
    """Keras's mixed precision: float32 variables, float16/bfloat16 compute; under
    mixed_float16 ``compile`` wraps the optimizer in Keras's LossScaleOptimizer, which calls
    our ``apply`` with unscaled gradients (its scale and counter are compared too)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        kwargs = lambda: dict(learning_rate=0.05, momentum=0.9, use_ema=True)  # noqa: E731
        theirs = train(keras.optimizers.SGD, kwargs, 2)
        ours = train(fastsgd.keras.SGD, kwargs, 2)
    finally:
        keras.config.set_dtype_policy(previous)
    wrapped = ours[2].optimizer
    if policy == "mixed_float16":
        assert isinstance(wrapped, keras.optimizers.LossScaleOptimizer)
        assert isinstance(wrapped.inner_optimizer, fastsgd.keras.SGD)
    else:
        assert isinstance(wrapped, fastsgd.keras.SGD)
    # Low-precision compute turns the optimizers' last-bit differences into differences of the
    # compute dtype's resolution in the next gradients; the bound is that resolution.
    eps = float(np.finfo(np.float16).eps) if policy == "mixed_float16" else 2.0 ** -7
    assert_runs_match(ours, theirs, policy, rtol=eps, atol=eps)


# =============================================================================================
# Save, load, resume


def test_save_load_resume_equals_uninterrupted(tmp_path):
    """model.save -> keras.models.load_model (optimizer state included) -> fit on gives exactly
    the weights and optimizer variables of never stopping. Accumulation windows of 4 calls cross
    the 6-call epochs, so the saved accumulators and raw counter matter."""
    kwargs = lambda: dict(learning_rate=SCHEDULES.ExponentialDecay(0.1, decay_steps=3, decay_rate=0.8),  # noqa
                          momentum=0.9, nesterov=True, weight_decay=0.02, gradient_accumulation_steps=4)
    straight = train(fastsgd.keras.SGD, kwargs, epochs=4)
    assert_runs_match(straight, train(keras.optimizers.SGD, kwargs, epochs=4), "uninterrupted")

    first = train(fastsgd.keras.SGD, kwargs, epochs=2)
    path = str(tmp_path / "model.keras")
    first[2].save(path)
    model = keras.models.load_model(path)
    opt = model.optimizer
    assert type(opt) is fastsgd.keras.SGD
    assert opt.get_config() == first[2].optimizer.get_config()
    for loaded, saved in zip(opt.variables, first[2].optimizer.variables):
        np.testing.assert_array_equal(numpy_of(loaded), numpy_of(saved), err_msg=loaded.path)
    record = Record()
    model.fit(X, Y, batch_size=BATCH, epochs=4, initial_epoch=2, shuffle=False, verbose=0, callbacks=[record])

    assert len(record.epochs) == 2
    assert not np.array_equal(record.epochs[-1][0], first[0][-1][0])  # training went on after the load
    for got, want in zip(record.epochs, straight[0][2:]):
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            np.testing.assert_array_equal(a, b, err_msg=f"value {i}")
    assert int(numpy_of(opt.iterations)) == 24 // 4 and int(numpy_of(opt._iterations)) == 24


# =============================================================================================
# Config, variables, direct apply


def test_config_round_trip_and_interchange():
    args = dict(learning_rate=0.5, momentum=0.06, nesterov=True, weight_decay=0.004, clipnorm=1.0,
                use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3, loss_scale_factor=8.0,
                gradient_accumulation_steps=2, name="opt")
    ours, theirs = fastsgd.keras.SGD(**args), keras.optimizers.SGD(**args)
    assert ours.get_config() == theirs.get_config()
    serialized = keras.optimizers.serialize(ours)
    assert serialized["registered_name"] == "fastsgd>SGD"
    back = keras.optimizers.deserialize(json.loads(json.dumps(serialized)))
    assert type(back) is fastsgd.keras.SGD and back.get_config() == ours.get_config()
    # Keras's own config builds ours, and a schedule survives the trip.
    assert fastsgd.keras.SGD.from_config(theirs.get_config()).get_config() == theirs.get_config()
    scheduled = fastsgd.keras.SGD(SCHEDULES.PiecewiseConstantDecay([2, 5], [0.1, 0.05, 0.01]), momentum=0.5)
    again = keras.optimizers.deserialize(json.loads(json.dumps(keras.optimizers.serialize(scheduled))))
    assert isinstance(again._learning_rate, SCHEDULES.PiecewiseConstantDecay)
    assert again.get_config() == scheduled.get_config()
    # In a compiled model's config.
    model = make_model()
    model.compile(optimizer=fastsgd.keras.SGD(0.1, momentum=0.9), loss="mse")
    assert model.get_compile_config()["optimizer"]["registered_name"] == "fastsgd>SGD"


def test_optimizer_variables_are_kerass():
    """Same optimizer variables as keras.optimizers.SGD: names, order, shapes, dtypes."""
    args = dict(learning_rate=0.1, momentum=0.9, use_ema=True, gradient_accumulation_steps=3)
    built = []
    for cls in (keras.optimizers.SGD, fastsgd.keras.SGD):
        model = make_model()
        opt = cls(**args, name="opt")
        opt.build(model.trainable_variables)
        built.append([(v.path, tuple(v.shape), v.dtype) for v in opt.variables])
    assert built[0] == built[1]
    assert len(built[1]) == 2 + 3 * 6  # iterations, learning rate; average, accumulator, momentum x 6
    assert fastsgd.keras.SGD(0.5).variables.__len__() == 2


def test_keras_single_step_numbers():
    """keras/src/optimizers/sgd_test.py::test_single_step."""
    opt = fastsgd.keras.SGD(learning_rate=0.5)
    assert len(opt.variables) == 2
    var = keras.Variable(np.array([1.0, 2.0, 3.0, 4.0], F32))
    opt.apply([torch.tensor([1.0, 6.0, 7.0, 2.0])], [var])
    np.testing.assert_allclose(numpy_of(var), [0.5, -1.0, -0.5, 3.0], rtol=1e-6)
    assert int(numpy_of(opt.variables[0])) == 1 and float(numpy_of(opt.variables[1])) == 0.5


def test_weight_decay_exclusions_by_variable_and_name():
    """keras/src/optimizers/sgd_test.py::test_weight_decay, then exclusions changed after build
    (Keras lets them take effect), both sides compared."""
    def run(cls):
        grads = torch.zeros(1)
        var1 = keras.Variable(np.full(1, 2.0, F32), name="weight")
        var2 = keras.Variable(np.full(1, 2.0, F32), name="exclude")
        var3 = keras.Variable(np.full(1, 2.0, F32), name="var3")
        cls(learning_rate=1.0, weight_decay=0.004).apply([grads], [var1])
        opt2 = cls(learning_rate=1.0, weight_decay=0.004)
        opt2.exclude_from_weight_decay(var_names=["exclude"])
        opt2.apply([grads, grads], [var1, var2])
        opt3 = cls(learning_rate=1.0, weight_decay=0.004)
        opt3.exclude_from_weight_decay(var_list=[var3])
        opt3.apply([grads, grads], [var1, var3])
        opt3.exclude_from_weight_decay(var_names=["weight"])  # after build: var1 stops decaying
        opt3.apply([grads, grads], [var1, var3])
        return [float(numpy_of(v)[0]) for v in (var1, var2, var3)]

    ours = run(fastsgd.keras.SGD)
    assert ours == run(keras.optimizers.SGD)
    np.testing.assert_allclose(ours, [1.9760959, 2.0, 1.992], rtol=1e-6)


def test_partial_permuted_lists_and_none_gradients_match_keras():
    """A permuted subset of the built variables and a None gradient, two steps, vs Keras."""
    results = []
    for cls in (keras.optimizers.SGD, fastsgd.keras.SGD):
        model = make_model()
        variables = model.trainable_variables
        opt = cls(learning_rate=0.1, momentum=0.9, use_ema=True)
        opt.build(variables)
        rng = np.random.default_rng(3)
        for _ in range(2):
            grads = [torch.from_numpy(rng.standard_normal(tuple(v.shape)).astype(F32)) for v in variables]
            order = [3, 0, 5, 1]
            with pytest.warns(UserWarning, match="Gradients do not exist"):
                opt.apply([grads[i] if i != 5 else None for i in order], [variables[i] for i in order])
        results.append([numpy_of(v) for v in variables + opt.variables])
    for a, b in zip(*results):
        assert_close(a, b, 10.0, "partial/permuted step")


def test_updates_keras_variables_in_place():
    """The model variables' and the momentum variables' own torch tensors change (zero-copy)."""
    var = keras.Variable(np.ones((3, 2), F32), name="w")
    opt = fastsgd.keras.SGD(learning_rate=0.1, momentum=0.9)
    opt.build([var])
    tensor, momentum = var.value, opt.momentums[0].value
    pointers = (tensor.data_ptr(), momentum.data_ptr())
    opt.apply([torch.ones(3, 2)], [var])
    assert var.value is tensor and opt.momentums[0].value is momentum
    assert (tensor.data_ptr(), momentum.data_ptr()) == pointers
    np.testing.assert_allclose(tensor.detach().numpy(), np.full((3, 2), 0.9), rtol=1e-6)
    np.testing.assert_allclose(momentum.numpy(), np.full((3, 2), -0.1), rtol=1e-6)


def test_refused_step_changes_nothing():
    var = keras.Variable(np.ones((3, 2), F32), name="w")
    other = keras.Variable(np.ones(4, F32), name="b")
    opt = fastsgd.keras.SGD(learning_rate=0.1, momentum=0.9)
    opt.apply([torch.ones(3, 2), torch.ones(4)], [var, other])
    before = [numpy_of(v) for v in [var, other] + opt.variables]
    with pytest.raises(ValueError):
        opt.apply([torch.ones(3, 2), torch.ones(5)], [var, other])  # wrong shape, second tensor
    with pytest.raises(ValueError, match="No gradients provided"):
        opt.apply([None, None], [var, other])
    with pytest.raises(ValueError, match="Unknown variable"):
        opt.apply([torch.ones(3, 2)], [keras.Variable(np.ones((3, 2), F32))])
    after = [numpy_of(v) for v in [var, other] + opt.variables]
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)


def test_refuses_other_backends(monkeypatch):
    """Under any backend but torch, construction fails with an error naming the torch backend."""
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="torch backend"):
        fastsgd.keras.SGD(learning_rate=0.1)


def test_invalid_arguments_raise_kerass_errors():
    for bad, match in ((dict(momentum=2.0), "momentum"), (dict(clipnorm=1.0, clipvalue=1.0), "Only one of"),
                       (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps"),
                       (dict(use_ema=True, ema_momentum=1.5), "ema_momentum"),
                       (dict(learning_rate=1), "learning_rate")):
        with pytest.raises(ValueError, match=match):
            fastsgd.keras.SGD(**bad)


def test_stateless_apply_matches_keras():
    """stateless_apply (the functional form) gives Keras's values and leaves state untouched."""
    outs = []
    for cls in (keras.optimizers.SGD, fastsgd.keras.SGD):
        var = keras.Variable(np.arange(4, dtype=F32), name="w")
        opt = cls(learning_rate=0.1, momentum=0.9)
        opt.build([var])
        new_vars, new_opt_vars = opt.stateless_apply([v.value.clone() for v in opt.variables], [torch.ones(4)],
                                                     [var.value.detach().clone()])
        outs.append([numpy_of(t) for t in new_vars + new_opt_vars])
        np.testing.assert_array_equal(numpy_of(var), np.arange(4, dtype=F32))
    for a, b in zip(*outs):
        assert_close(a, b, 4.0, "stateless_apply")


def test_fit_on_cuda_matches_keras():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    kwargs, configure, epochs = PARITY_CASES["everything"]
    theirs = train(keras.optimizers.SGD, kwargs, epochs, configure=configure)
    ours = train(fastsgd.keras.SGD, kwargs, epochs, configure=configure)
    assert ours[2].trainable_variables[0].value.device.type == "cuda"
    assert_runs_match(ours, theirs, "cuda")
