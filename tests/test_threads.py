"""numba's parallel kernels leave torch's thread count as the user set it (they share one
OpenMP runtime; see `recsys.threads`)."""

from __future__ import annotations

import numpy as np
import torch

from recsys.optim.shuffle import PARALLEL_FROM, gather_examples, random_permutation


def test_parallel_shuffle_and_gather_keep_torch_at_its_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        order = random_permutation(4 * PARALLEL_FROM, seed=0)  # several buckets: the parallel path
        assert torch.get_num_threads() == 1
        n = len(order)
        users, items, values = np.arange(n), np.arange(n), np.ones(n, np.float32)
        out = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.float32)
        gather_examples(users, items, values, order, *out)
        assert torch.get_num_threads() == 1
        np.testing.assert_array_equal(out[0], order)
    finally:
        torch.set_num_threads(before)
