"""Compiled kernels of MF's served explanations (`recsys.models.mf.explain`): building one
cached Newton row and scoring a row's ratings on a prediction, each one call instead of the
twenty-odd numpy calls (and their temporaries) the same arithmetic took, which at the sizes a
query meets (a user row of tens of ratings, an item row of a few hundred) cost more than the
arithmetic itself.

All arithmetic is float64 (the tables are read as float32 and widened), in the order of the
numpy formulation they replace, so the rows and effects agree with it to float rounding
(``tests/test_influence.py`` compares them with the direct float64 estimate). No fastmath:
the row's inverse must not be reassociated."""

from __future__ import annotations

import numpy as np

from recsys.jit import variant

#: reductions may be reordered (so they vectorise); nothing else of fastmath (no NaN/inf assumptions)
_REASSOC = {"reassoc", "contract"}


def _lower_cholesky_inverse(M):
    """``L⁻¹`` (lower triangular, float64 ``[n, n]``) for the Cholesky factor ``L`` of the
    symmetric positive-definite ``M`` (``M⁻¹ = L⁻ᵀL⁻¹``); raises ValueError if ``M`` is not
    positive definite. Plain loops: no BLAS call (whose thread team, woken for a matrix of a
    few hundred rows, spun for tens of ms per call on a busy machine)."""
    n = M.shape[0]
    L = np.zeros((n, n))
    for j in range(n):
        s = M[j, j]
        for p in range(j):
            s -= L[j, p] * L[j, p]
        if not s > 0.0:
            raise ValueError("the row's system is not positive definite (no L2 and too few ratings?)")
        diag = np.sqrt(s)
        L[j, j] = diag
        r = 1.0 / diag
        for i in range(j + 1, n):
            s = M[i, j]
            for p in range(j):
                s -= L[i, p] * L[j, p]
            L[i, j] = s * r
    inv = np.zeros((n, n))
    for i in range(n):  # row i of L⁻¹ from the rows above it: L[i, :i+1]·inv[:i+1, j] = δ_ij
        r = 1.0 / L[i, i]
        inv[i, i] = r
        for p in range(i):
            coef = L[i, p] * r
            for j in range(p + 1):
                inv[i, j] -= coef * inv[p, j]
    return inv


def _gram_of_inverse(inv):
    """``L⁻ᵀL⁻¹`` (the inverse of ``M``) from `_lower_cholesky_inverse`'s ``L⁻¹``."""
    n = inv.shape[0]
    out = np.zeros((n, n))
    for p in range(n):
        for a in range(p + 1):
            coef = inv[p, a]
            for b in range(p + 1):
                out[a, b] += coef * inv[p, b]
    return out


lower_cholesky_inverse = variant(_lower_cholesky_inverse, "serial", nogil=True, fastmath=_REASSOC)
gram_of_inverse = variant(_gram_of_inverse, "serial", nogil=True, fastmath=_REASSOC)


#: rows of more ratings than `_TILED_ABOVE` (whose ``(d+1)·m`` float64 columns, over 1 MB at
#: d=32, no longer stay in a core's cache) are built `_ROW_TILE` ratings at a time, shorter ones
#: in one tile (`_newton_row_tiles`)
_ROW_TILE = 1024
_TILED_ABOVE = 4096


def _newton_row(theta, other_factors, other_bias, others, values, global_mean, lam):
    """One row's Newton system and per-rating numbers (`NewtonInfluence`'s cached row).

    theta ``[K, d+1]`` float64: the row ``[factors; bias]`` per block; other_factors
    ``[n, K·d]`` float32 and other_bias ``[n, K]`` float32: the other side's tables; others
    ``[m]`` int: the other side's index of each of the row's ratings; values ``[m]`` float64:
    the ratings; lam ``[d+1]`` float64: the row's per-visit L2.

    Per block, with ``x_i = [other factors; 1]``, ``r_i`` the rating's error, ``A = Σ x_i x_iᵀ
    + max(m−1, 1)·diag(λ)``, ``h_i = x_iᵀA⁻¹x_i`` and ``t_i = −r_i h_i + x_iᵀA⁻¹(λ⊙θ)``:
    returns ``(A [K, d+1, d+1] float64, A⁻¹ [K, d+1, d+1] float64, α [m, K] float32 with
    α_i = t_i/(1 − h_i) − r_i, β [m] float32 = Σ_blocks |α_i|·‖x_i‖, h_max [K] float64 = max_i
    h_i, x2_max [K] float64 = max_i ‖x_i‖², h [m, K] float32)`` (h_max and x2_max bound how far
    the α_i can move when raters move: `updated_weights`; h bounds each one when the row's own
    parameters moved: `updated_user_scores`). ``A⁻¹`` by Cholesky (``h_i = ‖L⁻¹x_i‖²``)."""
    m = len(others)
    return newton_row_tiles(theta, other_factors, other_bias, others, values, global_mean, lam,
                            m if m <= _TILED_ABOVE else _ROW_TILE)


def _newton_row_tiled(theta, other_factors, other_bias, others, values, global_mean, lam):
    """`newton_row` `_ROW_TILE` ratings at a time, whatever the row's length."""
    return newton_row_tiles(theta, other_factors, other_bias, others, values, global_mean, lam, _ROW_TILE)


def _newton_row_tiles(theta, other_factors, other_bias, others, values, global_mean, lam, tile):
    """`newton_row`, ``tile`` ratings at a time: each pair of coefficients runs over one
    tile's columns (contiguous slices, in the core's cache) instead of over the whole row's,
    which a long row read from memory once per pair (the 173k-rating item row at 10^7: 330 ->
    145 ms in isolation). One tile (``tile >= m``) is the row in one pass."""
    k, d1 = theta.shape
    d = d1 - 1
    m = len(others)
    tile = max(min(tile, m), 1)  # (a row of no ratings: one empty tile)
    A_all = np.empty((k, d1, d1))
    inv_all = np.empty((k, d1, d1))
    alpha = np.empty((m, k), np.float32)
    h_all = np.empty((m, k), np.float32)
    beta = np.zeros(m)
    xt = np.empty((d1, m))  # the block's x_i as columns: the loops below run along the ratings
    y = np.empty((d1, tile))  # L⁻¹x_i as columns, for one tile of ratings
    resid = np.empty(m)
    h = np.empty(tile)
    t = np.empty(tile)
    norm = np.empty(tile)
    reg_theta = np.empty(d1)
    v_reg = np.empty(d1)
    h_max = np.zeros(k)
    x2_max = np.zeros(k)
    scale = max(m - 1, 1)
    for b in range(k):
        A = np.zeros((d1, d1))
        for lo in range(0, m, tile):  # A's lower triangle, one tile of ratings at a time
            hi = min(lo + tile, m)
            for i in range(lo, hi):
                o = others[i]
                s = 0.0
                for j in range(d):
                    v = np.float64(other_factors[o, b * d + j])
                    xt[j, i] = v
                    s += v * theta[b, j]
                xt[d, i] = 1.0
                resid[i] = values[i] - (global_mean + theta[b, d] + np.float64(other_bias[o, b]) + s)
            for p in range(d1):
                xp = xt[p, lo:hi]
                for q in range(p + 1):
                    xq = xt[q, lo:hi]
                    s = 0.0
                    for i in range(hi - lo):
                        s += xp[i] * xq[i]
                    A[p, q] += s
        for p in range(d1):
            for q in range(p):
                A[q, p] = A[p, q]
            A[p, p] += scale * lam[p]
            reg_theta[p] = lam[p] * theta[b, p]
        L_inv = lower_cholesky_inverse(A)
        A_inv = gram_of_inverse(L_inv)
        for p in range(d1):
            s = 0.0
            for q in range(d1):
                s += A_inv[p, q] * reg_theta[q]
            v_reg[p] = s
        for lo in range(0, m, tile):
            n = min(lo + tile, m) - lo
            for i in range(n):
                h[i] = 0.0
                t[i] = 0.0
                norm[i] = 0.0
            for p in range(d1):  # y = L⁻¹X, h_i = ‖y_i‖², t_i's x_i·A⁻¹(λ⊙θ), ‖x_i‖²
                yp = y[p, :n]
                for i in range(n):
                    yp[i] = 0.0
                for q in range(p + 1):
                    coef = L_inv[p, q]
                    xq = xt[q, lo:lo + n]
                    for i in range(n):
                        yp[i] += coef * xq[i]
                vp = v_reg[p]
                xp = xt[p, lo:lo + n]
                for i in range(n):
                    h[i] += yp[i] * yp[i]
                    t[i] += xp[i] * vp
                    norm[i] += xp[i] * xp[i]
            for i in range(n):
                denom = 1.0 - h[i]
                if abs(denom) < 1e-9:
                    denom = 1e-9
                r = resid[lo + i]
                a = (t[i] - r * h[i]) / denom - r
                alpha[lo + i, b] = a
                h_all[lo + i, b] = h[i]
                beta[lo + i] += abs(a) * np.sqrt(norm[i])
                h_max[b] = max(h_max[b], h[i])
                x2_max[b] = max(x2_max[b], norm[i])
        A_all[b] = A
        inv_all[b] = A_inv
    return A_all, inv_all, alpha, beta.astype(np.float32), h_max, x2_max, h_all


def _fold_in_leave_one_out(item_factors, item_bias, items, values, global_mean, reg, bias_reg):
    """`FoldInLeaveOneOut`'s ``V [m, D+1]`` (float64) of a user folded in from the ratings
    ``(items [m], values [m])``: the effect of rating ``z`` on the prediction of item ``i`` is
    ``[q_i/K; 1]·V[z]`` (the prediction minus that of the user re-folded without ``z``).

    The ridge is ``w = G⁻¹Xᵀt``, ``G = XᵀX + Λ`` (``x_z = [q_z/K; 1]``, ``t_z = r_z − μ − b̄_z``,
    ``Λ = diag(reg, …, reg, bias_reg)``) and ``V[z] = G⁻¹x_z e_z/(1 − h_z)``. With fewer
    ratings than ``D+1`` (and ``Λ > 0``) it is solved in the ratings' space instead:
    ``G⁻¹Xᵀ = Λ⁻¹XᵀS⁻¹`` with ``S = I + XΛ⁻¹Xᵀ`` (``m × m``), so ``e = S⁻¹t``,
    ``1 − h_z = (S⁻¹)_zz`` and ``V[z] = (S⁻¹XΛ⁻¹)[z]·e_z/(S⁻¹)_zz``; otherwise in ``G``."""
    m = len(items)
    k = item_bias.shape[1]
    n_factors = item_factors.shape[1]
    d1 = n_factors + 1
    X = np.empty((m, d1))
    t = np.empty(m)
    for z in range(m):
        it = items[z]
        mean_bias = 0.0
        for b in range(k):
            mean_bias += np.float64(item_bias[it, b])
        for j in range(n_factors):
            X[z, j] = np.float64(item_factors[it, j]) / k
        X[z, n_factors] = 1.0
        t[z] = values[z] - global_mean - mean_bias / k
    lam = np.full(d1, reg)
    lam[n_factors] = bias_reg
    V = np.zeros((m, d1))
    if m <= d1 and reg > 0.0 and bias_reg > 0.0:
        Xs = np.empty((m, d1))  # XΛ⁻¹
        for z in range(m):
            for j in range(d1):
                Xs[z, j] = X[z, j] / lam[j]
        S = np.empty((m, m))
        for a in range(m):
            for c in range(a + 1):
                s = 0.0
                for j in range(d1):
                    s += Xs[a, j] * X[c, j]
                S[a, c] = s
                S[c, a] = s
            S[a, a] += 1.0
        S_inv = gram_of_inverse(lower_cholesky_inverse(S))
        for z in range(m):
            e = 0.0
            for c in range(m):
                e += S_inv[z, c] * t[c]
            scale = e / S_inv[z, z]
            for c in range(m):
                coef = S_inv[z, c] * scale
                for j in range(d1):
                    V[z, j] += coef * Xs[c, j]
        return V
    G = np.zeros((d1, d1))
    for z in range(m):  # the lower triangle of XᵀX
        for p in range(d1):
            xp = X[z, p]
            for q in range(p + 1):
                G[p, q] += xp * X[z, q]
    for p in range(d1):
        for q in range(p):
            G[q, p] = G[p, q]
        G[p, p] += lam[p]
    G_inv = gram_of_inverse(lower_cholesky_inverse(G))
    GX = np.zeros((m, d1))  # rows G⁻¹x_z
    w = np.zeros(d1)
    for z in range(m):
        for p in range(d1):
            xp = X[z, p]
            for q in range(d1):
                GX[z, q] += G_inv[p, q] * xp
        for q in range(d1):
            w[q] += GX[z, q] * t[z]
    for z in range(m):
        e = t[z]
        h = 0.0
        for q in range(d1):
            e -= X[z, q] * w[q]
            h += X[z, q] * GX[z, q]
        scale = e / max(1.0 - h, 1e-12)
        for q in range(d1):
            V[z, q] = GX[z, q] * scale
    return V


def _updated_weights(gram, weights, positions, old_rows, added, ridge, other_factors, others, reg_theta, h_max,
                     x2_max, theta_moved, reg_theta_moved):
    """A cached row's system after some of its raters moved, it gained ratings or its own
    parameters moved (`NewtonInfluence`'s update in place of a long row).

    gram ``[K, (d+1)(d+2)/2]`` float64: the row's ``A`` as of its last build or update (its
    lower triangle row by row, as `numpy.tril_indices` lists it); weights
    ``[K, d+1, d+1]`` float32: the ``W`` its cached α were computed with (at its build);
    positions ``[n]``: the ratings whose rater moved since ``gram``, with old_rows ``[n, K·d]``
    float32 their rater's factors then (other_factors holds them now); added ``[a]``: the
    positions of the ratings gained since ``gram`` and ridge ``[d+1]``: what they add to the
    ridge ``(m−1)λ``; others ``[m]``: every rating's rater (positions index it); reg_theta
    ``[K, d+1]``: ``λ⊙θ`` now; h_max, x2_max ``[K]``: `newton_row`'s bounds at the build;
    theta_moved, reg_theta_moved ``[K]``: ``‖θ − θ_build‖`` and ``‖λ⊙(θ − θ_build)‖`` per block.

    ``A' = A + Σ_n (x_new x_newᵀ − x_old x_oldᵀ) + Σ_added x xᵀ + diag(ridge)``, ``W' = A'⁻¹``
    by Cholesky. Returns ``(A' [K, (d+1)(d+2)/2] packed as gram, W' [K, d+1, d+1] float64, W'(λ⊙θ) [K, d+1],
    scale, shift, ε [K])``. For a rating whose rater did not move since the build, ``α'_i = (t'_i −
    r_i')/(1 − h'_i)`` (with ``t = x·W(λ⊙θ)``, ``h = xᵀWx``) differs from the cached ``α_i =
    (t_i − r_i)/(1 − h_i)`` through ``W``, ``θ`` and the error ``r_i``: with ``ε ≥ ‖W' − W‖₂``
    (Frobenius, plus ``W``'s float32 rounding) and ``ω ≥ ‖W‖₂``, ``|h' − h| ≤ ε‖x‖²`` and
    ``|t' − r' − (t − r)| ≤ ‖x‖(ε‖λ⊙θ‖ + ω‖λ⊙Δθ‖ + ‖Δθ‖)``, so per block ``|α'| ≤ |α|·s +
    ‖x‖·(ε‖λ⊙θ‖ + ω‖λ⊙Δθ‖ + ‖Δθ‖)/(1 − h_max − ε·x2_max)``, ``s = (1 − h_max)/(1 − h_max −
    ε·x2_max)``: the bound ``β = Σ_blocks |α|·‖x‖`` of the pruned order becomes ``β·scale +
    shift``. ``scale`` is inf when that bound is of no use (``ε·x2_max > (1 − h_max)/2``)."""
    k, d1 = reg_theta.shape
    d = d1 - 1
    A = np.empty((k, d1, d1))
    for b in range(k):
        at = 0
        for p in range(d1):
            for q in range(p + 1):
                A[b, p, q] = gram[b, at]
                A[b, q, p] = gram[b, at]
                at += 1
    x_new = np.empty(d1)
    x_new[d] = 1.0
    if len(positions):  # the moved ratings' rank-2 terms, their coefficients as columns (vectorised sums)
        n_moved = len(positions)
        cols_new = np.empty((d1, n_moved))
        cols_old = np.empty((d1, n_moved))
        for b in range(k):
            for n in range(n_moved):
                o = others[positions[n]]
                for j in range(d):
                    cols_new[j, n] = np.float64(other_factors[o, b * d + j])
                    cols_old[j, n] = np.float64(old_rows[n, b * d + j])
                cols_new[d, n] = 1.0
                cols_old[d, n] = 1.0
            lower_gram_change(A[b], cols_new, cols_old)
    for n in range(len(added)):
        o = others[added[n]]
        for b in range(k):
            for j in range(d):
                x_new[j] = np.float64(other_factors[o, b * d + j])
            for p in range(d1):
                for q in range(p + 1):
                    A[b, p, q] += x_new[p] * x_new[q]
    for b in range(k):
        for p in range(d1):
            for q in range(p):
                A[b, q, p] = A[b, p, q]
            A[b, p, p] += ridge[p]
    W = np.empty((k, d1, d1))
    Wg = np.empty((k, d1))
    eps_all = np.empty(k)
    scale = 1.0
    shift = 0.0
    for b in range(k):
        W[b] = gram_of_inverse(lower_cholesky_inverse(A[b]))
        diff = 0.0
        size = 0.0
        g_norm = 0.0
        for p in range(d1):
            s = 0.0
            for q in range(d1):
                s += W[b, p, q] * reg_theta[b, q]
                old = np.float64(weights[b, p, q])
                diff += (W[b, p, q] - old) ** 2
                size += old * old
            Wg[b, p] = s
            g_norm += reg_theta[b, p] * reg_theta[b, p]
        rounding = 2.0 ** -23 * np.sqrt(size)
        eps = np.sqrt(diff) + rounding
        eps_all[b] = eps
        omega = np.sqrt(size) + rounding
        room = 1.0 - h_max[b]
        moved = eps * x2_max[b]
        if not moved <= 0.5 * room:
            scale = np.inf
        else:
            scale = max(scale, room / (room - moved))
            shift += x2_max[b] * (eps * np.sqrt(g_norm) + omega * reg_theta_moved[b] + theta_moved[b]) / (room - moved)
    if not np.isfinite(scale):
        shift = np.inf
    packed = np.empty_like(gram)
    for b in range(k):
        at = 0
        for p in range(d1):
            for q in range(p + 1):
                packed[b, at] = A[b, p, q]
                at += 1
    return packed, W, Wg, scale, shift, eps_all


def _lower_gram_change(A, cols_new, cols_old):
    """``A``'s lower triangle ``+= Σ_n (x_n x_nᵀ − y_n y_nᵀ)`` (``A [d+1, d+1]``; the ``x_n``,
    ``y_n`` are the columns of ``cols_new``, ``cols_old [d+1, n]``): each entry one pair of
    contiguous sums over ``n``."""
    d1, n = cols_new.shape
    for p in range(d1):
        xp = cols_new[p]
        yp = cols_old[p]
        for q in range(p + 1):
            xq = cols_new[q]
            yq = cols_old[q]
            s = 0.0
            for i in range(n):
                s += xp[i] * xq[i] - yp[i] * yq[i]
            A[p, q] += s


lower_gram_change = variant(_lower_gram_change, "serial", nogil=True, fastmath=_REASSOC)


def _updated_rating_score(alpha, others, examples, values, i, table, bias, theta, W, Wg, w, c, global_mean):
    """The effect of the rating at position ``i`` of a row updated in place (`updated_weights`):
    ``α_i`` computed from the current ``x_i``, its error ``r_i`` and ``W'`` (``h_i = x_iᵀW'x_i``,
    ``t_i = x_i·W'(λ⊙θ)``, as `newton_row` does at a build) and kept, float32, in ``alpha``
    ``[m, K]`` (NaN until computed: a later query reads it back), then ``−(Σ_blocks α_i (x_i·w_b)
    + c)/K``. table / bias: the other side's factors and biases; theta ``[K, d+1]`` the row's
    ``[factors; bias]``; values: every rating's value by example id. (Concurrent calls write
    the same values; one that reads a block's α before another call wrote it computes it.)"""
    k, d1 = w.shape
    d = d1 - 1
    known = True
    for b in range(k):
        if np.isnan(alpha[i, b]):
            known = False
    if known:
        return rating_score(alpha, others, i, table, w, c)
    o = others[i]
    value = np.float64(values[examples[i]])
    x = np.empty(d1)
    x[d] = 1.0
    acc = 0.0
    for b in range(k):
        s = 0.0
        fit = 0.0
        for j in range(d):
            v = np.float64(table[o, b * d + j])
            x[j] = v
            s += v * w[b, j]
            fit += v * theta[b, j]
        resid = value - (global_mean + theta[b, d] + np.float64(bias[o, b]) + fit)
        h = 0.0
        t = 0.0
        for p in range(d1):  # xᵀW'x from the lower triangle (W' is symmetric)
            row = 0.0
            for q in range(p):
                row += W[b, p, q] * x[q]
            h += x[p] * (2.0 * row + W[b, p, p] * x[p])
            t += x[p] * Wg[b, p]
        denom = 1.0 - h
        if abs(denom) < 1e-9:
            denom = 1e-9
        a = np.float32((t - resid * h) / denom - resid)
        alpha[i, b] = a
        acc += np.float64(a) * (s + w[b, d])
    return -(acc + c) / k


updated_rating_score = variant(_updated_rating_score, "serial", nogil=True, fastmath=_REASSOC)


def _rating_score(alpha, others, i, table, w, c):
    """The effect of the row's rating at position ``i``: ``−(Σ_blocks α_i (x_i·w_b) + c)/K``."""
    k, d1 = w.shape
    d = d1 - 1
    o = others[i]
    acc = 0.0
    for b in range(k):
        s = 0.0
        for j in range(d):
            s += np.float64(table[o, b * d + j]) * w[b, j]
        acc += np.float64(alpha[i, b]) * (s + w[b, d])
    return -(acc + c) / k


rating_score = variant(_rating_score, "serial", nogil=True, fastmath=_REASSOC)


def _row_rating_score(updated, alpha, others, examples, values, i, table, bias, theta, W, Wg, w, c, global_mean):
    """`rating_score` from the cached α, or for a row ``updated`` in place `updated_rating_score`."""
    if updated:
        return updated_rating_score(alpha, others, examples, values, i, table, bias, theta, W, Wg, w, c, global_mean)
    return rating_score(alpha, others, i, table, w, c)


row_rating_score = variant(_row_rating_score, "serial", nogil=True, fastmath=_REASSOC)


def _pruned_row_scores(alpha, others, examples, beta, by_beta, table, w, c, w_max, lo, hi, settled_below, best,
                       chunk, updated, moved, values, bias, theta, W, Wg, global_mean, beta_scale, beta_shift):
    """The effects of a long row's ratings (`row_rating_score`) in decreasing order of their bound, stopping
    once none left can reach the ``len(best)``-th largest ``|effect|`` (`NewtonInfluence`'s
    pruned item side). Returns ``(positions int64, effects float64)``: first every rating at
    or above example id ``settled_below`` (in position order: the caller re-estimates them)
    and, for a row ``updated`` in place, every rating whose rater moved (``moved[i]``: their
    cached bound no longer holds), then the scored ones in bound order; positions in ``[lo,
    hi)`` (the user's own) are skipped.

    beta ``[m]`` float32 and by_beta ``[m]`` int: the bound ``Σ_blocks |α_i|·‖x_i‖`` and the
    positions in decreasing order of it (for an updated row ``β·beta_scale + beta_shift``
    bounds the current α: `updated_weights`); w_max: ``max_b ‖w_b‖``; best float64 ``[top]``:
    the largest settled ``|effects|`` so far, decreasing, padded with -1 (updated in place
    with every scored effect). Scored in steps of ``chunk`` ratings, doubling; after each
    step it stops if the next rating's bound ``((β·beta_scale + beta_shift)·w_max + |c|)/K``
    with a relative margin of 1e-4 is below the smallest of a full ``best``. The arguments
    from ``values`` on are `updated_rating_score`'s (unused when not ``updated``)."""
    k = w.shape[0]
    m = len(examples)
    top = len(best)
    positions = np.empty(m, np.int64)
    effects = np.empty(m)
    n = 0
    for i in range(m):
        if (examples[i] >= settled_below or (updated and moved[i])) and (i < lo or i >= hi):
            positions[n] = i
            effects[n] = row_rating_score(updated, alpha, others, examples, values, i, table, bias, theta, W, Wg, w,
                                          c, global_mean)
            n += 1
            if updated and examples[i] < settled_below:  # a settled rating: it may be in the top
                a = abs(effects[n - 1])
                if a > best[top - 1]:
                    j = top - 1
                    while j > 0 and best[j - 1] < a:
                        best[j] = best[j - 1]
                        j -= 1
                    best[j] = a
    start = 0
    size = chunk
    while start < m:
        stop = min(start + size, m)
        for r in range(start, stop):
            i = by_beta[r]
            if (i >= lo and i < hi) or examples[i] >= settled_below or (updated and moved[i]):
                continue
            e = row_rating_score(updated, alpha, others, examples, values, i, table, bias, theta, W, Wg, w, c,
                                 global_mean)
            positions[n] = i
            effects[n] = e
            n += 1
            a = abs(e)
            if a > best[top - 1]:  # into the decreasing top
                j = top - 1
                while j > 0 and best[j - 1] < a:
                    best[j] = best[j - 1]
                    j -= 1
                best[j] = a
        start = stop
        size *= 2
        if start < m and best[top - 1] >= 0.0:
            bound = ((np.float64(beta[by_beta[start]]) * beta_scale + beta_shift) * w_max + abs(c)) / k
            if bound * (1 + 1e-4) + 1e-12 < best[top - 1]:
                break
    return positions[:n].copy(), effects[:n].copy()


def _into_top(best, a):
    """Insert ``a`` into ``best`` (decreasing, padded with −1) if it is among its largest."""
    top = len(best)
    if a > best[top - 1]:
        j = top - 1
        while j > 0 and best[j - 1] < a:
            best[j] = best[j - 1]
            j -= 1
        best[j] = a


#: a float32 dot product of ``d`` terms (in any order, products possibly fused) with one factor
#: rounded from float64 is within ``(d + 2)·2⁻²⁴·1.001·‖q‖‖w‖`` of the exact float64 one
_F32_DOT = 2.0 ** -24 * 1.001


def _user_effect_bounds(skip, others, Q, BI, values, alpha, alpha_bounds, h, spread, gsum, w, c, global_mean,
                        q_norm, updated, low, high):
    """Bounds ``low[n] ≤ |effect| ≤ high[n]`` of each rating ``n`` of a user row not ``skip``
    (`NewtonInfluence`'s pruned user side), from float32 dot products (vectorised: 6x the float64
    ones a rating's exact score takes) whose rounding is bounded and added; ``high`` inf: the
    rating must be scored exactly. The effect is ``−(Σ_b α_b (x_b·w_b) + c)/K`` with ``x_b =
    [q_b; 1]`` (``q`` the item's factors, ``others[n]``) and each ``|x_b·w_b − fl32(x_b·w_b)| ≤
    (d+2)·2⁻²⁴·1.001·‖q_b‖‖w_b‖``, ``‖q_b‖ ≤ q_norm[b]`` (the build's largest ``‖x_b‖``: the items
    of a rating not skipped did not move since the row was built).

    A row not ``updated``: ``α`` is the build's (``alpha [m, K]`` float32, what the exact score
    uses). A row ``updated`` in place: ``α' = (x·gsum_b − (value − μ − b_item))/(1 − h')``
    (`updated_weights`; ``gsum = W'(λ⊙θ) + θ`` now, the rating's ``values[n]``) with ``h'``
    within ``spread[b]`` of the build's ``h[n, b]``: its interval is computed once per update
    (the numerator's dot product bounded as above) and kept, rounded outwards to float32, in
    ``alpha_bounds [m, K, 2]`` as (centre, radius) (NaN until computed; centre inf where
    ``1 − h'`` may come near 0: scored exactly)."""
    k, d1 = w.shape
    d = d1 - 1
    w32 = np.empty((k, d), np.float32)
    g32 = np.empty((k, d), np.float32)
    w_err = np.empty(k)  # bounds on the rounding of x_b·w_b and x_b·gsum_b
    g_err = np.empty(k)
    for b in range(k):
        sw = 0.0
        sg = 0.0
        for j in range(d):
            w32[b, j] = w[b, j]
            sw += w[b, j] * w[b, j]
            if updated:
                g32[b, j] = gsum[b, j]
                sg += gsum[b, j] * gsum[b, j]
        w_err[b] = (d + 2) * _F32_DOT * q_norm[b] * np.sqrt(sw) * (1.0 + 1e-9)
        g_err[b] = (d + 2) * _F32_DOT * q_norm[b] * np.sqrt(sg) * (1.0 + 1e-9)
    if updated:
        user_alpha_intervals(skip, others, Q, BI, values, alpha_bounds, h, spread, gsum, g32, g_err, global_mean)
        user_effect_bounds_rows(skip, others, Q, alpha_bounds[:, :, 0], alpha_bounds[:, :, 1], w, w32, w_err, c, low,
                                high)
    else:
        user_effect_bounds_rows(skip, others, Q, alpha, np.zeros((1, k), np.float32)[np.zeros(len(others), np.int64)],
                                w, w32, w_err, c, low, high)


def _user_alpha_intervals(skip, others, Q, BI, values, alpha_bounds, h, spread, gsum, g32, g_err, global_mean):
    """`user_effect_bounds`' α' intervals of a row updated in place, for the ratings not
    ``skip`` whose interval this update has not computed yet (``alpha_bounds[n, 0, 0]`` NaN),
    as (centre, radius) rounded outwards to float32; centre inf where ``1 − h'`` may come
    near 0. ``g32`` ``[K, d]``: ``gsum``'s factor part as float32, ``g_err`` ``[K]`` the
    rounding bound of its dot products."""
    k, d = g32.shape
    dots = np.empty(k)
    for n in range(len(others)):
        if skip[n] or not np.isnan(alpha_bounds[n, 0, 0]):
            continue
        o = others[n]
        for b in range(k):
            s32 = np.float32(0.0)
            for j in range(d):
                s32 += Q[o, b * d + j] * g32[b, j]
            dots[b] = np.float64(s32)
        y = np.float64(values[n]) - global_mean
        near = False
        for b in range(k):
            num = gsum[b, d] + dots[b] - (y - np.float64(BI[o, b]))
            den_lo = 1.0 - np.float64(h[n, b]) - spread[b]
            if not den_lo > 1e-6:
                near = True
            den_hi = den_lo + 2.0 * spread[b]
            n_lo = num - g_err[b]
            n_hi = num + g_err[b]
            a_lo = min(n_lo / den_lo, n_lo / den_hi)
            a_hi = max(n_hi / den_lo, n_hi / den_hi)
            mid = 0.5 * (a_lo + a_hi)
            centre = np.float32(mid)
            alpha_bounds[n, b, 0] = centre
            alpha_bounds[n, b, 1] = np.float32(
                (0.5 * (a_hi - a_lo) + abs(mid - np.float64(centre))) * (1.0 + 2.0 ** -20) + 1e-300)
        if near:
            alpha_bounds[n, 0, 0] = np.inf


def _user_effect_bounds_rows(skip, others, Q, centres, radii, w, w32, w_err, c, low, high):
    """`user_effect_bounds`' pass over the ratings not ``skip``: ``α`` within ``radii`` of
    ``centres`` (``[m, K]``, float32; an inf centre: ``high`` inf), ``w``'s factor part as
    float32 ``w32`` ``[K, d]`` with its dot products' rounding bound ``w_err`` ``[K]``. Intervals
    as centre ± radius (no branches: the loops over ``d``, taken from ``w32``'s shape and kept
    apart from the interval arithmetic, vectorise): ``α ∈ a ± r`` and ``x·w ∈ s ± e`` give
    ``α(x·w) ∈ a·s ± (|a|e + r|s| + r·e)``."""
    k, d = w32.shape
    dots = np.empty(k)
    for n in range(len(others)):
        if skip[n]:
            continue
        o = others[n]
        for b in range(k):
            s32 = np.float32(0.0)
            for j in range(d):
                s32 += Q[o, b * d + j] * w32[b, j]
            dots[b] = np.float64(s32)
        centre = c
        radius = 0.0
        for b in range(k):
            xw = w[b, d] + dots[b]
            a = np.float64(centres[n, b])
            r = np.float64(radii[n, b])
            centre += a * xw
            radius += abs(a) * w_err[b] + r * (abs(xw) + w_err[b])
        high[n] = (abs(centre) + radius) / k * (1 + 1e-9)
        low[n] = (abs(centre) - radius) / k * (1 - 1e-6) - 1e-12
        if not high[n] < np.inf:
            high[n] = np.inf
            low[n] = 0.0


def _target_weights(W, table, row, k):
    """``(w [K, d+1] float64, c)``: ``w_b = W_b [table[row] block b; 1]`` and ``c = (λ⊙θ)·w``
    is left to the caller (`_pair_scores`)."""
    d1 = W.shape[1]
    d = d1 - 1
    w = np.empty((k, d1))
    for b in range(k):
        for p in range(d1):
            s = np.float64(W[b, p, d])
            for q in range(d):
                s += np.float64(W[b, p, q]) * np.float64(table[row, b * d + q])
            w[b, p] = s
    return w


target_weights = variant(_target_weights, "serial", nogil=True, fastmath=_REASSOC)
into_top = variant(_into_top, "serial", nogil=True)
user_effect_bounds_rows = variant(_user_effect_bounds_rows, "serial", nogil=True, fastmath=_REASSOC)
user_alpha_intervals = variant(_user_alpha_intervals, "serial", nogil=True, fastmath=_REASSOC)
user_effect_bounds = variant(_user_effect_bounds, "serial", nogil=True, fastmath=_REASSOC)


# placeholders of `_pair_scores_updated`'s update arguments for a row not updated (module
# constants: numba freezes them into the compiled code, nothing is allocated per call)
_NO_MOVED = np.zeros(0, np.bool_)
_NO_VALUES = np.zeros(0, np.float32)
_NO_BIAS = np.zeros((0, 0), np.float32)
_NO_THETA = np.zeros((0, 0))
_NO_WEIGHTS = np.zeros((0, 0, 0))
_NO_EPS = np.zeros(0)


def _pair_scores(k, user_examples, user_others, user_alpha, user_W, user_reg_theta, score_user,
                 item_examples, item_others, item_alpha, item_W, item_reg_theta, item_beta, item_by_beta, has_item,
                 P, Q, user, item, prune, top, settled_below, user_settled, chunk, prune_user, user_x2_max):
    """`pair_scores_updated` of rows not updated in place (fewer arguments to pass: each costs
    the caller's dispatch)."""
    return pair_scores_updated(k, user_examples, user_others, user_alpha, user_W, user_reg_theta, score_user,
                               item_examples, item_others, item_alpha, item_W, item_reg_theta, item_beta, item_by_beta,
                               has_item, P, Q, user, item, prune, top, settled_below, user_settled, chunk, False,
                               _NO_MOVED, _NO_VALUES, _NO_BIAS, _NO_THETA, _NO_WEIGHTS, _NO_THETA, 0.0, 1.0, 0.0,
                               False, _NO_MOVED, np.empty((0, 0), np.float32), _NO_BIAS, _NO_THETA, _NO_WEIGHTS,
                               _NO_THETA, _NO_EPS, _NO_BIAS, prune_user, _NO_VALUES, np.empty((0, 0, 2), np.float32),
                               user_x2_max)


def _pair_scores_updated(k, user_examples, user_others, user_alpha, user_W, user_reg_theta, score_user,
                         item_examples, item_others, item_alpha, item_W, item_reg_theta, item_beta, item_by_beta,
                         has_item, P, Q, user, item, prune, top, settled_below, user_settled, chunk,
                         item_updated, item_moved, values, BU, item_theta, item_W_now, item_Wg_now, global_mean,
                         beta_scale, beta_shift, user_updated, user_moved, user_alpha_now, user_h, user_theta,
                         user_W_now, user_Wg_now, user_spread, BI, prune_user, user_values, user_alpha_bounds,
                         user_x2_max):
    """Every candidate of the prediction of ``(user, item)`` scored from the two cached rows
    in one call (`NewtonInfluence.effects_and_shares`). Returns ``(example ids int64 [n],
    effects float64 [n], shares_user bool [n], shares_item bool [n], candidates)``: the
    user's ratings first (row order; effect 0 unless ``score_user``; the pair's own rating
    also gets its item-row share), then the item's other ratings (all, in row order, or with
    ``prune`` those `_pruned_row_scores` keeps, seeded with the ``top`` largest ``|effect|``
    of the user's ratings below ``settled_below`` when ``user_settled``).

    ``item_updated``: the item row was updated in place (`updated_weights`): its ratings are
    scored by `updated_rating_score` with ``W' = item_W_now`` (``w`` from it too),
    ``item_Wg_now = W'(λ⊙θ)``, the row's ``item_theta`` (``item_reg_theta`` its ``λ⊙θ``), the
    ratings' ``values`` and the user biases ``BU``, and ``item_alpha`` is the update's α
    (NaN until computed; filled in); ``item_beta`` / ``item_by_beta`` stay the build's, with
    ``item_moved`` marking the ratings gained or whose rater moved since the build and
    ``beta_scale``, ``beta_shift`` widening the bound.

    ``prune_user`` (with ``score_user`` and ``user_settled``): the user's ratings are bounded
    first (`user_effect_bounds`: float32 dot products, their rounding bounded; ``user_x2_max``
    the row's build's largest ``‖x‖²`` per block) and only those whose bound reaches the
    ``top`` largest lower bounds (exact effects included) are scored and returned, besides
    the ones always scored (the pair's own, at or above ``settled_below``, and for a row
    ``user_updated`` in place those gained or whose item moved since the build,
    ``user_moved``). A row updated in place (`updated_weights`: ``user_W_now``, ``user_Wg_now``,
    ``user_theta`` now) scores with `updated_rating_score` (α' into ``user_alpha_now``) and
    bounds from the build's ``user_h`` within ``user_spread``, the ratings' ``user_values``
    and the item biases ``BI``, keeping each rating's α' interval in ``user_alpha_bounds``."""
    m_u = len(user_examples)
    m_i = len(item_examples)
    lo = hi = 0
    w_i = np.zeros((k, 1))
    c_i = 0.0
    if has_item:
        lo = np.searchsorted(item_others, user)
        hi = np.searchsorted(item_others, user + 1)
        if item_updated:
            w_i = target_weights(item_W_now, P, user, k)
        else:
            w_i = target_weights(item_W, P, user, k)
        c_i = np.sum(item_reg_theta * w_i)
    ids = np.empty(m_u + m_i, np.int64)
    eff = np.zeros(m_u + m_i)
    su = np.zeros(m_u + m_i, np.bool_)
    si = np.zeros(m_u + m_i, np.bool_)
    best = np.full(max(top, 1), -1.0)
    w_u = np.zeros((k, 1))
    c_u = 0.0
    n = m_u
    if m_u:
        if score_user:
            if user_updated:
                w_u = target_weights(user_W_now, Q, item, k)
            else:
                w_u = target_weights(user_W, Q, item, k)
            c_u = np.sum(user_reg_theta * w_u)
        # the user's ratings no exact score must be returned for: bounded first (`user_effect_bounds`)
        pruned = score_user and prune_user and user_settled
        upper = np.empty(m_u if pruned else 0)
        lower = np.empty(m_u if pruned else 0)
        skip = np.zeros(m_u if pruned else 0, np.bool_)
        if pruned:
            gsum = np.empty((k, w_u.shape[1]))
            if user_updated:
                for b in range(k):
                    for p in range(w_u.shape[1]):
                        gsum[b, p] = user_Wg_now[b, p] + user_theta[b, p]
            q_norm = np.empty(k)
            for b in range(k):
                q_norm[b] = np.sqrt(user_x2_max[b]) * (1.0 + 1e-12)
            for n in range(m_u):
                skip[n] = (user_updated and user_moved[n]) or user_others[n] == item or user_examples[n] >= settled_below
            user_effect_bounds(skip, user_others, Q, BI, user_values, user_alpha, user_alpha_bounds, user_h,
                               user_spread, gsum, w_u, c_u, global_mean, q_norm, user_updated, lower, upper)
        scored = np.ones(m_u, np.bool_)
        floor = np.full(max(top, 1), -1.0)  # the largest lower bounds of |effect| (exact ones included)
        own = lo
        for n in range(m_u):
            ids[n] = user_examples[n]
            su[n] = True
            si[n] = user_others[n] == item
            if score_user:
                if pruned and not skip[n] and upper[n] < np.inf:
                    scored[n] = False
                    into_top(floor, lower[n])
                    continue
                if user_updated:
                    e = updated_rating_score(user_alpha_now, user_others, user_examples, values, n, Q, BI, user_theta,
                                             user_W_now, user_Wg_now, w_u, c_u, global_mean)
                else:
                    e = rating_score(user_alpha, user_others, n, Q, w_u, c_u)
                if si[n] and has_item and own < hi:  # the pair's own rating moved both rows
                    e += row_rating_score(item_updated, item_alpha, item_others, item_examples, values, own, P, BU,
                                          item_theta, item_W_now, item_Wg_now, w_i, c_i, global_mean)
                    own += 1
                eff[n] = e
                if user_settled and user_examples[n] < settled_below:
                    into_top(best, abs(e))
                    into_top(floor, abs(e))
        n = m_u
        if pruned:  # the user's other ratings: scored when their bound reaches the largest lower bounds
            for r in range(m_u):
                if scored[r] or upper[r] * (1 + 1e-6) + 1e-12 < floor[len(floor) - 1]:
                    continue
                if user_updated:
                    e = updated_rating_score(user_alpha_now, user_others, user_examples, values, r, Q, BI, user_theta,
                                             user_W_now, user_Wg_now, w_u, c_u, global_mean)
                else:
                    e = rating_score(user_alpha, user_others, r, Q, w_u, c_u)
                eff[r] = e
                scored[r] = True
                into_top(best, abs(e))
            n = 0
            for r in range(m_u):  # keep the scored ones, in row order
                if scored[r]:
                    ids[n], eff[n], su[n], si[n] = ids[r], eff[r], su[r], si[r]
                    n += 1
            for r in range(n, m_u):  # (the item's ratings are written from here on)
                eff[r] = 0.0
                su[r] = False
                si[r] = False
    if has_item and m_i:
        if prune:
            w_max = 0.0
            for b in range(k):
                s = 0.0
                for p in range(w_i.shape[1]):
                    s += w_i[b, p] * w_i[b, p]
                w_max = max(w_max, np.sqrt(s))
            pos, scores = pruned_row_scores(item_alpha, item_others, item_examples, item_beta, item_by_beta, P, w_i,
                                            c_i, w_max, lo, hi, settled_below, best, chunk, item_updated, item_moved,
                                            values, BU, item_theta, item_W_now, item_Wg_now, global_mean, beta_scale,
                                            beta_shift)
            for r in range(len(pos)):
                ids[n] = item_examples[pos[r]]
                eff[n] = scores[r]
                si[n] = True
                n += 1
        else:
            for i in range(m_i):
                if i >= lo and i < hi:
                    continue
                ids[n] = item_examples[i]
                eff[n] = row_rating_score(item_updated, item_alpha, item_others, item_examples, values, i, P, BU,
                                          item_theta, item_W_now, item_Wg_now, w_i, c_i, global_mean)
                si[n] = True
                n += 1
    return ids[:n], eff[:n], su[:n], si[:n], m_u + m_i - (hi - lo)


def _pair_prediction(P, Q, BU, BI, user, item, global_mean, lo, hi):
    """The clipped prediction of ``(user, item)`` from the tables (float64 arithmetic, as
    `recsys.models.mf.explain._Rows.prediction`)."""
    k = BU.shape[1]
    bu = 0.0
    bi = 0.0
    for b in range(k):
        bu += np.float64(BU[user, b])
        bi += np.float64(BI[item, b])
    dot = 0.0
    for j in range(P.shape[1]):
        dot += np.float64(P[user, j]) * np.float64(Q[item, j])
    raw = global_mean + bu / k + bi / k + dot / k
    return min(max(raw, lo), hi)


def _online_step_scores(user_factors, item_factors, user_bias, item_bias, owners, items, values, global_mean,
                        target_user, target_item, mine, theirs, reg_user, bias_reg_user, reg_item, bias_reg_item):
    """Effects of ratings learnt online by SGD (``MFExplainer._online_steps``, before the
    ``passes·lr`` scale): per rating ``(owner, item, value)`` with block errors ``e_b``, the
    user-row move ``(e_b q_b − reg_user·p_b, e_b − bias_reg_user·bu_b)`` scored on the target
    item's factors where ``mine``, plus the item-row move ``(e_b p_b − reg_item·q_b, e_b −
    bias_reg_item·bi_b)`` scored on the target user's factors where ``theirs``; summed over
    blocks, over ``K`` (float64 [m])."""
    k = user_bias.shape[1]
    d = user_factors.shape[1] // k
    m = len(owners)
    out = np.zeros(m)
    for n in range(m):
        u, i = owners[n], items[n]
        total = 0.0
        for b in range(k):
            dot = 0.0
            for j in range(d):
                dot += np.float64(user_factors[u, b * d + j]) * np.float64(item_factors[i, b * d + j])
            bu, bi = np.float64(user_bias[u, b]), np.float64(item_bias[i, b])
            e = values[n] - (global_mean + bu + bi + dot)
            if mine[n]:
                s = 0.0
                for j in range(d):
                    dp = e * np.float64(item_factors[i, b * d + j]) - reg_user * np.float64(user_factors[u, b * d + j])
                    s += dp * np.float64(item_factors[target_item, b * d + j])
                total += s + (e - bias_reg_user * bu)
            if theirs[n]:
                s = 0.0
                for j in range(d):
                    dq = e * np.float64(user_factors[u, b * d + j]) - reg_item * np.float64(item_factors[i, b * d + j])
                    s += dq * np.float64(user_factors[target_user, b * d + j])
                total += s + (e - bias_reg_item * bi)
        out[n] = total / k
    return out


def _extend_row_chains(new, users, items, first, prev_user, prev_item, head_user, head_item, count_user,
                       count_item):
    """`recsys.models.mf.explain.RowIndex.extend`'s bookkeeping of the example ids ``new``
    (int64, each ``>= first``, rows of ratings whose users / items are ``users`` / ``items``,
    int64 by example id): each is chained to its user's and its item's previous one
    (``prev_user[z − first]``, ``prev_item[z − first]``: the previous example id, −1 for none),
    becomes the head of both chains (``head_user``, ``head_item`` by index, −1 for none) and
    counts (``count_user``, ``count_item``). ``O(len(new))``; ValueError (nothing written) for
    an id below ``first`` or past the arrays."""
    for n in range(len(new)):
        z = new[n]
        if z < first or z >= len(users) or z - first >= len(prev_user) or z - first >= len(prev_item):
            raise ValueError("RowIndex.extend: an example id is not an appended row (below the base ratings or past them)")
        if users[z] < 0 or users[z] >= len(head_user) or items[z] < 0 or items[z] >= len(head_item):
            raise ValueError("RowIndex.extend: a user or item index is past the chains' heads")
    for n in range(len(new)):
        z = new[n]
        u = users[z]
        i = items[z]
        prev_user[z - first] = head_user[u]
        head_user[u] = z
        count_user[u] += 1
        prev_item[z - first] = head_item[i]
        head_item[i] = z
        count_item[i] += 1


def _row_chain(head, prev, count, first):
    """The ``count`` example ids of one chain of `extend_row_chains` (from ``head``, following
    ``prev[z − first]``), in the order they were added (int64 ``[count]``)."""
    out = np.empty(count, np.int64)
    z = head
    for n in range(count - 1, -1, -1):
        out[n] = z
        z = prev[z - first]
    return out


def _insert_rows(a, at, rows):
    """``numpy.insert(a, at, rows, axis=0)`` for sorted ``at`` (one copy, in slices: ``np.insert``
    of a ``[m, K]`` array took 90 µs at m = 10,000, this 18 µs)."""
    out = np.empty((a.shape[0] + len(at),) + a.shape[1:], a.dtype)
    src = 0
    dst = 0
    for j in range(len(at)):
        n = at[j] - src
        out[dst:dst + n] = a[src:src + n]
        dst += n
        src += n
        out[dst] = rows[j]
        dst += 1
    out[dst:] = a[src:]
    return out


def _trained_mask(trained, users):
    """``trained[u]`` for each of ``users`` (False past ``trained``: users added since training)."""
    out = np.zeros(len(users), np.bool_)
    n = len(trained)
    for j in range(len(users)):
        u = users[j]
        out[j] = u >= 0 and u < n and trained[u]
    return out


def _record_moves(users, items, items_moved, clock, own_user, moved_user, own_item, moved_item, user_ring,
                  user_ring_factors, user_written, user_then, user_then_new, user_table, item_ring, item_ring_factors,
                  item_written, item_then, item_then_new, item_table):
    """`recsys.models.mf.explain.NewtonInfluence`'s stamps and histories for one invalidation
    at ``clock`` (larger than every stamp): ``users`` (int64, repeats allowed) moved;
    ``items`` (int64) gained ratings, and their parameters moved where ``items_moved``.
    Stamps ``own_user``, ``moved_user`` of each user and ``own_item`` of each item
    (``moved_item`` too where moved). For each moved user and item once (in order of first
    appearance) writes the record ``(row, its factors then)`` at slot ``(written + n) %
    len(ring)`` of its side's ring and copies its factors now (``user_table`` / ``item_table``,
    ``[n, K·d]`` float32) into the side's copy (the factors as of the last invalidation:
    ``then[r]`` for the rows it holds, ``then_new[r − len(then)]`` for those added since).

    Returns ``(user records, item records, items moved, users' rows needed, items' rows
    needed)``: when a stamp array or a side's copy is shorter than an index needs, nothing is
    written (records 0) and the caller grows it and calls again. ValueError for an index past
    the factor tables or negative."""
    top_u = 0
    for j in range(len(users)):
        u = users[j]
        if u < 0 or u >= len(user_table):
            raise ValueError("NewtonInfluence.invalidate: a user index is past the factor table")
        top_u = max(top_u, u + 1)
    top_i = 0
    for j in range(len(items)):
        i = items[j]
        if i < 0 or i >= len(item_table):
            raise ValueError("NewtonInfluence.invalidate: an item index is past the factor table")
        top_i = max(top_i, i + 1)
    if top_u > len(own_user) or top_u > len(moved_user) or top_i > len(own_item) or top_i > len(moved_item) \
            or top_u > len(user_then) + len(user_then_new) or top_i > len(item_then) + len(item_then_new):
        return 0, 0, 0, top_u, top_i
    n_users = 0
    for j in range(len(users)):
        u = users[j]
        if moved_user[u] == clock:
            continue
        moved_user[u] = clock
        own_user[u] = clock
        write_record(u, user_ring, user_ring_factors, user_written + n_users, user_then, user_then_new)
        n_users += 1
    for j in range(len(users)):  # after every record: a user listed twice is recorded once, before its move
        copy_row(users[j], user_then, user_then_new, user_table)
    n_items = 0
    n_moved = 0
    for j in range(len(items)):
        i = items[j]
        own_item[i] = clock
        if items_moved[j]:
            n_moved += 1
            if moved_item[i] != clock:
                moved_item[i] = clock
                write_record(i, item_ring, item_ring_factors, item_written + n_items, item_then, item_then_new)
                n_items += 1
    for j in range(len(items)):
        if items_moved[j]:
            copy_row(items[j], item_then, item_then_new, item_table)
    return n_users, n_items, n_moved, top_u, top_i


def _write_record(row, ring, ring_factors, at, then, then_new):
    """Record ``(row, its factors in the copy)`` at slot ``at % len(ring)`` (none in an empty ring)."""
    if len(ring) == 0:
        return
    slot = at % len(ring)
    ring[slot] = row
    n_then = len(then)
    if row < n_then:
        ring_factors[slot, :] = then[row, :]
    else:
        ring_factors[slot, :] = then_new[row - n_then, :]


def _copy_row(row, then, then_new, table):
    """``table[row]`` into the copy (``then`` or, for a row added since, ``then_new``)."""
    n_then = len(then)
    if row < n_then:
        then[row, :] = table[row, :]
    else:
        then_new[row - n_then, :] = table[row, :]


def _stamp_rows(stamps, rows, mask, clock):
    """``stamps[rows[j]] = clock`` where ``mask[j]``; returns ``(rows stamped, size needed)``:
    nothing is written when ``stamps`` is shorter than a masked row needs."""
    top = 0
    n = 0
    for j in range(len(rows)):
        if mask[j]:
            if rows[j] < 0:
                raise ValueError("a negative row index")
            top = max(top, rows[j] + 1)
            n += 1
    if top > len(stamps):
        return 0, top
    for j in range(len(rows)):
        if mask[j]:
            stamps[rows[j]] = clock
    return n, top


newton_row_tiles = variant(_newton_row_tiles, "serial", nogil=True, fastmath=_REASSOC)
newton_row_tiled = variant(_newton_row_tiled, "serial", nogil=True, fastmath=_REASSOC)
newton_row = variant(_newton_row, "serial", nogil=True, fastmath=_REASSOC)
updated_weights = variant(_updated_weights, "serial", nogil=True, fastmath=_REASSOC)
fold_in_leave_one_out = variant(_fold_in_leave_one_out, "serial", nogil=True, fastmath=_REASSOC)
pruned_row_scores = variant(_pruned_row_scores, "serial", nogil=True, fastmath=_REASSOC)
pair_scores_updated = variant(_pair_scores_updated, "serial", nogil=True, fastmath=_REASSOC)
pair_scores = variant(_pair_scores, "serial", nogil=True, fastmath=_REASSOC)
pair_prediction = variant(_pair_prediction, "serial", nogil=True, fastmath=_REASSOC)
online_step_scores = variant(_online_step_scores, "serial", nogil=True, fastmath=_REASSOC)
extend_row_chains = variant(_extend_row_chains, "serial", nogil=True)
row_chain = variant(_row_chain, "serial", nogil=True)
trained_mask = variant(_trained_mask, "serial", nogil=True)
insert_rows = variant(_insert_rows, "serial", nogil=True)
write_record = variant(_write_record, "serial", nogil=True)
copy_row = variant(_copy_row, "serial", nogil=True)
record_moves = variant(_record_moves, "serial", nogil=True)
stamp_rows = variant(_stamp_rows, "serial", nogil=True)

__all__ = ["extend_row_chains", "fold_in_leave_one_out", "gram_of_inverse", "insert_rows", "lower_cholesky_inverse", "lower_gram_change", "newton_row", "online_step_scores",
           "pair_prediction", "pair_scores", "pair_scores_updated", "pruned_row_scores", "rating_score", "record_moves",
           "copy_row", "row_chain", "row_rating_score", "stamp_rows", "target_weights", "trained_mask", "updated_rating_score",
           "updated_weights", "user_alpha_intervals", "user_effect_bounds", "user_effect_bounds_rows", "write_record"]
