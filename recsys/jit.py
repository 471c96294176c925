"""Compiled variants of one kernel, kept apart in numba's on-disk cache.

numba's cache keys a compiled function by its qualified name, first line and signature, not by
its options, so ``njit(parallel=True, cache=True)(f)`` and ``njit(cache=True)(f)`` share one
entry: whichever compiled first is loaded for both. Measured here: the serial gather of 100
examples loaded the parallel build and took 13-16 ms on two busy cores (a thread team woken per
call) instead of 1 µs, which made online learning in the service 300 µs a rating. `variant`
compiles a copy of the function under its own name, so each option set has its own entry.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from numba import njit


def variant(func: Callable, name: str, **options: object) -> Callable:
    """``njit(cache=True, **options)`` of a copy of ``func`` cached as ``<qualname>__<name>``."""
    copy = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    copy.__qualname__ = f"{func.__qualname__}__{name}"
    copy.__doc__ = func.__doc__
    return njit(cache=True, **options)(copy)
