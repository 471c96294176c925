"""Explanation estimates: plain rollback equals brute-force removal where no later step touches
the example's rows; the one-row Newton estimate is exact for a row at its ridge optimum; sign
and scale conventions; the `explain` output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.errors import UnknownIdError
from recsys.experiments.faithfulness import Setup, raw_prediction, retrain
from recsys.explain.influence import candidates, estimate_effects, explain, explain_recommendations
from recsys.explain.rollback import RollbackCallback
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.train import TrainConfig, Trainer


def _setup(n_blocks=2, epochs=1, **kw) -> Setup:
    return Setup(MFConfig(embedding_size=8, n_blocks=n_blocks),
                 TrainConfig(epochs=epochs, learning_rate=0.05, sampler="fixed", patience=None, progress=False, **kw))


def _fit(r, setup, mode="compact"):
    model = MatrixFactorization(r.n_users, r.n_items, r.rating_scale, setup.model)
    cb = RollbackCallback(mode=mode)
    Trainer(setup.train, callbacks=[cb]).fit(model, r)
    return model, cb.log


def _last_untouched(r) -> int:
    """An example whose user and item are visited by no later example (fixed order)."""
    for z in range(len(r) - 1, -1, -1):
        later = slice(z + 1, None)
        if r.users[z] not in r.users[later] and r.items[z] not in r.items[later]:
            return z
    raise AssertionError("no such example")


def test_rollback_equals_brute_force_removal_when_no_later_step_touches_the_rows(small_ratings):
    r = small_ratings
    setup = _setup()
    model, log = _fit(r, setup, mode="exact")
    z = _last_untouched(r)
    u, i = int(r.users[z]), int(r.items[z])
    without = retrain(r, setup, [z])
    other_item = int(r.items[(r.users != u)][0])
    other_user = int(r.users[(r.items != i)][0])
    for x in ((u, i), (u, other_item), (other_user, i)):
        ids, eff, _, _ = estimate_effects(model, r, *x, method="rollback", log=log)
        true = raw_prediction(model, *x) - raw_prediction(without, *x)
        assert abs(true) > 1e-4
        assert eff[ids == z][0] == pytest.approx(true, abs=2e-6)


def test_compact_log_rollback_effects_agree_with_the_exact_log(small_ratings):
    # The same training logged both ways: the effects agree to a few percent and rank alike.
    r = small_ratings
    setup = _setup(epochs=6)
    model, exact = _fit(r, setup, mode="exact")
    _, compact = _fit(r, setup)
    for u, i in ((0, 5), (3, 4), (int(r.users[10]), int(r.items[10]))):
        _, e, _, _ = estimate_effects(model, r, u, i, method="rollback", log=exact)
        _, c, _, _ = estimate_effects(model, r, u, i, method="rollback", log=compact)
        assert np.linalg.norm(c - e) / np.linalg.norm(e) < 0.03
        assert np.argmax(np.abs(c)) == np.argmax(np.abs(e))


def test_rollback_error_is_measured_not_assumed_after_several_epochs(small_ratings):
    # With later visits the estimate is no longer exact, but on a tiny problem it still ranks.
    r = small_ratings
    setup = _setup(epochs=5)
    model, log = _fit(r, setup)
    u, i = int(r.users[0]), int(r.items[5])
    ids, eff, _, _ = estimate_effects(model, r, u, i, method="rollback", log=log)
    pick = np.argsort(-np.abs(eff))[:4]
    true = np.array([raw_prediction(model, u, i) - raw_prediction(retrain(r, setup, [ids[j]]), u, i) for j in pick])
    assert np.all(np.sign(true) == np.sign(eff[pick]))


def _ridge_user_row(model, r, u, drop=None):
    """The exact minimiser of the user's per-visit objective over [factors; bias] (items fixed)."""
    rows = np.flatnonzero(r.users == u)
    if drop is not None:
        rows = rows[rows != drop]
    Q = model.item_factors.weight.detach().double()[torch.from_numpy(r.items[rows])]
    X = torch.cat([Q, torch.ones(len(rows), 1, dtype=torch.float64)], 1)
    bi = model.item_bias.weight.detach().double()[torch.from_numpy(r.items[rows]), 0]
    y = torch.from_numpy(r.values[rows]).double() - float(model.global_mean) - bi
    lam = torch.tensor([float(model.reg_user[u])] * Q.shape[1] + [float(model.bias_reg_user[u])], dtype=torch.float64)
    sol = torch.linalg.solve(X.T @ X + len(rows) * torch.diag(lam), X.T @ y)
    return sol[:-1], sol[-1]


def test_newton_is_exact_for_a_row_at_its_ridge_optimum_and_pins_sign_and_scale(small_ratings):
    r = small_ratings
    setup = Setup(MFConfig(embedding_size=4, n_blocks=1), TrainConfig(epochs=3, patience=None, progress=False))
    model, _ = _fit(r, setup)
    u = int(r.users[0])
    item = int(np.setdiff1d(np.arange(r.n_items), r.items[r.users == u])[0])  # a pair not in training
    with torch.no_grad():
        p, b = _ridge_user_row(model, r, u)
        model.user_factors.weight[u] = p.float()
        model.user_bias.weight[u] = b.float()
    model.user_factors.weight.data = model.user_factors.weight.data.double()
    model.user_bias.weight.data = model.user_bias.weight.data.double()
    ids, eff, su, _ = estimate_effects(model, r, u, item, method="newton")
    q = model.item_factors.weight.detach().double()[item]
    bi = float(model.item_bias.weight.detach()[item, 0])
    full = float(model.global_mean) + bi + float(b) + float(p @ q)
    for j in np.flatnonzero(su):
        p2, b2 = _ridge_user_row(model, r, u, drop=ids[j])
        true = full - (float(model.global_mean) + bi + float(b2) + float(p2 @ q))
        assert eff[j] == pytest.approx(true, rel=1e-6, abs=1e-9)
    # a rating far above the prediction raised it: removing it lowers the prediction
    assert (np.sign(eff[su]) != 0).all()


def test_fia_agrees_with_newton_on_rows_with_many_ratings(small_ratings):
    r = small_ratings
    model, _ = _fit(r, _setup(n_blocks=1, epochs=10))
    u = int(np.argmax(r.user_counts()))
    i = int(np.setdiff1d(np.arange(r.n_items), r.items[r.users == u])[0])
    _, newton, _, _ = estimate_effects(model, r, u, i, method="newton")
    _, fia, _, _ = estimate_effects(model, r, u, i, method="fia")
    assert np.corrcoef(newton, fia)[0, 1] > 0.8


def test_explain_returns_the_top_k_by_absolute_effect_with_raw_ids(small_ratings):
    r = small_ratings
    model, log = _fit(r, _setup(epochs=3))
    raw_u, raw_i = r.user_ids.raw(3), r.item_ids.raw(4)
    for method in ("newton", "rollback", "fia"):
        exp = explain(model, log, r, raw_u, raw_i, k=4, method=method)
        assert exp.method == method and exp.units == "rating points" and len(exp.contributions) == 4
        effects = [abs(c.effect) for c in exp.contributions]
        assert effects == sorted(effects, reverse=True)
        ids, _, _ = candidates(r, 3, 4)
        assert exp.n_candidates == len(ids)
        for c in exp.contributions:
            assert c.user == raw_u or c.item == raw_i
            assert r.values[c.example] == c.rating and c.timestamp == int(r.timestamps[c.example])
    assert explain(model, log, r, raw_u, raw_i).method == "newton"
    assert explain(model, log, r, raw_u, raw_i).to_dict()["contributions"][0]["shares"] in {"user", "item", "both"}
    with pytest.raises(UnknownIdError):
        explain(model, log, r, "no-such-user", raw_i)
    with pytest.raises(UnknownIdError):
        explain(model, log, r, raw_u, "no-such-item")
    with pytest.raises(ValueError, match="needs the model's RollbackLog"):
        explain(model, None, r, raw_u, raw_i, method="rollback")
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain(model, log, r, raw_u, raw_i, method="lime")


def test_recommendations_are_explained_and_exclude_rated_items(small_ratings):
    r = small_ratings
    model, log = _fit(r, _setup(epochs=3))
    raw_u = r.user_ids.raw(2)
    exps = explain_recommendations(model, log, r, raw_u, n=3, k=2)
    rated = {r.item_ids.raw(int(i)) for i in r.items[r.users == 2]}
    assert len(exps) == 3 and not ({e.item for e in exps} & rated)
    assert all(len(e.contributions) == 2 for e in exps)


def test_cached_newton_equals_the_direct_estimate_and_follows_invalidation(small_ratings):
    from recsys.explain.influence import NewtonInfluence, estimate_effects
    from recsys.models import build_model
    from recsys.train import TrainConfig, Trainer

    r = small_ratings
    model = build_model("mf", r.n_users, r.n_items, r.rating_scale, {"embedding_size": 8, "n_blocks": 2})
    Trainer(TrainConfig(epochs=5, progress=False)).fit(model, r)
    cache = NewtonInfluence(model, r)
    pairs = [(int(r.users[z]), int(r.items[z])) for z in range(0, len(r), 37)] + [(0, r.n_items - 1), (3, 4)]
    for u, i in pairs:
        ids, direct = estimate_effects(model, r, u, i, "newton")[:2]
        ids2, cached = cache.effects(u, i)
        np.testing.assert_array_equal(ids, ids2)
        np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-7)
    u, i = pairs[0]
    with torch.no_grad():
        model.user_factors.weight[u] += 0.5
    stale = cache.effects(u, i)[1]
    cache.invalidate(users=[u])
    fresh = cache.effects(u, i)[1]
    np.testing.assert_allclose(fresh, estimate_effects(model, r, u, i, "newton")[1], rtol=1e-4, atol=1e-7)
    assert not np.allclose(stale, fresh)


def test_the_mf_explainer_caches_newton_by_default_and_follows_online_learning(small_ratings):
    """`MatrixFactorization.explainer`: None is the service's cached Newton, a named method is
    computed per query (what `explain` reports); after `learn`, `update` makes the new
    ratings candidates and refreshes the rows they moved."""
    from recsys.models.base import Explainer
    from tests.conftest import with_new_ratings

    r = small_ratings
    model, log = _fit(r, _setup(epochs=3))
    cached, direct = model.explainer(r, log), model.explainer(r, log, "newton")
    assert isinstance(cached, Explainer) and cached.method == direct.method == "newton"
    cached.warm()
    for u, i in ((3, 4), (0, 1), (int(r.users[10]), int(r.items[10]))):
        a, b = cached.explain(u, i, 5), direct.explain(u, i, 5)
        assert [c.example for c in a.contributions] == [c.example for c in b.contributions]
        np.testing.assert_allclose([c.effect for c in a.contributions], [c.effect for c in b.contributions],
                                   rtol=1e-4, atol=1e-7)
        assert b == explain(model, log, r, r.user_ids.raw(u), r.item_ids.raw(i), 5, "newton")
        assert a.prediction == pytest.approx(b.prediction, abs=1e-5)
    model.start_online(r, learning_rate=0.02)
    rollback = model.explainer(r, log, "rollback")
    ratings, new = with_new_ratings(r, [r.user_ids.raw(3), "newcomer"], [r.item_ids.raw(5), r.item_ids.raw(4)],
                                    [5.0, 1.0])
    model.learn(ratings, new)
    for ex in (cached, rollback):
        ex.update(ratings, new)
    fresh = model.explainer(ratings)
    got, want = cached.explain(3, 4, 50), fresh.explain(3, 4, 50)
    assert int(new[0]) in [c.example for c in got.contributions]
    np.testing.assert_allclose([c.effect for c in got.contributions], [c.effect for c in want.contributions],
                               rtol=1e-4, atol=1e-7)
    # the log's trajectory ended with training: newton, with the online rating's steps
    assert rollback.explain(3, 4, 3).method == "newton + online steps"
    newcomer = ratings.user_ids.index("newcomer")
    assert model.path(newcomer) == "fold-in" and model.path(3) == "online" and model.path(0) == "model"
    assert [c.example for c in cached.explain(newcomer, 4, 5).contributions][0] == int(new[1])
    ghost = cached.explain(-1, 4, 5)
    assert ghost.contributions == [] and ghost.method.startswith("none")


def _refolded_prediction(model, ratings, rows, item) -> float:
    """The prediction of ``item`` for a user folded in from the ratings ``rows`` alone."""
    p, b = model.fold_in_user(torch.from_numpy(ratings.items[rows]), torch.from_numpy(ratings.values[rows]))
    with torch.no_grad():
        return float(model.global_mean + b + model.item_bias.weight[item].mean()
                     + (p * model.item_factors.weight[item]).sum() / model.config.n_blocks)


def test_fold_in_users_are_explained_by_the_exact_refold_without_each_rating(small_ratings):
    """A user on the fold-in path is the ridge `fold_in_user` solved: each of their ratings'
    effect is the prediction minus that of the user re-folded without it (Sherman–Morrison,
    to 1e-5), also after they rate again; the item's other ratings keep the Newton estimate."""
    from tests.conftest import with_new_ratings

    r = small_ratings
    model, _ = _fit(r, _setup(epochs=3))
    model.start_online(r)
    items = [r.item_ids.raw(j) for j in (0, 2, 5, 7)]
    ratings, new = with_new_ratings(r, ["newcomer"] * 4, items, [5.0, 1.0, 4.0, 2.0])
    model.learn(ratings, new)
    explainer = model.explainer(ratings)
    u = ratings.user_ids.index("newcomer")
    assert model.path(u) == "fold-in"
    for step in range(2):
        mine = np.flatnonzero(ratings.users == u)
        for item in (1, 5, 9):
            ids, eff, su, si, method = explainer.effects(u, item)
            assert method.startswith("fold-in exact") and set(ids[su]) == set(mine) and not (su & si).any()
            base = _refolded_prediction(model, ratings, mine, item)
            assert raw_prediction(model, u, item) == pytest.approx(base, abs=1e-5)
            for z in mine:
                true = base - _refolded_prediction(model, ratings, mine[mine != z], item)
                assert eff[ids == z][0] == pytest.approx(true, abs=1e-5)
            assert si.sum() == (ratings.items[ids] == item).sum() - (item in ratings.items[mine])
        if step == 0:  # the user rates again: re-folded, and explained from the new fold
            ratings, more = with_new_ratings(ratings, ["newcomer"], [r.item_ids.raw(9)], [3.0])
            model.learn(ratings, more)
            explainer.update(ratings, more)
    top = explainer.explain(u, 1, 2)
    assert top.method.startswith("fold-in exact") and len(top.contributions) == 2


def test_newton_damping_by_the_summed_learning_rate_only_shrinks_unconverged_directions(small_ratings):
    """`NewtonInfluence(learning_rate_sum=S)` damps by ``1 − exp(−S·h)``: a huge summed rate
    (every direction converged) is the plain estimate, a tiny one leaves almost nothing."""
    from recsys.explain.influence import NewtonInfluence

    r = small_ratings
    model, _ = _fit(r, _setup(epochs=3))
    plain = NewtonInfluence(model, r)
    for u, i in ((3, 4), (0, 1)):
        ids, eff = plain.effects(u, i)
        ids_c, converged = NewtonInfluence(model, r, learning_rate_sum=1e6).effects(u, i)
        _, tiny = NewtonInfluence(model, r, learning_rate_sum=1e-6).effects(u, i)
        np.testing.assert_array_equal(ids, ids_c)
        np.testing.assert_allclose(converged, eff, rtol=1e-4, atol=1e-7)
        assert np.abs(tiny).max() < 1e-3 * np.abs(eff).max()
    with pytest.raises(ValueError, match="learning_rate_sum"):
        NewtonInfluence(model, r, learning_rate_sum=0.0)


def test_contracted_rollback_is_the_linear_rollback_when_nothing_contracts(small_ratings):
    """`contracted_rollback` maps each logged row update by ``(I − e^{−SA})(SA)⁻¹``: as the
    summed rate goes to 0 that is the identity, i.e. plain rollback's linear terms."""
    from recsys.models.mf.explain import contracted_rollback

    r = small_ratings
    model, log = _fit(r, _setup(epochs=3), mode="exact")
    u, i = int(r.users[7]), int(r.items[3])
    ids, eff, su, si = estimate_effects(model, r, u, i, "rollback", log)
    ids_c, small = contracted_rollback(model, r, log, u, i, 1e-9)
    np.testing.assert_array_equal(ids, ids_c)
    single = ~(su & si)
    np.testing.assert_allclose(small[single], eff[single], rtol=1e-5, atol=1e-8)
    _, damped = contracted_rollback(model, r, log, u, i, 5.0)
    assert np.abs(damped).sum() < np.abs(small).sum()
    with pytest.raises(ValueError, match="learning_rate_sum"):
        contracted_rollback(model, r, log, u, i, 0.0)


def test_ratings_learnt_online_are_explained_by_the_steps_they_took(small_ratings):
    """A trained user's ratings learnt online moved their rows by a few online SGD steps: their
    effects match re-running the online learning without each rating (the truth), not a
    Newton step to a row optimum they never reached; method says so."""
    import copy

    from tests.conftest import with_new_ratings

    r = small_ratings
    model, _ = _fit(r, _setup(epochs=3))
    model.start_online(r, learning_rate=0.02)
    before = copy.deepcopy(model)
    items = [r.item_ids.raw(j) for j in (1, 6, 8)]
    ratings, new = with_new_ratings(r, [r.user_ids.raw(3)] * 3, items, [5.0, 1.0, 4.0])
    model.learn(ratings, new)
    explainer = model.explainer(ratings)
    assert model.path(3) == "online"
    for item in (2, 6):
        ids, eff, su, _, method = explainer.effects(3, item)
        assert method == "newton + online steps"
        base = raw_prediction(model, 3, item)
        for z in new:
            again = copy.deepcopy(before)
            again.learn(ratings, new[new != z])
            true = base - raw_prediction(again, 3, item)
            assert abs(true) > 1e-4
            assert eff[ids == z][0] == pytest.approx(true, rel=0.1, abs=1e-5)


def _per_rating_newton_vectors(model, r, side, row, learning_rate_sum=None):
    """The previous cache's representation, written out as a reference: for every rating ``i``
    of one row, ``s_i = A⁻¹u_i`` with ``u_i = ∇ℓ_i + x_i (x_iᵀA⁻¹∇ℓ_i)/(1 − x_iᵀA⁻¹x_i)``
    (damped: ``(I − e^{−SA}) s_i``), ``[m, K, d+1]``, in the row's CSR order."""
    k, d = model.config.n_blocks, model.block_size
    csr = r.by_user if side == "user" else r.by_item
    z = csr.examples[csr.row(row)]
    P = model.user_factors.weight.detach().numpy().astype(np.float64)
    Q = model.item_factors.weight.detach().numpy().astype(np.float64)
    BU = model.user_bias.weight.detach().numpy().astype(np.float64)
    BI = model.item_bias.weight.detach().numpy().astype(np.float64)
    vectors = np.zeros((len(z), k, d + 1))
    for b in range(k):
        blk = slice(b * d, (b + 1) * d)
        pu, qi = P[r.users[z], blk], Q[r.items[z], blk]
        resid = r.values[z] - (float(model.global_mean) + BU[r.users[z], b] + BI[r.items[z], b] + (pu * qi).sum(1))
        if side == "user":
            X, theta = np.c_[qi, np.ones(len(z))], np.r_[P[row, blk], BU[row, b]]
            lam = np.r_[np.full(d, float(model.reg_user[row])), float(model.bias_reg_user[row])]
        else:
            X, theta = np.c_[pu, np.ones(len(z))], np.r_[Q[row, blk], BI[row, b]]
            lam = np.r_[np.full(d, float(model.reg_item[row])), float(model.bias_reg_item[row])]
        A = X.T @ X + np.diag(max(len(z) - 1, 1) * lam)
        for j in range(len(z)):
            g = -resid[j] * X[j] + lam * theta
            a_x, a_g = np.linalg.solve(A, X[j]), np.linalg.solve(A, g)
            s = np.linalg.solve(A, g + X[j] * (X[j] @ a_g) / (1.0 - X[j] @ a_x))
            if learning_rate_sum is not None:
                h, V = np.linalg.eigh(A)
                s = V @ (-np.expm1(-h * learning_rate_sum) * (V.T @ s))
            vectors[j, b] = s
    return z, vectors


@pytest.mark.parametrize("learning_rate_sum", [None, 2.0])
def test_the_compact_newton_rows_give_the_per_rating_vectors_estimates(small_ratings, learning_rate_sum):
    """`NewtonInfluence` keeps per row ``W = A⁻¹`` and one ``α_i`` per rating and block instead
    of a ``[K, d+1]`` vector per rating: every effect equals scoring the per-rating vectors,
    ``−Σ_blocks s_i·x̃ / K``, to 1e-5 (undamped and damped)."""
    from recsys.explain.influence import NewtonInfluence

    r = small_ratings
    model, _ = _fit(r, _setup(epochs=3))
    cache = NewtonInfluence(model, r, learning_rate_sum=learning_rate_sum)
    k, d = model.config.n_blocks, model.block_size
    P = model.user_factors.weight.detach().numpy().astype(np.float64).reshape(-1, k, d)
    Q = model.item_factors.weight.detach().numpy().astype(np.float64).reshape(-1, k, d)
    ones = np.ones((k, 1))
    for u, i in ((3, 4), (0, 1), (int(r.users[10]), int(r.items[10])), (5, r.n_items - 1)):
        ids, eff, su, si, _ = cache.effects_and_shares(u, i)
        want = np.zeros(len(ids))
        for side, row, target, mask in (("user", u, np.c_[Q[i], ones], su), ("item", i, np.c_[P[u], ones], si)):
            z, s = _per_rating_newton_vectors(model, r, side, row, learning_rate_sum)
            pos = {int(e): j for j, e in enumerate(z)}
            for j in np.flatnonzero(mask):
                want[j] -= np.einsum("kj,kj->", s[pos[int(ids[j])]], target) / k
        np.testing.assert_allclose(eff, want, rtol=1e-5, atol=1e-5)
        assert np.abs(want).max() > 1e-3  # not trivially zero


def test_a_folded_in_users_ratings_refresh_only_the_rows_they_changed(small_ratings):
    """A fold-in is a ridge solve of the user's row alone: the items it rated gain a rating
    (their own rows are rebuilt) but no item parameter moved, so the rows of their other
    raters stay cached; the refreshed estimates equal a fresh explainer's."""
    from tests.conftest import with_new_ratings

    r = small_ratings
    model, _ = _fit(r, _setup(epochs=3))
    model.start_online(r, learning_rate=0.02)
    cached = model.explainer(r)
    cached.warm()
    item = 4
    raters = r.by_item.columns[r.by_item.row(item)]
    ratings, new = with_new_ratings(r, ["newcomer", "newcomer"], [r.item_ids.raw(item), r.item_ids.raw(6)],
                                    [5.0, 2.0])
    model.learn(ratings, new)
    cached.update(ratings, new)
    newcomer = ratings.user_ids.index("newcomer")
    assert model.path(newcomer) == "fold-in"
    fresh = model.explainer(ratings)
    for u in (int(raters[0]), newcomer):
        got, want = cached.explain(u, item, 50), fresh.explain(u, item, 50)
        assert [c.example for c in got.contributions] == [c.example for c in want.contributions]
        np.testing.assert_allclose([c.effect for c in got.contributions], [c.effect for c in want.contributions],
                                   rtol=1e-4, atol=1e-7)
    cache = cached._newton
    assert cache.current("user", int(raters[-1]))  # another rater of the item: kept, not rebuilt


def test_the_top_k_by_absolute_effect_breaks_ties_by_position():
    from recsys.models.mf.explain import _top

    eff = np.array([0.1, -0.5, 0.5, 0.0, 0.2, -0.2, 0.5])
    for k in range(len(eff) + 2):
        np.testing.assert_array_equal(_top(eff, k), np.argsort(-np.abs(eff), kind="stable")[:k])


def test_the_top_k_scored_in_bound_order_is_the_top_k_of_every_candidate(small_ratings):
    """For a long item row `NewtonInfluence` scores only the ratings whose bound on the effect
    can still reach the k-th largest: the explanation (contributions, effects, candidate count)
    is the one from scoring every candidate, and fewer candidates are scored."""
    r = small_ratings
    model, _ = _fit(r, _setup(epochs=3))
    pruned, full = model.explainer(r), model.explainer(r)
    pruned.warm()
    pruned._cache().prune_above = pruned._cache().prune_chunk = 2  # every item row is "long"
    scored_fewer = False
    counts = r.item_counts()
    for z in range(0, len(r), 23):
        u, i = int(r.users[z]), int(np.argmax(counts)) if z % 2 else int(r.items[z])
        for k in (1, 3, 10):
            a, b = pruned.explain(u, i, k), full.explain(u, i, k)
            assert [(c.example, c.shares) for c in a.contributions] == [(c.example, c.shares) for c in b.contributions]
            np.testing.assert_allclose([c.effect for c in a.contributions], [c.effect for c in b.contributions],
                                       rtol=1e-5)  # float32 products over fewer rows round differently
            assert (a.n_candidates, a.prediction, a.method) == (b.n_candidates, b.prediction, b.method)
            scored_fewer |= len(pruned._cache().effects_and_shares(u, i, top=k)[0]) < b.n_candidates
    assert scored_fewer


def test_the_row_index_follows_appended_ratings_in_csr_order_without_a_new_csr(small_ratings):
    """`RowIndex`: the training CSR plus the rows appended since gives every user's and
    item's ratings exactly as the grown `Ratings`' own CSR lists them."""
    from recsys.models.mf.explain import RowIndex
    from tests.conftest import with_new_ratings

    r = small_ratings
    index = RowIndex(r)
    ratings, new = with_new_ratings(r, [r.user_ids.raw(3), "newcomer", r.user_ids.raw(0)],
                                    [r.item_ids.raw(5), r.item_ids.raw(4), r.item_ids.raw(0)], [5.0, 1.0, 3.0])
    index.extend(ratings, new)
    more, new2 = with_new_ratings(ratings, [r.user_ids.raw(3)], [r.item_ids.raw(1)], [2.0])
    index.extend(more, new2)
    for side, csr, n in (("user", more.by_user, more.n_users), ("item", more.by_item, more.n_items)):
        for row in range(n):
            z, cols = index.row(side, row)
            np.testing.assert_array_equal(z, csr.examples[csr.row(row)])
            np.testing.assert_array_equal(cols, csr.columns[csr.row(row)])


@pytest.mark.parametrize("n_rated", [3, 9, 14])
def test_the_fold_in_leave_one_out_solved_in_either_space_equals_refolding(small_ratings, n_rated):
    """`FoldInLeaveOneOut` solves in the ratings' space when a user has at most D+1 ratings
    (here D+1 = 9) and in the factors' space past that: either way each rating's effect is
    the prediction minus that of the user re-folded without it."""
    from recsys.models.mf.explain import FoldInLeaveOneOut
    from tests.conftest import with_new_ratings

    r = small_ratings
    model, _ = _fit(r, _setup(epochs=3))
    model.start_online(r)
    rng = np.random.default_rng(n_rated)
    items = rng.choice(r.n_items, size=n_rated, replace=False)
    ratings, new = with_new_ratings(r, ["newcomer"] * n_rated, [r.item_ids.raw(int(j)) for j in items],
                                    rng.integers(1, 6, n_rated).astype(float).tolist())
    model.learn(ratings, new)
    u = ratings.user_ids.index("newcomer")
    mine = np.flatnonzero(ratings.users == u)
    loo = FoldInLeaveOneOut(model, ratings)
    for item in (0, 4, 11):
        base = _refolded_prediction(model, ratings, mine, item)
        want = [base - _refolded_prediction(model, ratings, mine[mine != z], item) for z in mine]
        np.testing.assert_allclose(loo.effects(u, item, mine), want, rtol=0, atol=1e-5)
        assert np.abs(want).max() > 1e-3


@pytest.mark.parametrize("changes_kept", [256, 1])
def test_cached_rows_are_rebuilt_exactly_when_a_row_they_hold_moved(small_ratings, changes_kept):
    """`update` only stamps the rows online learning moved; a cached row is rebuilt when next
    used if its own row or a row it holds (a rater, a rated item) moved since it was built,
    and kept otherwise. After each batch (trained users, a new user folded in, the folded-in
    user rating again) every explanation equals a fresh explainer's. ``changes_kept`` 1:
    staleness read from the stamps of every held row instead of the list of moved rows."""
    from tests.conftest import with_new_ratings

    r = small_ratings
    model, _ = _fit(r, _setup(epochs=3))
    model.start_online(r, learning_rate=0.02)
    cached = model.explainer(r)
    cached.warm()
    cache = cached._cache()
    cache.changes_kept = changes_kept
    rng = np.random.default_rng(0)
    ratings = r
    batches = [([3, 3], [1, 6]), (["newcomer"] * 3, [0, 2, 5]), ([7, "newcomer"], [4, 9]), ([3], [11]), ([12], [6])]
    for step, (users, items) in enumerate(batches):
        raw_users = [u if isinstance(u, str) else r.user_ids.raw(u) for u in users]
        ratings, new = with_new_ratings(ratings, raw_users, [r.item_ids.raw(j) for j in items],
                                        rng.integers(1, 6, len(items)).astype(float).tolist())
        model.learn(ratings, new)
        cached.update(ratings, new)
        if step == 0:  # user 3 and items 1, 6 moved
            rated_by_3 = set(ratings.items[ratings.users == 3].tolist())
            raters = set(ratings.users[np.isin(ratings.items, [1, 6])].tolist())
            assert not cache.current("user", 3) and not cache.current("item", 1) and not cache.current("item", 6)
            assert all(not cache.current("item", j) for j in rated_by_3)
            assert all(not cache.current("user", v) for v in raters)
            untouched_items = set(range(r.n_items)) - rated_by_3 - {1, 6}
            untouched_users = set(range(r.n_users)) - raters - {3}
            assert untouched_items and untouched_users
            assert all(cache.current("item", j) for j in untouched_items)
            assert all(cache.current("user", v) for v in untouched_users)
        fresh = model.explainer(ratings)
        for u in range(ratings.n_users):
            for i in range(step % 3, ratings.n_items, 3):
                got, want = cached.explain(u, i, 8), fresh.explain(u, i, 8)
                assert [c.example for c in got.contributions] == [c.example for c in want.contributions]
                np.testing.assert_allclose([c.effect for c in got.contributions],
                                           [c.effect for c in want.contributions], rtol=1e-5, atol=1e-8)
                assert (got.method, got.n_candidates) == (want.method, want.n_candidates)


@pytest.mark.parametrize("top", [1, 5])
def test_long_item_rows_updated_in_place_explain_as_rebuilt_rows(top):
    """A long item row is updated in place, not rebuilt, when its raters moved (online SGD of
    their ratings elsewhere; a folded-in user re-folded), when it gained ratings (from a
    new user, folded in: its parameters stay; from trained users, one of whom rated it
    before: online SGD moves it too): its ``A`` gains each rank-2 / rank-1 change and the
    ridge's, and the α of the ratings a query scores are computed then. Over the batches,
    with pruning on, every explanation equals a fresh explainer's (same top k in order,
    effects to 1e-5), the updated system equals the rebuilt one, and every rating of the
    updated row scored without pruning equals the rebuilt row's."""
    from recsys.models.mf.explain import NewtonInfluence
    from recsys.models.mf.explain_kernels import pair_scores_updated
    from tests.conftest import make_ratings, with_new_ratings

    r = make_ratings(n_users=120, n_items=8, n=700, seed=3)
    model, _ = _fit(r, _setup(epochs=3))
    model.start_online(r, learning_rate=0.02)
    cached = model.explainer(r)
    cache = cached._cache()
    cache.update_above = cache.prune_above = 20
    cache.prune_chunk = 4
    cached.warm()
    rng = np.random.default_rng(1)
    counts = r.item_counts()
    long_items = np.flatnonzero(counts > 20)
    assert len(long_items) >= 4
    hot = int(np.argmax(counts))
    raters = r.by_item.columns[r.by_item.row(hot)]
    cold = [j for j in range(r.n_items) if j != hot]
    # (the newcomer's items are never rated online by others: a folded-in user's cached
    # leave-one-out is kept while the items it was folded on move)
    batches = [([int(raters[0])] * 2, cold[2:4]), ([int(raters[5])], cold[4:5]), (["newcomer"] * 2, [cold[0], hot]),
               ([int(raters[9]), int(raters[11])], [cold[5], cold[2]]), (["newcomer"], [cold[1]]),
               ([int(raters[0])], [hot]), ([int(r.users[np.flatnonzero(r.items != hot)[0]])], [hot])]
    ratings = r
    for users, items in batches:
        raw_users = [u if isinstance(u, str) else r.user_ids.raw(u) for u in users]
        ratings, new = with_new_ratings(ratings, raw_users, [r.item_ids.raw(int(j)) for j in items],
                                        rng.integers(1, 6, len(users)).astype(float).tolist())
        model.learn(ratings, new)
        cached.update(ratings, new)
        fresh = model.explainer(ratings)
        fresh._cache().prune_above, fresh._cache().prune_chunk = 20, 4
        for u in range(0, ratings.n_users, 3):
            for i in long_items.tolist():
                got, want = cached.explain(u, i, top), fresh.explain(u, i, top)
                assert [c.example for c in got.contributions] == [c.example for c in want.contributions]
                np.testing.assert_allclose([c.effect for c in got.contributions],
                                           [c.effect for c in want.contributions], rtol=1e-5, atol=1e-8)
                assert (got.method, got.n_candidates) == (want.method, want.n_candidates)
        assert cache.updated("item", hot)
        fresh_cache = NewtonInfluence(model, ratings)
        fresh_cache.update_above = 20
        rebuilt = fresh_cache._build("item", hot)
        done, row = cache._updates[("item", hot)], cache._rows[("item", hot)]
        np.testing.assert_array_equal(row.examples, rebuilt.examples)
        np.testing.assert_array_equal(row.others, rebuilt.others)
        np.testing.assert_allclose(done.gram, rebuilt.gram, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(done.weights, rebuilt.weights, rtol=1e-5, atol=1e-7)
    assert cache.counts["updated"] >= len(batches)
    assert done.n_moved == 8  # raters 0, 5, 9 and 11 moved; 4 ratings gained
    u = int(raters[0])
    P, Q = model.user_factors.weight.detach().numpy(), model.item_factors.weight.detach().numpy()
    want_ids, want_eff, _, _, _ = NewtonInfluence(model, ratings).effects_and_shares(u, hot)
    empty = cache._empty
    got = pair_scores_updated(model.config.n_blocks, empty.examples, empty.others, empty.alpha, empty.weights,
                              empty.reg_theta, False, row.examples, row.others, done.alpha.copy(), row.weights,
                              done.reg_theta, row.beta, row.by_beta, True, P, Q, u, hot, False, 1,
                              np.iinfo(np.int64).max, True, 4, True, done.moved, ratings.values,
                              model.user_bias.weight.detach().numpy(), done.theta, done.weights, done.reg_weights,
                              float(model.global_mean), done.beta_scale, done.beta_shift, False, done.moved[:0],
                              empty.alpha.copy(), empty.alpha, done.theta, done.weights, done.reg_weights, done.h_spread,
                              model.item_bias.weight.detach().numpy(), False, empty.values,
                              np.zeros((0, model.config.n_blocks, 2), np.float32), empty.x2_max)
    mine = np.isin(want_ids, got[0])
    np.testing.assert_array_equal(got[0], want_ids[mine])
    np.testing.assert_allclose(got[1], want_eff[mine], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("history_kept", [2, 3])
def test_an_item_row_whose_movers_left_the_history_or_that_moved_too_often_is_rebuilt(history_kept):
    """An item row is rebuilt instead of updated in place when its moved raters' previous
    factors have left the history ring (3 moves: a ring of 2 records lost one, one of 3 did
    not and is updated), once more of its ratings than `update_moved_max` were gained or
    had their rater move, or once `updates_kept` other rows were updated since (it is
    dropped then); the explanations equal a fresh explainer's either way."""
    from tests.conftest import make_ratings, with_new_ratings

    r = make_ratings(n_users=120, n_items=8, n=700, seed=3)
    model, _ = _fit(r, _setup(epochs=3))
    model.start_online(r, learning_rate=0.02)
    cached = model.explainer(r)
    cache = cached._cache()
    cache.history_kept = history_kept  # read at construction: rebuild the ring small
    cache.__init__(model, r, index=cache.index)
    cache.update_above = cache.prune_above = 20
    cache.update_moved_max = 4
    cached.warm()
    hot = int(np.argmax(r.item_counts()))
    raters = r.by_item.columns[r.by_item.row(hot)]
    other = (hot + 1) % r.n_items
    ratings = r

    def rate(users: list[int]):
        nonlocal ratings
        ratings, new = with_new_ratings(ratings, [r.user_ids.raw(int(u)) for u in users],
                                        [r.item_ids.raw(other)] * len(users), [3.0] * len(users))
        model.learn(ratings, new)
        cached.update(ratings, new)

    def check(rebuilt: bool):
        before = cache._rows.get(("item", hot))
        got = cached.explain(int(raters[20]), hot, 3)
        assert (cache._rows[("item", hot)] is not before) == rebuilt and cache.updated("item", hot) == (not rebuilt)
        want = model.explainer(ratings).explain(int(raters[20]), hot, 3)
        assert [c.example for c in got.contributions] == [c.example for c in want.contributions]
        np.testing.assert_allclose([c.effect for c in got.contributions], [c.effect for c in want.contributions],
                                   rtol=1e-5)

    for step in range(3):  # three moves of 1 user each: a ring of 2 records loses the first
        rate([raters[1 + step]])
    check(rebuilt=history_kept < 3)
    rate([raters[4]])
    check(rebuilt=False)
    rate([raters[5], raters[6], raters[7], raters[8]])  # with the 1-4 moved before: past update_moved_max
    check(rebuilt=True)
    cache.updates_kept, cache.update_moved_max = 1, 64  # a second updated row drops the first
    second = next(int(j) for j in np.argsort(-r.item_counts()) if j not in (hot, other))
    rate([raters[9]])
    check(rebuilt=False)
    cached.explain(int(raters[20]), second, 3)  # (rebuilt: its raters moved longer ago than the ring reaches)
    rate([int(r.by_item.columns[r.by_item.row(second)][0])])
    cached.explain(int(raters[20]), second, 3)
    assert cache.updated("item", second) and not cache.updated("item", hot) and ("item", hot) not in cache._rows
    check(rebuilt=True)


def test_a_folded_in_users_leave_one_out_follows_the_items_it_was_folded_on(small_ratings):
    """`FoldInLeaveOneOut` re-folds on the item rows as they are now: once online SGD moved an
    item a folded-in user rated, the user's cached leave-one-out is recomputed, and the
    explanation equals a fresh explainer's (it kept the old one before)."""
    from tests.conftest import with_new_ratings

    r = small_ratings
    model, _ = _fit(r, _setup(epochs=3))
    model.start_online(r, learning_rate=0.05)
    cached = model.explainer(r)
    cached.warm()
    ratings, new = with_new_ratings(r, ["newcomer"] * 3, [r.item_ids.raw(j) for j in (0, 2, 5)], [5.0, 1.0, 4.0])
    model.learn(ratings, new)
    cached.update(ratings, new)
    newcomer = ratings.user_ids.index("newcomer")
    first = cached.explain(newcomer, 7, 3)
    ratings, new = with_new_ratings(ratings, [r.user_ids.raw(3), r.user_ids.raw(4)], [r.item_ids.raw(2)] * 2,
                                    [5.0, 5.0])
    model.learn(ratings, new)
    cached.update(ratings, new)
    got, want = cached.explain(newcomer, 7, 3), model.explainer(ratings).explain(newcomer, 7, 3)
    assert got.method == "fold-in exact + newton"
    assert [c.example for c in got.contributions] == [c.example for c in want.contributions]
    np.testing.assert_allclose([c.effect for c in got.contributions], [c.effect for c in want.contributions],
                               rtol=1e-6)
    mine = {c.example: c.effect for c in first.contributions if c.shares == "user"}
    assert any(abs(c.effect - mine[c.example]) > 1e-6 for c in got.contributions if c.example in mine)


def test_the_history_of_moved_users_gives_their_factors_at_any_clock_it_reaches():
    """`NewtonInfluence` keeps the factors moved users had before each move (a ring grown up
    to `history_kept` records): for any clock it still reaches, each user's factors then
    come back exactly; past it, None."""
    from recsys.models.mf.explain import NewtonInfluence
    from tests.conftest import make_ratings

    r = make_ratings(n_users=400, n_items=10, n=2000, seed=1)
    model, _ = _fit(r, _setup(epochs=1))
    cache = NewtonInfluence(model, r)
    cache.history_kept = 700  # read at construction
    cache.__init__(model, r)
    table = model.user_factors.weight.detach().numpy()
    snapshots = [table.copy()]
    rng = np.random.default_rng(0)
    for _ in range(6):  # 6 x 150 records: the ring grows from 256 to 700, then wraps
        users = rng.choice(r.n_users, size=150, replace=False)
        table[users] += rng.normal(size=(150, table.shape[1])).astype(np.float32)
        cache.invalidate(users)
        snapshots.append(table.copy())
    assert len(cache._history["user"].rows) == 700
    for clock in range(len(snapshots)):
        users = np.arange(0, r.n_users, 7)
        moved = [u for u in users if any((snapshots[c][u] != snapshots[clock][u]).any()
                                         for c in range(clock + 1, len(snapshots)))]
        got = cache._factors_before(np.asarray(moved), clock)
        if clock < 2:  # records of clocks 1 and 2 were overwritten
            assert got is None
        else:
            np.testing.assert_array_equal(got, snapshots[clock][moved])


def test_the_row_index_chains_many_appended_batches_in_arrival_order(small_ratings):
    """`RowIndex.extend` (compiled chains, grown as ratings and users arrive): after many
    batches of repeat raters, repeat items and new users, every row equals the grown
    `Ratings`' CSR and `appended` lists each row's appended ratings in arrival order; an id
    that is not an appended row is refused before anything is written."""
    from recsys.models.mf.explain import RowIndex
    from tests.conftest import with_new_ratings

    r = small_ratings
    index = RowIndex(r)
    rng = np.random.default_rng(3)
    ratings, newcomers = r, []
    for _ in range(60):
        size = int(rng.choice([1, 3, 80]))
        users = []
        for _ in range(size):
            if rng.random() < 0.1:
                newcomers.append(f"new{len(newcomers)}")
                users.append(newcomers[-1])
            elif newcomers and rng.random() < 0.2:
                users.append(newcomers[int(rng.integers(len(newcomers)))])
            else:
                users.append(r.user_ids.raw(int(rng.integers(3))))  # few users: long chains
        items = [r.item_ids.raw(int(rng.integers(r.n_items))) for _ in range(size)]
        ratings, new = with_new_ratings(ratings, users, items, rng.integers(1, 6, size).astype(float).tolist())
        index.extend(ratings, new)
    assert len(ratings) - len(r) > 1024  # the chains grew past their first size
    for side, csr, n in (("user", ratings.by_user, ratings.n_users), ("item", ratings.by_item, ratings.n_items)):
        of_side = ratings.users if side == "user" else ratings.items
        for row in range(n):
            z, cols = index.row(side, row)
            np.testing.assert_array_equal(z, csr.examples[csr.row(row)])
            np.testing.assert_array_equal(cols, csr.columns[csr.row(row)])
            appended = np.flatnonzero(of_side[len(r):] == row) + len(r)
            np.testing.assert_array_equal(index.appended(side, row), appended)
    heads = index._head["user"].copy()
    with pytest.raises(ValueError, match="not an appended row"):
        index.extend(ratings, np.array([len(ratings) - 1, 0]))
    np.testing.assert_array_equal(index._head["user"], heads)


def test_one_invalidation_records_each_moved_user_once_with_the_factors_before_it():
    """`NewtonInfluence.record` (the form `MFExplainer.update` uses): a user listed twice in
    one batch is recorded once, with the factors they had before the batch; users and items
    past the stamp arrays grow them; the stamps and lists of moved rows are `invalidate`'s."""
    from recsys.models.mf.explain import NewtonInfluence
    from tests.conftest import make_ratings

    r = make_ratings(n_users=50, n_items=10, n=400, seed=2)
    model, _ = _fit(r, _setup(epochs=1))
    direct, generic = NewtonInfluence(model, r), NewtonInfluence(model, r)
    table = model.user_factors.weight.detach().numpy()
    before = table.copy()
    users = np.array([4, 9, 4, 7], np.int64)
    table[[4, 7, 9]] += 1.0
    direct.record(users, np.array([2, 3, 2], np.int64), np.array([True, False, True]))
    generic.invalidate(users, [2, 2], [3])
    for cache in (direct, generic):
        assert cache._history["user"].written == 3
        np.testing.assert_array_equal(cache._factors_before(np.array([4, 7, 9]), 0), before[[4, 7, 9]])
        assert cache._own["user"][[4, 7, 9]].tolist() == [1, 1, 1] and cache._moved["item"][[2, 3]].tolist() == [1, 0]
        assert cache._own["item"][[2, 3]].tolist() == [1, 1]
    assert [c.tolist() for _, c in direct._changes["item"]] == [[2, 2]]
    assert [c.tolist() for _, c in generic._changes["item"]] == [[2, 2]]
    model.grow(3 * r.n_users, r.n_items)  # users the stamps and the copy of the factors have no room for yet
    newcomer = 3 * r.n_users - 1
    model.user_factors.weight.data[newcomer] = 2.0
    direct.record(np.array([newcomer], np.int64), np.zeros(0, np.int64), np.zeros(0, bool))
    assert len(direct._own["user"]) >= 3 * r.n_users and direct._own["user"][newcomer] == 2
    assert len(direct._moved["user"]) == len(direct._own["user"])
    assert len(direct._history["user"].then) == r.n_users  # the copy grows by its new part only
    np.testing.assert_array_equal(direct._history["user"].then_new[newcomer - r.n_users], 2.0)
    model.user_factors.weight.data[newcomer] = 3.0  # moves again: the ring keeps the factors before
    direct.record(np.array([newcomer], np.int64), np.zeros(0, np.int64), np.zeros(0, bool))
    np.testing.assert_array_equal(direct._factors_before(np.array([newcomer]), 2), 2.0)


def test_a_long_row_built_a_tile_at_a_time_equals_the_one_pass_build():
    """`explain_kernels.newton_row` builds rows of more than `_TILED_ABOVE` ratings
    `_ROW_TILE` ratings at a time (`_newton_row_tiled`): the same system, inverse and α as the
    one-pass build (to float rounding), a last partial tile included, and ``A`` the row's
    ``Σ x xᵀ + (m−1)λ``."""
    from recsys.models.mf import explain_kernels as kernels

    rng = np.random.default_rng(5)
    k, d, n_other = 2, 6, 9000
    other = (rng.normal(size=(n_other, k * d)) * 0.4).astype(np.float32)
    other_bias = (rng.normal(size=(n_other, k)) * 0.1).astype(np.float32)
    theta, lam = rng.normal(size=(k, d + 1)) * 0.3, np.full(d + 1, 0.05)
    for m in (3 * kernels._ROW_TILE + 17, kernels._TILED_ABOVE + 5):
        others = np.sort(rng.choice(n_other, m, replace=False)).astype(np.int32)
        values = rng.integers(1, 6, m).astype(np.float64)
        tiled = kernels.newton_row_tiled(theta, other, other_bias, others, values, 3.5, lam)
        one_pass = kernels.newton_row(theta, other, other_bias, others, values, 3.5, lam)
        if m > kernels._TILED_ABOVE:  # newton_row itself goes by tiles: check A against its definition
            X = np.concatenate([other[others].astype(np.float64).reshape(m, k, d), np.ones((m, k, 1))], axis=2)
            want = np.einsum("mki,mkj->kij", X, X) + (m - 1) * np.diag(lam)
            np.testing.assert_allclose(tiled[0], want, rtol=1e-12, atol=1e-9)
        for got, ref in zip(tiled, one_pass, strict=True):
            rtol = 1e-6 if got.dtype == np.float32 else 1e-10
            np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-9)


def _heavy_user_explainer():
    """Ratings where a few users hold more than 40 ratings, a model learning online from them
    and its warmed explainer with rows of more than 40 ratings updated in place: ``(ratings,
    model, explainer, its NewtonInfluence cache)``."""
    from tests.conftest import make_ratings

    r = make_ratings(n_users=30, n_items=150, n=2400, seed=4)
    model, _ = _fit(r, _setup(epochs=3))
    model.start_online(r, learning_rate=0.02)
    cached = model.explainer(r)
    cache = cached._cache()
    cache.update_above = 40
    cached.warm()
    return r, model, cached, cache


@pytest.mark.parametrize("top", [1, 5])
def test_a_long_user_row_updated_in_place_explains_as_its_rebuilt_row(top):
    """A user row of more than `update_above` ratings whose own parameters moved (the user
    rated online), that gained ratings (a repeat rating included) and whose items moved
    (others rated them) is updated in place, not rebuilt: its ``A`` gains the changes' terms,
    and a pruned query scores exactly only the ratings it must (gained, item moved, the
    pair's own) and those whose bound on ``|effect|`` (from the build's ``h`` and ``ε``) can
    reach the top: every explanation equals a fresh explainer's (same top k in order,
    effects to 1e-5), the system equals the rebuilt one, and most ratings are not scored."""
    from recsys.models.mf.explain import NewtonInfluence
    from tests.conftest import with_new_ratings

    r, model, cached, cache = _heavy_user_explainer()
    rng = np.random.default_rng(2)
    heavy = [int(u) for u in np.argsort(-r.user_counts())[:3]]
    assert r.user_counts()[heavy].min() > 40
    mine = r.items[r.users == heavy[0]]
    others = [u for u in range(r.n_users) if u not in heavy]
    batches = [([heavy[0]] * 2, [int(j) for j in rng.choice(r.n_items, 2, replace=False)]),
               ([others[0], others[1]], [int(mine[0]), int(mine[3])]),  # items the heavy user rated move
               ([heavy[0]], [int(mine[5])]),  # a repeat rating: after the earlier one
               ([heavy[1], heavy[0], others[2]], [int(mine[7]), int(rng.integers(r.n_items)), int(mine[9])])]
    ratings, skipped = r, 0
    for users, items in batches:
        ratings, new = with_new_ratings(ratings, [r.user_ids.raw(u) for u in users],
                                        [r.item_ids.raw(j) for j in items],
                                        rng.integers(1, 6, len(users)).astype(float).tolist())
        model.learn(ratings, new)
        cached.update(ratings, new)
        fresh = model.explainer(ratings)
        for u in heavy:
            for i in rng.choice(r.n_items, 12, replace=False).tolist() + [int(mine[5])]:
                got, want = cached.explain(u, i, top), fresh.explain(u, i, top)
                assert [c.example for c in got.contributions] == [c.example for c in want.contributions]
                np.testing.assert_allclose([c.effect for c in got.contributions],
                                           [c.effect for c in want.contributions], rtol=1e-5, atol=1e-8)
                assert (got.method, got.n_candidates, got.prediction) == (want.method, want.n_candidates,
                                                                         want.prediction)
                ids, _, su, _, _ = cache.effects_and_shares(u, i, top=top)
                skipped += int(ratings.user_counts()[u] - su.sum())
        assert cache.updated("user", heavy[0])
        fresh_cache = NewtonInfluence(model, ratings)
        fresh_cache.update_above = 40
        rebuilt = fresh_cache._build("user", heavy[0])
        done, row = cache._updates[("user", heavy[0])], cache._rows[("user", heavy[0])]
        np.testing.assert_array_equal(row.examples, rebuilt.examples)
        np.testing.assert_array_equal(row.others, rebuilt.others)
        np.testing.assert_allclose(done.gram, rebuilt.gram, rtol=1e-9, atol=1e-9)
    assert skipped > 0.5 * len(batches) * len(heavy) * 13 * 40  # most of the users' ratings were never scored
    ids, eff = cache.effects(heavy[0], int(mine[5]))  # every candidate: the same as a fresh explainer's
    want_ids, want_eff = NewtonInfluence(model, ratings).effects(heavy[0], int(mine[5]))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(eff, want_eff, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("rated_online", [False, True])
def test_the_user_rows_float32_bounds_hold_every_ratings_exact_effect(rated_online):
    """`explain_kernels.user_effect_bounds` (float32 dot products, their rounding bounded)
    brackets the exact ``|effect|`` of every rating it bounds, on a current long user row
    (the build's α) and on one updated in place after the user rated online (α' within an
    interval from the build's ``h``, computed once per update and kept): ``low ≤ |effect| ≤
    high``, and tightly enough to prune (median width: within 1e-4 of the effect on the current
    row, 5e-2 on the updated one, whose ``h'`` is only known within ``ε·max‖x‖²``)."""
    from recsys.models.mf.explain_kernels import (
        rating_score,
        target_weights,
        updated_rating_score,
        user_effect_bounds,
    )
    from tests.conftest import with_new_ratings

    r, model, cached, cache = _heavy_user_explainer()
    heavy = int(np.argmax(r.user_counts()))
    rng = np.random.default_rng(5)
    if rated_online:
        other = (heavy + 1) % r.n_users
        mine = r.items[r.users == heavy]
        ratings, new = with_new_ratings(r, [r.user_ids.raw(u) for u in (heavy, heavy, other)],
                                        [r.item_ids.raw(int(j)) for j in (*rng.choice(r.n_items, 2, replace=False), mine[0])],
                                        [4.0, 1.0, 5.0])
        model.learn(ratings, new)
        cached.update(ratings, new)
        cached.explain(heavy, 0, 3)
        assert cache.updated("user", heavy)
    k = model.config.n_blocks
    Q, BI = model.item_factors.weight.detach().numpy(), model.item_bias.weight.detach().numpy()
    mu = float(model.global_mean)
    row = cache._row("user", heavy, update=True)
    done = cache._updates.get(("user", heavy))
    assert (done is not None) == rated_online
    m = len(row.examples)
    bounded, widths = 0, []
    for i in range(0, r.n_items, 5):
        weights = done.weights if done is not None else row.weights
        w = target_weights(weights, Q, i, k)
        c = float(np.sum((done.reg_theta if done is not None else row.reg_theta) * w))
        skip = (done.moved.copy() if done is not None else np.zeros(m, bool)) | (row.others == i)
        low, high = np.empty(m), np.empty(m)
        gsum = done.reg_weights + done.theta if done is not None else np.zeros((k, w.shape[1]))
        user_effect_bounds(skip, row.others, Q, BI, row.values, row.alpha,
                           done.alpha_bounds if done is not None else np.zeros((0, k, 2), np.float32), row.h,
                           done.h_spread if done is not None else np.zeros(k), gsum, w, c, mu,
                           np.sqrt(row.x2_max) * (1 + 1e-12), done is not None, low, high)
        for n in np.flatnonzero(~skip):
            if done is not None:
                exact = abs(updated_rating_score(done.alpha, row.others, row.examples, cached.ratings.values, n, Q, BI,
                                                 done.theta, done.weights, done.reg_weights, w, c, mu))
            else:
                exact = abs(rating_score(row.alpha, row.others, n, Q, w, c))
            assert low[n] <= exact <= high[n], (n, low[n], exact, high[n])
            widths.append((high[n] - low[n]) / exact)
            bounded += 1
    assert bounded > 0.8 * m * len(range(0, r.n_items, 5))
    assert np.median(widths) < (5e-2 if rated_online else 1e-4)


def test_a_row_of_no_ratings_is_built_and_explained():
    """An item no training rating names (as some are in MovieLens' u1 split) has a row of
    no ratings: `newton_row` builds it (``A`` is the ridge alone, no α) and a prediction of
    it is explained from the user's ratings alone, as a fresh estimate does."""
    from recsys.models.mf.explain_kernels import newton_row
    from tests.conftest import make_ratings

    k, d = 2, 3
    theta = np.ones((k, d + 1))
    lam = np.full(d + 1, 0.5)
    A, A_inv, alpha, beta, h_max, x2_max, h = newton_row(theta, np.zeros((4, k * d), np.float32),
                                                        np.zeros((4, k), np.float32), np.zeros(0, np.int32),
                                                        np.zeros(0), 3.0, lam)
    assert alpha.shape == (0, k) and beta.shape == (0,) and h.shape == (0, k)
    np.testing.assert_allclose(A, np.broadcast_to(np.diag(lam), (k, d + 1, d + 1)))
    np.testing.assert_allclose(A_inv, np.broadcast_to(np.diag(1 / lam), (k, d + 1, d + 1)))
    from recsys.ratings import Ratings

    full = make_ratings(n_users=20, n_items=30, n=300, seed=2)
    keep = full.items != 7  # item 7 keeps its index, and no rating
    r = Ratings.from_arrays([full.user_ids.raw(int(u)) for u in full.users[keep]],
                            [full.item_ids.raw(int(i)) for i in full.items[keep]], full.values[keep], rating_scale=(1, 5),
                            user_ids=full.user_ids, item_ids=full.item_ids)
    assert r.item_counts()[7] == 0
    model, _ = _fit(r, _setup())
    u, i = int(r.users[0]), 7
    got, want = model.explainer(r).explain(u, i, 3), model.explainer(r, method="newton").explain(u, i, 3)
    assert [c.example for c in got.contributions] == [c.example for c in want.contributions]
    assert all(c.shares == "user" for c in got.contributions)
