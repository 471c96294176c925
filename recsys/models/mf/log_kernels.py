"""Gradient-rollback logging kernels for biased MF: the same updates as the training kernels of
`recsys.models.mf.kernels` (the weights agree up to float32 rounding), plus each example's
share of them written to an update log (`recsys.models.mf.log`), and the compact log's
projection kernel."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from recsys.jit import variant

# --------------------------------------------------------------------------- logged kernels
# The same updates as `sgd_examples_interleaved` / `sgd_examples_hogwild` (the weights agree up
# to float32 rounding: fastmath lets the compiler order the arithmetic differently), plus an
# update log for gradient rollback (`recsys.models.mf.log`). Two kinds:
#
# - exact (`sgd_examples_logged`): every update an example applies to its user row, item row
#   and the two bias slots is added to that example's log row, stored example-major,
#   ``log[z] = [K, 2d+2]`` with ``log[z, b] = [Δp (d) | Δq (d) | Δb_u | Δb_i]``: a visit
#   read-modify-writes one contiguous stretch of ``K·(2d+2)`` floats (1 KB at D=128), at a
#   random place of a log far larger than the cache, so the logged epoch is memory-bound.
# - compact (`sgd_examples_compact_logged`): only ``lr·ē`` (block-mean error) is added to the
#   example's row of a small per-segment accumulator ``acc [n, 2]`` (with ``lr``); the updates are
#   reconstructed later from snapshots of the tables (`recsys.models.mf.log.CompactRollbackLog`).
#
# Both prefetch the log row (all its cache lines) of a visit a few visits ahead, so its cache
# misses overlap the arithmetic of the visits in between instead of stalling the update
# (measured on MovieLens-100K: exact 3.8x -> 2.2x the unlogged kernel's time; compact about
# 1.1x, and 16 visits ahead did better than 4).

_PREFETCH = 16  # compact: one or two lines per row
_PREFETCH_EXACT = 4  # exact: 17 lines per row at D=128


@intrinsic
def prefetch_flat(typingctx, arr, index):
    """Hint the CPU to bring the cache line holding element ``index`` of the C-contiguous
    ``arr`` (flat, row-major numbering) into cache for writing (``llvm.prefetch``: no fault,
    no effect on results)."""
    if not isinstance(arr, types.Array) or arr.layout != "C" or not isinstance(index, types.Integer):
        return None
    sig = types.void(arr, index)

    def codegen(context, builder, signature, args):
        aryty, idxty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = builder.gep(ary.data, [context.cast(builder, args[1], idxty, types.intp)])
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _prefetch_rows(arr, row: int, row_len: int) -> None:
    """Prefetch every cache line of the ``row_len`` contiguous elements starting at ``row_len·row``."""
    start = row * row_len
    for o in range(0, row_len, 16):  # 16 float32 = one 64-byte line
        prefetch_flat(arr, start + o)
    prefetch_flat(arr, start + row_len - 1)


def _logged_shards(
    users: np.ndarray,  # int64 [m]
    items: np.ndarray,  # int64 [m]
    values: np.ndarray,  # float32 [m]
    log_rows: np.ndarray,  # int64 [m]: the log row of each visit (the training example id)
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
    log: np.ndarray,  # float32 [n_rows, n_blocks, 2 * block_size + 2] (accumulated in place)
) -> None:
    """Exact logging: `sgd_examples_hogwild`'s loop that also adds each visit's updates to
    ``log[log_rows[k]]``. With one shard: `sgd_examples_interleaved` plus the log."""
    n_shards = len(shard_sq_err)
    n_blocks = BU.shape[1]
    d = P.shape[1] // n_blocks
    mu = np.float32(mu)
    lr = np.float32(lr)
    lr_bias = np.float32(lr_bias)
    n = len(users)
    step = (n + n_shards - 1) // n_shards
    row_len = n_blocks * (2 * d + 2)
    for s in prange(n_shards):
        sq = 0.0
        hi_k = min(n, (s + 1) * step)
        for k in range(s * step, hi_k):
            if k + _PREFETCH_EXACT < hi_k:
                _prefetch_rows(log, log_rows[k + _PREFETCH_EXACT], row_len)
            u = users[k]
            i = items[k]
            lz = log[log_rows[k]]
            ru = reg_u[u]
            ri = reg_i[i]
            for b in range(n_blocks):
                pu = P[u, b * d:(b + 1) * d]
                qi = Q[i, b * d:(b + 1) * d]
                row = lz[b]
                dot = np.float32(0.0)
                for f in range(d):
                    dot += pu[f] * qi[f]
                e = values[k] - (mu + BU[u, b] + BI[i, b] + dot)
                sq += e * e
                dbu = lr_bias * (e - bias_reg_u[u] * BU[u, b])
                dbi = lr_bias * (e - bias_reg_i[i] * BI[i, b])
                BU[u, b] += dbu
                BI[i, b] += dbi
                row[2 * d] += dbu
                row[2 * d + 1] += dbi
                for f in range(d):
                    pf = pu[f]
                    qf = qi[f]
                    dp = lr * (e * qf - ru * pf)
                    dq = lr * (e * pf - ri * qf)
                    pu[f] = pf + dp
                    qi[f] = qf + dq
                    row[f] += dp
                    row[d + f] += dq
        shard_sq_err[s] = sq


def _compact_shards(
    users: np.ndarray,
    items: np.ndarray,
    values: np.ndarray,
    log_rows: np.ndarray,  # int64 [m]: the accumulator row of each visit (the example id)
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
    shard_sq_err: np.ndarray,
    acc: np.ndarray,  # float32 [n_rows, 2] (accumulated in place)
) -> None:
    """Compact logging: `sgd_examples_hogwild`'s loop that also adds ``lr·ē`` (the step's
    error averaged over the blocks, times the learning rate) to ``acc[z, 0]`` and ``lr`` to
    ``acc[z, 1]`` for the visited example ``z = log_rows[k]`` (8 bytes per visit)."""
    n_shards = len(shard_sq_err)
    n_blocks = BU.shape[1]
    d = P.shape[1] // n_blocks
    mu = np.float32(mu)
    lr = np.float32(lr)
    lr_bias = np.float32(lr_bias)
    n = len(users)
    step = (n + n_shards - 1) // n_shards
    mean_lr = lr / np.float32(n_blocks)
    for s in prange(n_shards):
        sq = 0.0
        hi_k = min(n, (s + 1) * step)
        for k in range(s * step, hi_k):
            if k + _PREFETCH < hi_k:
                _prefetch_rows(acc, log_rows[k + _PREFETCH], 2)
            u = users[k]
            i = items[k]
            z = log_rows[k]
            ru = reg_u[u]
            ri = reg_i[i]
            e_sum = np.float32(0.0)
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
                e_sum += e
            acc[z, 0] += mean_lr * e_sum
            acc[z, 1] += lr
        shard_sq_err[s] = sq


#: Exact logging on the calling thread (deterministic; one shard).
sgd_examples_logged = variant(_logged_shards, "serial", fastmath=True, nogil=True)
#: Exact logging, Hogwild! shards on threads (an example is visited by one thread, so its log
#: row is never written concurrently unless the order repeats it; the weights it reads may be).
sgd_examples_hogwild_logged = variant(_logged_shards, "parallel", parallel=True, fastmath=True, nogil=True)
#: Compact logging on the calling thread (deterministic; one shard).
sgd_examples_compact_logged = variant(_compact_shards, "serial", fastmath=True, nogil=True)
#: Compact logging, Hogwild! shards on threads.
sgd_examples_hogwild_compact_logged = variant(_compact_shards, "parallel", parallel=True, fastmath=True, nogil=True)



@njit(fastmath=True, cache=True, nogil=True)
def compact_projection(
    other_rows: np.ndarray,  # int64 [m]: each candidate's row on the side it does not share
    shares_item: np.ndarray,  # bool [m]: False: it shares the user (other side: items), True: the item
    user_factors: np.ndarray,  # int8 [n_users, J, n_blocks * d]: the user table at each knot, quantised
    user_scale: np.ndarray,  # float32 [n_users, J]: row scales (row = int8 * scale)
    user_bias: np.ndarray,  # float32 [n_users, J, n_blocks]
    item_factors: np.ndarray,  # int8 [n_items, J, n_blocks * d]
    item_scale: np.ndarray,  # float32 [n_items, J]
    item_bias: np.ndarray,  # float32 [n_items, J, n_blocks]
    p: np.ndarray,  # float32 [n_blocks, d]: the prediction's user factors
    q: np.ndarray,  # float32 [n_blocks, d]: the prediction's item factors
    own_rows: np.ndarray,  # float32 [2, J, n_blocks * d]: the prediction's user, item rows at each knot
    own_dot: np.ndarray,  # float64 [2, J, n_blocks]: the prediction's own knot rows · (q, p)
    own_bias: np.ndarray,  # float64 [2, J, n_blocks]: the prediction's own bias slots at each knot
    own_reg: np.ndarray,  # float64 [2, 2]: (factor L2, bias L2) of the prediction's user, item
    coef: np.ndarray,  # float64 [m, S]: each candidate's Σ lr·ē per segment
    visits: np.ndarray,  # float64 [m, S]: each candidate's Σ lr per segment
    alpha: np.ndarray,  # float64 [S]: share of each segment credited to its end knot
    bias_ratio: float,  # bias learning rate / factor learning rate
    dot_out: np.ndarray,  # float64 [n_blocks, m] (out): Δ(own row) · (other prediction row)
    bias_out: np.ndarray,  # float64 [n_blocks, m] (out): Δ(own bias slot)
) -> None:
    """The compact rollback log's query (`recsys.models.mf.log.CompactRollbackLog.projected`),
    both sides in one pass: per candidate, the block predictions at each knot (its other
    row against the prediction's own row) give the blocks' deviations from the mean error,
    hence its per-block segment coefficients and their knot shares ``c_j`` (and ``v_j``);
    the change of the row it shares with the prediction, projected on the prediction's other
    row ``x``, is ``Σ_j c_j (other_j[row] · x) − reg Σ_j v_j (own_j · x)``, and of the
    shared bias slot ``ρ (Σ_j c_j − breg Σ_j v_j own_bias_j)``. No full update vector is
    formed."""
    n_knots = user_factors.shape[1]
    n_seg = n_knots - 1
    n_blocks = p.shape[0]
    d = p.shape[1]
    other_x = np.empty((n_knots, n_blocks))
    dev = np.empty((n_knots, n_blocks))
    seg_c = np.empty((max(n_seg, 1), n_blocks))
    for c in range(len(other_rows)):
        r = other_rows[c]
        side = 1 if shares_item[c] else 0
        factors = user_factors if side == 1 else item_factors
        scale = user_scale if side == 1 else item_scale
        bias = user_bias if side == 1 else item_bias
        x = p if side == 1 else q
        reg = own_reg[side, 0]
        breg = own_reg[side, 1]
        for j in range(n_knots):
            s = scale[r, j]
            mean = 0.0
            for b in range(n_blocks):
                acc_x = np.float32(0.0)
                acc_o = np.float32(0.0)
                for f in range(d):
                    v = np.float32(factors[r, j, b * d + f])
                    acc_x += v * x[b, f]
                    acc_o += v * own_rows[side, j, b * d + f]
                other_x[j, b] = s * acc_x
                dev[j, b] = -(own_bias[side, j, b] + bias[r, j, b] + s * acc_o)  # −pred, mean added below
                mean -= dev[j, b]
            mean /= n_blocks
            for b in range(n_blocks):
                dev[j, b] += mean
        for t in range(n_seg):
            for b in range(n_blocks):
                seg_c[t, b] = coef[c, t] + visits[c, t] * ((1.0 - alpha[t]) * dev[t, b] + alpha[t] * dev[t + 1, b])
        for b in range(n_blocks):
            dot_out[b, c] = 0.0
            bias_out[b, c] = 0.0
        for j in range(n_knots):
            wa = 1.0 - alpha[j] if j < n_seg else 0.0
            wb = alpha[j - 1] if j > 0 else 0.0
            vj = 0.0
            if j < n_seg:
                vj += wa * visits[c, j]
            if j > 0:
                vj += wb * visits[c, j - 1]
            for b in range(n_blocks):
                cj = 0.0
                if j < n_seg:
                    cj += wa * seg_c[j, b]
                if j > 0:
                    cj += wb * seg_c[j - 1, b]
                dot_out[b, c] += cj * other_x[j, b] - reg * vj * own_dot[side, j, b]
                bias_out[b, c] += bias_ratio * (cj - breg * vj * own_bias[side, j, b])


@njit(cache=True, nogil=True)
def is_permutation(ids: np.ndarray, n: int) -> bool:
    """Whether ``ids`` visits each of ``0..n-1`` exactly once."""
    if len(ids) != n:
        return False
    seen = np.zeros(n, dtype=np.bool_)
    for k in range(len(ids)):
        z = ids[k]
        if z < 0 or z >= n or seen[z]:
            return False
        seen[z] = True
    return True
