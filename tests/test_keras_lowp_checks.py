"""fastsgd.keras.SGD with masters: what a state load must refuse, and masters that follow the weights.

Keras restores optimizer variables by position, so a checkpoint of another configuration lands
in the wrong variables unless checked: int16 remainders in float32 masters, or remainders split
with another rounding. And once masters exist, a write to the weights from outside (set_weights,
load_weights, EarlyStopping's restore) must not be undone by the next step, which runs from the
master.
"""

import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="the Keras adapter tests need keras (torch backend)")
torch = pytest.importorskip("torch", reason="the Keras adapter runs on Keras's torch backend")
if keras.backend.backend() != "torch":
    pytest.skip(f"Keras's backend is {keras.backend.backend()!r}; fastsgd.keras needs KERAS_BACKEND=torch",
                allow_module_level=True)

import fastsgd.keras  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

X = np.random.default_rng(0).standard_normal((64, 4)).astype("float32")
Y = X[:, :1] * 0.5 + 0.25


def compiled(init=1, lr=0.05, momentum=0.9, **kw):
    keras.utils.set_random_seed(init)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="bfloat16"),
                              keras.layers.Dense(1, dtype="bfloat16")])
    model.compile(optimizer=fastsgd.keras.SGD(lr, momentum=momentum, **kw), loss="mse")
    return model


def fit(model, epochs=1):
    model.fit(X, Y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)


def bits(t):
    t = getattr(t, "value", t).detach()
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def state(opt):
    return [bits(v).clone() for v in opt.variables]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def store_of(opt):
    store = {}
    opt.save_own_variables(store)
    return store


# =============================================================================================
# State loads


@pytest.mark.parametrize("saved,loading", [("remainder", "float32"), ("float32", "remainder")])
def test_load_weights_refuses_remainders_for_masters_and_back(saved, loading, tmp_path):
    src = compiled(momentum=0.0, master_weights=saved)
    fit(src, 2)
    path = str(tmp_path / "src.keras")
    src.save(path)
    dst = compiled(init=2, momentum=0.0, master_weights=loading)
    fit(dst)
    before = state(dst.optimizer)
    with pytest.raises(ValueError, match=r"_(master|remainder) \(a float32 master|an int16 remainder"):
        dst.load_weights(path)
    assert same(state(dst.optimizer), before)
    with pytest.raises(ValueError, match="cannot load this optimizer state") as caught:
        dst.optimizer.load_own_variables(store_of(src.optimizer))
    message = str(caught.value)
    assert "int16" in message and "float32" in message and "master_weights" in message
    assert same(state(dst.optimizer), before)
    # The layers that Keras loaded before refusing the optimizer are trained from, not reverted.
    loaded = [bits(w).clone() for w in dst.trainable_weights]
    dst.optimizer.learning_rate = 0.0
    fit(dst)
    assert same([bits(w) for w in dst.trainable_weights], loaded)


def test_same_count_other_dtype_is_refused_by_name():
    model = compiled(master_weights="float32")
    fit(model)
    opt = model.optimizer
    store = store_of(opt)
    master = opt._masters[0]
    index = [id(v) for v in opt.variables].index(id(master))
    store[str(index)] = np.zeros(master.shape, np.int16)
    before = state(opt)
    with pytest.raises(ValueError, match=rf"variable {index}, {master.path} \(a float32 master\), is float32 "
                                         rf"\(4, 3\) here but int16 \(4, 3\) in the store"):
        opt.load_own_variables(store)
    assert same(state(opt), before)
    store[str(index)] = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"float32 \(4, 3\) here but float32 \(3, 4\)"):
        opt.load_own_variables(store)
    assert same(state(opt), before)


def test_count_mismatch_refused_when_built_but_absent_state_kept_as_keras():
    trained = compiled(master_weights="float32")
    fit(trained)
    opt = trained.optimizer
    before = state(opt)
    other = compiled(init=2)          # no masters: fewer variables
    fit(other)
    with pytest.raises(ValueError, match=r"the store holds \d+ variables, this optimizer \d+"):
        opt.load_own_variables(store_of(other.optimizer))
    assert same(state(opt), before)
    # No per-variable state in the store (a file saved without an optimizer, or before it was
    # built) and an optimizer not built yet: Keras's warning, nothing loaded.
    for store in ({}, {"0": np.array(3, np.int32), "1": np.array(0.5, np.float32)}):
        with pytest.warns(UserWarning, match="Skipping variable loading"):
            opt.load_own_variables(store)
        assert same(state(opt), before)
    fresh = fastsgd.keras.SGD(master_weights="float32")
    with pytest.warns(UserWarning, match="Skipping variable loading"):
        fresh.load_own_variables(store_of(opt))
    assert not fresh.built and int(fresh.iterations.value) == 0


def test_load_weights_of_the_same_configuration_resumes_bit_identically(tmp_path):
    kw = dict(master_weights="float32", stochastic_rounding=True, seed=3)
    straight = compiled(**kw)
    fit(straight, 2)
    first = compiled(**kw)
    fit(first)
    path = str(tmp_path / "first.keras")
    first.save(path)
    resumed = compiled(init=9, **kw)
    fit(resumed, 3)                     # its own masters, weights and iterations, all to be replaced
    resumed.load_weights(path)
    fit(resumed)
    assert same([bits(w) for w in resumed.trainable_weights], [bits(w) for w in straight.trainable_weights])
    assert same(state(resumed.optimizer), state(straight.optimizer))


@pytest.mark.parametrize("saved,loading", [
    ((True, 5), (False, 5)), ((False, 5), (True, 5)), ((True, 5), (True, 6))])
def test_remainders_split_another_way_are_refused(saved, loading, tmp_path):
    src = compiled(master_weights="remainder", stochastic_rounding=saved[0], seed=saved[1])
    fit(src)
    path = str(tmp_path / "src.keras")
    src.save(path)
    dst = compiled(init=2, master_weights="remainder", stochastic_rounding=loading[0], seed=loading[1])
    fit(dst)
    before = state(dst.optimizer)
    want = f"split with stochastic_rounding={saved[0]}" + (f", seed={saved[1]}" if saved[0] else "")
    with pytest.raises(ValueError, match=want):
        dst.load_weights(path)
    with pytest.raises(ValueError, match=rf"cannot load these remainders: they were {want}, this optimizer"):
        dst.optimizer.load_own_variables(store_of(src.optimizer))
    assert same(state(dst.optimizer), before)


def test_remainder_split_record_and_seed_free_nearest(tmp_path):
    src = compiled(master_weights="remainder", seed=5)            # to nearest: the seed plays no part
    fit(src)
    record = src.optimizer.variables[-1]
    assert record.path.endswith("remainder_split") and record.dtype == "int64"
    assert record.value.tolist() == [0, 0]
    assert len(src.optimizer._masters) == 4
    path = str(tmp_path / "src.keras")
    src.save(path)
    dst = compiled(init=2, master_weights="remainder", seed=7)
    fit(dst)
    dst.load_weights(path)
    assert same(state(dst.optimizer), state(src.optimizer))
    big = compiled(master_weights="remainder", stochastic_rounding=True, seed=2**64 - 1).optimizer
    big.build(compiled().trainable_weights)
    assert big.variables[-1].value.tolist() == [1, -1]
    # Without remainders (no 16-bit variables) there is nothing to record: Keras's variables only.
    keras.utils.set_random_seed(0)
    wide = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    opt = fastsgd.keras.SGD(momentum=0.9, master_weights="remainder", stochastic_rounding=True)
    opt.build(wide.trainable_weights)
    ref = keras.optimizers.SGD(momentum=0.9)
    ref.build(wide.trainable_weights)
    assert [v.name for v in opt.variables] == [v.name for v in ref.variables]


def test_split_mode_changed_after_the_first_step_is_refused():
    model = compiled(master_weights="remainder", stochastic_rounding=True, seed=4)
    opt = model.optimizer
    opt.build(model.trainable_weights)
    opt.seed = 9                         # before the first step: the remainders are re-split anyway
    fit(model)
    assert opt.variables[-1].value.tolist() == [1, 9]
    before = state(opt) + [bits(w).clone() for w in model.trainable_weights]
    opt.stochastic_rounding = False
    grads = [torch.full(w.shape, 0.5, dtype=torch.bfloat16) for w in model.trainable_weights]
    with pytest.raises(ValueError, match=r"split with stochastic_rounding=True, seed=9 and cannot be joined "
                                         r"with stochastic_rounding=False"):
        opt.apply(grads)
    assert same(state(opt) + [bits(w) for w in model.trainable_weights], before)


# =============================================================================================
# Masters follow the weights written from outside


@pytest.mark.parametrize("form", ["float32", "remainder"])
def test_set_weights_mid_training_is_where_the_next_step_starts(form):
    model = compiled(momentum=0.0, master_weights=form, stochastic_rounding=form == "remainder")
    fit(model)
    opt = model.optimizer
    kept = bits(opt._masters[2]).clone()           # the second layer's kernel: not written
    weights = model.get_weights()
    weights[0] = np.full_like(weights[0], 0.375)
    model.get_layer(index=0).kernel.assign(weights[0])
    opt.learning_rate = 0.0
    fit(model)
    assert torch.all(model.trainable_weights[0].value == 0.375)
    master = opt._masters[0].value
    assert torch.all(master == 0.375) if form == "float32" else torch.all(master == 0)
    assert torch.equal(bits(opt._masters[2]), kept)  # untouched variables keep their masters
    model.set_weights([np.zeros_like(w) for w in weights])
    fit(model)
    assert all(not torch.any(w.value) for w in model.trainable_weights)


def test_load_weights_without_optimizer_state_mid_training(tmp_path):
    keras.utils.set_random_seed(3)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="bfloat16"),
                              keras.layers.Dense(1, dtype="bfloat16")])   # never compiled
    path = str(tmp_path / "plain.weights.h5")
    plain.save_weights(path)
    model = compiled(momentum=0.0, master_weights="float32")
    fit(model)
    with pytest.warns(UserWarning, match="Skipping variable loading"):
        model.load_weights(path)
    model.optimizer.learning_rate = 0.0
    fit(model)
    assert same([bits(w) for w in model.trainable_weights], [bits(w) for w in plain.trainable_weights])


def test_resync_masters_after_writes_torch_cannot_see():
    model = compiled(momentum=0.0, master_weights="float32")
    fit(model)
    opt = model.optimizer
    opt.learning_rate = 0.0
    kernel = model.trainable_weights[0]
    kernel.value.detach().view(torch.int16).numpy()[...] = 0x3f00  # 0.5, through shared memory
    opt.resync_masters()
    fit(model)
    assert torch.all(kernel.value == 0.5) and torch.all(opt._masters[0].value == 0.5)
    fastsgd.keras.SGD(master_weights="float32").resync_masters()   # not built: nothing to do


def test_refused_step_puts_resynced_masters_back():
    model = compiled(momentum=0.0, master_weights="float32")
    fit(model)
    opt = model.optimizer
    model.trainable_weights[0].assign(np.zeros((4, 3), "float32"))
    before = state(opt)
    bad = [torch.zeros(5, dtype=torch.bfloat16)] + [torch.zeros(w.shape, dtype=torch.bfloat16)
                                                     for w in model.trainable_weights[1:]]
    with pytest.raises(ValueError, match="shape"):
        opt.apply(bad)
    assert same(state(opt), before)
    opt.learning_rate = 0.0
    fit(model)                                       # the write is still seen
    assert not torch.any(model.trainable_weights[0].value)


def test_training_alone_never_resyncs():
    model = compiled(master_weights="float32")
    calls = []
    real = model.optimizer._reread_masters
    model.optimizer._reread_masters = lambda indices, *a: (calls.append(list(indices)), real(indices, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit(model, 3)
    assert calls == [[0, 1, 2, 3]]                   # the first step's, only


@pytest.mark.parametrize("form", ["float32", "remainder"])
def test_constraints_reach_the_master(form):
    """A constraint writes the stored variable after the step; the elements it changed must
    take that value as their exact value, or the master drifts on unconstrained while the
    variable stays pinned. NonNeg, lr 1: a weight pushed below 0 and then pulled up by 0.015
    a step must follow a float32 run's constrained weights, rounded as the form rounds (the
    gradients are bfloat16 values, so every step is exact in float32)."""
    v = keras.Variable(np.zeros(4, np.float32), dtype="bfloat16")
    v.constraint = keras.constraints.NonNeg()
    opt = fastsgd.keras.SGD(1.0, master_weights=form)
    opt.build([v])
    grads = [np.array([1.0, 1.0, -0.015, 0.5], np.float32)] + [np.full(4, -0.015, np.float32)] * 3
    ref = np.zeros(4, np.float32)
    for g in grads:
        g16 = torch.tensor(g).to(torch.bfloat16)
        opt.apply([g16], [v])
        ref = np.maximum(ref - g16.float().numpy(), 0)
        if form == "float32":   # the variable is the master rounded to nearest even
            expect = torch.tensor(ref).to(torch.bfloat16).float().numpy()
        else:                   # remainders round to nearest with ties away from zero
            expect = (((ref.view(np.uint32) + np.uint32(0x8000)) >> 16) << 16).view(np.float32)
        np.testing.assert_array_equal(v.value.detach().float().numpy(), expect)
    assert v.value.detach().float().numpy()[0] > 0.04   # pulled back up from the constraint, not pinned at 0
