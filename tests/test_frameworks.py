"""Any DLPack producer, in place: PyTorch tensors, generic __dlpack__ objects, JAX refusal,
float16/bfloat16 variables, minimize() and the functional stateless_apply()."""

import gc
import os

import numpy as np
import pytest

import fastsgd


class Producer:
    """Wraps a NumPy array behind __dlpack__ only, so fastsgd must take the capsule path."""

    def __init__(self, array, legacy=False):
        self.array = array
        self.legacy = legacy

    def __dlpack__(self, **kwargs):
        if self.legacy and kwargs:
            raise TypeError("this producer predates max_version")
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


@pytest.mark.parametrize("legacy", [False, True])
def test_generic_dlpack_producer_updated_in_place(legacy):
    w = np.ones(6, np.float32)
    g = np.full(6, 2.0, np.float32)
    var = Producer(w, legacy)
    opt = fastsgd.SGD(0.25, momentum=0.5)
    opt.apply([Producer(g, legacy)], [var])
    opt.apply([Producer(g, legacy)], [var])
    # step 1: m = -0.5, w = 0.5; step 2: m = 0.5 * -0.5 - 0.5 = -0.75, w = -0.25
    np.testing.assert_array_equal(w, np.float32(-0.25))


def test_dlpack_read_only_export_refused():
    w = np.ones(4, np.float32)
    w.setflags(write=False)
    with pytest.raises(ValueError, match="read-only|READ_ONLY"):
        fastsgd.SGD(0.1).apply([np.ones(4, np.float32)], [Producer(w)])


def test_dlpack_capsules_do_not_leak():
    def rss_kib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    w = np.ones(256, np.float32)
    g = np.ones(256, np.float32)
    var, grad = Producer(w), Producer(g)
    opt = fastsgd.SGD(1e-6)
    for _ in range(1000):
        opt.apply([grad], [var])
    gc.collect()
    before = rss_kib()
    for _ in range(10_000):  # 20,000 imports
        opt.apply([grad], [var])
    gc.collect()
    grown = rss_kib() - before
    assert grown < 2048, f"RSS grew by {grown} KiB over 20,000 DLPack imports"


def test_jax_arrays_are_refused_with_advice():
    class FakeJaxArray(Producer):
        pass

    FakeJaxArray.__module__ = "jaxlib._jax"
    w = FakeJaxArray(np.ones(3, np.float32))
    with pytest.raises(TypeError, match="stateless_apply"):
        fastsgd.SGD(0.1).apply([np.ones(3, np.float32)], [w])
    np.testing.assert_array_equal(w.array, 1)


def test_stateless_apply_leaves_inputs_and_returns_new_state():
    w = np.array([1.0, 2.0], np.float32)
    g = np.array([1.0, 1.0], np.float32)
    opt = fastsgd.SGD(0.1, momentum=0.9)
    new_w, state = opt.stateless_apply(None, [g], [w])
    np.testing.assert_array_equal(w, [1.0, 2.0])
    assert not opt.built
    new_w2, state2 = opt.stateless_apply(state, [g], new_w)
    live = fastsgd.SGD(0.1, momentum=0.9)
    w_live = w.copy()
    live.apply([g], [w_live])
    live.apply([g], [w_live])
    np.testing.assert_array_equal(new_w2[0], w_live)
    assert state2["iterations"] == 2


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("slot_dtype", ["float32", "variable"])
def test_low_precision_matches_float64_reference(dtype_name, slot_dtype):
    if dtype_name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="NumPy needs ml_dtypes for bfloat16")
        dtype = np.dtype(ml_dtypes.bfloat16)
        eps = 2.0 ** -8
    else:
        dtype = np.dtype(np.float16)
        eps = 2.0 ** -11
    rng = np.random.default_rng(3)
    w64 = rng.standard_normal(1000)
    w = w64.astype(dtype)
    w64 = w.astype(np.float64)
    cfg = dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, use_ema=True)
    opt = fastsgd.SGD(slot_dtype=slot_dtype, **cfg)
    ref = fastsgd.SGD(**cfg)
    for _ in range(5):
        g = rng.standard_normal(1000).astype(dtype)
        opt.apply([g], [w])
        ref.apply([g.astype(np.float64)], [w64])
    # each step rounds w once (and the slots too, when kept in the variable dtype)
    per_step = 2 if slot_dtype == "float32" else 8
    tol = 5 * per_step * eps * np.maximum(np.abs(w64), 1.0)
    assert np.all(np.abs(w.astype(np.float64) - w64) <= tol)
    assert opt._engine.slot_spec(0)[1] == ("float32" if slot_dtype == "float32" else dtype_name)


def test_mixed_dtypes_in_one_step():
    a = np.ones(5, np.float32)
    b = np.ones(5, np.float64)
    c = np.ones(5, np.float16)
    opt = fastsgd.SGD(0.5)
    opt.apply([np.ones(5, np.float32), np.ones(5, np.float64), np.ones(5, np.float16)], [a, b, c])
    for x in (a, b, c):
        np.testing.assert_array_equal(x, 0.5)


def test_minimize_with_loss_and_grads_callable():
    w = np.array([1.0], np.float32)
    opt = fastsgd.SGD(0.1)
    opt.minimize(lambda: (float((w ** 2).sum() / 2), [w.copy()]), [w])
    np.testing.assert_allclose(w, [0.9], rtol=1e-7)


# ---- PyTorch ------------------------------------------------------------------------------

try:
    import torch
except ImportError:  # pragma: no cover - torch is in the test extras
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (test extra)")


@needs_torch
def test_seed_doctests_with_torch_minimize():
    var = torch.tensor(1.0, requires_grad=True)
    opt = fastsgd.SGD(learning_rate=0.1)
    opt.minimize(lambda: (var ** 2) / 2.0, [var])
    assert abs(var.item() - 0.9) < 1e-7

    var = torch.tensor(1.0, requires_grad=True)
    opt = fastsgd.SGD(0.1, momentum=0.9)
    val0 = var.item()
    opt.minimize(lambda: (var ** 2) / 2.0, [var])
    val1 = var.item()
    opt.minimize(lambda: (var ** 2) / 2.0, [var])
    val2 = var.item()
    assert abs((val0 - val1) - 0.1) < 1e-6
    assert abs((val1 - val2) - 0.18) < 1e-6


@needs_torch
def test_torch_parameters_updated_in_place_and_version_bumped():
    p = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    ptr = p.data_ptr()
    (p ** 2).sum().backward()
    version = p._version
    fastsgd.SGD(0.5).apply([p.grad], [p])
    assert p.data_ptr() == ptr
    assert p._version > version
    torch.testing.assert_close(p.detach(), torch.zeros(2, 3))  # p - 0.5 * 2p


@needs_torch
def test_torch_training_loop_matches_numpy_path():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    params = list(model.parameters())
    twins = [p.detach().numpy().copy() for p in params]
    pointers = [p.data_ptr() for p in params]
    cfg = dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, clipnorm=1.0, use_ema=True)
    opt, ref = fastsgd.SGD(**cfg), fastsgd.SGD(**cfg)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    for _ in range(10):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad for p in params]
        ref.apply([g.numpy().copy() for g in grads], twins)
        opt.apply(grads, params)
    assert [p.data_ptr() for p in params] == pointers
    for p, t in zip(params, twins):
        np.testing.assert_array_equal(p.detach().numpy(), t)


@needs_torch
def test_torch_refusals():
    opt = fastsgd.SGD(0.1)
    w = torch.ones(4, 4)
    with pytest.raises(ValueError, match="contiguous"):
        opt.apply([torch.ones(4)], [w[:, 0]])
    with pytest.raises(TypeError, match="dtype"):
        opt.apply([torch.ones(4, dtype=torch.int32)], [torch.ones(4, dtype=torch.int32)])
    w = torch.ones(4)
    opt.apply([torch.ones(4)], [w])
    with pytest.raises(TypeError, match="dtype"):
        opt.apply([torch.ones(4, dtype=torch.float64)], [w])
    torch.testing.assert_close(w, torch.full((4,), 0.9))


@needs_torch
def test_torch_bfloat16_and_float16_parameters():
    for dtype in (torch.bfloat16, torch.float16):
        p = torch.ones(10, dtype=dtype)
        fastsgd.SGD(0.25).apply([torch.ones(10, dtype=dtype)], [p])
        torch.testing.assert_close(p, torch.full((10,), 0.75, dtype=dtype))
