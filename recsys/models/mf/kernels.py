"""Compiled CPU kernels for biased MF: one fused pass per rating instead of a dozen tensor ops.

Per-example (incremental) SGD is the classic way to train MF (Funk; Surprise; cornac), but
in PyTorch every example would cost a Python step. These numba kernels run a whole sequence
of examples in machine code, updating the tables in place (they share memory with the
model's tensors). The default, `sgd_examples_interleaved`, runs on one thread and updates
every factor block of an example in turn; `sgd_examples` runs the blocks on separate threads
(a block touches only its own columns and bias slot, so the result does not depend on the
thread count); `sgd_examples_hogwild` splits the examples across threads. The logged
kernels of gradient rollback (`recsys.models.mf.log_kernels`) share the interleaved/Hogwild loop. On this project's 2-vCPU machines the block-parallel kernel gained
between 0% and 35% over one thread depending on the host's load, while the interleaved
kernel was 25% faster than one block-major thread in every measurement, so it is the default.

Semantics (example k, rating r, block b with factors p = P[u, b], q = Q[i, b]):
    e      = r - (mu + bu[u, b] + bi[i, b] + p . q)
    bu    += lr_bias * (e - bias_reg_u[u] * bu)        bi += lr_bias * (e - bias_reg_i[i] * bi)
    p     += lr * (e * q_old - reg_u[u] * p_old)       q  += lr * (e * p_old - reg_i[i] * q_old)
which is the gradient of 0.5 * (e^2 + reg_u |p|^2 + reg_i |q|^2 + bias regs) per example.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from recsys.jit import variant


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def sgd_examples(
    users: np.ndarray,  # int64 [m]: the examples to visit, in visiting order (contiguous)
    items: np.ndarray,  # int64 [m]
    values: np.ndarray,  # float32 [m]
    P: np.ndarray,  # float32 [n_users, n_blocks * block_size] (updated in place)
    Q: np.ndarray,  # float32 [n_items, n_blocks * block_size]
    BU: np.ndarray,  # float32 [n_users, n_blocks]
    BI: np.ndarray,  # float32 [n_items, n_blocks]
    mu: float,
    lr: float,
    lr_bias: float,
    reg_u: np.ndarray,  # float32 [n_users] per-visit L2 on user factors
    reg_i: np.ndarray,  # float32 [n_items]
    bias_reg_u: np.ndarray,  # float32 [n_users]
    bias_reg_i: np.ndarray,  # float32 [n_items]
    block_sq_err: np.ndarray,  # float64 [n_blocks]: sum of squared pre-update errors (out)
) -> None:
    """Incremental SGD over the examples in the given order, one thread per factor block."""
    n_blocks = BU.shape[1]
    d = P.shape[1] // n_blocks
    # float32 scalars: a float64 learning rate would promote every update to float64 and
    # cost about a quarter of the kernel's speed.
    mu = np.float32(mu)
    lr = np.float32(lr)
    lr_bias = np.float32(lr_bias)
    for b in prange(n_blocks):
        lo = b * d
        hi = lo + d
        # Private copies of this block's bias columns: the blocks' biases share cache lines
        # in [rows, blocks] layout, and writing them from several threads (false sharing)
        # made two threads three times slower than one.
        bu = BU[:, b].copy()
        bi = BI[:, b].copy()
        sq = 0.0
        for k in range(len(users)):
            u = users[k]
            i = items[k]
            pu = P[u, lo:hi]
            qi = Q[i, lo:hi]
            dot = np.float32(0.0)
            for f in range(d):
                dot += pu[f] * qi[f]
            e = values[k] - (mu + bu[u] + bi[i] + dot)
            sq += e * e
            bu[u] += lr_bias * (e - bias_reg_u[u] * bu[u])
            bi[i] += lr_bias * (e - bias_reg_i[i] * bi[i])
            ru = reg_u[u]
            ri = reg_i[i]
            for f in range(d):
                pf = pu[f]
                qf = qi[f]
                pu[f] = pf + lr * (e * qf - ru * pf)
                qi[f] = qf + lr * (e * pf - ri * qf)
        BU[:, b] = bu
        BI[:, b] = bi
        block_sq_err[b] = sq


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def sgd_examples_hogwild(
    users: np.ndarray,
    items: np.ndarray,
    values: np.ndarray,
    P: np.ndarray,
    Q: np.ndarray,
    BU: np.ndarray,
    BI: np.ndarray,
    mu: float,
    lr: float,
    lr_bias: float,
    reg_u: np.ndarray,
    reg_i: np.ndarray,
    bias_reg_u: np.ndarray,
    bias_reg_i: np.ndarray,
    shard_sq_err: np.ndarray,  # float64 [n_shards] (out); one shard per thread
) -> None:
    """The same updates as `sgd_examples`, with the examples split into contiguous shards
    that threads process at once, writing shared rows without locks (Hogwild!, Niu et al.,
    arXiv 1106.5730). Rows shared by two shards at the same instant may lose an update, so
    results vary from run to run; on sparse data the effect on accuracy is negligible and
    the speed-up is close to the number of threads (memory latency, not arithmetic, is the
    limit at scale)."""
    n_shards = len(shard_sq_err)
    n_blocks = BU.shape[1]
    d = P.shape[1] // n_blocks
    mu = np.float32(mu)
    lr = np.float32(lr)
    lr_bias = np.float32(lr_bias)
    n = len(users)
    step = (n + n_shards - 1) // n_shards
    for s in prange(n_shards):
        sq = 0.0
        for k in range(s * step, min(n, (s + 1) * step)):
            u = users[k]
            i = items[k]
            ru = reg_u[u]
            ri = reg_i[i]
            for b in range(n_blocks):
                pu = P[u, b * d:(b + 1) * d]
                qi = Q[i, b * d:(b + 1) * d]
                dot = np.float32(0.0)
                for f in range(d):
                    dot += pu[f] * qi[f]
                e = values[k] - (mu + BU[u, b] + BI[i, b] + dot)
                sq += e * e
                BU[u, b] += lr_bias * (e - bias_reg_u[u] * BU[u, b])
                BI[i, b] += lr_bias * (e - bias_reg_i[i] * BI[i, b])
                for f in range(d):
                    pf = pu[f]
                    qf = qi[f]
                    pu[f] = pf + lr * (e * qf - ru * pf)
                    qi[f] = qf + lr * (e * pf - ri * qf)
        shard_sq_err[s] = sq


def set_threads(n: int | None) -> None:
    """Use ``n`` threads for the kernels (default: all cores numba sees)."""
    numba.set_num_threads(n or numba.config.NUMBA_NUM_THREADS)




#: One pass over the examples updating every block of each example in turn, on the calling
#: thread (`sgd_examples_hogwild`'s loop with a single shard): the same result as
#: `sgd_examples`, deterministic, and about 25% faster on one core because each example's
#: rows are read once; the default when only one core is free.
sgd_examples_interleaved = variant(sgd_examples_hogwild.py_func, "interleaved", fastmath=True, nogil=True)
