"""fastsgd.torch.SGD against torch.optim.SGD (foreach=False, the reference loop), step for step.

Bit-identical for float32 and float64 (torch's CPU loop is one FMA per `add_`, and so is the
engine's torch convention), through parameter groups, every kind of LR scheduler, GradScaler
overflow steps and state_dict round trips in both directions. Also: the Optimizer protocol
(hooks, closure, add_param_group, named parameters, zero_grad), torch.compile'd models,
float16/bfloat16, the extras torch lacks, and torch's own error messages."""

import shutil
import io
import math

import pytest

torch = pytest.importorskip("torch", reason="torch is an optional framework")

import fastsgd  # noqa: E402
import fastsgd.torch as ftorch  # noqa: E402

SHAPES = [(7, 5), (33,), (), (1,), (4, 1, 3)]


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def grads_for(step, params, seed=1, none_at=None):
    """Seeded gradients for one step; parameter `none_at` gets no gradient."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for i, p in enumerate(params):
        out.append(None if i == none_at else torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return out


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def assert_same(ours, ref, what=""):
    for a, b in zip(ours.param_groups, ref.param_groups):
        for p, q in zip(a["params"], b["params"]):
            assert torch.equal(p, q), f"{what}: parameters differ, max |d| = {(p - q).abs().max().item()}"
            sa, sb = ours.state.get(p, {}), ref.state.get(q, {})
            ba, bb = sa.get("momentum_buffer"), sb.get("momentum_buffer")
            assert (ba is None) == (bb is None), f"{what}: momentum buffer present in one only"
            if ba is not None:
                assert ba.dtype == bb.dtype == p.dtype
                assert torch.equal(ba, bb), f"{what}: momentum buffers differ"


CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.1),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.03, momentum=0.8, weight_decay=1e-2),
    dict(lr=0.03, momentum=0.8, nesterov=True, weight_decay=1e-2, maximize=True),
    dict(lr=0.07, weight_decay=0.3, maximize=True),
    dict(lr=1e-3, momentum=0.99, dampening=0.5, weight_decay=5e-4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_parity_sweep_bit_identical(config, dtype):
    params = make_params(dtype, seed=len(str(config)))
    mirror = clone_params(params)
    ours = ftorch.SGD(params, **config)
    ref = torch.optim.SGD(mirror, foreach=False, **config)
    for step in range(6):
        grads = grads_for(step, params, none_at=1 if step in (0, 3) else None)  # late first grad, gaps
        set_grads(params, grads)
        set_grads(mirror, grads)
        ours.step()
        ref.step()
        assert_same(ours, ref, f"step {step}")
    assert any(not torch.equal(p, q) for p, q in zip(params, make_params(dtype, seed=len(str(config)))))


def test_groups_and_named_parameters_bit_identical():
    params = make_params()
    mirror = clone_params(params)

    def groups(ps, named):
        def name(lo, hi):
            return [(f"p{i}", ps[i]) for i in range(lo, hi)] if named else ps[lo:hi]

        return [{"params": name(0, 2), "lr": 0.2, "momentum": 0.5},
                {"params": name(2, 4), "weight_decay": 0.1, "nesterov": True, "momentum": 0.9},
                {"params": name(4, len(ps)), "momentum": 0.0}]

    ours = ftorch.SGD(groups(params, True), lr=0.01)
    ref = torch.optim.SGD(groups(mirror, True), lr=0.01, foreach=False)
    assert ours.param_groups[0]["param_names"] == ["p0", "p1"]
    for step in range(4):
        grads = grads_for(step, params)
        set_grads(params, grads)
        set_grads(mirror, grads)
        ours.step()
        ref.step()
        assert_same(ours, ref, f"step {step}")


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=12),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.2, step_size_up=3),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 3),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], milestones=[3]),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, [lambda s: 1 / (1 + s), lambda s: 0.9 ** s]),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_bit_identical(name):
    params = make_params()
    mirror = clone_params(params)

    def groups(ps):
        return [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.05}]

    ours = ftorch.SGD(groups(params), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(groups(mirror), lr=0.1, momentum=0.9, foreach=False)
    s_ours, s_ref = SCHEDULERS[name](ours), SCHEDULERS[name](ref)
    lrs = []
    for step in range(10):
        grads = grads_for(step, params)
        set_grads(params, grads)
        set_grads(mirror, grads)
        ours.step()
        ref.step()
        assert_same(ours, ref, f"{name} step {step}")
        if name == "ReduceLROnPlateau":
            s_ours.step(1.0)
            s_ref.step(1.0)
        else:
            s_ours.step()
            s_ref.step()
        lrs.append(ours.param_groups[0]["lr"])
        assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        assert ours.param_groups[0]["momentum"] == ref.param_groups[0]["momentum"]
    assert len(set(lrs)) > 1, "the scheduler never changed the rate"
    # Scheduler keys (initial_lr, max_lr, base_momentum, ...) survive a state_dict round trip.
    sd = ours.state_dict()
    for k in ref.param_groups[0]:
        if k != "params":
            assert k in sd["param_groups"][0]


def test_onecycle_cycles_momentum_into_the_engine():
    params = make_params()
    ours = ftorch.SGD(params, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=0.3, total_steps=10)
    seen = []
    for step in range(5):
        used = ours.param_groups[0]["momentum"]
        set_grads(params, grads_for(step, params))
        ours.step()
        assert ours.engine.group(0).momentum == used
        assert ours.engine.group(0).learning_rate == ours.param_groups[0]["lr"]
        sched.step()
        seen.append(used)
    assert len(set(seen)) == 5


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_interchange_weights_only(direction):
    config = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    params = make_params()
    mirror = clone_params(params)
    first = (ftorch.SGD if direction == "ours_to_torch" else lambda p, **c: torch.optim.SGD(p, foreach=False, **c))
    second = (ftorch.SGD if direction == "torch_to_ours" else lambda p, **c: torch.optim.SGD(p, foreach=False, **c))
    a = first(params, **config)
    straight = torch.optim.SGD(mirror, foreach=False, **config)
    for step in range(3):
        grads = grads_for(step, params)
        set_grads(params, grads)
        set_grads(mirror, grads)
        a.step()
        straight.step()
    sd = _roundtrip(a.state_dict())
    assert set(sd) == {"state", "param_groups"}
    assert isinstance(sd["state"][0]["momentum_buffer"], torch.Tensor)
    resumed = clone_params(params)
    b = second(resumed, **config)
    b.load_state_dict(sd)
    for step in range(3, 6):
        grads = grads_for(step, params)
        set_grads(resumed, grads)
        set_grads(mirror, grads)
        b.step()
        straight.step()
    for p, q in zip(resumed, mirror):
        assert torch.equal(p, q)


def test_momentum_buffers_are_the_engine_slots():
    params = make_params()
    opt = ftorch.SGD(params, lr=0.1, momentum=0.9)
    set_grads(params, grads_for(0, params))
    opt.step()
    buf = opt.state[params[0]]["momentum_buffer"]
    ptr, before = buf.data_ptr(), buf.clone()
    set_grads(params, grads_for(1, params))
    opt.step()
    assert opt.state[params[0]]["momentum_buffer"] is buf and buf.data_ptr() == ptr
    assert not torch.equal(buf, before)
    # A buffer written into state from outside (as ZeroRedundancyOptimizer does) is the one used.
    mine = torch.zeros_like(params[0])
    opt.state[params[0]] = {"momentum_buffer": mine}
    set_grads(params, grads_for(2, params))
    opt.step()
    assert torch.equal(mine, params[0].grad)  # 0.9 * 0 + g
    assert opt.state[params[0]]["momentum_buffer"] is mine


def test_training_loop_with_zero_grad_converges():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x.sum(1, keepdim=True).sin()
    opt = ftorch.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_closure_hooks_and_isinstance():
    params = make_params()
    opt = ftorch.SGD(params, lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        calls.append("closure")
        loss = sum((p.double() ** 2).sum() for p in params)
        opt.zero_grad()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == ["pre", "closure", "post"] and isinstance(loss, torch.Tensor)
    h1.remove()
    h2.remove()
    before = [p.detach().clone() for p in params]
    opt.step(closure)
    assert calls == ["pre", "closure", "post", "closure"]
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), 0.8 * b, rtol=1e-6, atol=1e-7)


def test_add_param_group_keeps_buffers():
    params = make_params()
    mirror = clone_params(params)
    ours = ftorch.SGD(params[:3], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(mirror[:3], lr=0.1, momentum=0.9, foreach=False)
    for step in range(4):
        if step == 2:
            ours.add_param_group({"params": params[3:], "lr": 0.02, "momentum": 0.5})
            ref.add_param_group({"params": mirror[3:], "lr": 0.02, "momentum": 0.5})
        grads = grads_for(step, params)
        set_grads(params, grads)
        set_grads(mirror, grads)
        ours.step()
        ref.step()
        assert_same(ours, ref, f"step {step}")


def test_tensor_lr():
    params = make_params()
    mirror = clone_params(params)
    ours = ftorch.SGD(params, lr=torch.tensor(0.1), momentum=0.9)
    ref = torch.optim.SGD(mirror, lr=torch.tensor(0.1), momentum=0.9, foreach=False)
    for step in range(3):
        grads = grads_for(step, params)
        set_grads(params, grads)
        set_grads(mirror, grads)
        ours.step()
        ref.step()
        ours.param_groups[0]["lr"].fill_(0.05)  # in place, as tensor-lr schedulers do
        ref.param_groups[0]["lr"].fill_(0.05)
        assert_same(ours, ref, f"step {step}")


# ---- GradScaler -----------------------------------------------------------------------------


def _scaled_run(opt_factory, params, steps, inf_at, scaler_kwargs):
    scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
    scaler.scale(torch.ones(()))  # creates the scale tensor, as scaling a loss does
    opt = opt_factory(params)
    for step in range(steps):
        grads = grads_for(step, params)
        scale = scaler.get_scale()
        set_grads(params, [g * scale for g in grads])
        if step in inf_at:
            params[0].grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return opt, scaler


def test_grad_scaler_fused_protocol_matches_torch_with_overflow_steps():
    params = make_params()
    mirror = clone_params(params)
    kw = dict(init_scale=2.0 ** 10, growth_interval=2)
    ours, s1 = _scaled_run(lambda p: ftorch.SGD(p, lr=0.05, momentum=0.9), params, 8, {0, 5}, kw)
    ref, s2 = _scaled_run(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False), mirror, 8, {0, 5}, kw)
    assert ours._step_supports_amp_scaling
    assert s1.get_scale() == s2.get_scale() and s1.get_scale() != 2.0 ** 10
    assert_same(ours, ref, "after 8 scaled steps")
    assert ours.skipped_steps == 2
    assert not hasattr(ours, "grad_scale") and not hasattr(ours, "found_inf")


def test_overflowing_first_step_creates_no_state_unlike_torch_fused():
    params = make_params()
    mirror = clone_params(params)
    kw = dict(init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in params]
    ours, _ = _scaled_run(lambda p: ftorch.SGD(p, lr=0.05, momentum=0.9), params, 1, {0}, kw)
    fused, _ = _scaled_run(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True), mirror, 1, {0}, kw)
    assert len(ours.state) == 0 and ours.state_dict()["state"] == {}
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    # torch's fused SGD made (uninitialised) momentum buffers on the skipped step.
    assert all("momentum_buffer" in fused.state[q] for q in mirror)


# ---- dtypes, devices, compile -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_close_to_torch_and_buffers_in_param_dtype(dtype):
    params = make_params(dtype)
    mirror = [torch.nn.Parameter(p.detach().float()) for p in params]
    ours = ftorch.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2)
    ref = torch.optim.SGD(mirror, lr=0.05, momentum=0.9, weight_decay=1e-2, foreach=False)
    for step in range(4):
        grads = grads_for(step, params)
        set_grads(params, grads)
        set_grads(mirror, [g.float() for g in grads])
        ours.step()
        ref.step()
    eps = torch.finfo(dtype).eps
    for p, q in zip(params, mirror):
        assert p.dtype == dtype and ours.state[p]["momentum_buffer"].dtype == dtype
        torch.testing.assert_close(p.float(), q.detach(), rtol=8 * eps, atol=8 * eps)


def test_cuda_parameters():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    params = [p.cuda() for p in make_params()]
    params = [torch.nn.Parameter(p.detach()) for p in params]
    mirror = clone_params(params)
    ours = ftorch.SGD(params, lr=0.05, momentum=0.9)
    ref = torch.optim.SGD(mirror, lr=0.05, momentum=0.9, foreach=False)
    for step in range(3):
        grads = [g.cuda() for g in grads_for(step, params)]
        set_grads(params, grads)
        set_grads(mirror, grads)
        ours.step()
        ref.step()
    for p, q in zip(params, mirror):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler, and none is on PATH "
                           "(the compiler-free wheel check); it runs in CI's first pass")
def test_compiled_model_trains_like_torch():
    torch.manual_seed(0)
    base = torch.nn.Linear(4, 2)
    twin = torch.nn.Linear(4, 2)
    twin.load_state_dict(base.state_dict())
    model = torch.compile(base)
    ours = ftorch.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, foreach=False)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for _ in range(3):
        for m, o in ((model, ours), (twin, ref)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for p, q in zip(base.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(base.weight, twin.weight.new_zeros(2, 4))


# ---- extras ----------------------------------------------------------------------------------


def test_keras_convention_matches_fastsgd_keras_facade():
    params = make_params()
    arrays = [p.detach().clone() for p in params]
    ours = ftorch.SGD(params, lr=0.05, momentum=0.9, nesterov=True, convention="keras")
    keras_like = fastsgd.SGD(learning_rate=0.05, momentum=0.9, nesterov=True)
    for step in range(3):
        grads = grads_for(step, params)
        set_grads(params, grads)
        ours.step()
        keras_like.apply([g.clone() for g in grads], arrays)
    for p, a in zip(params, arrays):
        assert torch.equal(p.detach(), a)
    assert "velocity" in ours.state[params[0]]


def test_global_clipnorm_and_clipvalue_match_torch_utilities():
    params = make_params(torch.float64)
    mirror = clone_params(params)
    ours = ftorch.SGD(params, lr=0.1, momentum=0.9, global_clipnorm=0.5)
    ref = torch.optim.SGD(mirror, lr=0.1, momentum=0.9, foreach=False)
    for step in range(3):
        grads = grads_for(step, params)
        set_grads(params, grads)
        set_grads(mirror, grads)
        ours.step()
        torch.nn.utils.clip_grad_norm_(mirror, 0.5, foreach=False)
        ref.step()
    # torch divides by (norm + 1e-6), Keras (and fastsgd) by norm: relative 1e-6 / norm apart.
    for p, q in zip(params, mirror):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)

    params = make_params(torch.float64)
    mirror = clone_params(params)
    ours = ftorch.SGD(params, lr=0.1, clipvalue=0.3)
    ref = torch.optim.SGD(mirror, lr=0.1, foreach=False)
    grads = grads_for(0, params)
    set_grads(params, grads)
    set_grads(mirror, grads)
    ours.step()
    torch.nn.utils.clip_grad_value_(mirror, 0.3)
    ref.step()
    for p, q in zip(params, mirror):
        assert torch.equal(p, q)


def test_ema_swap_and_finalize():
    params = make_params(torch.float64)
    opt = ftorch.SGD(params, lr=0.1, use_ema=True, ema_momentum=0.5)
    avg = None
    for step in range(3):
        set_grads(params, grads_for(step, params))
        opt.step()
        w = [p.detach().clone() for p in params]
        avg = w if avg is None else [0.5 * a + 0.5 * x for a, x in zip(avg, w)]
    for p, a in zip(params, avg):
        torch.testing.assert_close(opt.state[p]["ema"], a, rtol=1e-12, atol=1e-12)
    trained = [p.detach().clone() for p in params]
    with opt.swap_ema():
        for p, a in zip(params, avg):
            torch.testing.assert_close(p.detach(), a, rtol=1e-12, atol=1e-12)
    for p, t in zip(params, trained):
        assert torch.equal(p.detach(), t)
    opt.finalize()
    for p, a in zip(params, avg):
        torch.testing.assert_close(p.detach(), a, rtol=1e-12, atol=1e-12)


def test_skip_nonfinite_changes_nothing_and_creates_no_state():
    params = make_params()
    opt = ftorch.SGD(params, lr=0.1, momentum=0.9, skip_nonfinite=True)
    before = [p.detach().clone() for p in params]
    grads = grads_for(0, params)
    grads[2] = torch.tensor(float("nan"))
    set_grads(params, grads)
    opt.step()
    assert len(opt.state) == 0 and opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    set_grads(params, grads_for(1, params))
    opt.step()
    assert len(opt.state) == len(params)


def test_gradient_accumulation_equals_one_step_on_the_mean():
    params = make_params(torch.float64)
    mirror = clone_params(params)
    ours = ftorch.SGD(params, lr=0.1, momentum=0.9, gradient_accumulation_steps=2)
    ref = torch.optim.SGD(mirror, lr=0.1, momentum=0.9, foreach=False)
    for k in range(2):
        g1, g2 = grads_for(2 * k, params), grads_for(2 * k + 1, params)
        set_grads(params, g1)
        ours.step()
        if k == 0:
            assert "momentum_buffer" not in ours.state.get(params[0], {})
        set_grads(params, g2)
        ours.step()
        set_grads(mirror, [(a + b) / 2 for a, b in zip(g1, g2)])
        ref.step()
    for p, q in zip(params, mirror):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    sd = _roundtrip(ours.state_dict())
    assert sd["fastsgd"]["raw_iterations"] == 4


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
    (dict(momentum=-0.5), ValueError, "Invalid momentum value: -0.5"),
    (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value: -1.0"),
    (dict(nesterov=True), ValueError, "Nesterov momentum requires a momentum and zero dampening"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "Nesterov momentum requires"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
    (dict(differentiable=True), ValueError, "differentiable"),
    (dict(convention="jax"), ValueError, "convention"),
    (dict(clipnorm=-1.0), ValueError, "clipnorm"),
    (dict(clipnorm=1.0, global_clipnorm=1.0), ValueError, "global_clipnorm"),
    (dict(clipvalue="big"), TypeError, "clipvalue"),
    (dict(use_ema=1), TypeError, "use_ema"),
    (dict(gradient_accumulation_steps=1.5), TypeError, "gradient_accumulation_steps"),
])
def test_argument_errors_like_torch(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ftorch.SGD(make_params(), **kwargs)


def test_parameter_list_errors_like_torch():
    p = make_params()
    for bad, exc in ((p[0], TypeError), ([], ValueError), ([{"params": set(p)}], TypeError)):
        with pytest.raises(exc) as ours:
            ftorch.SGD(bad)
        with pytest.raises(exc) as ref:
            torch.optim.SGD(bad)
        assert str(ours.value) == str(ref.value)


def test_refused_step_changes_nothing():
    params = make_params()
    opt = ftorch.SGD(params, lr=0.1, momentum=0.9)
    set_grads(params, grads_for(0, params))
    params[0].grad = params[0].grad.to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(TypeError, match=r"params\[0\]\.grad is torch.sparse_coo"):
        opt.step()
    assert len(opt.state) == 0
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_lr_scheduler_accepts_it():
    opt = ftorch.SGD(make_params(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    assert sched.get_last_lr() == [0.1]


def test_strided_gradients_and_buffers_work_like_torch():
    params = make_params(shapes=[(5, 7), (6,)])
    mirror = clone_params(params)
    ours = ftorch.SGD(params, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(mirror, lr=0.1, momentum=0.9, foreach=False)
    for step in range(3):
        grads = [torch.randn(7, 5, dtype=torch.float64).float().t(), torch.randn(12)[::2]]
        set_grads(params, grads)
        for q, g in zip(mirror, grads):
            q.grad = g
        assert not params[0].grad.is_contiguous()
        ours.step()
        ref.step()
        assert_same(ours, ref, f"step {step}")
    # a strided buffer in state (e.g. loaded from elsewhere) is replaced by a contiguous copy
    ours.state[params[0]]["momentum_buffer"] = ours.state[params[0]]["momentum_buffer"].t().contiguous().t()
    ref.state[mirror[0]]["momentum_buffer"] = ref.state[mirror[0]]["momentum_buffer"].clone()
    for ps in (params, mirror):
        set_grads(ps, grads_for(9, ps))
    ours.step()
    ref.step()
    assert_same(ours, ref, "strided buffer")
    assert ours.state[params[0]]["momentum_buffer"].is_contiguous()


def test_readme_training_loop_runs_and_equals_torch(tmp_path, monkeypatch):
    import functools
    import os
    import re
    import types

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = re.search(r"## PyTorch: `fastsgd.torch.SGD`.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    finals = []
    for sgd in (ftorch.SGD, functools.partial(torch.optim.SGD, foreach=False)):
        torch.manual_seed(0)
        ns = {"fastsgd": types.SimpleNamespace(torch=types.SimpleNamespace(SGD=sgd))}
        exec(code.replace("import fastsgd.torch\n", ""), ns)
        finals.append(([p.detach() for p in ns["model"].parameters()], ns["loss"].item()))
    (ours, loss), (ref, _) = finals
    assert loss < 0.3
    assert all(torch.equal(p, q) for p, q in zip(ours, ref))
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert sd["state"][0]["momentum_buffer"].shape == (64, 20)


def test_deepcopy_and_pickle_keep_config_and_state():
    import copy
    import pickle

    params = make_params()
    opt = ftorch.SGD(params, lr=0.1, momentum=0.9, use_ema=True, clipvalue=0.5)
    for step in range(2):
        set_grads(params, grads_for(step, params))
        opt.step()
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin._config() == opt._config()
        assert len(twin.state) == len(opt.state)
        tp = [p for g in twin.param_groups for p in g["params"]]
        for p, q in zip(params, tp):
            assert torch.equal(opt.state[p]["momentum_buffer"], twin.state[q]["momentum_buffer"])
            assert twin.state[q]["momentum_buffer"].data_ptr() != opt.state[p]["momentum_buffer"].data_ptr()
        set_grads(tp, grads_for(2, params))
        twin.step()
        assert twin.iterations == 3


def test_ema_overwrite_frequency_copies_average_into_params():
    params = make_params(torch.float64)
    opt = ftorch.SGD(params, lr=0.1, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2)
    for step in range(2):
        set_grads(params, grads_for(step, params))
        opt.step()
    for p in params:
        assert torch.equal(p.detach(), opt.state[p]["ema"])
    set_grads(params, grads_for(2, params))
    opt.step()
    assert any(not torch.equal(p.detach(), opt.state[p]["ema"]) for p in params)


def test_global_hooks_and_counters_survive_load_state_dict():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen = []
    handle = register_optimizer_step_post_hook(lambda o, a, k: seen.append(type(o).__name__))
    try:
        params = make_params()
        opt = ftorch.SGD(params, lr=0.1, momentum=0.9, use_ema=True)
        for step in range(3):
            set_grads(params, grads_for(step, params))
            opt.step()
    finally:
        handle.remove()
    assert seen == ["SGD"] * 3
    sd = _roundtrip(opt.state_dict())
    assert sd["fastsgd"] == {"raw_iterations": 3, "skipped_steps": 0}
    opt.load_state_dict(sd)
    assert opt.iterations == 3
    fresh = ftorch.SGD(clone_params(params), lr=0.1, momentum=0.9, use_ema=True)
    fresh.load_state_dict(sd)
    assert fresh.iterations == 3
    torch_sgd = torch.optim.SGD(clone_params(params), lr=0.1, momentum=0.9)
    torch_sgd.load_state_dict(sd)  # the extra entry is ignored by torch


def test_bare_array_call_keeps_working_in_a_loop():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    twin = torch.nn.Linear(6, 3)
    twin.load_state_dict(model.state_dict())
    bare = fastsgd.SGD(learning_rate=0.1, momentum=0.9)
    ours = ftorch.SGD(twin.parameters(), lr=0.1, momentum=0.9, convention="keras")
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    params = list(model.parameters())
    for _ in range(4):
        for m, step in ((model, lambda: bare.apply([p.grad for p in params], params)), (twin, ours.step)):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_add_param_group_keeps_the_step_counters():
    # Stochastic rounding keys its random bits by the step: after add_param_group the first
    # parameter must go on exactly as if nothing had been added.
    def run(add):
        a = torch.nn.Parameter(torch.linspace(-1, 1, 257).to(torch.bfloat16))
        b = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
        opt = ftorch.SGD([a], lr=0.01, stochastic_rounding=True, seed=3)
        for step in range(8):
            if step == 5 and add:
                opt.add_param_group({"params": [b]})
                assert opt.state_dict()["fastsgd"]["raw_iterations"] == 5
            a.grad = grads_for(step, [a])[0]
            b.grad = torch.ones_like(b)
            opt.step()
        assert opt.state_dict()["fastsgd"]["raw_iterations"] == 8
        return a.detach()

    assert torch.equal(run(True).view(torch.int16), run(False).view(torch.int16))

    # Gradient accumulation stays in phase: calls 1..4 of a 2-step window update twice.
    p = torch.nn.Parameter(torch.ones(2))
    opt = ftorch.SGD([p], lr=0.1, gradient_accumulation_steps=2)
    for call in range(4):
        if call == 3:
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
        p.grad = torch.ones(2)
        opt.step()
    assert opt.iterations == 2 and torch.allclose(p.detach(), torch.full((2,), 0.8))


@pytest.mark.parametrize("kwargs,dtype", [({}, torch.float32), ({"master_weights": "float32"}, torch.bfloat16),
                                          ({"stochastic_rounding": True}, torch.bfloat16),
                                          ({"gradient_accumulation_steps": 2}, torch.float32),
                                          ({"use_ema": True}, torch.float32)])
def test_step_without_any_gradient_does_nothing_like_torch(kwargs, dtype):
    p = torch.nn.Parameter(torch.ones(3, dtype=dtype))
    opt = ftorch.SGD([p], lr=0.1, momentum=0.9, **kwargs)
    ref = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
    calls = []
    for o in (opt, ref):
        o.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        o.register_step_post_hook(lambda o, a, k: calls.append("post"))
    for first in (True, False):
        if not first:
            p.grad = torch.ones_like(p)
            opt.step()
            opt.zero_grad()
        before = _roundtrip(opt.state_dict())
        values = p.detach().clone()
        calls.clear()
        assert opt.step(lambda: 1.5) == 1.5 and ref.step(lambda: 1.5) == 1.5
        assert calls == ["pre", "post"] * 2
        assert torch.equal(p.detach(), values)
        after = _roundtrip(opt.state_dict())
        assert after.get("fastsgd") == before.get("fastsgd")
        assert after["state"].keys() == before["state"].keys()
        assert all(torch.equal(after["state"][i][k], v) for i in before["state"] for k, v in before["state"][i].items())


@pytest.mark.parametrize("block,exc,match", [
    ({"raw_iterations": "x", "skipped_steps": 0}, TypeError, r"\['raw_iterations'\] must be an int"),
    ({"raw_iterations": True, "skipped_steps": 0}, TypeError, r"\['raw_iterations'\] must be an int"),
    ({"raw_iterations": -5, "skipped_steps": 0}, ValueError, r"\['raw_iterations'\] must be an int in \[0, 2\*\*62\)"),
    ({"raw_iterations": 2**64, "skipped_steps": 0}, ValueError, r"\['raw_iterations'\]"),
    ({"raw_iterations": 2**62, "skipped_steps": 0}, ValueError, r"\['raw_iterations'\]"),
    ({"raw_iterations": 3, "skipped_steps": -1}, ValueError, r"\['skipped_steps'\]"),
    ({"raw_iterations": 3, "skipped_steps": 1.0}, TypeError, r"\['skipped_steps'\]"),
    ({"seed": 3}, ValueError, r"state_dict\['fastsgd'\] has no 'raw_iterations'"),
    ({"raw_iterations": 3}, ValueError, r"has no 'skipped_steps'"),
    ({"raw_iterations": 3, "skipped_steps": 0, "seed": 2**64}, ValueError,
     r"\['seed'\] must be an int in \[0, 2\*\*64\)"),
    ({"raw_iterations": 3, "skipped_steps": 0, "seed": "1"}, TypeError, r"\['seed'\]"),
    ({"raw_iterations": 3, "skipped_steps": 0, "remainder_split": "up"}, ValueError, r"\['remainder_split'\]"),
    ({"raw_iterations": 3, "skipped_steps": 0, "steps": 1}, ValueError, r"unknown keys \['steps'\]"),
    (5, TypeError, r"state_dict\['fastsgd'\] must be a dict"),
])
def test_load_state_dict_checks_the_counters_first(block, exc, match):
    def trained(seed):
        p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        o = ftorch.SGD([p], lr=0.1, momentum=0.9, stochastic_rounding=True, seed=seed)
        for _ in range(3 if seed == 5 else 2):
            p.grad = torch.full_like(p, 0.1)
            o.step()
        return p, o

    _, src = trained(5)
    sd = {**src.state_dict(), "fastsgd": block}
    p, opt = trained(7)
    opt.state[p]["momentum_buffer"].fill_(42.0)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    assert torch.all(opt.state[p]["momentum_buffer"] == 42.0)
    assert opt.state_dict()["fastsgd"] == {"raw_iterations": 2, "skipped_steps": 0, "seed": 7}
    assert opt.engine.seed == 7
    p.grad = torch.full_like(p, 0.1)
    opt.step()
    assert opt.iterations == 3
