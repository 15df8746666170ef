"""The low-precision options, checked in one place for fastsgd.SGD and both framework adapters."""
from __future__ import annotations

from typing import Any, NoReturn, Optional, Tuple

import numpy as np

MASTER_FORMS = ("float32", "remainder")


def check_lowp_options(master_weights: Any, stochastic_rounding: Any, seed: Any) -> Tuple[Optional[str], bool, int]:
    """Validates ``master_weights`` (None, 'float32' or 'remainder'), ``stochastic_rounding`` (a bool)
    and ``seed`` (an int in [0, 2**64)); returns them normalised, or raises TypeError/ValueError
    naming the argument."""
    if master_weights is not None and (not isinstance(master_weights, str) or master_weights not in MASTER_FORMS):
        raise ValueError(f"`master_weights` must be None, 'float32' or 'remainder', got {master_weights!r}")
    if not isinstance(stochastic_rounding, (bool, np.bool_)):
        raise TypeError(f"`stochastic_rounding` must be a bool, got {stochastic_rounding!r}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"`seed` must be an int in [0, 2**64), got {seed!r}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"`seed` must be an int in [0, 2**64), got {seed!r}")
    return master_weights, bool(stochastic_rounding), int(seed)


# How remainders were split from their masters: a remainder joins back into its master only
# under the rule (and seed) that split it.
REMAINDER_SPLITS = ("nearest", "stochastic")


def remainder_split(stochastic_rounding: bool) -> str:
    """The split rule of an optimizer: "stochastic" with stochastic rounding, else "nearest"."""
    return "stochastic" if stochastic_rounding else "nearest"


def check_remainder_split(value: Any, where: str) -> str:
    """A checkpoint's recorded split, validated (ValueError naming ``where``)."""
    if not isinstance(value, str) or value not in REMAINDER_SPLITS:
        raise ValueError(f"{where} must be 'nearest' or 'stochastic', got {value!r}")
    return value


def refuse_split_mismatch(saved: str, stochastic_rounding: bool, where: str) -> None:
    """Raises ValueError when remainders split under ``saved`` would be joined under the other rule."""
    if saved != remainder_split(stochastic_rounding):
        raise ValueError(f"{where} is {saved!r}: the remainders were split "
                         f"{'with' if saved == 'stochastic' else 'without'} stochastic rounding, and joining them "
                         "under this optimizer's rule would change the masters; construct the optimizer with "
                         f"stochastic_rounding={saved == 'stochastic'} to resume it")


def refuse_float16_remainder(what: str) -> NoReturn:
    """Raises the refusal of a float16 variable under master_weights='remainder'; ``what`` names it."""
    raise ValueError("`master_weights='remainder'` needs bfloat16 variables (their float32 master is the "
                     f"variable's bits plus 16 more); {what} is float16: use master_weights='float32'")
