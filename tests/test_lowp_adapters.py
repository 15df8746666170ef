"""Master weights, remainders and stochastic rounding through fastsgd.torch.SGD and fastsgd.keras.SGD.

Oracles: torch.optim.SGD(foreach=False) on float32 copies of the parameters (a float32 master
must be that run, bit for bit: the torch rule is bit-identical to it for float32), fastsgd.SGD's
array API fed the very gradients the adapter saw (variables, masters and remainders must agree
bit for bit), and the same training never stopped (a checkpoint resume must not change a bit).
"""

import io
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the adapter tests need torch")

import fastsgd  # noqa: E402
import fastsgd.torch as ftorch  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def bits(t):
    """A tensor's raw bits as int64 (bfloat16/float16/uint16 -> 16 bits, float32 -> 32 bits)."""
    t = t.detach().contiguous()
    if t.element_size() == 2:
        return t.view(torch.int16).to(torch.int64) & 0xFFFF
    return t.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def seeded(shape, seed, dtype, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# =============================================================================================
# torch: masters against torch.optim.SGD in float32

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
                                dict(momentum=0.8, dampening=0.1),
                                dict()])
def test_torch_float32_master_is_torch_float32_run(dtype, kw):
    shapes = [(37, 11), (129,), ()]
    low = [torch.nn.Parameter(seeded(s, i, dtype)) for i, s in enumerate(shapes)]
    wide = torch.nn.Parameter(seeded((5, 3), 9, torch.float32))       # unaffected by the mode
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    ref_wide = torch.nn.Parameter(wide.detach().clone())
    opt = ftorch.SGD(low + [wide], lr=0.05, master_weights="float32", **kw)
    oracle = torch.optim.SGD(ref + [ref_wide], lr=0.05, foreach=False, **kw)
    for step in range(60):
        for i, (p, r) in enumerate(zip(low + [wide], ref + [ref_wide])):
            g = seeded(p.shape, 1000 * step + i, p.dtype, 0.1)
            p.grad, r.grad = g, g.float()
        opt.step()
        oracle.step()
    for p, r in zip(low, ref):
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32 and master.shape == p.shape
        assert torch.equal(bits(master), bits(r))
        assert torch.equal(bits(p), bits(r.detach().to(dtype)))          # stored to nearest even
        if kw.get("momentum"):
            buf = opt.state[p]["momentum_buffer"]
            assert buf.dtype == torch.float32
            assert torch.equal(bits(buf), bits(oracle.state[r]["momentum_buffer"]))
    assert torch.equal(bits(wide), bits(ref_wide))
    assert "master" not in opt.state[wide]
    # Without the master, bfloat16 to nearest drifts away from the float32 run.
    plain = [torch.nn.Parameter(seeded(s, i, dtype)) for i, s in enumerate(shapes)]
    opt_plain = ftorch.SGD(plain, lr=0.05, **kw)
    for step in range(60):
        for i, p in enumerate(plain):
            p.grad = seeded(p.shape, 1000 * step + i, p.dtype, 0.1)
        opt_plain.step()
    assert not torch.equal(bits(plain[0]), bits(low[0]))


def _unround(p, rem):
    """float32 master bits from a bfloat16 parameter and its remainder (stored to nearest,
    ties away from zero: the high half was rounded up in magnitude when rem >= 0x8000)."""
    r = rem.view(torch.int16).to(torch.int64) & 0xFFFF
    up = (r >= 0x8000).to(torch.int64)
    return ((bits(p) - up) << 16) | r


@pytest.mark.parametrize("stochastic", [False, True])
def test_torch_remainder_is_the_float32_master_over_many_steps(stochastic):
    p = torch.nn.Parameter(seeded((4099,), 3, torch.bfloat16))
    ref = torch.nn.Parameter(p.detach().float())
    kw = dict(lr=0.03, momentum=0.9, weight_decay=1e-2)
    opt = ftorch.SGD([p], master_weights="remainder", stochastic_rounding=stochastic, seed=11, **kw)
    oracle = torch.optim.SGD([ref], foreach=False, **kw)
    for step in range(300):
        g = seeded(p.shape, step, torch.bfloat16, 0.05)
        p.grad, ref.grad = g, g.float()
        opt.step()
        oracle.step()
        if step == 0:
            assert opt.state[p]["remainder"].dtype == torch.uint16
    rem = opt.state[p]["remainder"]
    u = bits(ref)
    assert torch.equal(rem.view(torch.int16).to(torch.int64) & 0xFFFF, u & 0xFFFF)
    up = bits(p) - (u >> 16)
    assert set(up.unique().tolist()) <= {0, 1}
    if not stochastic:
        assert torch.equal(_unround(p, rem), u)
    else:
        assert up.sum() > 0   # some rounded up, some down: the high half alone is not the rule


# =============================================================================================
# torch: the adapter against fastsgd.SGD's array API on the same gradients


def _bf16_model(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    return model.to(torch.bfloat16)


@pytest.mark.parametrize("form,stochastic", [("float32", False), ("float32", True), ("remainder", False),
                                             ("remainder", True), (None, True)])
def test_torch_model_matches_array_api(form, stochastic):
    model = _bf16_model(0)
    twins = [p.detach().clone() for p in model.parameters()]
    kw = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    opt = ftorch.SGD(model.parameters(), lr=0.05, convention="keras", master_weights=form,
                     stochastic_rounding=stochastic, seed=77, **kw)
    # Without a master the adapter keeps torch's slots in the parameter's dtype.
    slot_dtype = "float32" if form else "variable"
    ref = fastsgd.SGD(learning_rate=0.05, master_weights=form, stochastic_rounding=stochastic, seed=77,
                      slot_dtype=slot_dtype, **kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(40):
        x = torch.randn(16, 12, generator=gen).to(torch.bfloat16)
        y = torch.randn(16, 3, generator=gen).to(torch.bfloat16)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        ref.apply(grads, twins)
    params = list(model.parameters())
    for p, t in zip(params, twins):
        assert torch.equal(bits(p), bits(t))
    if form is not None:
        key = "master" if form == "float32" else "remainder"
        theirs = ref.state_dict()["slots"][key]
        for i, p in enumerate(params):
            mine = opt.state[p][key]
            want = torch.from_numpy(np.ascontiguousarray(theirs[i]).view(np.int32 if key == "master" else np.int16))
            assert torch.equal(mine.view(want.dtype), want)
    # Stochastic rounding changes the stored bits: not the to-nearest run.
    if stochastic:
        plain = _bf16_model(0)
        assert not all(torch.equal(bits(a), bits(b)) for a, b in zip(plain.parameters(), params))


# =============================================================================================
# torch: stochastic rounding, checkpoints


def _sr_run(form, seed, steps, model=None, opt=None, start=0):
    model = model if model is not None else _bf16_model(3)
    if opt is None:
        opt = ftorch.SGD(model.parameters(), lr=0.02, momentum=0.9, master_weights=form,
                         stochastic_rounding=True, seed=seed)
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + step)
        x = torch.randn(8, 12, generator=gen).to(torch.bfloat16)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("form", [None, "float32", "remainder"])
def test_torch_resume_is_bit_identical(form):
    straight, _ = _sr_run(form, 5, 12)
    first, opt = _sr_run(form, 5, 5)
    sd = roundtrip(opt.state_dict())
    assert sd["fastsgd"] == {"raw_iterations": 5, "skipped_steps": 0, "seed": 5,
                             **({"remainder_split": "stochastic"} if form == "remainder" else {})}
    if form is not None:
        key = "master" if form == "float32" else "remainder"
        assert all(sd["state"][i][key].dtype == (torch.float32 if key == "master" else torch.uint16)
                   for i in sd["state"])
        assert all(s["momentum_buffer"].dtype == torch.float32 for s in sd["state"].values())
    model_state = roundtrip(first.state_dict())
    resumed = _bf16_model(99)
    resumed.load_state_dict(model_state)
    opt2 = ftorch.SGD(resumed.parameters(), lr=0.02, momentum=0.9, master_weights=form,
                      stochastic_rounding=True, seed=123)       # the checkpoint's seed wins
    opt2.load_state_dict(sd)
    _sr_run(form, None, 7, resumed, opt2, start=5)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(bits(a), bits(b))
    assert opt2.iterations == 12 and opt2.state_dict()["fastsgd"]["seed"] == 5


def test_torch_seeds_differ_and_rounding_is_unbiased():
    a, _ = _sr_run(None, 1, 3)
    b, _ = _sr_run(None, 2, 3)
    c, _ = _sr_run(None, 1, 3)
    pa, pb, pc = (list(m.parameters()) for m in (a, b, c))
    assert all(torch.equal(bits(x), bits(y)) for x, y in zip(pa, pc))
    assert not torch.equal(bits(pa[0]), bits(pb[0]))
    # One step far below half an ulp: to nearest never moves, stochastic moves on average by it.
    n, lr = 200_000, 1e-4
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    p.grad = q.grad = torch.ones(n, dtype=torch.bfloat16)
    ftorch.SGD([p], lr=lr, stochastic_rounding=True, seed=4).step()
    ftorch.SGD([q], lr=lr).step()
    assert torch.all(q == 1)
    target = float(np.float32(1.0) - np.float32(lr))
    ulp = 2.0 ** -8                                      # bfloat16 spacing just below 1
    prob = (1.0 - target) / ulp
    sigma = ulp * (prob * (1 - prob) / n) ** 0.5
    assert set(p.detach().float().unique().tolist()) == {1.0, 1.0 - ulp}
    assert abs(p.detach().double().mean().item() - target) < 5 * sigma


def test_torch_modes_off_are_unchanged():
    params = [torch.nn.Parameter(seeded((17,), i, torch.bfloat16)) for i in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ftorch.SGD(params, lr=0.1, momentum=0.9)
    off = ftorch.SGD(twins, lr=0.1, momentum=0.9, master_weights=None, stochastic_rounding=False, seed=9)
    for step in range(5):
        for p, t in zip(params, twins):
            p.grad = t.grad = seeded(p.shape, step, torch.bfloat16)
        opt.step()
        off.step()
    for p, t in zip(params, twins):
        assert torch.equal(bits(p), bits(t))
        assert set(off.state[t]) == {"momentum_buffer"}
        assert off.state[t]["momentum_buffer"].dtype == torch.bfloat16
    assert "fastsgd" not in off.state_dict()


def test_torch_loads_torch_optim_state_and_keeps_wide_buffers():
    p = torch.nn.Parameter(seeded((9,), 0, torch.bfloat16))
    theirs = torch.optim.SGD([torch.nn.Parameter(p.detach().clone())], lr=0.1, momentum=0.9)
    theirs.param_groups[0]["params"][0].grad = seeded((9,), 1, torch.bfloat16)
    theirs.step()
    opt = ftorch.SGD([p], lr=0.1, momentum=0.9, master_weights="float32")
    opt.load_state_dict(roundtrip(theirs.state_dict()))
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == torch.float32
    assert torch.equal(buf, theirs.state[theirs.param_groups[0]["params"][0]]["momentum_buffer"].float())
    p.grad = seeded((9,), 2, torch.bfloat16)
    opt.step()
    assert opt.state[p]["master"].dtype == torch.float32
    # and back: our float32 masters survive torch's cast-to-parameter-dtype on load
    again = ftorch.SGD([torch.nn.Parameter(p.detach().clone())], lr=0.1, momentum=0.9, master_weights="float32")
    again.load_state_dict(roundtrip(opt.state_dict()))
    q = again.param_groups[0]["params"][0]
    assert torch.equal(bits(again.state[q]["master"]), bits(opt.state[p]["master"]))
    assert again.state[q]["momentum_buffer"].dtype == torch.float32


def test_torch_pickle_keeps_the_modes():
    import copy
    import pickle

    p = torch.nn.Parameter(seeded((9,), 0, torch.bfloat16))
    opt = ftorch.SGD([p], lr=0.1, master_weights="remainder", stochastic_rounding=True, seed=42)
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        o = twin._options
        assert (o.master_weights, o.stochastic_rounding, o.seed) == (fastsgd._core.MasterForm.remainder, True, 42)


# =============================================================================================
# torch: refusals change nothing


def test_torch_refusals():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"`master_weights` must be None, 'float32' or 'remainder'"):
        ftorch.SGD([p], master_weights="float64")
    with pytest.raises(ValueError, match=r"`master_weights` must be"):
        ftorch.SGD([p], master_weights=True)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        ftorch.SGD([p], stochastic_rounding=1)
    with pytest.raises(TypeError, match="seed"):
        ftorch.SGD([p], seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        ftorch.SGD([p], seed=2**64)
    with pytest.raises(ValueError, match="master_weights.*use_ema"):
        ftorch.SGD([p], master_weights="float32", use_ema=True)
    with pytest.raises(ValueError, match="stochastic_rounding.*use_ema"):
        ftorch.SGD([p], stochastic_rounding=True, use_ema=True)


def test_torch_refused_steps_change_nothing():
    b = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    # A parameter made float16 after construction (the constructor refuses one) is refused at the step.
    h = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = ftorch.SGD([b, h], lr=0.1, momentum=0.9, master_weights="remainder", stochastic_rounding=True)
    h.data = h.data.half()
    b.grad = torch.ones(4, dtype=torch.bfloat16)
    h.grad = torch.ones(3, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"params\[1\] is float16"):
        opt.step()
    assert len(opt.state) == 0 and torch.all(b == 1) and torch.all(h == 1)
    assert opt.state_dict()["fastsgd"]["raw_iterations"] == 0

    # The engine refuses a momentum buffer of the wrong dtype: the master made for the step
    # is dropped again.
    opt = ftorch.SGD([b], lr=0.1, momentum=0.9, master_weights="float32")
    opt.state[b]["momentum_buffer"] = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"slots\[momentum\]\[0\] has dtype bfloat16, expected float32"):
        opt.step()
    assert set(opt.state[b]) == {"momentum_buffer"} and torch.all(b == 1)
    del opt.state[b]
    opt.step()
    assert opt.iterations == 1 and float(opt.state[b]["master"][0]) == np.float32(0.9)

    # A checkpoint whose master does not fit is refused before anything changes.
    sd = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[b].items()}
    bad = {**sd, "state": {0: {**sd["state"][0], "master": torch.zeros(5)}}}
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    bad = {**sd, "state": {0: {**sd["state"][0], "remainder": torch.zeros(4)}}}
    with pytest.raises(TypeError, match="remainder"):
        opt.load_state_dict(bad)
    assert set(opt.state[b]) == set(before)
    assert all(torch.equal(opt.state[b][k], v) for k, v in before.items())


# =============================================================================================
# Keras

def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="the Keras adapter tests need keras (torch backend)")
    if keras.backend.backend() != "torch":
        pytest.skip(f"Keras's backend is {keras.backend.backend()!r}; fastsgd.keras needs KERAS_BACKEND=torch")
    import fastsgd.keras  # noqa: F401

    return keras


def _keras_model(keras, seed=0, dtype="bfloat16"):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((10,)),
                             keras.layers.Dense(16, activation="tanh", dtype=dtype),
                             keras.layers.Dense(3, dtype=dtype)])


def _keras_data(n=96):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 10)).astype("float32"), rng.standard_normal((n, 3)).astype("float32")


@pytest.mark.parametrize("form,stochastic", [("float32", False), ("remainder", True), (None, True)])
def test_keras_fit_matches_array_api(form, stochastic):
    keras = _keras()
    import fastsgd.keras

    model = _keras_model(keras)
    kw = dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    opt = fastsgd.keras.SGD(master_weights=form, stochastic_rounding=stochastic, seed=21, **kw)
    model.compile(optimizer=opt, loss="mse")
    twins = [v.value.detach().clone() for v in model.trainable_weights]
    assert all(t.dtype == torch.bfloat16 for t in twins)
    seen = []
    real_apply = opt.apply

    def recording_apply(grads, variables=None):
        seen.append([g.detach().clone() for g in grads])
        return real_apply(grads, variables)

    opt.apply = recording_apply
    x, y = _keras_data()
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert len(seen) == 12
    ref = fastsgd.SGD(master_weights=form, stochastic_rounding=stochastic, seed=21,
                      slot_dtype="float32" if form else "variable", **kw)   # Keras's slots without a master
    for grads in seen:
        ref.apply(grads, twins)
    for v, t in zip(model.trainable_weights, twins):
        assert v.dtype == "bfloat16"
        assert torch.equal(bits(v.value), bits(t))
    if form is not None:
        key = "master" if form == "float32" else "remainder"
        theirs = ref.state_dict()["slots"][key]
        assert len(opt._masters) == len(theirs)
        for m, want in zip(opt._masters, theirs):
            assert m.dtype == ("float32" if form == "float32" else "int16")
            assert m.path.endswith(f"_{key}")
            want = np.ascontiguousarray(want).view(np.int32 if key == "master" else np.int16)
            assert torch.equal(m.value.detach().view(torch.int32 if key == "master" else torch.int16),
                               torch.from_numpy(want))
        assert all(v.dtype == "float32" for v in opt.momentums)


@pytest.mark.parametrize("form", ["float32", "remainder", None])
def test_keras_save_load_resume_is_bit_identical(form, tmp_path):
    keras = _keras()
    import fastsgd.keras

    x, y = _keras_data()

    def compiled():
        model = _keras_model(keras)
        model.compile(optimizer=fastsgd.keras.SGD(learning_rate=0.05, momentum=0.9, master_weights=form,
                                                  stochastic_rounding=True, seed=8), loss="mse")
        return model

    straight = compiled()
    straight.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    first = compiled()
    first.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "m.keras")
    first.save(path)
    resumed = keras.models.load_model(path)
    opt = resumed.optimizer
    assert type(opt) is fastsgd.keras.SGD
    assert (opt.master_weights, opt.stochastic_rounding, opt.seed) == (form, True, 8)
    assert int(opt.iterations.value) == 6
    assert len(first.optimizer.variables) == len(opt.variables)
    for a, b in zip(first.optimizer.variables, opt.variables):
        assert a.name.rsplit("_", 1)[-1] == b.name.rsplit("_", 1)[-1] and a.dtype == b.dtype
        assert torch.equal(a.value, b.value)
    resumed.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(straight.trainable_weights, resumed.trainable_weights):
        assert torch.equal(bits(a.value), bits(b.value))
    for a, b in zip(straight.optimizer.variables, opt.variables):
        assert torch.equal(a.value, b.value), a.path


def test_keras_masters_follow_weights_set_after_build():
    keras = _keras()
    import fastsgd.keras

    model = _keras_model(keras)
    opt = fastsgd.keras.SGD(learning_rate=0.1, master_weights="float32")
    opt.build(model.trainable_weights)
    v = model.trainable_weights[0]
    v.assign(np.full(v.shape, 0.5, "float32"))
    opt.apply([torch.zeros(w.shape, dtype=torch.bfloat16) for w in model.trainable_weights])
    assert torch.all(v.value == 0.5) and torch.all(opt._masters[0].value == 0.5)


def test_keras_modes_off_and_refusals():
    keras = _keras()
    import fastsgd.keras

    assert fastsgd.keras.SGD(momentum=0.9, name="a").get_config() == keras.optimizers.SGD(momentum=0.9, name="a").get_config()
    cfg = fastsgd.keras.SGD(master_weights="remainder", stochastic_rounding=True, seed=3).get_config()
    assert (cfg["master_weights"], cfg["stochastic_rounding"], cfg["seed"]) == ("remainder", True, 3)
    assert fastsgd.keras.SGD.from_config(cfg).seed == 3
    with pytest.raises(ValueError, match=r"`master_weights` must be None, 'float32' or 'remainder'"):
        fastsgd.keras.SGD(master_weights="bfloat16")
    with pytest.raises(TypeError, match="seed"):
        fastsgd.keras.SGD(seed="1")
    with pytest.raises(ValueError, match="seed"):
        fastsgd.keras.SGD(seed=-1)
    with pytest.raises(ValueError, match="use_ema"):
        fastsgd.keras.SGD(master_weights="float32", use_ema=True)

    model = _keras_model(keras, dtype="float16")
    opt = fastsgd.keras.SGD(momentum=0.9, master_weights="remainder")
    before = len(opt.variables)
    with pytest.raises(ValueError, match=r"float16: use master_weights='float32'"):
        opt.build(model.trainable_weights)
    assert not opt.built and len(opt.variables) == before

    model = _keras_model(keras)
    opt = fastsgd.keras.SGD(master_weights="float32")
    opt.build(model.trainable_weights)
    with pytest.raises(ValueError, match="stateless_apply"):
        opt.stateless_apply([v.value.clone() for v in opt.variables],
                            [torch.zeros(w.shape, dtype=torch.bfloat16) for w in model.trainable_weights],
                            [w.value.clone() for w in model.trainable_weights])
    assert int(opt.iterations.value) == 0


# =============================================================================================
# torch: masters in checkpoints, across modes, and written from outside

def _trained_lowp(form, stochastic=False, seed=5, steps=3, lr=0.05):
    params = [torch.nn.Parameter(seeded(shape, i, torch.bfloat16)) for i, shape in enumerate([(8, 4), (4,)])]
    opt = ftorch.SGD(params, lr=lr, momentum=0.9, master_weights=form, stochastic_rounding=stochastic, seed=seed)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = seeded(p.shape, 10 * step + i, torch.bfloat16, 0.1)
        opt.step()
    return params, opt


def _snapshot(params, opt):
    buf = io.BytesIO()
    torch.save(([p.detach() for p in params], opt.state_dict()), buf)
    return buf.getvalue()


@pytest.mark.parametrize("key,value,exc,match", [
    ("master", [0.0] * 32, TypeError, r"state_dict\['state'\]\[0\]\['master'\] must be a torch.Tensor, got list"),
    ("master", torch.zeros(8, 4, dtype=torch.float64), TypeError, r"\['master'\] has dtype torch.float64"),
    ("master", torch.zeros(8, 4, dtype=torch.int32), TypeError, r"\['master'\] has dtype torch.int32"),
    ("master", torch.zeros(3), ValueError, r"\['master'\] has shape \(3,\)"),
])
def test_torch_load_checks_masters_and_changes_nothing(key, value, exc, match):
    _, src = _trained_lowp("float32", True)
    sd = src.state_dict()
    sd["state"][0] = {**sd["state"][0], key: value}
    params, opt = _trained_lowp("float32", True, seed=7, steps=2)
    before = _snapshot(params, opt)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    assert _snapshot(params, opt) == before


def test_torch_load_checks_remainders():
    _, src = _trained_lowp("remainder")
    sd = src.state_dict()
    params, opt = _trained_lowp("remainder", steps=2)
    before = _snapshot(params, opt)
    for value, exc, match in ((sd["state"][0]["remainder"].view(torch.int16), TypeError, "dtype torch.int16"),
                              (sd["state"][0]["remainder"].numpy(), TypeError, "must be a torch.Tensor")):
        bad = {**sd, "state": {**sd["state"], 0: {**sd["state"][0], "remainder": value}}}
        with pytest.raises(exc, match=match):
            opt.load_state_dict(bad)
        assert _snapshot(params, opt) == before


@pytest.mark.parametrize("key,value,exc,match", [
    ("master", torch.zeros(8, 4, dtype=torch.int16), TypeError,
     r"state\[params\[0\]\]\['master'\] has dtype torch.int16"),
    ("master", torch.zeros(8, 4, dtype=torch.float64), TypeError, r"\['master'\] has dtype torch.float64"),
    ("master", [0.0] * 32, TypeError, r"\['master'\] must be a torch.Tensor, got list"),
    ("master", torch.zeros(8, 4, device="meta"), TypeError, r"\['master'\] is on meta"),
    ("master", torch.zeros(32), ValueError, r"\['master'\] has shape \(32,\)"),
    ("momentum_buffer", [0.0] * 32, TypeError, r"\['momentum_buffer'\] must be a torch.Tensor, got list"),
])
def test_torch_step_checks_masters_written_into_state(key, value, exc, match):
    params, opt = _trained_lowp("float32", steps=1)
    old = opt.state[params[0]][key]
    opt.state[params[0]][key] = value
    before = [p.detach().clone() for p in params]
    with pytest.raises(exc, match=match):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and opt.iterations == 1
    opt.state[params[0]][key] = old
    opt.step()
    assert opt.iterations == 2


def test_torch_checkpoints_across_master_forms():
    # plain -> float32 master: the masters start from the parameters, as in a fresh optimizer:
    # the next step is torch.optim.SGD's on float32 copies with the widened buffers.
    plain_params, plain = _trained_lowp(None)
    params = [torch.nn.Parameter(p.detach().clone()) for p in plain_params]
    wide = [torch.nn.Parameter(p.detach().float()) for p in plain_params]
    opt = ftorch.SGD(params, lr=0.05, momentum=0.9, master_weights="float32")
    opt.load_state_dict(roundtrip(plain.state_dict()))
    assert all(set(opt.state[p]) == {"momentum_buffer"} for p in params)
    ref = torch.optim.SGD(wide, lr=0.05, momentum=0.9, foreach=False)
    ref.load_state_dict(roundtrip(plain.state_dict()))
    for w, p in zip(wide, plain_params):
        ref.state[w]["momentum_buffer"] = plain.state[p]["momentum_buffer"].float()
    for p, w in zip(params, wide):
        p.grad = seeded(p.shape, 99, torch.bfloat16, 0.1)
        w.grad = p.grad.float()
    opt.step()
    ref.step()
    for p, w in zip(params, wide):
        assert torch.equal(bits(opt.state[p]["master"]), bits(w))

    # master (either form) -> no master_weights: the masters are dropped, nothing stale stays.
    for form in ("float32", "remainder"):
        src_params, src = _trained_lowp(form, True)
        params = [torch.nn.Parameter(p.detach().clone()) for p in src_params]
        opt = ftorch.SGD(params, lr=0.05, momentum=0.9)
        opt.load_state_dict(roundtrip(src.state_dict()))
        assert all(set(opt.state[p]) == {"momentum_buffer"} for p in params)
        assert all(opt.state[p]["momentum_buffer"].dtype == torch.bfloat16 for p in params)

    # float32 <-> remainder: refused, naming the parameter and both forms; nothing changes.
    for theirs, ours in (("remainder", "float32"), ("float32", "remainder")):
        _, src = _trained_lowp(theirs)
        params, opt = _trained_lowp(ours, steps=2)
        before = _snapshot(params, opt)
        with pytest.raises(ValueError, match=rf"params\[0\]'s checkpoint keeps a master_weights='{theirs}' master, "
                                             rf"this optimizer master_weights='{ours}'"):
            opt.load_state_dict(roundtrip(src.state_dict()))
        assert _snapshot(params, opt) == before


@pytest.mark.parametrize("saved,resumed", [(False, True), (True, False)])
def test_torch_remainder_split_is_recorded_and_a_mismatch_refused(saved, resumed):
    src_params, src = _trained_lowp("remainder", saved)
    sd = roundtrip(src.state_dict())
    assert sd["fastsgd"]["remainder_split"] == ("stochastic" if saved else "nearest")
    params, opt = _trained_lowp("remainder", resumed, steps=2)
    before = _snapshot(params, opt)
    with pytest.raises(ValueError, match=rf"'remainder_split'\] is '{sd['fastsgd']['remainder_split']}'.*"
                                         rf"construct the optimizer with stochastic_rounding={saved}"):
        opt.load_state_dict(sd)
    assert _snapshot(params, opt) == before
    # The matching setting resumes; a checkpoint without the key (older) is taken to match.
    ok = ftorch.SGD([torch.nn.Parameter(p.detach().clone()) for p in src_params], lr=0.05, momentum=0.9,
                    master_weights="remainder", stochastic_rounding=saved)
    ok.load_state_dict(sd)
    older = {**sd, "fastsgd": {k: v for k, v in sd["fastsgd"].items() if k != "remainder_split"}}
    opt.load_state_dict(older)
    assert opt.state_dict()["fastsgd"]["raw_iterations"] == 3


def test_torch_float16_remainder_refused_up_front():
    b = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    h = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"params\[1\] is float16: use master_weights='float32'"):
        ftorch.SGD([b, h], lr=0.1, master_weights="remainder")
    opt = ftorch.SGD([b], lr=0.1, master_weights="remainder", stochastic_rounding=True)
    b.grad = torch.ones_like(b)
    opt.step()
    group = {"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16)), h], "lr": 0.5}
    with pytest.raises(ValueError, match=r"params\[2\] is float16"):
        opt.add_param_group(group)
    assert group == {"params": group["params"], "lr": 0.5} and isinstance(group["params"], list)
    assert len(opt.param_groups) == 1 and opt.iterations == 1
    opt.step()
    assert opt.iterations == 2 and opt.state_dict()["fastsgd"]["raw_iterations"] == 2


@pytest.mark.parametrize("form", ["float32", "remainder"])
def test_torch_outside_writes_need_resync_masters(form):
    params, opt = _trained_lowp(form)
    opt.param_groups[0]["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    target = [seeded(p.shape, 50 + i, torch.bfloat16) for i, p in enumerate(params)]
    for p, t in zip(params, target):
        p.data.copy_(t)
    if form == "float32":
        opt.step()                                 # lr = 0: the masters win over the outside write
        assert not torch.equal(bits(params[0]), bits(target[0]))
    else:                                          # the write is joined with stale low bits
        assert all(bool(torch.any(opt.state[p]["remainder"] != 0)) for p in params)
    for p, t in zip(params, target):
        p.data.copy_(t)
    opt.resync_masters([params[0]])
    opt.resync_masters()
    opt.step()
    assert all(torch.equal(bits(p), bits(t)) for p, t in zip(params, target))
    key = "master" if form == "float32" else "remainder"
    want = [t.float() if form == "float32" else torch.zeros_like(t, dtype=torch.uint16) for t in target]
    assert all(torch.equal(opt.state[p][key], w) for p, w in zip(params, want))
    with pytest.raises(ValueError, match=r"`params\[0\]` is not a parameter of this optimizer"):
        opt.resync_masters([torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(TypeError, match="`params` must be"):
        opt.resync_masters(3)
