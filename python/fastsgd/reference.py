"""A plain NumPy statement of Keras 3's SGD: the oracle that fastsgd's tests compare against.

Nothing here is fast. Every rule of ``keras.optimizers.SGD(...).apply(grads, variables)``
(Keras 3.15, torch backend) is written out once, in the order Keras runs it, one variable at a
time, so that a reader can check each line against the Keras source and against
``shared/KERAS_SEMANTICS.md``:

    g <- g / loss_scale_factor                          (if set)
    with accumulation (k steps): a non-update call only does  acc <- acc + g
                                 an update call uses          g <- (g + acc) / k
    clip:   clipnorm c         g <- (g * c) / max(||g||, c)            per tensor
            global_clipnorm c  g <- g * (c * min(1/N, 1/c) + (N - N))  N = norm over all grads
            clipvalue c        g <- clip(g, -c, c)
    decay:  v <- v * (1 - wd * lr)                                    (if weight_decay is set)
    step:   momentum 0:        v <- v - lr * g
            momentum mu:       m <- mu * m - lr * g;  v <- v + m
            Nesterov:          m <- mu * m - lr * g;  v <- (v - lr * g) + mu * m
    EMA:    avg <- b * avg + (1 - b) * v, b = 0 on the first step, else ema_momentum;
            every ema_overwrite_frequency steps: v <- avg             (all built variables)
    iterations: the raw call counter goes up by one on every call.

Arithmetic is done in the variable's dtype (float32 for float32 variables), with the
hyper-parameters cast to that dtype first, as the Keras torch backend does. Sums of squares for
the norms are accumulated in float64 and then rounded to the variable dtype: Keras/torch sum in
float32 with their own summation order, so no NumPy order would match them bit for bit, and the
exact sum is the value both are closest to.

Only NumPy is imported. A learning-rate schedule is recognised by duck typing (any object whose
class derives from a class named ``LearningRateSchedule``, so both ``fastsgd.schedules`` and
``keras.optimizers.schedules`` objects work) and is called as ``schedule(step)``.
"""

from __future__ import annotations

import re
import warnings

import numpy as np

__all__ = ["ReferenceSGD"]


def _is_schedule(value):
    """True if ``value`` is a learning-rate schedule (called with the step), not a plain callable."""
    return any(cls.__name__ == "LearningRateSchedule" for cls in type(value).__mro__)


def _sum_of_squares(g):
    """The sum of squares of ``g``, accumulated exactly enough in float64 (a Python float)."""
    g64 = np.asarray(g, dtype=np.float64)
    return float(np.sum(g64 * g64))


class ReferenceSGD:
    """Keras 3 ``SGD``, written for clarity: ``apply`` updates NumPy arrays in place.

    The constructor takes the arguments of ``keras.optimizers.SGD`` with the same meaning and
    the same ``ValueError`` checks on values (it is not strict about Python types: ``momentum=0``
    and ``learning_rate=1`` are accepted here, where Keras rejects ints).

    Args:
        learning_rate: a float (kept as float32, like Keras's float32 variable), a schedule
            called as ``schedule(raw_call_count)``, or a zero-argument callable.
        momentum: float in [0, 1]; 0 means plain gradient descent (``nesterov`` is then ignored).
        nesterov: use the Nesterov form of the momentum update.
        weight_decay: decoupled decay factor, or None.
        clipnorm, clipvalue, global_clipnorm: at most one may be set; a value <= 0 disables it.
        use_ema, ema_momentum, ema_overwrite_frequency: moving average of the variables.
        loss_scale_factor: gradients are divided by it before anything else.
        gradient_accumulation_steps: None/0, or an int >= 2.
        name: kept for symmetry with Keras; unused.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        nesterov=False,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
    ):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError("`momentum` must be a float between [0, 1].")
        if sum(c is not None for c in (clipnorm, clipvalue, global_clipnorm)) > 1:
            raise ValueError("Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set.")
        if gradient_accumulation_steps and not gradient_accumulation_steps >= 2:
            raise ValueError("`gradient_accumulation_steps` must be an integer >= 2.")
        if use_ema:
            if not 0.0 <= ema_momentum <= 1.0:
                raise ValueError("`ema_momentum` must be in the range [0, 1].")
            if ema_overwrite_frequency and (
                not isinstance(ema_overwrite_frequency, (int, np.integer)) or ema_overwrite_frequency < 1
            ):
                raise ValueError("`ema_overwrite_frequency` must be an integer >= 1 or None.")

        if _is_schedule(learning_rate) or callable(learning_rate):
            self._learning_rate = learning_rate
        else:
            # Keras stores a float rate in a float32 variable.
            self._learning_rate = np.float32(learning_rate)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = weight_decay
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.use_ema = bool(use_ema)
        self.ema_momentum = ema_momentum
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.loss_scale_factor = loss_scale_factor
        self.gradient_accumulation_steps = gradient_accumulation_steps or None
        self.name = name

        self._raw_iterations = 0  # every apply() call that got past the empty-list check
        self._variables = None  # the build list, in build order
        self._index = {}  # id(variable) -> position in the build list
        self._excluded_ids = set()
        self._excluded_pattern = None
        # Slots, one per built variable, or None when the feature is off.
        self.momentums = None
        self.averages = None
        self.accumulators = None

    # ------------------------------------------------------------------ state and properties

    @property
    def iterations(self):
        """Completed update steps: the raw call count, divided by the accumulation steps."""
        if self.gradient_accumulation_steps:
            return self._raw_iterations // self.gradient_accumulation_steps
        return self._raw_iterations

    @property
    def raw_iterations(self):
        """The number of apply() calls (what schedules are evaluated at)."""
        return self._raw_iterations

    @property
    def learning_rate(self):
        """The current learning rate as a Python float (a schedule is read at the raw count)."""
        return float(self._current_learning_rate())

    @learning_rate.setter
    def learning_rate(self, value):
        """Replaces the rate: a float (kept as float32), a schedule or a callable."""
        if _is_schedule(value) or callable(value):
            self._learning_rate = value
        else:
            self._learning_rate = np.float32(value)

    @property
    def built(self):
        """Whether the slots exist (the first apply() builds them)."""
        return self._variables is not None

    def _current_learning_rate(self):
        """The rate for this call: schedule(raw count), the float32 value, or callable()."""
        if _is_schedule(self._learning_rate):
            return float(self._learning_rate(self._raw_iterations))
        if callable(self._learning_rate):
            return float(self._learning_rate())
        return self._learning_rate

    def build(self, variables):
        """Records the variables (by identity, in order) and creates zero-filled slots."""
        self._variables = list(variables)
        self._index = {id(v): i for i, v in enumerate(self._variables)}
        if self.momentum != 0:
            self.momentums = [np.zeros_like(v) for v in self._variables]
        if self.use_ema:
            self.averages = [np.zeros_like(v) for v in self._variables]
        if self.gradient_accumulation_steps:
            self.accumulators = [np.zeros_like(v) for v in self._variables]

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from weight decay and replaces any earlier exclusion.

        ``var_list`` matches by identity; ``var_names`` is a list of regular expressions searched
        in a variable's ``name`` attribute (NumPy arrays have none, so it only matters for
        objects that carry a name). Works before or after build, as in Keras.
        """
        self._excluded_ids = {id(v) for v in (var_list or [])}
        names = set(var_names or [])
        self._excluded_pattern = re.compile("|".join(names)) if names else None

    def _uses_weight_decay(self, variable):
        """False for variables excluded by ``exclude_from_weight_decay``."""
        if id(variable) in self._excluded_ids:
            return False
        name = getattr(variable, "name", None)
        if self._excluded_pattern is not None and isinstance(name, str):
            if self._excluded_pattern.search(name) is not None:
                return False
        return True

    # ------------------------------------------------------------------ the step

    def apply_gradients(self, grads_and_vars):
        """``apply(*zip(*grads_and_vars))``.

        Returns what Keras returns: its raw call counter (``_iterations``), which under gradient
        accumulation is not the public ``iterations`` (that one is divided by the steps).
        """
        pairs = list(grads_and_vars)
        self.apply([g for g, _ in pairs], [v for _, v in pairs])
        return self._raw_iterations

    def apply(self, grads, variables=None):
        """One Keras ``apply`` call: updates ``variables`` (NumPy float arrays) in place.

        ``grads[i]`` belongs to ``variables[i]`` and may be None (that variable then gets no
        update and no weight decay this call). Without ``variables`` the build list is used.
        Later calls may pass any subset or permutation of the built variables: slots follow
        the array's identity.
        """
        grads = list(grads)
        if len(grads) == 0:
            return  # Keras returns before anything, iterations included.
        if variables is None:
            if not self.built:
                raise ValueError("The first apply() call must pass the variables.")
            variables = self._variables
        variables = list(variables)
        if len(grads) != len(variables):
            raise ValueError("grads and variables must have the same length.")
        if not self.built:
            self.build(variables)
        for v in variables:
            if id(v) not in self._index:
                raise ValueError("Unknown variable: the optimizer was not built with it.")

        # Drop (None, variable) pairs.
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        if not pairs:
            raise ValueError("No gradients provided for any variable.")
        if len(pairs) < len(grads):
            warnings.warn(f"Gradients do not exist for {len(grads) - len(pairs)} variable(s); "
                          "they are left out of this step.", stacklevel=2)
        variables = [v for _, v in pairs]
        grads = []
        for g, v in pairs:
            g = np.array(g, dtype=v.dtype, copy=True)
            if g.shape != v.shape:
                raise ValueError(f"gradient shape {g.shape} does not match variable shape {v.shape}")
            grads.append(g)

        # 1. Loss-scale unscaling, before accumulation (accumulators hold unscaled gradients).
        if self.loss_scale_factor is not None:
            grads = [g / g.dtype.type(self.loss_scale_factor) for g in grads]

        # 2. Accumulate, or update.
        k = self.gradient_accumulation_steps
        if k:
            slots = [self.accumulators[self._index[id(v)]] for v in variables]
            if (self._raw_iterations + 1) % k != 0:
                for acc, g in zip(slots, grads):
                    acc += g
            else:
                grads = [(g + acc) / g.dtype.type(k) for g, acc in zip(grads, slots)]
                self._update(grads, variables)
                for acc in self.accumulators:  # every accumulator, passed this call or not
                    acc[...] = 0
        else:
            self._update(grads, variables)

        # 3. EMA over every built variable, on every call (accumulation calls included).
        if self.use_ema:
            self._update_moving_averages()
            freq = self.ema_overwrite_frequency
            if freq and (self.iterations + 1) % freq == 0:
                for v, avg in zip(self._variables, self.averages):
                    v[...] = avg

        # 4. The raw counter counts every call.
        self._raw_iterations += 1

    def _update(self, grads, variables):
        """Clip, weight decay, then the SGD step, for the variables of an update call."""
        lr = self._current_learning_rate()  # evaluated once, used by decay and the step
        grads = self._clip(grads)
        if self.weight_decay is not None:
            for v in variables:
                if self._uses_weight_decay(v):
                    t = v.dtype.type
                    factor = t(1) - t(self.weight_decay) * t(lr)
                    v *= factor
        for g, v in zip(grads, variables):
            self._sgd_step(g, v, lr)

    def _clip(self, grads):
        """Keras's ``_clip_gradients``: the first configured (and positive) mode applies."""
        if self.clipnorm and self.clipnorm > 0:
            clipped = []
            for g in grads:
                t = g.dtype.type
                c = t(self.clipnorm)
                s = t(_sum_of_squares(g))
                norm = np.sqrt(s) if s > 0 else s  # a NaN sum stays NaN, as in Keras
                clipped.append((g * c) / max(norm, c))
            return clipped
        if self.global_clipnorm and self.global_clipnorm > 0:
            total = np.sqrt(sum(_sum_of_squares(g) for g in grads))
            clipped = []
            for g in grads:
                t = g.dtype.type
                c = t(self.global_clipnorm)
                norm = t(total)
                with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                    # No epsilon: norm 0 gives 1/0 = inf and scale c * (1/c); an inf or NaN
                    # norm makes (norm - norm) NaN, and so every gradient.
                    scale = c * min(t(1) / norm, t(1) / c) + (norm - norm)
                clipped.append(g * scale)
            return clipped
        if self.clipvalue and self.clipvalue > 0:
            return [np.clip(g, -g.dtype.type(self.clipvalue), g.dtype.type(self.clipvalue)) for g in grads]
        return grads

    def _sgd_step(self, g, v, lr):
        """``update_step`` for one variable, in its dtype, in the torch backend's order."""
        t = v.dtype.type
        lr = t(lr)
        if self.momentum == 0:
            v -= lr * g  # nesterov has no effect without momentum
            return
        mu = t(self.momentum)
        m = self.momentums[self._index[id(v)]]
        m *= mu
        m -= lr * g
        if self.nesterov:
            v -= lr * g
            v += mu * m
        else:
            v += m

    def _update_moving_averages(self):
        """``avg = b * avg + (1 - b) * v`` over all built variables, b = 0 on the first step."""
        for v, avg in zip(self._variables, self.averages):
            t = v.dtype.type
            b = t(0) if self.iterations == 0 else t(self.ema_momentum)
            avg[...] = b * avg + (t(1) - b) * v

    def finalize_variable_values(self, var_list):
        """With EMA, copies each average into ``var_list`` by position; otherwise does nothing.

        Raises ValueError when ``var_list`` does not hold one array per average.
        """
        if not self.use_ema:
            return
        var_list = list(var_list)
        averages = self.averages or []
        if len(var_list) != len(averages):
            raise ValueError(
                f"The length of model variables ({len(var_list)}) to override does not match the "
                f"number of moving averages ({len(averages)})."
            )
        for v, avg in zip(var_list, averages):
            v[...] = avg
