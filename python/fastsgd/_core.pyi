"""Type stub of the native module fastsgd._core (python/src/bindings.cpp).

CI checks it against the built module with ``python -m mypy.stubtest fastsgd._core`` and
tests/test_stubs.py: a binding added, renamed or removed without this file following fails there.
"""

import enum
from typing import Any, Optional, Sequence

import numpy.typing as npt

__version__: str

class Convention(enum.Enum):
    """Which per-element rule the engine follows."""

    keras = 0
    torch = 1

class DecayForm(enum.Enum):
    """How weight decay enters the update."""

    decoupled = 0
    l2 = 1

class SlotKind(enum.Enum):
    """The optimizer state kept per variable."""

    momentum = 0
    average = 1
    accumulator = 2
    master = 3
    remainder = 4

class MasterForm(enum.Enum):
    """Where a 16-bit variable's exact float32 value lives between steps."""

    float32 = 0
    remainder = 1

class Group:
    """One parameter group's hyper-parameters."""

    learning_rate: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    decay_form: Optional[DecayForm]
    maximize: bool
    def __init__(
        self,
        *,
        learning_rate: float = ...,
        momentum: float = ...,
        dampening: float = ...,
        nesterov: bool = ...,
        weight_decay: float = ...,
        decay_form: Optional[DecayForm] = ...,
        maximize: bool = ...,
    ) -> None: ...

class Options:
    """The engine's hyper-parameters; None leaves an optional feature off."""

    convention: Convention
    group: Group
    clipnorm: Optional[float]
    clipvalue: Optional[float]
    global_clipnorm: Optional[float]
    use_ema: bool
    ema_momentum: float
    ema_overwrite_frequency: Optional[int]
    loss_scale_factor: Optional[float]
    gradient_accumulation_steps: Optional[int]
    slots_in_variable_dtype: bool
    caller_owned_slots: bool
    skip_nonfinite: bool
    master_weights: Optional[MasterForm]
    stochastic_rounding: bool
    seed: int
    def __init__(
        self,
        *,
        convention: Convention = ...,
        group: Group = ...,
        clipnorm: Optional[float] = ...,
        clipvalue: Optional[float] = ...,
        global_clipnorm: Optional[float] = ...,
        use_ema: bool = ...,
        ema_momentum: float = ...,
        ema_overwrite_frequency: Optional[int] = ...,
        loss_scale_factor: Optional[float] = ...,
        gradient_accumulation_steps: Optional[int] = ...,
        slots_in_variable_dtype: bool = ...,
        caller_owned_slots: bool = ...,
        skip_nonfinite: bool = ...,
        master_weights: Optional[MasterForm] = ...,
        stochastic_rounding: bool = ...,
        seed: int = ...,
    ) -> None: ...

class GradStats:
    """Sums of squares of the effective gradients, as norm clipping measures them."""

    @property
    def sum_squares(self) -> list[float]: ...
    @property
    def total(self) -> float: ...
    @property
    def nonfinite(self) -> bool: ...

def validate(options: Options) -> None: ...

class Engine:
    """The C++ fastsgd::SGD engine, holding groups, slots and iteration counters."""

    def __init__(self, options: Options) -> None: ...
    def add_group(self, group: Group) -> int: ...
    def set_group(self, index: int, group: Group) -> None: ...
    def group(self, index: int) -> Group: ...
    @property
    def num_groups(self) -> int: ...
    def build(self, variables: Sequence[Any], decays: Sequence[bool] = ..., groups: Sequence[int] = ...) -> None: ...
    def step(
        self,
        grads: Sequence[Any],
        variables: Optional[Sequence[Any]] = None,
        *,
        learning_rate: Optional[float] = None,
        slots: Optional[dict[SlotKind, Sequence[Any]]] = None,
        fresh_momentum: Optional[Sequence[bool]] = None,
        grad_scale: float = 1.0,
        found_inf: Optional[bool] = None,
        global_sum_squares: Optional[float] = None,
        stream: Optional[int] = None,
    ) -> tuple[bool, bool, int]: ...
    def grad_stats(
        self,
        grads: Sequence[Any],
        variables: Optional[Sequence[Any]] = None,
        *,
        slots: Optional[dict[SlotKind, Sequence[Any]]] = None,
        grad_scale: float = 1.0,
    ) -> GradStats: ...
    def finalize(self, variables: Sequence[Any]) -> None: ...
    def read_slot(self, kind: SlotKind, index: int) -> npt.NDArray[Any]: ...
    def write_slot(self, kind: SlotKind, index: int, values: npt.NDArray[Any]) -> None: ...
    def slot_spec(self, index: int) -> tuple[int, str]: ...
    def has_slot(self, kind: SlotKind, index: Optional[int] = None) -> bool: ...
    def momentum_started(self, index: int) -> bool: ...
    def set_momentum_started(self, index: int, started: bool) -> None: ...
    def set_decays(self, index: int, decays: bool) -> None: ...
    def set_stream(self, stream: int) -> None: ...
    @property
    def options(self) -> Options: ...
    @property
    def built(self) -> bool: ...
    @property
    def size(self) -> int: ...
    @property
    def update_is_due(self) -> bool: ...
    @property
    def iterations(self) -> int: ...
    @property
    def raw_iterations(self) -> int: ...
    @raw_iterations.setter
    def raw_iterations(self, value: int) -> None: ...
    @property
    def seed(self) -> int: ...
    @seed.setter
    def seed(self, value: int) -> None: ...
    @property
    def skipped_steps(self) -> int: ...
    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None: ...

def cpu_info() -> dict[str, Any]: ...
def cuda_info() -> dict[str, Any]: ...
def set_num_threads(threads: int) -> None: ...
