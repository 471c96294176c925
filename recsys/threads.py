"""One OpenMP runtime, two thread pools: numba's parallel kernels and torch.

When numba's OpenMP layer and torch load the same libgomp, a numba parallel launch sets the
runtime's thread count to numba's, and every torch op after it runs with that many threads,
whatever ``torch.set_num_threads`` said (measured on two busy cores: a single-threaded matmul
loop ran 9x slower after one parallel shuffle, and REC epochs 10-40x slower).
`torch_threads_kept` restores torch's count after a parallel kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Run a numba parallel kernel inside; torch's thread count is what it was before."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
