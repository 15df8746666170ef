"""The engine's 0.2 surface through fastsgd._core: typed options, parameter groups, torch's rule,
caller-owned slots, the overflow skip and two-phase norms."""

import itertools

import numpy as np
import pytest

import fastsgd
from fastsgd import _core

torch = pytest.importorskip("torch", reason="torch is an optional test peer (pip install '.[test]')")

SlotKind = _core.SlotKind


def torch_options(**group):
    o = _core.Options()
    o.convention = _core.Convention.torch
    o.group = _core.Group(**group)
    o.caller_owned_slots = True
    o.slots_in_variable_dtype = True
    return o


# ---- typed options and validation --------------------------------------------------------------

def test_options_are_typed_and_reject_unknown_fields():
    o = _core.Options()
    with pytest.raises(AttributeError):
        o.momentun = 0.9  # a misspelt key is an error, not silently ignored
    with pytest.raises(TypeError):
        o.gradient_accumulation_steps = "2"
    o.clipnorm = None
    assert o.clipnorm is None


@pytest.mark.parametrize("edit, message", [
    (lambda o: setattr(o, "group", _core.Group(momentum=1.5)), "`momentum` must be a float between [0, 1]."),
    (lambda o: (setattr(o, "clipnorm", 1.0), setattr(o, "clipvalue", 0.0)),
     "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. Received: clipnorm=1.0, "
     "clipvalue=0.0, global_clipnorm=None"),
    (lambda o: setattr(o, "gradient_accumulation_steps", 1),
     "`gradient_accumulation_steps` must be an integer >= 2. Received: gradient_accumulation_steps=1"),
    (lambda o: (setattr(o, "use_ema", True), setattr(o, "ema_momentum", 2.0)),
     "`ema_momentum` must be in the range [0, 1]. Received: ema_momentum=2.0"),
    (lambda o: setattr(o, "group", _core.Group(dampening=0.1)), "torch-convention"),
    (lambda o: setattr(o, "group", _core.Group(learning_rate=float("nan"))), "`learning_rate` must be a finite"),
])
def test_keras_convention_validation_uses_keras_wording(edit, message):
    o = _core.Options()
    edit(o)
    with pytest.raises(ValueError) as info:
        _core.Engine(o)
    assert message in str(info.value)


@pytest.mark.parametrize("group, message", [
    (dict(learning_rate=-1.0), "Invalid learning rate: -1.0"),
    (dict(momentum=-0.5), "Invalid momentum value: -0.5"),
    (dict(weight_decay=-1e-4), "Invalid weight_decay value: -0.0001"),
    (dict(momentum=0.9, dampening=0.1, nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    (dict(nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
])
def test_torch_convention_validation_uses_torch_wording(group, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        _core.Engine(torch_options(**group))
    engine = _core.Engine(torch_options())
    with pytest.raises(ValueError, match="Invalid|Nesterov"):
        engine.set_group(0, _core.Group(**group))
    assert engine.group(0).learning_rate == 0.01  # the refused set_group changed nothing


# ---- torch's rule, bit for bit -----------------------------------------------------------------

SWEEP = [c for c in itertools.product([torch.float32, torch.float64], [0.0, 0.9], [0.0, 0.25], [False, True],
                                      [0.0, 1e-2], [False, True])
         if not (c[3] and (c[1] == 0 or c[2] != 0))]


@pytest.mark.parametrize("dtype, momentum, dampening, nesterov, weight_decay, maximize", SWEEP)
def test_torch_rule_is_bit_identical_to_torch_single_tensor_loop(dtype, momentum, dampening, nesterov,
                                                                 weight_decay, maximize):
    gen = torch.Generator().manual_seed(7)
    shapes = [(1,), (33,), (4, 17), (1025,)]
    params = [torch.randn(s, dtype=dtype, generator=gen) for s in shapes]
    twins = [p.clone().requires_grad_(True) for p in params]
    hyper = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                 maximize=maximize)
    reference = torch.optim.SGD(twins, lr=0.05, foreach=False, **hyper)
    engine = _core.Engine(torch_options(learning_rate=0.05, **hyper))
    engine.build(params)
    buffers = [None] * len(params)
    for step in range(4):
        if step == 2:  # a scheduler rewrites the group between steps
            reference.param_groups[0]["lr"] = 0.02
            engine.set_group(0, _core.Group(learning_rate=0.02, **hyper))
        grads = [torch.randn(s, dtype=dtype, generator=gen) for s in shapes]
        for t, g in zip(twins, grads):
            t.grad = g.clone()
        reference.step()
        slots = fresh = None
        if momentum:
            fresh = [b is None for b in buffers]
            buffers = [torch.empty_like(p) if b is None else b for b, p in zip(buffers, params)]
            slots = {SlotKind.momentum: buffers}
        engine.step(grads, slots=slots, fresh_momentum=fresh)
        for p, t in zip(params, twins):
            assert torch.equal(p, t.detach()), f"step {step}: max diff {(p - t.detach()).abs().max().item()}"
        if momentum:
            for b, t in zip(buffers, twins):
                assert torch.equal(b, reference.state[t]["momentum_buffer"])


def test_engine_owned_torch_rule_starts_each_slot_with_its_first_gradient():
    o = torch_options(learning_rate=0.1, momentum=0.9)
    o.caller_owned_slots = False
    engine = _core.Engine(o)
    w = np.zeros(3, np.float32)
    engine.build([w])
    assert not engine.momentum_started(0)
    engine.step([np.full(3, 2.0, np.float32)])
    assert engine.momentum_started(0)
    np.testing.assert_array_equal(engine.read_slot(SlotKind.momentum, 0), np.full(3, 2.0, np.float32))
    np.testing.assert_array_equal(w, np.full(3, np.float32(-0.2)))


# ---- parameter groups ---------------------------------------------------------------------------

@pytest.mark.parametrize("convention", [_core.Convention.keras, _core.Convention.torch])
def test_groups_equal_separate_optimizers_in_one_call(convention):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(300).astype(np.float32), rng.standard_normal(70).astype(np.float32)
    a1, b1 = a.copy(), b.copy()
    g0 = dict(learning_rate=0.1, momentum=0.9, weight_decay=0.01)
    g1 = dict(learning_rate=0.03, momentum=0.5, nesterov=True, maximize=True)

    def make(group):
        o = _core.Options()
        o.convention = convention
        o.group = _core.Group(**group)
        return _core.Engine(o)

    both = make(g0)
    assert both.add_group(_core.Group(**g1)) == 1
    both.build([a, b], groups=[0, 1])
    only_a, only_b = make(g0), make(g1)
    only_a.build([a1])
    only_b.build([b1])
    for _ in range(3):
        ga, gb = rng.standard_normal(300).astype(np.float32), rng.standard_normal(70).astype(np.float32)
        both.step([ga, gb])
        only_a.step([ga])
        only_b.step([gb])
    np.testing.assert_array_equal(a, a1)
    np.testing.assert_array_equal(b, b1)


def test_build_refuses_an_unknown_group_and_builds_nothing():
    engine = _core.Engine(_core.Options())
    w = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"groups\[0\] is 4"):
        engine.build([w], groups=[4])
    assert not engine.built


def test_learning_rate_override_replaces_every_group_rate():
    engine = _core.Engine(_core.Options())
    engine.add_group(_core.Group(learning_rate=5.0))
    a, b = np.ones(2, np.float32), np.ones(2, np.float32)
    engine.build([a, b], groups=[0, 1])
    engine.step([np.ones(2, np.float32), np.ones(2, np.float32)], learning_rate=0.5)
    np.testing.assert_array_equal(a, [0.5, 0.5])
    np.testing.assert_array_equal(b, [0.5, 0.5])


# ---- caller-owned slots -------------------------------------------------------------------------

def test_caller_owned_slots_are_written_in_place():
    o = _core.Options()
    o.group = _core.Group(learning_rate=0.1, momentum=0.9)
    o.use_ema = True
    o.caller_owned_slots = True
    engine = _core.Engine(o)
    w = torch.ones(5)
    velocity, average = torch.zeros(5), torch.zeros(5)
    v_ptr, a_ptr = velocity.data_ptr(), average.data_ptr()
    engine.build([w])
    assert not engine.has_slot(SlotKind.momentum)  # the engine allocated nothing
    engine.step([torch.ones(5)], slots={SlotKind.momentum: [velocity], SlotKind.average: [average]})
    assert velocity.data_ptr() == v_ptr and average.data_ptr() == a_ptr
    torch.testing.assert_close(velocity, torch.full((5,), -0.1), rtol=0, atol=0)
    torch.testing.assert_close(average, w, rtol=0, atol=0)  # first EMA step copies the variable


@pytest.mark.parametrize("bad, error, message", [
    (None, ValueError, r"slots\[momentum\]\[0\] is missing"),
    (torch.zeros(5, dtype=torch.float64), TypeError, "has dtype float64, expected float32"),
    (torch.zeros(4), ValueError, "has 4 elements, expected 5"),
    (torch.zeros(10)[::2], ValueError, "not contiguous"),
    ("w", ValueError, "share memory"),
])
def test_refused_caller_slot_changes_nothing(bad, error, message):
    o = _core.Options()
    o.group = _core.Group(learning_rate=0.1, momentum=0.9)
    o.caller_owned_slots = True
    engine = _core.Engine(o)
    w = torch.ones(5)
    engine.build([w])
    slot = w if isinstance(bad, str) else bad
    before = w.clone()
    with pytest.raises(error, match=message):
        engine.step([torch.ones(5)], slots={SlotKind.momentum: [slot]})
    assert torch.equal(w, before)
    assert engine.raw_iterations == 0


# ---- overflow skip and two-phase norms -----------------------------------------------------------

@pytest.mark.parametrize("bad_value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("extra", [{}, {"use_ema": True}, {"gradient_accumulation_steps": 2},
                                   {"global_clipnorm": 1.0}, {"clipnorm": 0.5}])
def test_skipped_step_leaves_every_byte_unchanged(bad_value, extra):
    o = _core.Options()
    o.group = _core.Group(learning_rate=0.1, momentum=0.9)
    o.skip_nonfinite = True
    for k, v in extra.items():
        setattr(o, k, v)
    engine = _core.Engine(o)
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(n).astype(np.float32) for n in (10, 70000)]
    engine.build(ws)
    engine.step([np.ones_like(w) for w in ws])  # a normal step first: slots and counters are non-trivial
    kinds = [k for k in (SlotKind.momentum, SlotKind.average, SlotKind.accumulator) if engine.has_slot(k)]
    before = ([w.copy() for w in ws], [[engine.read_slot(k, i) for i in range(2)] for k in kinds],
              engine.raw_iterations)
    grads = [np.ones_like(w) for w in ws]
    grads[1][12345] = bad_value
    updated, skipped, missing = engine.step(grads)
    assert skipped and not updated and missing == 0
    assert engine.skipped_steps == 1
    assert engine.raw_iterations == before[2]
    for w, w0 in zip(ws, before[0]):
        assert w.tobytes() == w0.tobytes()
    for k, slots0 in zip(kinds, before[1]):
        for i, s0 in enumerate(slots0):
            assert engine.read_slot(k, i).tobytes() == s0.tobytes()


def test_external_found_inf_decides_without_scanning():
    o = _core.Options()
    o.skip_nonfinite = True
    engine = _core.Engine(o)
    w = np.ones(4, np.float32)
    engine.build([w])
    assert engine.step([np.ones(4, np.float32)], found_inf=True)[1]
    np.testing.assert_array_equal(w, np.ones(4, np.float32))
    # found_inf=False is the caller's decision: an Inf gradient then goes through.
    engine.step([np.array([np.inf, 1, 1, 1], np.float32)], found_inf=False)
    assert np.isneginf(w[0]) and engine.raw_iterations == 1


def test_grad_scale_unscales_like_grad_scaler():
    engine = _core.Engine(_core.Options())
    w = np.zeros(3, np.float32)
    engine.build([w])
    engine.step([np.full(3, 1024.0, np.float32)], learning_rate=1.0, grad_scale=1 / 1024)
    np.testing.assert_array_equal(w, np.full(3, -1.0, np.float32))


def test_two_phase_global_clip_equals_single_process_bit_for_bit():
    rng = np.random.default_rng(11)
    sizes = (5, 9000, 70001)
    grads = [rng.standard_normal(n).astype(np.float32) * 3 for n in sizes]

    def make():
        o = _core.Options()
        o.group = _core.Group(learning_rate=0.1, momentum=0.9)
        o.global_clipnorm = 1.0
        e = _core.Engine(o)
        ws = [np.ones(n, np.float32) for n in sizes]
        e.build(ws)
        return e, ws

    single, ws_single = make()
    two_phase, ws_two = make()
    single.step(grads)
    stats = two_phase.grad_stats(grads)
    assert two_phase.raw_iterations == 0 and all((w == 1).all() for w in ws_two)  # measuring changes nothing
    np.testing.assert_allclose(stats.total, sum(float((g.astype(np.float64) ** 2).sum()) for g in grads), rtol=1e-12)
    assert stats.total == sum(stats.sum_squares) and not stats.nonfinite
    # A sharded run would all-reduce the per-rank totals; here one rank holds everything.
    two_phase.step(grads, global_sum_squares=stats.total)
    for a, b in zip(ws_single, ws_two):
        assert a.tobytes() == b.tobytes()


def test_grad_stats_flags_nonfinite_exactly():
    engine = _core.Engine(_core.Options())
    w = np.ones(3, np.float64)
    engine.build([w])
    # 1e200 ** 2 overflows the sum of squares, yet every element is finite.
    assert not engine.grad_stats([np.array([1e200, 1e200, 0.0])]).nonfinite
    assert engine.grad_stats([np.array([np.nan, 0.0, 0.0])]).nonfinite


def test_iterations_at_the_int64_limit_are_refused_not_wrapped():
    engine = _core.Engine(_core.Options())
    w = np.ones(2, np.float32)
    engine.build([w])
    engine.raw_iterations = 2**63 - 1
    with pytest.raises(ValueError, match="overflow"):
        engine.step([np.ones(2, np.float32)])
    assert engine.raw_iterations == 2**63 - 1
    np.testing.assert_array_equal(w, np.ones(2, np.float32))


# ---- the façade --------------------------------------------------------------------------------

def test_facade_skip_nonfinite_counts_and_changes_nothing():
    import fastsgd

    opt = fastsgd.SGD(learning_rate=0.1, momentum=0.9, skip_nonfinite=True)
    w = np.ones(4, np.float32)
    opt.apply([np.ones(4, np.float32)], [w])
    before = (w.copy(), opt.state_dict())
    opt.apply([np.array([1, np.nan, 1, 1], np.float32)], [w])
    assert opt.skipped_steps == 1 and opt.iterations == 1
    assert w.tobytes() == before[0].tobytes()
    np.testing.assert_array_equal(opt.state_dict()["slots"]["momentum"][0], before[1]["slots"]["momentum"][0])
    assert fastsgd.SGD.from_config(opt.get_config()).skip_nonfinite


def test_facade_two_phase_clip_matches_local_clip():
    import fastsgd

    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(n).astype(np.float32) for n in (100, 5000)]
    local, two = fastsgd.SGD(0.1, global_clipnorm=0.5), fastsgd.SGD(0.1, global_clipnorm=0.5)
    wl, wt = [np.zeros(100, np.float32), np.zeros(5000, np.float32)], [np.zeros(100, np.float32),
                                                                         np.zeros(5000, np.float32)]
    local.apply(grads, wl)
    stats = two.grad_stats(grads, wt)
    two.apply(grads, wt, global_sum_squares=stats.total)
    for a, b in zip(wl, wt):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("nesterov", [False, True])
def test_velocity_conversion_continues_the_same_path_at_a_constant_rate(nesterov):
    import fastsgd

    rng = np.random.default_rng(9)
    grads = [rng.standard_normal(50) for _ in range(6)]
    lr, m = 0.0625, 0.9  # exact in float32, the precision Keras keeps a float rate in
    w_keras = np.zeros(50)
    keras_opt = fastsgd.SGD(lr, momentum=m, nesterov=nesterov)
    for g in grads[:3]:
        keras_opt.apply([g], [w_keras])
    w_torch = w_keras.copy()
    velocity = keras_opt.state_dict()["slots"]["momentum"][0]
    for g in grads[3:]:
        keras_opt.apply([g], [w_keras])
    o = torch_options(learning_rate=lr, momentum=m, nesterov=nesterov)
    engine = _core.Engine(o)
    engine.build([w_torch])
    buffer = fastsgd.keras_velocity_to_torch(velocity, lr)
    for g in grads[3:]:
        engine.step([g], slots={SlotKind.momentum: [buffer]}, fresh_momentum=[False])
    np.testing.assert_allclose(w_torch, w_keras, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(fastsgd.torch_buffer_to_keras(buffer, lr),
                               keras_opt.state_dict()["slots"]["momentum"][0], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="learning_rate"):
        fastsgd.keras_velocity_to_torch(velocity, 0.0)


def test_grad_stats_needs_no_slot_it_does_not_read():
    o = _core.Options()
    o.group = _core.Group(momentum=0.9)
    o.use_ema = True
    o.caller_owned_slots = True
    engine = _core.Engine(o)
    w = np.ones(3, np.float32)
    engine.build([w])
    assert engine.grad_stats([np.full(3, 2.0, np.float32)]).total == 12.0
    with pytest.raises(ValueError, match="missing"):
        engine.step([np.full(3, 2.0, np.float32)])


def test_refused_or_skipped_first_momentum_step_allocates_nothing():
    o = _core.Options()
    o.skip_nonfinite = True
    engine = _core.Engine(o)
    w = np.ones(3, np.float32)
    engine.build([w])
    engine.set_group(0, _core.Group(momentum=0.9))  # momentum slots are due at the next step
    assert engine.step([np.array([np.nan, 1, 1], np.float32)])[1]
    assert not engine.has_slot(SlotKind.momentum)
    with pytest.raises(ValueError, match="share memory"):
        engine.step([w])
    assert not engine.has_slot(SlotKind.momentum)
    engine.step([np.ones(3, np.float32)])
    assert engine.has_slot(SlotKind.momentum)


@pytest.mark.parametrize("bad, error", [(1.5, TypeError), ("2", TypeError), (True, TypeError), (None, TypeError),
                                        (-1, ValueError), (2**40, ValueError), (4097, ValueError)])
def test_set_num_threads_refuses_what_is_not_a_thread_count(bad, error):
    """set_num_threads takes an int in [0, 4096]; anything else is refused and the limit stays."""
    fastsgd.set_num_threads(1)
    try:
        with pytest.raises(error, match="`threads` must be an int in"):
            fastsgd.set_num_threads(bad)
        assert fastsgd.cpu_info()["threads"] == 1
    finally:
        fastsgd.set_num_threads(0)
