"""fastsgd.SGD against keras.optimizers.SGD (Keras 3, torch backend), option by option.

Three optimizers take the same gradients side by side: real Keras on ``keras.Variable``s,
fastsgd on NumPy arrays, and the NumPy reference (fastsgd.reference). After every step:

* fastsgd vs Keras within the acceptance tolerance
  ``|d| <= 1e-5 * |keras| + 1e-6 * max(1, largest |value| seen so far)``;
* fastsgd vs the reference within a tolerance ten times tighter (same formulas, same order);
* ``iterations`` and the current learning rate equal.

The sweep covers every pair of option values: a seeded greedy pairwise design over momentum,
Nesterov, weight decay, each clip mode (at thresholds that clip, that do not, and at values
that switch clipping off), EMA with and without overwrite, loss scaling, accumulation, every
schedule, a callable rate, ``apply`` with and without variables and ``apply_gradients``,
permuted and partial variable lists, None gradients and weight-decay exclusion. A few cases
with everything on and 60 cases drawn at random from the whole grid follow. Then: the seed's
docstring examples, Keras's own test numbers (KERAS_SEMANTICS.md §6 and §11), the schedules,
config interchange with Keras, and resuming from state_dict.
"""

import copy
import itertools
import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="the Keras parity tests need keras (torch backend)")

import fastsgd  # noqa: E402
from fastsgd import schedules as fs_schedules  # noqa: E402
from fastsgd.reference import ReferenceSGD  # noqa: E402

F32 = np.float32

pytestmark = [
    # Keras's torch backend converts with np.array(x); NumPy 2 warns about its __array__.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    # Keras, fastsgd and the reference all warn when some gradients are None.
    pytest.mark.filterwarnings("ignore:Gradients do not exist"),
]

KERAS_RTOL, KERAS_ATOL = 1e-5, 1e-6  # the acceptance tolerance against Keras
REF_RTOL, REF_ATOL = 1e-6, 1e-7  # fastsgd against the reference: same formulas, same order


# =============================================================================================
# Helpers


def to_numpy(kvar):
    """A Keras variable (or tensor) as a NumPy array."""
    return np.asarray(keras.ops.convert_to_numpy(kvar))


def keras_iterations(kopt):
    return int(keras.ops.convert_to_numpy(kopt.iterations))


def assert_close(actual, expected, scale, rtol, atol, what):
    """``|actual - expected| <= rtol * |expected| + atol * max(1, scale)``, NaN matching NaN."""
    actual = np.asarray(actual, np.float64).reshape(-1)
    expected = np.asarray(expected, np.float64).reshape(-1)
    assert actual.shape == expected.shape, f"{what}: {actual.shape} values, expected {expected.shape}"
    bound = rtol * np.abs(expected) + atol * max(1.0, scale)
    both_nan = np.isnan(actual) & np.isnan(expected)
    with np.errstate(invalid="ignore"):
        ok = (actual == expected) | (np.abs(actual - expected) <= bound) | both_nan
    if not ok.all():
        bad = np.flatnonzero(~ok)
        i = bad[0]
        raise AssertionError(
            f"{what}: {bad.size} of {actual.size} values outside tolerance; first at flat index {i}: "
            f"got {actual[i]!r}, expected {expected[i]!r} (|d| = {abs(actual[i] - expected[i]):.3g}, "
            f"bound {bound[i]:.3g}); largest |d| = {np.nanmax(np.abs(actual - expected)):.3g}"
        )


# Learning rates: (kind, constructor arguments). Schedules are built from the same arguments in
# keras.optimizers.schedules and fastsgd.schedules. The CosineDecayRestarts parameters avoid the
# float32 restart-boundary artefact (KERAS_SEMANTICS §7.6, §12.1).
LR_SPECS = {
    "float": ("float", 0.05),
    "float_odd": ("float", 0.0371),
    "exponential": ("ExponentialDecay", dict(initial_learning_rate=0.1, decay_steps=3, decay_rate=0.5)),
    "exponential_staircase": ("ExponentialDecay",
                              dict(initial_learning_rate=0.08, decay_steps=2, decay_rate=0.7, staircase=True)),
    "piecewise": ("PiecewiseConstantDecay", dict(boundaries=[2, 5], values=[0.1, 0.05, 0.01])),
    "polynomial": ("PolynomialDecay",
                   dict(initial_learning_rate=0.1, decay_steps=6, end_learning_rate=0.01, power=2.0)),
    "polynomial_cycle": ("PolynomialDecay", dict(initial_learning_rate=0.1, decay_steps=4,
                                                 end_learning_rate=0.005, power=0.5, cycle=True)),
    "inverse_time": ("InverseTimeDecay", dict(initial_learning_rate=0.1, decay_steps=2, decay_rate=0.5)),
    "inverse_time_staircase": ("InverseTimeDecay",
                               dict(initial_learning_rate=0.1, decay_steps=3, decay_rate=1.5, staircase=True)),
    "cosine": ("CosineDecay", dict(initial_learning_rate=0.1, decay_steps=8, alpha=0.1)),
    "cosine_warmup": ("CosineDecay", dict(initial_learning_rate=0.0, decay_steps=6, alpha=0.05,
                                          warmup_target=0.2, warmup_steps=3)),
    "cosine_restarts": ("CosineDecayRestarts", dict(initial_learning_rate=0.1, first_decay_steps=3,
                                                    t_mul=2.0, m_mul=0.8, alpha=0.05)),
    "cosine_restarts_t1": ("CosineDecayRestarts", dict(initial_learning_rate=0.1, first_decay_steps=2,
                                                       t_mul=1.0, m_mul=0.9)),
    "callable": ("callable", None),
}


class LearningRateBox:
    """The state a callable learning rate reads; the test changes it between steps.

    Keras calls a callable rate 0, 1 or 2 times a step (KERAS_SEMANTICS §4.2), so the callable
    must not count its calls: it only reads ``value``.
    """

    def __init__(self):
        self.value = 0.03

    def __call__(self):
        return self.value

    def set_for_step(self, step):
        self.value = 0.02 + 0.015 * (step % 4)


def make_lr(spec_name, library, box):
    """The learning-rate argument for ``library`` ("keras", "fastsgd" or "reference")."""
    kind, args = LR_SPECS[spec_name]
    if kind == "float":
        return args
    if kind == "callable":
        return box
    if library == "keras":
        return getattr(keras.optimizers.schedules, kind)(**copy.deepcopy(args))
    return getattr(fs_schedules, kind)(**copy.deepcopy(args))


class Trio:
    """One Keras optimizer, one fastsgd optimizer and one reference, on equal copies of
    the same initial values. ``step`` feeds all three the same gradients."""

    def __init__(self, config, lr_spec, inits, dtype=F32, exclude=()):
        self.config, self.lr_spec, self.dtype = dict(config), lr_spec, dtype
        self.box = LearningRateBox()
        self.kvars = [keras.Variable(x.astype(dtype), dtype=np.dtype(dtype).name) for x in inits]
        self.fvars = [x.astype(dtype) for x in inits]
        self.rvars = [x.astype(dtype) for x in inits]
        self.kopt = keras.optimizers.SGD(learning_rate=make_lr(lr_spec, "keras", self.box), **config)
        self.fopt = fastsgd.SGD(learning_rate=make_lr(lr_spec, "fastsgd", self.box), **config)
        self.ropt = ReferenceSGD(learning_rate=make_lr(lr_spec, "reference", self.box), **config)
        if exclude:
            self.kopt.exclude_from_weight_decay(var_list=[self.kvars[i] for i in exclude])
            self.fopt.exclude_from_weight_decay(var_list=[self.fvars[i] for i in exclude])
            self.ropt.exclude_from_weight_decay(var_list=[self.rvars[i] for i in exclude])
        self.scale = max(float(np.max(np.abs(x))) for x in inits)

    def step(self, grads, order=None, api="apply"):
        """Applies ``grads`` (aligned with ``order``, indices into the variable list) to all three."""
        order = list(range(len(self.kvars))) if order is None else list(order)
        kv = [self.kvars[i] for i in order]
        fv = [self.fvars[i] for i in order]
        rv = [self.rvars[i] for i in order]
        kg = [None if g is None else keras.ops.convert_to_tensor(np.array(g, self.dtype)) for g in grads]
        fg = [None if g is None else np.array(g, self.dtype) for g in grads]
        rg = [None if g is None else np.array(g, self.dtype) for g in grads]
        if api == "apply":
            self.kopt.apply(kg, kv)
            self.fopt.apply(fg, fv)
            self.ropt.apply(rg, rv)
        elif api == "apply_built":  # no variables: the built list, in build order
            assert order == list(range(len(self.kvars)))
            self.kopt.apply(kg)
            self.fopt.apply(fg)
            self.ropt.apply(rg)
        else:
            # Keras returns its raw call counter, not the public (accumulated) iterations.
            kit = int(keras.ops.convert_to_numpy(self.kopt.apply_gradients(zip(kg, kv))))
            fit = self.fopt.apply_gradients(zip(fg, fv))
            rit = self.ropt.apply_gradients(zip(rg, rv))
            assert rit == kit, f"apply_gradients returned {rit} (reference), keras {kit}"
            assert int(fit) == kit, f"apply_gradients returned {fit} (fastsgd), keras {kit}"
        for g, f in zip(grads, fg):
            if g is not None:
                assert np.array_equal(f, np.asarray(g, self.dtype), equal_nan=True), "fastsgd modified a gradient"

    def check(self, what):
        """Compares every variable (and iterations) of the three optimizers."""
        kvals = [to_numpy(v) for v in self.kvars]
        self.scale = max([self.scale] + [float(np.nanmax(np.abs(k))) for k in kvals if k.size])
        for i, (k, f, r) in enumerate(zip(kvals, self.fvars, self.rvars)):
            where = f"{what}, variable {i} shape {k.shape}"
            assert_close(f, k, self.scale, KERAS_RTOL, KERAS_ATOL, f"fastsgd vs keras, {where}")
            assert_close(f, r, self.scale, REF_RTOL, REF_ATOL, f"fastsgd vs reference, {where}")
            assert_close(r, k, self.scale, KERAS_RTOL, KERAS_ATOL, f"reference vs keras, {where}")
        kit = keras_iterations(self.kopt)
        assert type(self.fopt.iterations) is int, f"{what}: iterations is {type(self.fopt.iterations)}"
        assert self.fopt.iterations == kit, f"{what}: iterations fastsgd {self.fopt.iterations}, keras {kit}"
        assert self.ropt.iterations == kit, f"{what}: iterations reference {self.ropt.iterations}, keras {kit}"

    def check_learning_rate(self, what):
        expected = float(to_numpy(self.kopt.learning_rate))
        actual = float(self.fopt.learning_rate)
        assert actual == pytest.approx(expected, rel=1e-6, abs=1e-12), \
            f"{what}: learning_rate fastsgd {actual!r}, keras {expected!r}"

    def check_slots(self, what):
        """Momentum, average and accumulator slots (fastsgd.state_dict) against Keras's."""
        slots = self.fopt.state_dict()["slots"]
        keras_slots = {
            "momentum": self.kopt.momentums if self.config.get("momentum", 0.0) != 0 else None,
            "average": self.kopt._model_variables_moving_average if self.config.get("use_ema") else None,
            "accumulator": (self.kopt._accumulated_gradients
                            if self.config.get("gradient_accumulation_steps") else None),
        }
        for kind, kslots in keras_slots.items():
            if kslots is None:
                continue
            assert kind in slots, f"{what}: fastsgd state_dict has no {kind} slots"
            assert len(slots[kind]) == len(kslots), f"{what}: {kind} slot count"
            for i, (f, k) in enumerate(zip(slots[kind], kslots)):
                assert_close(f, to_numpy(k), self.scale, KERAS_RTOL, KERAS_ATOL,
                             f"fastsgd vs keras, {what}, {kind} slot {i}")

    def finalize_and_check(self, what):
        self.kopt.finalize_variable_values(self.kvars)
        self.fopt.finalize_variable_values(self.fvars)
        self.ropt.finalize_variable_values(self.rvars)
        self.check(f"{what}, after finalize_variable_values")


# =============================================================================================
# The pairwise sweep


AXES = {
    "momentum": [0.0, 0.9],
    "nesterov": [False, True],
    "weight_decay": [None, 0.0, 0.02, 0.2],
    # Thresholds that clip, that do not, and values <= 0 that switch clipping off.
    "clip": [None, ("clipnorm", 0.5), ("clipnorm", 1e3), ("clipnorm", 0.0), ("clipvalue", 0.5),
             ("clipvalue", 50.0), ("clipvalue", -1.0), ("global_clipnorm", 1.0), ("global_clipnorm", 1e4),
             ("global_clipnorm", 0.0)],
    "ema": [None, (0.9, None), (0.8, 2), (0.95, 3), (0.5, 1)],
    "loss_scale_factor": [None, 128.0, 3.0, 0.5],
    "gradient_accumulation_steps": [None, 2, 3],
    "lr": list(LR_SPECS),
    "api": ["apply", "apply_gradients", "apply_built"],
    "order": ["same", "permuted", "subset"],
    "none_grads": [False, True],
    "exclude": [False, True],
}


def pairwise_design(axes, seed=1234, candidates=40):
    """A seeded greedy design that holds every pair of values of every two axes at least once.

    Each new case starts from a pair not covered yet, fills the other axes with the random
    candidate that covers the most new pairs, and repeats until no pair is left.
    """
    rng = np.random.RandomState(seed)
    names = list(axes)
    sizes = [len(axes[n]) for n in names]
    axis_pairs = list(itertools.combinations(range(len(names)), 2))

    def pairs_of(case):
        return {(a, case[a], b, case[b]) for a, b in axis_pairs}

    uncovered = {(a, i, b, j) for a, b in axis_pairs for i in range(sizes[a]) for j in range(sizes[b])}
    design = []
    while uncovered:
        a, i, b, j = sorted(uncovered)[rng.randint(len(uncovered))]
        best, best_gain = None, -1
        for _ in range(candidates):
            case = [rng.randint(s) for s in sizes]
            case[a], case[b] = i, j
            gain = len(pairs_of(case) & uncovered)
            if gain > best_gain:
                best, best_gain = case, gain
        design.append({n: axes[n][k] for n, k in zip(names, best)})
        uncovered -= pairs_of(best)
    return design


EVERYTHING_ON = [
    dict(momentum=0.9, nesterov=True, weight_decay=0.02, clip=("global_clipnorm", 1.0), ema=(0.9, 3),
         loss_scale_factor=128.0, gradient_accumulation_steps=2, lr="cosine_restarts", api="apply",
         order="permuted", none_grads=True, exclude=True),
    dict(momentum=0.9, nesterov=False, weight_decay=0.2, clip=("clipnorm", 0.5), ema=(0.8, 2),
         loss_scale_factor=3.0, gradient_accumulation_steps=3, lr="callable", api="apply_gradients",
         order="subset", none_grads=True, exclude=True),
    dict(momentum=0.9, nesterov=True, weight_decay=0.02, clip=("clipvalue", 0.5), ema=(0.95, None),
         loss_scale_factor=0.5, gradient_accumulation_steps=None, lr="piecewise", api="apply",
         order="same", none_grads=True, exclude=False),
]


def random_design(axes, count, seed=4321):
    """``count`` cases drawn uniformly from the grid (higher-order interactions, by chance)."""
    rng = np.random.RandomState(seed)
    return [{n: values[rng.randint(len(values))] for n, values in axes.items()} for _ in range(count)]


CASES = pairwise_design(AXES) + EVERYTHING_ON + random_design(AXES, 60)


def describe(case):
    parts = [f"momentum={case['momentum']}", f"nesterov={case['nesterov']}",
             f"weight_decay={case['weight_decay']}"]
    if case["clip"]:
        parts.append(f"{case['clip'][0]}={case['clip'][1]}")
    if case["ema"]:
        parts.append(f"use_ema=True, ema_momentum={case['ema'][0]}, ema_overwrite_frequency={case['ema'][1]}")
    parts += [f"loss_scale_factor={case['loss_scale_factor']}",
              f"gradient_accumulation_steps={case['gradient_accumulation_steps']}",
              f"lr={case['lr']}", f"api={case['api']}", f"order={case['order']}",
              f"none_grads={case['none_grads']}", f"exclude={case['exclude']}"]
    return ", ".join(parts)


def sgd_kwargs(case):
    """The SGD constructor arguments (without the learning rate) of a sweep case."""
    kwargs = dict(momentum=case["momentum"], nesterov=case["nesterov"], weight_decay=case["weight_decay"])
    if case["clip"]:
        kwargs[case["clip"][0]] = case["clip"][1]
    if case["ema"]:
        kwargs.update(use_ema=True, ema_momentum=case["ema"][0], ema_overwrite_frequency=case["ema"][1])
    if case["loss_scale_factor"] is not None:
        kwargs["loss_scale_factor"] = case["loss_scale_factor"]
    if case["gradient_accumulation_steps"]:
        kwargs["gradient_accumulation_steps"] = case["gradient_accumulation_steps"]
    return kwargs


SHAPE_POOL = [(3, 5), (2, 3, 4), (17,), (64,), (7, 1)]


def run_case(case, seed, dtype=F32):
    """Runs one sweep case for 5..12 steps, checking after every step."""
    rng = np.random.RandomState(seed)
    shapes = [(1,), (1031,)] + [SHAPE_POOL[k] for k in rng.choice(len(SHAPE_POOL), rng.randint(1, 3), False)]
    inits = [(rng.standard_normal(s) * 1.5).astype(dtype) for s in shapes]
    trio = Trio(sgd_kwargs(case), case["lr"], inits, dtype=dtype, exclude=(0,) if case["exclude"] else ())
    n = len(shapes)
    steps = rng.randint(5, 13)
    none_step = rng.randint(1, steps) if case["none_grads"] else -1
    lsf = case["loss_scale_factor"] or 1.0
    label = describe(case)
    trio.check(f"[{label}] initial values")
    for step in range(steps):
        trio.box.set_for_step(step)
        trio.check_learning_rate(f"[{label}] before step {step}")
        # The first call builds, in order, with every variable; later ones may permute or drop.
        order = list(range(n))
        if step > 0 and case["order"] == "permuted":
            order = list(rng.permutation(n))
        elif step > 0 and case["order"] == "subset" and step % 2 == 1:
            order.pop(rng.randint(n))
        grads = [(rng.standard_normal(shapes[i]) * lsf).astype(dtype) for i in order]
        if step == none_step:
            for k in rng.choice(len(order), rng.randint(1, len(order)), replace=False):
                grads[k] = None
        if case["exclude"] and case["weight_decay"] is not None:
            # Keras's torch backend crashes (torch._foreach_mul_ on an empty list) when every
            # variable of a call is excluded from weight decay: keep one that is not.
            # (A call always holds at least two variables here.)
            if all(g is None or i == 0 for i, g in zip(order, grads)):
                k = next(k for k, i in enumerate(order) if i != 0)
                grads[k] = (rng.standard_normal(shapes[order[k]]) * lsf).astype(dtype)
        api = case["api"]
        if api == "apply_built" and (step == 0 or order != list(range(n))):
            api = "apply"  # the first call builds; a permuted or partial list needs the variables
        trio.step(grads, order, api)
        trio.check(f"[{label}] after step {step} (order {order}, None at "
                   f"{[order[k] for k, g in enumerate(grads) if g is None]})")
    trio.check_slots(f"[{label}] after {steps} steps")
    if case.get("ema"):
        trio.finalize_and_check(f"[{label}]")


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: f"case{i:03d}")
def test_sweep_matches_keras(index):
    run_case(CASES[index], seed=1000 + index)


def test_sweep_covers_every_pair_of_option_values():
    names = list(AXES)
    for a, b in itertools.combinations(names, 2):
        seen = {(repr(c[a]), repr(c[b])) for c in CASES}
        for x in AXES[a]:
            for y in AXES[b]:
                assert (repr(x), repr(y)) in seen, (a, x, b, y)


@pytest.mark.parametrize("config", [
    dict(momentum=0.9, nesterov=True, weight_decay=0.02, clipnorm=0.5),
    dict(momentum=0.9, use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=2, gradient_accumulation_steps=2),
    dict(global_clipnorm=1.0, loss_scale_factor=3.0, weight_decay=0.1),
], ids=["nesterov-wd-clipnorm", "ema-accumulation", "globalclip-lossscale-wd"])
def test_float64_variables_match_keras(config):
    case = dict(momentum=config.get("momentum", 0.0), nesterov=config.get("nesterov", False),
                weight_decay=config.get("weight_decay"), clip=None, ema=None,
                loss_scale_factor=config.get("loss_scale_factor"),
                gradient_accumulation_steps=config.get("gradient_accumulation_steps"),
                lr="cosine", api="apply", order="same", none_grads=True, exclude=False)
    for key in ("clipnorm", "clipvalue", "global_clipnorm"):
        if key in config:
            case["clip"] = (key, config[key])
    if config.get("use_ema"):
        case["ema"] = (config["ema_momentum"], config["ema_overwrite_frequency"])
    run_case(case, seed=77, dtype=np.float64)


@pytest.mark.parametrize("spec", [k for k, (kind, _) in LR_SPECS.items() if kind not in ("float", "callable")])
def test_schedules_match_keras_schedules(spec):
    kind, args = LR_SPECS[spec]
    ksched = getattr(keras.optimizers.schedules, kind)(**copy.deepcopy(args))
    fsched = getattr(fs_schedules, kind)(**copy.deepcopy(args))
    assert fsched.get_config() == ksched.get_config()
    for step in range(41):
        expected = float(to_numpy(ksched(step)))
        actual = float(fsched(step))
        assert actual == pytest.approx(expected, rel=1e-6, abs=1e-9), f"{spec} at step {step}"


# =============================================================================================
# The seed's docstring examples, through fastsgd


def test_seed_doctest_plain_step():
    opt = fastsgd.SGD(learning_rate=0.1)
    var = np.array(1.0, F32)  # a scalar variable, like tf.Variable(1.0)
    opt.apply([var.copy()], [var])  # loss = var**2 / 2: the gradient is var
    assert float(var) == pytest.approx(0.9, abs=1e-6)
    assert var == F32(0.9)


def test_seed_doctest_momentum_steps():
    opt = fastsgd.SGD(0.1, momentum=0.9)
    var = np.array(1.0, F32)
    val0 = var.copy()
    opt.apply([var.copy()], [var])
    val1 = var.copy()
    assert float(val0 - val1) == pytest.approx(0.1, abs=1e-6)
    opt.apply([var.copy()], [var])
    val2 = var.copy()
    assert float(val1 - val2) == pytest.approx(0.18, abs=1e-6)


def test_seed_doctests_match_keras_exactly_enough():
    for kwargs in ({"learning_rate": 0.1}, {"learning_rate": 0.1, "momentum": 0.9}):
        kvar, fvar = keras.Variable(np.array([1.0], F32)), np.array([1.0], F32)
        kopt, fopt = keras.optimizers.SGD(**kwargs), fastsgd.SGD(**kwargs)
        for step in range(3):
            kopt.apply([keras.ops.convert_to_tensor(to_numpy(kvar))], [kvar])
            fopt.apply([fvar.copy()], [fvar])
            assert_close(fvar, to_numpy(kvar), 1.0, KERAS_RTOL, KERAS_ATOL, f"{kwargs} step {step}")


# =============================================================================================
# Keras's own test numbers (KERAS_SEMANTICS §6, §11), through fastsgd


def test_single_step():
    v = np.array([1.0, 2.0, 3.0, 4.0], F32)
    opt = fastsgd.SGD(learning_rate=0.5)
    opt.apply_gradients(zip([np.array([1.0, 6.0, 7.0, 2.0], F32)], [v]))
    np.testing.assert_allclose(v, [0.5, -1.0, -0.5, 3.0], rtol=1e-4, atol=1e-4)
    assert opt.iterations == 1
    assert opt.learning_rate == 0.5


def test_golden_nesterov_table():
    golden = np.array([
        [0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999],
        [0.9989, 0.9979, 0.9969, 0.9959, 0.9949, 0.9939, 0.9929, 0.9919, 0.9909, 0.9899],
        [0.9979, 0.9959, 0.9939, 0.9919, 0.9899, 0.9879, 0.9859, 0.9839, 0.9819, 0.9799],
        [0.9969, 0.9939, 0.9909, 0.9879, 0.9849, 0.9819, 0.9789, 0.9759, 0.9729, 0.9699],
        [0.9959, 0.9919, 0.9879, 0.9839, 0.9799, 0.9759, 0.9719, 0.9679, 0.9639, 0.9599],
    ])
    opt = fastsgd.SGD(nesterov=True)
    x = np.ones(10, F32)
    grads = np.arange(0.1, 1.1, 0.1).astype(F32)
    opt.apply_gradients(zip([np.full(10, 0.01, F32)], [x]))
    for row in golden:
        np.testing.assert_allclose(x, row, rtol=5e-4, atol=5e-4)
        np.testing.assert_allclose(x, row, atol=2e-6)
        opt.apply_gradients(zip([grads], [x]))


def test_weight_decay_golden():
    zero = np.array(0.0, F32)
    var1, var3 = np.array(2.0, F32), np.array(2.0, F32)
    fastsgd.SGD(learning_rate=1.0, weight_decay=0.004).apply_gradients(zip([zero], [var1]))
    fastsgd.SGD(learning_rate=1.0, weight_decay=0.004).apply_gradients(zip([zero], [var1]))
    opt3 = fastsgd.SGD(learning_rate=1.0, weight_decay=0.004)
    opt3.exclude_from_weight_decay(var_list=[var3])
    opt3.apply_gradients(zip([zero, zero], [var1, var3]))
    assert float(var1) == pytest.approx(1.9760959, abs=1e-6)
    assert float(var3) == 2.0


class Named(np.ndarray):
    """A NumPy array with a ``name``, for exclusion by ``var_names``."""


def test_weight_decay_exclusion_by_name():
    var = np.array([2.0], F32).view(Named)
    var.name = "dense/exclude_me"
    other = np.array([2.0], F32)
    opt = fastsgd.SGD(learning_rate=1.0, weight_decay=0.004)
    opt.exclude_from_weight_decay(var_names=["exclude"])
    opt.apply([np.zeros(1, F32), np.zeros(1, F32)], [var, other])
    assert var[0] == 2.0
    assert other[0] == pytest.approx(1.992, abs=1e-6)


def _clip_result(grads, **clip):
    """The gradients as the update sees them: lr 1 from zero variables gives -g."""
    vs = [np.zeros(np.shape(g), F32) for g in grads]
    fastsgd.SGD(1.0, **clip).apply([np.array(g, F32) for g in grads], vs)
    return [-v for v in vs]


def test_clip_examples():
    np.testing.assert_allclose(_clip_result([[100.0, 100.0]], clipnorm=1.0)[0], [2 ** 0.5 / 2] * 2, rtol=1e-6)
    np.testing.assert_array_equal(_clip_result([[100.0, 100.0]], clipvalue=1.0)[0], [1.0, 1.0])
    np.testing.assert_allclose(_clip_result([[50.0, 100.0]], global_clipnorm=1.0)[0], [0.4472136, 0.8944272],
                               rtol=1e-6)
    a, b = _clip_result([[3.0], [4.0]], global_clipnorm=1.0)
    np.testing.assert_allclose([a[0], b[0]], [0.6, 0.8], rtol=1e-6)


def test_ema_example():
    v = np.array([[3.0, 4.0], [5.0, 6.0]], F32)
    g = np.ones((2, 2), F32)
    opt = fastsgd.SGD(learning_rate=1.0, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3)
    opt.apply_gradients([(g, v)])
    np.testing.assert_allclose(v, [[2, 3], [4, 5]])
    np.testing.assert_allclose(opt.state_dict()["slots"]["average"][0].reshape(2, 2), [[2, 3], [4, 5]])
    opt.apply_gradients([(g, v)])
    np.testing.assert_allclose(v, [[1, 2], [3, 4]])
    np.testing.assert_allclose(opt.state_dict()["slots"]["average"][0].reshape(2, 2), [[1.9, 2.9], [3.9, 4.9]],
                               rtol=1e-6)
    opt.apply_gradients([(g, v)])
    np.testing.assert_allclose(v, [[1.71, 2.71], [3.71, 4.71]], rtol=1e-6)


def test_ema_with_accumulation_example():
    v = np.array([10.0], F32)
    opt = fastsgd.SGD(1.0, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2,
                      gradient_accumulation_steps=2)
    expected = [(10, 10), (9, 9), (9, 9), (8.5, 8.5), (8.5, 8.5), (7.5, 8.0)]
    for call, (var, avg) in enumerate(expected, start=1):
        opt.apply([np.ones(1, F32)], [v])
        got_avg = float(opt.state_dict()["slots"]["average"][0].reshape(-1)[0])
        assert (float(v[0]), got_avg) == pytest.approx((var, avg), abs=1e-6), f"call {call}"


def test_ema_with_model_fit_and_finalize():
    w = np.ones((1, 2), F32)  # Dense(2, ones, no bias), x = 1, y = 0, mse: the gradient is w
    opt = fastsgd.SGD(learning_rate=0.1, use_ema=True, ema_momentum=0.9)
    for _ in range(2):
        opt.apply([w.copy()], [w])
    opt.finalize_variable_values([w])
    np.testing.assert_allclose(w, [[0.891, 0.891]], atol=1e-5)
    assert opt.iterations == 2


def test_static_loss_scaling():
    v = np.array([[1.0, 2.0], [3.0, 4.0]], F32)
    opt = fastsgd.SGD(learning_rate=1.0, loss_scale_factor=1024.0)
    opt.apply([v * 1024], [v])
    np.testing.assert_allclose(v, np.zeros((2, 2)), atol=1e-7)
    assert opt.scale_loss(1.0) == 1024.0


def test_gradient_accumulation_example():
    v = np.array([[1.0, 2.0], [3.0, 4.0]], F32)
    opt = fastsgd.SGD(learning_rate=1.0, gradient_accumulation_steps=3)
    expected = [([[1, 2], [3, 4]], 1, 0), ([[1, 2], [3, 4]], 2, 0), ([[0, 1], [2, 3]], 0, 1),
                ([[0, 1], [2, 3]], 1, 1)]
    for call, (var, acc, iterations) in enumerate(expected, start=1):
        opt.apply([np.ones((2, 2), F32)], [v])
        np.testing.assert_array_equal(v, var, err_msg=f"call {call}")
        np.testing.assert_array_equal(opt.state_dict()["slots"]["accumulator"][0].reshape(2, 2),
                                      np.full((2, 2), acc), err_msg=f"call {call}")
        assert opt.iterations == iterations, f"call {call}"


def test_callable_learning_rate():
    v = np.array([[1.0, 2.0], [3.0, 4.0]], F32)
    opt = fastsgd.SGD(learning_rate=lambda: 0.1)
    opt.apply([np.ones((2, 2), F32)], [v])
    np.testing.assert_allclose(v, [[0.9, 1.9], [2.9, 3.9]], rtol=1e-6)
    assert opt.iterations == 1


def test_empty_gradients():
    v, v2 = np.array([[3.0, 4.0], [5.0, 6.0]], F32), np.array([[3.0, 4.0], [5.0, 6.0]], F32)
    with pytest.raises(ValueError, match="No gradients provided for any variable"):
        fastsgd.SGD(learning_rate=1.0).apply_gradients([(None, v)])
    np.testing.assert_array_equal(v, [[3, 4], [5, 6]])
    opt = fastsgd.SGD(learning_rate=1.0)
    with pytest.warns(Warning):
        opt.apply_gradients([(None, v), (np.ones((2, 2), F32), v2)])
    np.testing.assert_array_equal(v, [[3, 4], [5, 6]])
    np.testing.assert_array_equal(v2, [[2, 3], [4, 5]])
    opt.apply([], [])
    assert opt.iterations == 1  # an empty list changes nothing, not even iterations


def test_invalid_momentum():
    for momentum in (-1.0, 2.0):
        with pytest.raises(ValueError, match=r"`momentum` must be a float between \[0, 1\]"):
            fastsgd.SGD(momentum=momentum)


def test_gradient_accumulation_with_weight_decay_equals_mean_gradient():
    rng = np.random.RandomState(3)
    v1, v3 = np.array([[0.9], [0.5]], F32), np.array([[0.9], [0.5]], F32)
    opt1 = fastsgd.SGD(weight_decay=0.05)
    opt3 = fastsgd.SGD(weight_decay=0.05, gradient_accumulation_steps=3)
    for _ in range(8):
        grads3 = rng.random_sample([3, 2, 1]).astype(F32)
        opt1.apply_gradients([(grads3.mean(axis=0), v1)])
        for batch in range(3):
            opt3.apply_gradients([(np.ascontiguousarray(grads3[batch]), v3)])
    np.testing.assert_allclose(v1, v3, rtol=1e-6, atol=1e-7)


# =============================================================================================
# Non-finite gradients: Keras-exact behaviour by default (KERAS_SEMANTICS §3.1)


@pytest.mark.parametrize("clip", [{}, {"clipnorm": 1.0}, {"global_clipnorm": 1.0}, {"clipvalue": 1.0}],
                         ids=["noclip", "clipnorm", "global_clipnorm", "clipvalue"])
@pytest.mark.parametrize("bad", [np.inf, np.nan], ids=["inf", "nan"])
def test_non_finite_gradients_match_keras(clip, bad):
    inits = [np.array([1.0, 2.0, 3.0], F32), np.array([0.5, -0.5], F32)]
    trio = Trio(dict(momentum=0.5, **clip), "float", inits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trio.step([np.array([bad, 1.0, -2.0], F32), np.array([3.0, 4.0], F32)])
        trio.check(f"non-finite {bad} with {clip}")


# =============================================================================================
# Configuration: Keras's get_config() in, Keras-shaped get_config() out


CONFIG_OPTIONS = [
    {},
    dict(momentum=0.06, nesterov=True, weight_decay=0.004),
    dict(momentum=0.9, clipnorm=1.0, use_ema=True, ema_momentum=0.95, ema_overwrite_frequency=4,
         loss_scale_factor=8.0, gradient_accumulation_steps=2),
    dict(global_clipnorm=2.5, weight_decay=0.01),
    dict(clipvalue=0.5, use_ema=True),
]

CONFIG_LRS = ["float", "float_odd", "exponential", "exponential_staircase", "piecewise", "polynomial_cycle",
              "inverse_time", "cosine_warmup", "cosine_restarts"]


def test_fresh_config_equals_keras_config():
    for options in CONFIG_OPTIONS:
        for lr in (0.01, 0.1, 0.0371):
            kcfg = keras.optimizers.SGD(learning_rate=lr, name="opt", **options).get_config()
            fcfg = fastsgd.SGD(learning_rate=lr, name="opt", **options).get_config()
            assert fcfg == kcfg, (options, lr)


@pytest.mark.parametrize("lr", CONFIG_LRS)
@pytest.mark.parametrize("options", range(len(CONFIG_OPTIONS)), ids=lambda i: f"options{i}")
def test_keras_config_round_trips_through_fastsgd(lr, options):
    options = CONFIG_OPTIONS[options]
    kopt = keras.optimizers.SGD(learning_rate=make_lr(lr, "keras", None), name="my_sgd", **options)
    kcfg = kopt.get_config()
    fopt = fastsgd.SGD.from_config(copy.deepcopy(kcfg))
    fcfg = fopt.get_config()
    assert sorted(fcfg) == sorted(kcfg)
    for key in kcfg:
        if key == "learning_rate" and isinstance(kcfg[key], dict):
            assert isinstance(fcfg[key], dict), fcfg[key]
            assert fcfg[key]["class_name"] == kcfg[key]["class_name"]
            assert fcfg[key]["config"] == kcfg[key]["config"]
        else:
            assert fcfg[key] == kcfg[key], (key, fcfg[key], kcfg[key])
    # Keras can load fastsgd's config back, to the same config.
    assert keras.optimizers.SGD.from_config(copy.deepcopy(fcfg)).get_config() == kcfg


def step_both_and_compare(kopt, fopt, kvars, fvars, rng, scale, what):
    """One step of fresh random gradients through Keras and fastsgd, then the acceptance check
    on every variable and on iterations; returns the updated largest |value| seen."""
    grads = [rng.standard_normal(v.shape).astype(F32) for v in fvars]
    kopt.apply([keras.ops.convert_to_tensor(g) for g in grads], kvars)
    fopt.apply([g.copy() for g in grads], fvars)
    for i, (k, f) in enumerate(zip(kvars, fvars)):
        k = to_numpy(k)
        scale = max(scale, float(np.max(np.abs(k))))
        assert_close(f, k, scale, KERAS_RTOL, KERAS_ATOL, f"{what}, variable {i}")
    assert fopt.iterations == keras_iterations(kopt), what
    return scale


@pytest.mark.parametrize("lr", ["float", "polynomial_cycle", "cosine_restarts"])
def test_optimizer_loaded_from_keras_config_steps_like_keras(lr):
    options = dict(momentum=0.9, nesterov=True, weight_decay=0.01, global_clipnorm=3.0, use_ema=True,
                   ema_momentum=0.9, ema_overwrite_frequency=3, gradient_accumulation_steps=2)
    kcfg = keras.optimizers.SGD(learning_rate=make_lr(lr, "keras", None), **options).get_config()
    kopt = keras.optimizers.SGD.from_config(copy.deepcopy(kcfg))
    fopt = fastsgd.SGD.from_config(copy.deepcopy(kcfg))
    rng = np.random.RandomState(11)
    inits = [rng.standard_normal(s).astype(F32) for s in [(1,), (1031,), (4, 3)]]
    kvars, fvars = [keras.Variable(x.copy()) for x in inits], [x.copy() for x in inits]
    scale = 3.0
    for step in range(8):
        scale = step_both_and_compare(kopt, fopt, kvars, fvars, rng, scale, f"from_config lr={lr}, step {step}")


# =============================================================================================
# State: resuming from state_dict, and changing the learning rate mid-run


@pytest.mark.parametrize("stop_after", [3, 4])  # mid accumulation window and at its end
def test_resume_from_state_dict_matches_uninterrupted_keras(stop_after):
    config = dict(momentum=0.9, nesterov=True, weight_decay=0.01, clipnorm=2.0, use_ema=True,
                  ema_momentum=0.8, ema_overwrite_frequency=3, gradient_accumulation_steps=2)
    rng = np.random.RandomState(5)
    inits = [rng.standard_normal(s).astype(F32) for s in [(1,), (1031,), (5, 2)]]
    kvars, fvars = [keras.Variable(x.copy()) for x in inits], [x.copy() for x in inits]
    kopt = keras.optimizers.SGD(learning_rate=make_lr("cosine_restarts", "keras", None), **config)
    fopt = fastsgd.SGD(learning_rate=make_lr("cosine_restarts", "fastsgd", None), **config)
    scale = 3.0
    for step in range(10):
        if step == stop_after:
            state = fopt.state_dict()
            fopt = fastsgd.SGD.from_config(fopt.get_config())
            fopt.load_state_dict(state)
        scale = step_both_and_compare(kopt, fopt, kvars, fvars, rng, scale, f"resumed after {stop_after}, step {step}")


def test_a_float_cannot_replace_a_schedule_in_either():
    kopt = keras.optimizers.SGD(make_lr("cosine", "keras", None))
    fopt = fastsgd.SGD(make_lr("cosine", "fastsgd", None))
    with pytest.raises(TypeError):
        kopt.learning_rate = 0.1
    with pytest.raises(TypeError):
        fopt.learning_rate = 0.1


def test_setting_the_learning_rate_mid_run_matches_keras():
    inits = [np.linspace(-1, 1, 9).astype(F32)]
    trio = Trio(dict(momentum=0.9, weight_decay=0.1), "float", inits)
    rng = np.random.RandomState(8)
    for step in range(6):
        if step == 3:
            trio.kopt.learning_rate = 0.2
            trio.fopt.learning_rate = 0.2
            trio.ropt.learning_rate = 0.2
        trio.check_learning_rate(f"step {step}")
        trio.step([rng.standard_normal(9).astype(F32)])
        trio.check(f"lr set at step 3, step {step}")
