"""fastsgd on CUDA tensors against the CPU engine. Runs only where fastsgd was built with CUDA,
a device is usable and torch has CUDA; everything is skipped (with the reason) elsewhere.

Element-wise configurations must match the CPU engine bit for bit (the kernels call the same
math.h functions, built without floating-point contraction). With clipnorm / global_clipnorm the
norm is summed in a different order on the GPU, so those compare with a tight tolerance, and
must be bit-identical from run to run. tests/gpu/run.sh builds the package with CUDA and runs this.
"""

import itertools
import warnings

import numpy as np
import pytest

import fastsgd

try:
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    torch = None


def _skip_reason():
    info = fastsgd.cuda_info()
    if not info["built"]:
        return f"fastsgd was built without CUDA ({info['status']})"
    if info["device_count"] == 0:
        return f"no usable CUDA device: {info['status']}"
    if torch is None:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (CPU-only torch build, or no driver for it)"
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

DTYPES = ["float32", "float64", "float16", "bfloat16"]
# Shapes: tails, exactly one chunk (16384 elements), one more, several chunks, 2-D.
SHAPES = [(1,), (7,), (129, 3), (16384,), (16385,), (40001,), (33, 65)]
LR = 0.05

ELEMENTWISE = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "weight_decay": {"momentum": 0.5, "weight_decay": 0.01},
    "clipvalue": {"momentum": 0.9, "clipvalue": 0.25},
    "loss_scale": {"loss_scale_factor": 128.0, "momentum": 0.9},
    "accumulation": {"gradient_accumulation_steps": 3, "momentum": 0.9},
    "ema": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 2, "momentum": 0.9},
    "everything": {"momentum": 0.8, "nesterov": True, "weight_decay": 0.004, "clipvalue": 0.5,
                   "loss_scale_factor": 4.0, "gradient_accumulation_steps": 2, "use_ema": True,
                   "ema_momentum": 0.95, "ema_overwrite_frequency": 3},
}
NORM_CLIPPED = {
    "clipnorm": {"clipnorm": 1.0, "momentum": 0.9},
    "clipnorm_accumulation": {"clipnorm": 0.5, "gradient_accumulation_steps": 2, "weight_decay": 0.01},
    "global_clipnorm": {"global_clipnorm": 1.0, "momentum": 0.9, "nesterov": True},
    "global_clipnorm_ema": {"global_clipnorm": 2.0, "use_ema": True, "ema_momentum": 0.9,
                            "loss_scale_factor": 8.0, "gradient_accumulation_steps": 2},
}
TOLERANCE = {"float64": (1e-12, 1e-14), "float32": (2e-6, 1e-7), "float16": (2e-3, 1e-5),
             "bfloat16": (1.6e-2, 1e-4)}


def _tdtype(name):
    return getattr(torch, name)


def _bits(t):
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(cpu, gpu, what):
    a, b = _bits(cpu), _bits(gpu)
    if torch.equal(a, b):
        return
    av, bv = cpu.detach().cpu().double().reshape(-1), gpu.detach().cpu().double().reshape(-1)
    both_nan = torch.isnan(av) & torch.isnan(bv)
    bad = (a != b) & ~both_nan
    if not bad.any():
        return
    i = int(bad.nonzero()[0])
    raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements differ from the CPU engine; "
                         f"first at {i}: cpu {av[i].item()!r}, cuda {bv[i].item()!r}")


def _slot_values(a):
    a = np.asarray(a)
    if a.dtype == np.uint16:  # bfloat16 slots come back as raw bits
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def assert_slots_equal(cpu_opt, gpu_opt, exact, dtype_name):
    cs, gs = cpu_opt.state_dict(), gpu_opt.state_dict()
    assert cs["iterations"] == gs["iterations"]
    assert sorted(cs["slots"]) == sorted(gs["slots"])
    for kind in cs["slots"]:
        for i, (a, b) in enumerate(zip(cs["slots"][kind], gs["slots"][kind])):
            a, b = np.asarray(a), np.asarray(b)
            if exact:
                same = np.array_equal(a.view(np.uint8), b.view(np.uint8)) or \
                    np.array_equal(_slot_values(a), _slot_values(b), equal_nan=True)
                assert same, f"{kind} slot {i} differs from the CPU engine"
            else:
                rtol, atol = TOLERANCE[dtype_name]
                np.testing.assert_allclose(_slot_values(b), _slot_values(a), rtol=rtol, atol=atol,
                                           err_msg=f"{kind} slot {i}")


def run_twins(kwargs, dtype_name, shapes=SHAPES, steps=6, seed=0, none_every=0, slot_dtype="float32",
              make_gpu_var=None):
    """The same steps with torch CPU tensors (CPU engine) and CUDA tensors (CUDA engine)."""
    dtype = _tdtype(dtype_name)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    cpu_vars = [t.clone() for t in init]
    gpu_vars = [make_gpu_var(t) if make_gpu_var else t.clone().cuda() for t in init]
    cpu_opt = fastsgd.SGD(learning_rate=LR, slot_dtype=slot_dtype, **kwargs)
    gpu_opt = fastsgd.SGD(learning_rate=LR, slot_dtype=slot_dtype, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            grads = [(torch.randn(s, generator=gen) * (0.2 + step)).to(dtype) for s in shapes]
            if none_every and step % 2 == 1:
                grads = [None if i % none_every == 0 else g for i, g in enumerate(grads)]
            cpu_opt.apply(grads, cpu_vars)
            gpu_opt.apply([None if g is None else g.cuda() for g in grads], gpu_vars)
    torch.cuda.synchronize()
    return cpu_opt, gpu_opt, cpu_vars, gpu_vars


def test_cuda_info_names_the_device():
    info = fastsgd.cuda_info()
    assert info["built"] and info["device_count"] >= 1
    assert "device(s)" in info["status"] and torch.cuda.get_device_name(0) in info["status"]


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("config", list(ELEMENTWISE))
def test_elementwise_configs_bit_exact(config, dtype_name):
    cpu_opt, gpu_opt, cpu_vars, gpu_vars = run_twins(ELEMENTWISE[config], dtype_name, none_every=3)
    for i, (c, g) in enumerate(zip(cpu_vars, gpu_vars)):
        assert_same_bits(c, g, f"{config}/{dtype_name} variable {i}")
    assert_slots_equal(cpu_opt, gpu_opt, exact=True, dtype_name=dtype_name)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("config", ["momentum", "everything"])
def test_slots_in_variable_dtype_bit_exact(config, dtype_name):
    cpu_opt, gpu_opt, cpu_vars, gpu_vars = run_twins(ELEMENTWISE[config], dtype_name, slot_dtype="variable")
    for i, (c, g) in enumerate(zip(cpu_vars, gpu_vars)):
        assert_same_bits(c, g, f"{config}/{dtype_name}/variable slots, variable {i}")
    assert_slots_equal(cpu_opt, gpu_opt, exact=True, dtype_name=dtype_name)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("config", list(NORM_CLIPPED))
def test_norm_clipping_close_to_cpu(config, dtype_name):
    cpu_opt, gpu_opt, cpu_vars, gpu_vars = run_twins(NORM_CLIPPED[config], dtype_name, none_every=4)
    rtol, atol = TOLERANCE[dtype_name]
    for i, (c, g) in enumerate(zip(cpu_vars, gpu_vars)):
        torch.testing.assert_close(g.cpu().double(), c.double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{config}/{dtype_name} variable {i}: {m}")
    assert_slots_equal(cpu_opt, gpu_opt, exact=False, dtype_name=dtype_name)


@pytest.mark.parametrize("config", list(NORM_CLIPPED))
def test_norm_clipping_is_deterministic(config):
    shapes = [(300_001,), (5, 7), (16384 * 3 + 5,)] + [(i + 1,) for i in range(140)]
    _, _, _, first = run_twins(NORM_CLIPPED[config], "float32", shapes=shapes, steps=4, seed=3)
    _, _, _, second = run_twins(NORM_CLIPPED[config], "float32", shapes=shapes, steps=4, seed=3)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(_bits(a), _bits(b)), f"{config}: variable {i} differs between two identical runs"


def test_many_tensors_and_large_tensors():
    # More tensors than one launch holds (128), and one tensor of many chunks.
    shapes = [(i % 37 + 1, 3) for i in range(300)] + [(1_000_003,)]
    _, _, cpu_vars, gpu_vars = run_twins({"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
                                         "float32", shapes=shapes, steps=3)
    for i, (c, g) in enumerate(zip(cpu_vars, gpu_vars)):
        assert_same_bits(c, g, f"variable {i}")


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_misaligned_views(dtype_name):
    # Slices starting one element into a buffer: no vector loads for those tensors.
    keep = []

    def misaligned(t):
        base = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        keep.append(base)
        view = base[1:].view(t.shape)
        view.copy_(t.cuda())
        return view

    _, _, cpu_vars, gpu_vars = run_twins({"momentum": 0.9, "use_ema": True}, dtype_name,
                                         make_gpu_var=misaligned)
    for i, (c, g) in enumerate(zip(cpu_vars, gpu_vars)):
        assert g.data_ptr() % 16 != 0 or g.numel() == 0
        assert_same_bits(c, g, f"misaligned {dtype_name} variable {i}")


def test_mixed_dtypes_in_one_optimizer():
    gen = torch.Generator().manual_seed(5)
    dts = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    init = [torch.randn(1000 + 17 * i, generator=gen).to(dts[i % 4]) for i in range(8)]
    cpu_vars = [t.clone() for t in init]
    gpu_vars = [t.clone().cuda() for t in init]
    kw = {"momentum": 0.9, "gradient_accumulation_steps": 2, "use_ema": True}
    cpu_opt, gpu_opt = fastsgd.SGD(LR, **kw), fastsgd.SGD(LR, **kw)
    for _ in range(5):
        grads = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in init]
        cpu_opt.apply(grads, cpu_vars)
        gpu_opt.apply([g.cuda() for g in grads], gpu_vars)
    cpu_opt.finalize_variable_values(cpu_vars)
    gpu_opt.finalize_variable_values(gpu_vars)
    torch.cuda.synchronize()
    for i, (c, g) in enumerate(zip(cpu_vars, gpu_vars)):
        assert_same_bits(c, g, f"mixed dtypes, variable {i} after finalize")


def test_side_streams_and_explicit_stream():
    gen = torch.Generator().manual_seed(11)
    shapes = [(100_000,), (513,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    cpu_vars = [t.clone() for t in init]
    gpu_vars = [t.clone().cuda() for t in init]
    kw = {"momentum": 0.9, "global_clipnorm": 5.0}
    cpu_opt, gpu_opt = fastsgd.SGD(LR, **kw), fastsgd.SGD(LR, **kw)
    streams = [torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.current_stream()]
    torch.cuda.synchronize()
    for step in range(9):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        cpu_opt.apply(grads, cpu_vars)
        s = streams[step % 3]
        with torch.cuda.stream(s):
            gpu_grads = [g.cuda() for g in grads]  # synchronous copies from pageable memory
            if step % 2:
                gpu_opt.apply(gpu_grads, gpu_vars)  # the producer's current stream
            else:
                gpu_opt.apply(gpu_grads, gpu_vars, stream=s.cuda_stream)
        # No waits between the streams here: the engine orders each step's stream after the
        # stream of the step before (variables and slots are read and written by both).
    torch.cuda.synchronize()
    for i, (c, g) in enumerate(zip(cpu_vars, gpu_vars)):
        torch.testing.assert_close(g.cpu(), c, rtol=2e-6, atol=1e-7)


def test_cuda_graph_capture_is_refused_and_changes_nothing():
    # A captured step would replay the learning rate, EMA factors and accumulation phase of the
    # capturing call and never advance the counters, so the engine refuses capture.
    gen = torch.Generator().manual_seed(2)
    shapes = [(70_000,), (129,)]
    gpu_vars = [torch.randn(s, generator=gen).cuda() for s in shapes]
    gpu_grads = [torch.randn(s, generator=gen).cuda() for s in shapes]
    gpu_opt = fastsgd.SGD(LR, momentum=0.9, weight_decay=0.01, clipnorm=1.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: builds slots and the norm scratch
            gpu_opt.apply(gpu_grads, gpu_vars)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    before = [v.clone() for v in gpu_vars]
    iterations = int(gpu_opt.iterations)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match=r"stream 0x[0-9a-f]+ is capturing a CUDA graph"):
        with torch.cuda.graph(graph):
            gpu_opt.apply(gpu_grads, gpu_vars)
    torch.cuda.synchronize()
    assert int(gpu_opt.iterations) == iterations
    for b, v in zip(before, gpu_vars):
        assert torch.equal(_bits(b), _bits(v))


def _engine_pair(convention, groups, **options):
    """Two engines (CPU, CUDA) with the same options and parameter groups."""
    engines = []
    for _ in range(2):
        o = fastsgd._core.Options()
        o.convention = convention
        o.group = groups[0]
        for k, v in options.items():
            setattr(o, k, v)
        e = fastsgd._core.Engine(o)
        for g in groups[1:]:
            e.add_group(g)
        engines.append(e)
    return engines


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_torch_convention_groups_bit_exact(dtype_name):
    # torch's rule (explicit FMAs, b = g on a slot's first step), L2 and decoupled decay,
    # maximize, dampening, Nesterov, per-group learning rates, a variable excluded from decay.
    core = fastsgd._core
    groups = [core.Group(learning_rate=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
              core.Group(learning_rate=0.02, momentum=0.8, nesterov=True, weight_decay=0.003,
                         decay_form=core.DecayForm.decoupled, maximize=True),
              core.Group(learning_rate=0.1, weight_decay=0.02, maximize=True)]
    cpu, gpu = _engine_pair(core.Convention.torch, groups, clipvalue=0.5)
    gen = torch.Generator().manual_seed(5)
    dt = _tdtype(dtype_name)
    shapes = [(16385,), (7,), (129, 3), (40001,), (33, 65)]
    init = [torch.randn(s, generator=gen).to(dt) for s in shapes]
    cpu_vars = [t.clone() for t in init]
    gpu_vars = [t.clone().cuda() for t in init]
    group_of = [0, 1, 2, 0, 1]
    decays = [True, True, True, False, True]
    cpu.build(cpu_vars, decays, group_of)
    gpu.build(gpu_vars, decays, group_of)
    for step in range(5):
        grads = [torch.randn(s, generator=gen).to(dt) for s in shapes]
        if step == 2:
            grads[1] = None
        cpu.step(grads)
        gpu.step([g.cuda() if g is not None else None for g in grads])
    torch.cuda.synchronize()
    for i, (c, g) in enumerate(zip(cpu_vars, gpu_vars)):
        assert_same_bits(c, g.cpu(), f"variable {i}")
        assert cpu.momentum_started(i) == gpu.momentum_started(i)


def test_grad_stats_and_skip_nonfinite_on_cuda():
    core = fastsgd._core
    cpu, gpu = _engine_pair(core.Convention.keras, [core.Group(learning_rate=0.05, momentum=0.9)],
                            skip_nonfinite=True, global_clipnorm=1.0)
    gen = torch.Generator().manual_seed(9)
    shapes = [(50001,), (17,), (16384,)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    cpu_vars = [t.clone() for t in init]
    gpu_vars = [t.clone().cuda() for t in init]
    cpu.build(cpu_vars)
    gpu.build(gpu_vars)
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    a, b = cpu.grad_stats(grads), gpu.grad_stats([g.cuda() for g in grads])
    np.testing.assert_allclose(b.sum_squares, a.sum_squares, rtol=1e-12)
    assert a.nonfinite is False and b.nonfinite is False
    # A finite float64 gradient whose square overflows: the probe, not the sum, decides.
    big = [g.clone() for g in grads]
    big[2][5] = 1e200
    assert gpu.grad_stats([g.cuda() for g in big]).nonfinite is False
    bad = [g.clone() for g in grads]
    bad[1][3] = float("nan")
    assert gpu.grad_stats([g.cuda() for g in bad]).nonfinite is True
    before = [v.clone() for v in gpu_vars]
    result = gpu.step([g.cuda() for g in bad])
    torch.cuda.synchronize()
    assert result.skipped and not result.updated and gpu.iterations == 0
    for x, v in zip(before, gpu_vars):
        assert torch.equal(x, v)
    # Measured-then-clipped (skip_nonfinite) on the GPU: close to the CPU, same sums reused.
    for _ in range(3):
        cpu.step(grads)
        gpu.step([g.cuda() for g in grads])
    torch.cuda.synchronize()
    for c, g in zip(cpu_vars, gpu_vars):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-13, atol=1e-15)
    # A global sum computed outside: bit for bit.
    cpu.step(grads, global_sum_squares=7.5)
    gpu.step([g.cuda() for g in grads], global_sum_squares=7.5)
    torch.cuda.synchronize()
    for c, g in zip(cpu_vars, gpu_vars):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-13, atol=1e-15)


def test_state_dict_round_trip_on_cuda():
    cpu_opt, gpu_opt, cpu_vars, gpu_vars = run_twins({"momentum": 0.9, "use_ema": True}, "float32", steps=3)
    state = gpu_opt.state_dict()
    fresh = fastsgd.SGD(learning_rate=LR, momentum=0.9, use_ema=True)
    fresh.build(gpu_vars)
    fresh.load_state_dict(state)
    for kind, arrays in fresh.state_dict()["slots"].items():
        for a, b in zip(arrays, state["slots"][kind]):
            np.testing.assert_array_equal(a, b)


def test_cpu_gradient_for_cuda_variable_is_refused():
    w = torch.ones(4, device="cuda")
    opt = fastsgd.SGD(0.1)
    with pytest.raises(ValueError, match="cuda|cpu"):
        opt.apply([torch.ones(4)], [w])
    torch.testing.assert_close(w.cpu(), torch.ones(4))


def test_cupy_arrays_if_installed():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(n).astype(np.float32) for n in (5, 16385, 1000)]
    cpu_vars = [a.copy() for a in init]
    gpu_vars = [cupy.asarray(a) for a in init]
    kw = {"momentum": 0.9, "nesterov": True, "clipvalue": 0.5, "use_ema": True}
    cpu_opt, gpu_opt = fastsgd.SGD(LR, **kw), fastsgd.SGD(LR, **kw)
    for _ in range(4):
        grads = [rng.standard_normal(a.shape).astype(np.float32) for a in init]
        cpu_opt.apply(grads, cpu_vars)
        gpu_opt.apply([cupy.asarray(g) for g in grads], gpu_vars)
    cupy.cuda.get_current_stream().synchronize()
    for c, g in zip(cpu_vars, gpu_vars):
        np.testing.assert_array_equal(cupy.asnumpy(g).view(np.uint32), c.view(np.uint32))


@pytest.mark.parametrize("momentum,nesterov", list(itertools.product([0.0, 0.9], [False, True])))
def test_every_step_kind_over_a_long_run(momentum, nesterov):
    # Accumulation windows, EMA overwrites and None gradients interleaved over 13 calls.
    kw = {"momentum": momentum, "nesterov": nesterov, "gradient_accumulation_steps": 3, "use_ema": True,
          "ema_overwrite_frequency": 2, "weight_decay": 0.001}
    cpu_opt, gpu_opt, cpu_vars, gpu_vars = run_twins(kw, "float32", steps=13, none_every=2)
    for i, (c, g) in enumerate(zip(cpu_vars, gpu_vars)):
        assert_same_bits(c, g, f"long run, variable {i}")
    assert_slots_equal(cpu_opt, gpu_opt, exact=True, dtype_name="float32")


# ---- 16-bit variables: master weights, remainders, stochastic rounding ---------------------------

LOWP_MODES = {
    "stochastic": {"stochastic_rounding": True, "seed": 7},
    "master": {"master_weights": "float32"},
    "master_stochastic": {"master_weights": "float32", "stochastic_rounding": True, "seed": 1234},
    "remainder": {"master_weights": "remainder"},
    "remainder_stochastic": {"master_weights": "remainder", "stochastic_rounding": True, "seed": 2**64 - 1},
}
LOWP_EXTRAS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "everything": {"momentum": 0.8, "nesterov": True, "weight_decay": 0.004, "clipvalue": 0.5,
                   "loss_scale_factor": 4.0, "gradient_accumulation_steps": 2},
}


def _lowp_modes_for(dtype_name):
    # Remainders hold a bfloat16 variable's low half: float16 variables refuse them.
    return [m for m in LOWP_MODES if dtype_name == "bfloat16" or not m.startswith("remainder")]


@pytest.mark.parametrize("extra", list(LOWP_EXTRAS))
@pytest.mark.parametrize("dtype_name,mode", [(d, m) for d in ("float16", "bfloat16") for m in _lowp_modes_for(d)])
def test_low_precision_modes_bit_exact(dtype_name, mode, extra):
    kw = {**LOWP_MODES[mode], **LOWP_EXTRAS[extra]}
    cpu_opt, gpu_opt, cpu_vars, gpu_vars = run_twins(kw, dtype_name, steps=7, none_every=3)
    for i, (c, g) in enumerate(zip(cpu_vars, gpu_vars)):
        assert_same_bits(c, g, f"{mode}/{extra}/{dtype_name} variable {i}")
    assert_slots_equal(cpu_opt, gpu_opt, exact=True, dtype_name=dtype_name)
    if mode.startswith(("master", "remainder")):
        assert ("master" if mode.startswith("master") else "remainder") in gpu_opt.state_dict()["slots"]


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_stochastic_rounding_with_variable_dtype_slots_bit_exact(dtype_name):
    cpu_opt, gpu_opt, cpu_vars, gpu_vars = run_twins({**LOWP_MODES["stochastic"], "momentum": 0.9}, dtype_name,
                                                     slot_dtype="variable")
    for i, (c, g) in enumerate(zip(cpu_vars, gpu_vars)):
        assert_same_bits(c, g, f"stochastic/{dtype_name}/variable slots, variable {i}")
    assert_slots_equal(cpu_opt, gpu_opt, exact=True, dtype_name=dtype_name)


@pytest.mark.parametrize("mode", ["stochastic", "master_stochastic", "remainder_stochastic"])
def test_low_precision_misaligned_views_bit_exact(mode):
    keep = []

    def misaligned(t):
        base = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        keep.append(base)
        view = base[1:].view(t.shape)
        view.copy_(t.cuda())
        return view

    _, _, cpu_vars, gpu_vars = run_twins({**LOWP_MODES[mode], "momentum": 0.9}, "bfloat16",
                                         make_gpu_var=misaligned)
    for i, (c, g) in enumerate(zip(cpu_vars, gpu_vars)):
        assert_same_bits(c, g, f"misaligned {mode} variable {i}")


@pytest.mark.parametrize("form", ["float32", "remainder"])
def test_low_precision_torch_convention_with_caller_owned_slots(form):
    # torch's rule with L2 decay and dampening, and master/remainder slots the caller owns.
    core = fastsgd._core
    master_form = core.MasterForm.float32 if form == "float32" else core.MasterForm.remainder
    kind = core.SlotKind.master if form == "float32" else core.SlotKind.remainder
    cpu, gpu = _engine_pair(core.Convention.torch,
                            [core.Group(learning_rate=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)],
                            master_weights=master_form, stochastic_rounding=True, seed=42, caller_owned_slots=True)
    gen = torch.Generator().manual_seed(21)
    shapes = [(16385,), (7,), (33, 65)]
    init = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    cpu_vars = [t.clone() for t in init]
    gpu_vars = [t.clone().cuda() for t in init]
    # The caller starts a master as the widened variable, a remainder at zero (as the engine does).
    cpu_masters = [t.float() if form == "float32" else torch.zeros_like(t) for t in init]
    gpu_masters = [m.cuda() for m in cpu_masters]
    cpu_moms = [torch.zeros(s) for s in shapes]
    gpu_moms = [m.cuda() for m in cpu_moms]
    cpu.build(cpu_vars)
    gpu.build(gpu_vars)
    for step in range(5):
        grads = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
        fresh = [step == 0] * len(shapes)
        cpu.step(grads, slots={core.SlotKind.momentum: cpu_moms, kind: cpu_masters}, fresh_momentum=fresh)
        gpu.step([g.cuda() for g in grads], slots={core.SlotKind.momentum: gpu_moms, kind: gpu_masters},
                 fresh_momentum=fresh)
    torch.cuda.synchronize()
    for i in range(len(shapes)):
        assert_same_bits(cpu_vars[i], gpu_vars[i], f"variable {i}")
        assert_same_bits(cpu_masters[i], gpu_masters[i], f"{form} slot {i}")
        assert_same_bits(cpu_moms[i], gpu_moms[i], f"momentum slot {i}")
    assert not gpu.has_slot(kind)  # the engine allocated nothing


def test_engine_owned_master_starts_as_the_variable_on_cuda():
    init = [torch.randn(1000, generator=torch.Generator().manual_seed(2)).half()]
    gpu_vars = [t.cuda() for t in init]
    opt = fastsgd.SGD(learning_rate=LR, master_weights="float32")
    opt.build(gpu_vars)
    master = np.asarray(opt.state_dict()["slots"]["master"][0])
    np.testing.assert_array_equal(master.view(np.uint32), init[0].float().numpy().view(np.uint32))


def test_low_precision_refusals_on_cuda_change_nothing():
    v = torch.randn(10).half().cuda()
    with pytest.raises(ValueError, match="needs bfloat16 variables"):
        fastsgd.SGD(learning_rate=LR, master_weights="remainder").build([v])
    with pytest.raises(ValueError, match="use_ema"):
        fastsgd.SGD(learning_rate=LR, stochastic_rounding=True, use_ema=True)
