"""`recsys.threads.limit_compute_threads`: what a serving worker runs its numerical libraries with."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_info

from recsys.threads import limit_compute_threads


def test_limiting_sets_torch_and_every_loaded_blas_pool_and_restoring_gives_the_counts_back():
    torch_before = torch.get_num_threads()
    pools_before = {p["filepath"]: p["num_threads"] for p in threadpool_info()}
    restore = limit_compute_threads(1)
    try:
        assert torch.get_num_threads() == 1
        pools = threadpool_info()
        assert any(p["user_api"] == "blas" for p in pools)  # numpy's BLAS is among them
        assert all(p["num_threads"] == 1 for p in pools)
    finally:
        restore()
    assert torch.get_num_threads() == torch_before
    assert {p["filepath"]: p["num_threads"] for p in threadpool_info()} == pools_before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_a_count_below_one_or_not_whole_is_refused_by_value(bad):
    with pytest.raises(ValueError, match="compute threads"):
        limit_compute_threads(bad)
