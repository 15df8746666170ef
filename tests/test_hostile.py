"""A hostile-input suite (issue 14, item 8): random valid optimizers, random bad calls.

For every refused call: the error is a TypeError or ValueError, and variables, gradients,
slots, ``iterations``, the learning rate and whether the optimizer is built are byte-for-byte
unchanged; the optimizer then still takes a valid step. Examples are derandomized (the same
in every run, CI and the sanitizer pass included) and bounded by FASTSGD_HOSTILE_EXAMPLES.
"""

import copy
import os
import warnings

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the hostile-input suite needs hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastsgd  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

EXAMPLES = int(os.environ.get("FASTSGD_HOSTILE_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [np.float32, np.float64, np.float16]
SHAPES = [(), (1,), (3,), (2, 3), (4, 1, 2), (0,)]


@st.composite
def optimizers(draw):
    """Keyword arguments of a random valid fastsgd.SGD."""
    kw = {"learning_rate": draw(st.sampled_from([0.5, 0.01, 1e-3])),
          "momentum": draw(st.sampled_from([0.0, 0.5, 0.9]))}
    kw["nesterov"] = kw["momentum"] > 0 and draw(st.booleans())
    clip = draw(st.sampled_from([None, "clipnorm", "clipvalue", "global_clipnorm"]))
    if clip:
        kw[clip] = draw(st.sampled_from([0.1, 1.0]))
    if draw(st.booleans()):
        kw["weight_decay"] = 0.01
    if draw(st.booleans()):
        kw["use_ema"] = True
        kw["ema_overwrite_frequency"] = draw(st.sampled_from([None, 2]))
    if draw(st.booleans()):
        kw["gradient_accumulation_steps"] = draw(st.sampled_from([2, 3]))
    if draw(st.booleans()):
        kw["loss_scale_factor"] = 4.0
    kw["slot_dtype"] = draw(st.sampled_from(["float32", "variable"]))
    return kw


@st.composite
def problems(draw):
    n = draw(st.integers(1, 3))
    specs = [(draw(st.sampled_from(SHAPES)), draw(st.sampled_from(DTYPES))) for _ in range(n)]
    if torch is not None and draw(st.booleans()):
        framework = "torch"
    else:
        framework = "numpy"
    return specs, framework


def _make(specs, framework, seed):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(shape).astype(dtype) for shape, dtype in specs]
    arrays = [np.ascontiguousarray(a) for a in arrays]
    if framework == "torch":
        return [torch.from_numpy(a.copy()) for a in arrays]
    return arrays


def _bytes(x):
    if x is None or isinstance(x, (int, float, str)):
        return repr(x)
    if torch is not None and isinstance(x, torch.Tensor):
        if x.layout != torch.strided or x.device.type != "cpu" or x.is_quantized:
            return repr(x.layout) + repr(x.device)
        return x.detach().resolve_neg().contiguous().numpy().tobytes()
    if isinstance(x, np.ndarray) and x.dtype != object:
        return x.tobytes()
    if isinstance(x, (list, tuple)):
        return [_bytes(e) for e in x]
    return repr(type(x))


def _fingerprint(opt, variables, extra):
    state = opt.state_dict()
    slots = {k: [a.tobytes() for a in v] for k, v in state.get("slots", {}).items()}
    return (opt.built, state["iterations"], opt.iterations, state.get("learning_rate"), slots,
            [_bytes(v) for v in variables], _bytes(extra))


def _like(x, values):
    if torch is not None and isinstance(x, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(values))
    return np.ascontiguousarray(values)


def _np(x):
    return x.numpy() if torch is not None and isinstance(x, torch.Tensor) else np.asarray(x)


def _bad_calls(variables, grads):
    """(name, call) pairs; each call must be refused. Built from the valid grads/variables."""
    v0, g0 = variables[0], grads[0]
    a0 = _np(g0)
    calls = [
        ("bare grads array", lambda o: o.apply(g0, variables)),
        ("bare variables array", lambda o: o.apply(grads, v0)),
        ("string grads", lambda o: o.apply("abc", variables)),
        ("int grads", lambda o: o.apply(3, variables)),
        ("length mismatch", lambda o: o.apply(grads + [g0], variables)),
        ("too few variables", lambda o: o.apply(grads, variables[:-1]) if len(variables) > 1
         else o.apply(grads, [])),
        ("wrong shape", lambda o: o.apply([_like(g0, np.ones(a0.size + 1, a0.dtype))] + grads[1:], variables)),
        ("wrong dtype", lambda o: o.apply([_like(g0, a0.astype(np.float64 if a0.dtype != np.float64
                                                              else np.float32))] + grads[1:], variables)),
        ("int dtype", lambda o: o.apply([_like(g0, a0.astype(np.int32))] + grads[1:], variables)),
        ("object dtype", lambda o: o.apply([np.array([None] * max(a0.size, 1), dtype=object)] + grads[1:],
                                           variables)),
        ("python list grad", lambda o: o.apply([a0.tolist()] + grads[1:], variables)),
        ("unknown variable", lambda o: o.apply(grads, [_like(v0, _np(v0).copy())] + variables[1:])
         if o.built else o.apply(grads + [g0], variables + [np.ones(7, np.float32)])),
        ("duplicate variable", lambda o: o.apply([g0, g0], [v0, v0])),
        ("read-only variable", lambda o: o.apply([a0], [np.frombuffer(_np(v0).tobytes(), _np(v0).dtype)
                                                         .reshape(_np(v0).shape)]) if not o.built
         else o.apply([a0], [np.frombuffer(b"\0" * 4, np.float32)])),
        ("strided grad", lambda o: o.apply([np.repeat(a0.reshape(-1), 2)[::2].reshape(a0.shape)
                                            if a0.size > 1 else a0.astype(">f4")] + grads[1:], variables)),
        ("bad stream", lambda o: o.apply(grads, variables, stream=2**70)),
        ("stream string", lambda o: o.apply(grads, variables, stream="s")),
        ("numpy scalar variable", lambda o: o.apply([np.float32(1)], [np.float32(1)])),
        ("bad pair", lambda o: o.apply_gradients([(g0,)])),
        ("finalize wrong length", lambda o: o.finalize_variable_values(variables + [v0]) if o.use_ema and o.built
         else (_ for _ in ()).throw(ValueError("skip"))),
        ("build twice or bad build", lambda o: o.build(variables) if o.built else o.build(g0)),
        ("lr string", lambda o: setattr(o, "learning_rate", "abc")),
        ("lr huge", lambda o: setattr(o, "learning_rate", 10**400)),
        ("lr None", lambda o: setattr(o, "learning_rate", None)),
        ("decay names", lambda o: o.exclude_from_weight_decay(var_names="abc")),
        ("decay pattern", lambda o: o.exclude_from_weight_decay(var_names=["("])),
        ("state None", lambda o: o.load_state_dict(None)),
        ("state string", lambda o: o.load_state_dict("abc")),
    ]
    if torch is not None:
        calls += [
            ("sparse grad", lambda o: o.apply([torch.ones(3).to_sparse()], [torch.ones(3)])),
            ("meta grad", lambda o: o.apply([torch.ones(3, device="meta")], [torch.ones(3)])),
            ("neg variable", lambda o: o.apply([torch.ones(3)], [torch.ones(3)._neg_view()])),
            ("misaligned", lambda o: o.apply([torch.frombuffer(bytearray(20), dtype=torch.float32, offset=1,
                                                               count=4)], [torch.ones(4)])),
        ]
    return calls


def _check_refused(opt, variables, grads, call):
    before = _fingerprint(opt, variables, grads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call(opt)
        except (TypeError, ValueError):
            pass
        except Exception as e:  # noqa: BLE001 - the point of the suite
            raise AssertionError(f"refused with {type(e).__name__}: {e}") from e
        else:
            raise AssertionError("the call was accepted")
    assert _fingerprint(opt, variables, grads) == before


def _valid_step(opt, variables, grads):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.apply(grads, variables)


@SETTINGS
@given(config=optimizers(), problem=problems(), warmup=st.integers(0, 3), pick=st.data())
def test_every_refused_call_changes_nothing(config, problem, warmup, pick):
    specs, framework = problem
    variables = _make(specs, framework, 0)
    grads = _make(specs, framework, 1)
    opt = fastsgd.SGD(**config)
    for _ in range(warmup):
        _valid_step(opt, variables, grads)
    calls = _bad_calls(variables, grads)
    picked = pick.draw(st.lists(st.sampled_from(range(len(calls))), min_size=1, max_size=4))
    for index in picked:
        name, call = calls[index]
        try:
            _check_refused(opt, variables, grads, call)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e
    # Still usable, and a refused first call built nothing.
    before = opt.iterations
    _valid_step(opt, variables, grads)
    assert opt.built
    assert opt.iterations >= before


def _junk():
    return st.sampled_from([None, "abc", 2**63, -1, 1e30, float("nan"), True, [], {}, b"x",
                            np.zeros(3, np.int16), np.zeros((7, 7), np.float32), [np.zeros(2)], object()])


@SETTINGS
@given(config=optimizers(), problem=problems(), warmup=st.integers(1, 3), pick=st.data())
def test_corrupt_checkpoints_change_nothing(config, problem, warmup, pick):
    specs, framework = problem
    variables = _make(specs, framework, 0)
    grads = _make(specs, framework, 1)
    opt = fastsgd.SGD(**config)
    for _ in range(warmup):
        _valid_step(opt, variables, grads)
    state = opt.state_dict()
    corrupt = copy.deepcopy(state)
    paths = [("iterations",), ("learning_rate",), ("shapes",), ("slot_dtypes",), ("slots",), ("extra",)]
    for kind, arrays in state["slots"].items():
        paths.append(("slots", kind))
        paths += [("slots", kind, i) for i in range(len(arrays))]
    path = pick.draw(st.sampled_from(paths))
    value = pick.draw(_junk())
    target = corrupt
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    # Also change a slot and the counter so that a partial write would show.
    for arrays in corrupt["slots"].values() if isinstance(corrupt.get("slots"), dict) else ():
        if isinstance(arrays, list) and arrays and isinstance(arrays[0], np.ndarray) and arrays[0].dtype.kind == "f":
            arrays[0] = arrays[0] + 1
    if path != ("iterations",):
        corrupt["iterations"] = state["iterations"] + 5
    try:
        _check_refused(opt, variables, grads, lambda o: o.load_state_dict(corrupt))
    except AssertionError as e:
        if "accepted" in str(e) and path == ("learning_rate",) and value is True:
            raise
        if "accepted" in str(e):
            # Some junk is harmless where it lands (e.g. an optional key set to a valid value);
            # then the load must have taken the whole state.
            after = opt.state_dict()
            assert after["iterations"] == corrupt["iterations"], (path, value)
            return
        raise AssertionError(f"{path} = {value!r}: {e}") from e
    # The pending-state path (before build) checks the same things, or defers to build.
    fresh = fastsgd.SGD(**config)
    try:
        fresh.load_state_dict(corrupt)
    except (TypeError, ValueError):
        assert not fresh.built
        return
    fresh_vars = _make(specs, framework, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((TypeError, ValueError)):
            fresh.apply(grads, fresh_vars)
    assert not fresh.built
    assert all(_bytes(a) == _bytes(b) for a, b in zip(fresh_vars, _make(specs, framework, 0)))
