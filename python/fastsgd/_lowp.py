"""The low-precision options, checked in one place for fastsgd.SGD and both framework adapters."""
from __future__ import annotations

from typing import Any, Optional, Tuple

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
