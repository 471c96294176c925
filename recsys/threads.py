"""One OpenMP runtime, two thread pools: numba's parallel kernels and torch.

When numba's OpenMP layer and torch load the same libgomp, a numba parallel launch sets the
runtime's thread count to numba's, and every torch op after it runs with that many threads,
whatever ``torch.set_num_threads`` said (measured on two busy cores: a single-threaded matmul
loop ran 9x slower after one parallel shuffle, and REC epochs 10-40x slower).
`torch_threads_kept` restores torch's count after a parallel kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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


def limit_compute_threads(n: int) -> Callable[[], None]:
    """Make torch and every BLAS/OpenMP pool this process loaded (numpy's OpenBLAS included)
    use ``n`` threads from now on; returns a function that restores the counts before.

    A serving worker runs requests side by side with the other workers on every core; a BLAS
    call that fans out over idle-looking cores finds them busy and its threads spin waiting for
    each other. Measured with two processes scoring 10^7-rating EASE users on two cores: 1.94
    ms of CPU per user with OpenBLAS's default threads, 0.15 ms with one."""
    from threadpoolctl import threadpool_limits

    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"compute threads must be a whole number >= 1, got {n!r}")
    torch_before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    pools = threadpool_limits(limits=int(n))  # in force until restored

    def restore() -> None:
        pools.restore_original_limits()
        torch.set_num_threads(torch_before)

    return restore
