"""The `implicit` wrappers (ALS, BPR): the same factors as the library called directly, fold-in
equal to the library's user solve, exact ALS explanations that sum to the score, artefacts
that score identically, popularity for unknown users, clear errors for bad configs."""

from __future__ import annotations

import implicit.cpu.als
import implicit.cpu.bpr
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recsys.artefact import load_artefact, save_artefact
from recsys.models import MODELS, build_model
from recsys.models.base import Explainable, FoldIn, OnlineLearner, RankingModel
from recsys.models.implicit import ALS, BPR, ALSConfig, BPRConfig
from recsys.models.implicit.bpr import bpr_user_solve
from recsys.models.implicit.explain import ALS_METHOD, POPULARITY_REASON, RESIDUAL_TERM
from recsys.ratings import Ratings
from tests.conftest import make_ratings, require_ml100k, with_new_ratings

#: the library's own defaults for reg, alpha and input (the comparisons call it with them)
SMALL_ALS = {"embedding_size": 8, "iterations": 6, "seed": 3, "reg": 0.01, "alpha": 1.0, "weighting": "binary"}
SMALL_BPR = {"embedding_size": 8, "iterations": 30, "seed": 3, "num_threads": 1, "learning_rate": 0.05}


@pytest.fixture(scope="module")
def data() -> Ratings:
    return make_ratings(n_users=40, n_items=30, n=500, seed=2)


def binary_csr(r: Ratings) -> sp.csr_matrix:
    """The CSR a user of the library would build by hand: one 1.0 per interaction."""
    m = sp.csr_matrix((np.ones(len(r), np.float32), (r.users, r.items)), shape=(r.n_users, r.n_items))
    m.sort_indices()
    return m


def fitted(name: str, r: Ratings, **config) -> RankingModel:
    base = SMALL_ALS if name == "als" else SMALL_BPR
    model = build_model(name, r.n_users, r.n_items, r.rating_scale, {**base, **config})
    model.fit(r)
    return model


def library_als(r: Ratings, **kw) -> implicit.cpu.als.AlternatingLeastSquares:
    lib = implicit.cpu.als.AlternatingLeastSquares(factors=8, iterations=6, random_state=3, **kw)
    lib.fit(binary_csr(r), show_progress=False)
    return lib


# ----------------------------------------------------------------------------- the contract
def test_both_are_registered_rankers_with_the_capabilities(data):
    for name, cls in (("als", ALS), ("bpr", BPR)):
        assert MODELS[name][0] is cls
        model = fitted(name, data)
        assert model.task == "ranking" and model.name == name
        assert isinstance(model, OnlineLearner) and isinstance(model, FoldIn) and isinstance(model, Explainable)
        scores = model.score_all(torch.arange(data.n_users))
        assert scores.shape == (data.n_users, data.n_items) and scores.dtype == torch.float32


# ----------------------------------------------------------------------------- against implicit
def test_als_factors_are_the_library_s_own(data):
    """Same data, seed and settings: the library's fitted factors, bit for bit."""
    model = fitted("als", data, exact_user_solve=False)
    lib = library_als(data)
    assert np.array_equal(model.item_factors.numpy(), lib.item_factors)
    assert np.array_equal(model.user_factors.numpy(), lib.user_factors)
    scores = model.score_all(torch.arange(data.n_users)).numpy()
    np.testing.assert_allclose(scores, lib.user_factors @ lib.item_factors.T, rtol=1e-5, atol=1e-6)


def test_als_exact_user_solve_is_the_library_s_recalculate_user(data):
    model = fitted("als", data)  # exact_user_solve=True (default)
    lib = library_als(data)
    assert np.array_equal(model.item_factors.numpy(), lib.item_factors)
    expected = lib.recalculate_user(np.arange(data.n_users), binary_csr(data))
    np.testing.assert_allclose(model.user_factors.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_als_confidence_alpha_and_weights_reach_the_library(data):
    """``scaled`` with ``values``: the library sees the ratings as weights and ``alpha``."""
    model = fitted("als", data, exact_user_solve=False, alpha=2.5, weighting="values")
    csr = binary_csr(data)
    csr.data = data.by_user.values.astype(np.float32)  # by_user is ordered (user, item) like the CSR
    lib = implicit.cpu.als.AlternatingLeastSquares(factors=8, iterations=6, random_state=3, alpha=2.5)
    lib.fit(csr, show_progress=False)
    assert np.array_equal(model.item_factors.numpy(), lib.item_factors)
    # one-plus: c = 1 + alpha·w handed over with the library's alpha at 1
    one_plus = fitted("als", data, exact_user_solve=False, alpha=2.5, weighting="values", confidence="one-plus")
    csr.data = 1 + 2.5 * csr.data
    lib = implicit.cpu.als.AlternatingLeastSquares(factors=8, iterations=6, random_state=3)
    lib.fit(csr, show_progress=False)
    np.testing.assert_allclose(one_plus.item_factors.numpy(), lib.item_factors, rtol=1e-5, atol=1e-6)


def test_bpr_factors_are_the_library_s_own_with_the_bias_column(data):
    model = fitted("bpr", data)
    lib = implicit.cpu.bpr.BayesianPersonalizedRanking(factors=8, iterations=30, random_state=3, num_threads=1,
                                                       learning_rate=0.05)
    lib.fit(binary_csr(data), show_progress=False)
    assert model.user_factors.shape == (data.n_users, 9) and model.item_factors.shape == (data.n_items, 9)
    assert np.array_equal(model.user_factors.numpy(), lib.user_factors)
    assert np.array_equal(model.item_factors.numpy(), lib.item_factors)
    assert torch.all(model.user_factors[:, -1] == 1)  # the user's bias slot: score = x·y + b_i
    u = 5
    top = torch.topk(model.score_all(torch.tensor([u]))[0], 5).indices.numpy()
    lib_scores = lib.user_factors[u] @ lib.item_factors.T
    assert set(top) == set(np.argsort(-lib_scores)[:5])


# ----------------------------------------------------------------------------- unknown users
def test_unknown_and_empty_users_get_popularity(data):
    r = data.subset(data.users != 7)  # user 7 keeps its index but has no interaction
    for name in ("als", "bpr"):
        model = fitted(name, r)
        scores = model.score_all(torch.tensor([-1, 7, 0]))
        counts = torch.from_numpy(r.item_counts().astype(np.float32))
        assert torch.equal(scores[0], counts) and torch.equal(scores[1], counts)
        assert not torch.equal(scores[2], counts)
        assert model.path(-1) == model.path(7) == "popularity" and model.path(0) == "model"
        with pytest.raises(IndexError):
            model.score_all(torch.tensor([r.n_users]))


def test_items_nobody_chose_are_ranked_last(data):
    r = data.subset(data.items != 4)
    model = fitted("als", r)
    scores = model.score_all(torch.arange(r.n_users))
    others = torch.cat([scores[:, :4], scores[:, 5:]], 1)
    assert torch.all(scores[:, 4] < others.min(1).values)


# ----------------------------------------------------------------------------- fold-in
def test_als_fold_in_is_the_library_s_recalculate_user(data):
    model = fitted("als", data)
    items, values = torch.tensor([1, 4, 9, 20]), torch.tensor([5.0, 3.0, 1.0, 4.0])
    row = model.fold_in_user(items, values)
    lib = implicit.cpu.als.AlternatingLeastSquares(factors=8)
    lib.item_factors = model.item_factors.numpy().copy()
    one = sp.csr_matrix((np.ones(4, np.float32), (np.zeros(4, int), items.numpy())), shape=(1, data.n_items))
    np.testing.assert_allclose(row.numpy(), lib.recalculate_user(0, one), rtol=1e-6, atol=1e-7)


def test_als_fold_in_of_a_fitted_user_gives_back_their_row(data):
    """With the exact user solve, refolding a user's unchanged interactions is a no-op."""
    model = fitted("als", data)
    for u in (0, 11, 39):
        rows = data.users == u
        row = model.fold_in_user(torch.from_numpy(data.items[rows]), torch.from_numpy(data.values[rows]))
        np.testing.assert_allclose(row.numpy(), model.user_factors[u].numpy(), rtol=1e-5, atol=1e-6)


def test_als_learn_folds_in_a_new_user_and_changes_a_fitted_user_s_list(data):
    model = fitted("als", data)
    model.start_online(data)
    before = model.score_all(torch.tensor([3]))[0].clone()
    raw = data.item_ids.raw
    fresh = np.setdiff1d(np.arange(data.n_items), data.items[data.users == 3])[:2]  # items 3 had not chosen
    ratings, new = with_new_ratings(data, ["new-user"] * 3 + [data.user_ids.raw(3)] * 2,
                                    [raw(1), raw(4), raw(9), raw(fresh[0]), raw(fresh[1])], [5.0, 4.0, 4.0, 5.0, 5.0])
    model.learn(ratings, new)
    v = ratings.user_ids.index("new-user")
    assert model.n_users >= ratings.n_users
    assert model.path(v) == "fold-in" and model.path(3) == "fold-in" and model.path(0) == "model"
    lib = implicit.cpu.als.AlternatingLeastSquares(factors=8)
    lib.item_factors = model.item_factors.numpy().copy()
    for u in (v, 3):
        mine = ratings.users == u
        one = sp.csr_matrix((np.ones(mine.sum(), np.float32), (np.zeros(mine.sum(), int), ratings.items[mine])),
                            shape=(1, data.n_items))
        np.testing.assert_allclose(model.user_factors[u].numpy(), lib.recalculate_user(0, one), rtol=1e-5, atol=1e-6)
    after = model.score_all(torch.tensor([3]))[0]
    assert not torch.equal(before, after)
    assert not torch.equal(model.score_all(torch.tensor([v]))[0], model.item_counts)  # no longer popularity


def test_a_pair_received_again_counts_once_with_its_latest_value(data):
    """Online, re-rating an item replaces its weight in the user's solve; it does not add to it."""
    model = fitted("als", data, weighting="values")
    u = 3
    item = int(data.items[data.users == u][0])
    ratings, new = with_new_ratings(data, [data.user_ids.raw(u)], [data.item_ids.raw(item)], [1.0])
    model.learn(ratings, new)
    mine = data.users == u
    values = data.values[mine].copy()
    values[data.items[mine] == item] = 1.0
    lib = implicit.cpu.als.AlternatingLeastSquares(factors=8)
    lib.item_factors = model.item_factors.numpy().copy()
    one = sp.csr_matrix((values, (np.zeros(mine.sum(), int), data.items[mine])), shape=(1, data.n_items))
    np.testing.assert_allclose(model.user_factors[u].numpy(), lib.recalculate_user(0, one), rtol=1e-5, atol=1e-6)


def test_bpr_fold_in_maximises_its_objective():
    """`bpr_user_solve` stops where the gradient of F vanishes and no nearby row does better."""
    rng = np.random.default_rng(0)
    items = rng.normal(0, 0.5, (40, 5))
    positives, pop, reg = np.array([1, 5, 7, 30]), rng.integers(1, 9, 40).astype(float), 0.05
    x = bpr_user_solve(items, positives, pop, reg, np.random.default_rng(0))
    neg = np.setdiff1d(np.arange(40), positives)
    pi = pop[neg] / pop[neg].sum()

    def objective(v):
        s = items[:, :4] @ v + items[:, 4]
        margin = s[positives][:, None] - s[neg][None, :]
        return float((-np.logaddexp(0, -margin) @ pi).sum() / len(positives) - 0.5 * reg * v @ v)

    eps = 1e-6
    grad = np.array([(objective(x + eps * e) - objective(x - eps * e)) / (2 * eps) for e in np.eye(4)])
    assert np.abs(grad).max() < 1e-6
    for _ in range(20):
        assert objective(x + rng.normal(0, 0.05, 4)) < objective(x)


def test_bpr_fold_in_moves_the_list_toward_the_user_s_items(data):
    model = fitted("bpr", data, iterations=100)
    model.start_online(data)
    u = 2
    theirs = data.items[data.users == u]
    ratings, new = with_new_ratings(data, ["twin"] * len(theirs), [data.item_ids.raw(i) for i in theirs],
                                    [1.0] * len(theirs))
    v = ratings.user_ids.index("twin")
    assert model.path(v) == "popularity"
    model.learn(ratings, new)
    assert model.path(v) == "fold-in" and bool(model.user_factors[v, -1] == 1)
    scores = model.score_all(torch.tensor([v]))[0].numpy()
    chosen = np.zeros(data.n_items, bool)
    chosen[theirs] = True
    auc = (scores[chosen][:, None] > scores[~chosen][None, :]).mean()
    fitted_scores = model.score_all(torch.tensor([u]))[0].numpy()
    fitted_auc = (fitted_scores[chosen][:, None] > fitted_scores[~chosen][None, :]).mean()
    assert auc > 0.9 and auc >= fitted_auc - 0.05
    popular = (model.item_counts.numpy()[chosen][:, None] > model.item_counts.numpy()[~chosen][None, :]).mean()
    assert auc > popular


# ----------------------------------------------------------------------------- explanations
def test_als_explanation_is_exact_and_is_implicit_s_explain(data):
    model = fitted("als", data)
    explainer = model.explainer(data)
    u, i = 6, 13
    exp = explainer.explain(u, i, k=1000)
    mine = np.flatnonzero(data.users == u)
    assert exp.method == ALS_METHOD and exp.units == "score" and exp.terms is None
    assert exp.n_candidates == len(mine) == len(exp.contributions)
    assert {c.example for c in exp.contributions} == set(mine.tolist())
    total = sum(c.effect for c in exp.contributions)
    assert total == pytest.approx(exp.prediction, rel=1e-5, abs=1e-6)
    assert exp.prediction == pytest.approx(float(model.score_all(torch.tensor([u]))[0, i]))
    # the library's explain, called directly on the user's row
    lib = implicit.cpu.als.AlternatingLeastSquares(factors=8)
    lib.item_factors = model.item_factors.numpy().copy()
    one = binary_csr(data)[u]
    score, top, _ = lib.explain(0, one, i, N=1000)
    assert score == pytest.approx(total, rel=1e-9)
    direct = {data.item_ids.raw(int(item)): effect for item, effect in top}
    assert {c.item: c.effect for c in exp.contributions} == pytest.approx(direct)
    top3 = explainer.explain(u, i, k=3).contributions
    assert [abs(c.effect) for c in top3] == sorted((abs(c.effect) for c in exp.contributions), reverse=True)[:3]


def test_als_explanation_reports_what_it_does_not_credit(data):
    """Without the exact user solve the row is the library's CG iterate: the gap is a term."""
    model = fitted("als", data, exact_user_solve=False, iterations=2)
    exp = model.explainer(data).explain(6, 13, k=1000)
    assert RESIDUAL_TERM in exp.terms
    assert sum(c.effect for c in exp.contributions) + exp.terms[RESIDUAL_TERM] == pytest.approx(exp.prediction)


def test_als_explanation_follows_online_interactions(data):
    model = fitted("als", data)
    explainer = model.explainer(data)
    explainer.explain(3, 13, k=5)  # caches user 3's solve
    ratings, new = with_new_ratings(data, [data.user_ids.raw(3)] * 2, [data.item_ids.raw(2), data.item_ids.raw(6)],
                                    [5.0, 5.0])
    model.learn(ratings, new)
    explainer.update(ratings, new)
    exp = explainer.explain(3, 13, k=1000)
    assert {int(new[0]), int(new[1])} <= {c.example for c in exp.contributions}
    assert sum(c.effect for c in exp.contributions) == pytest.approx(exp.prediction, rel=1e-5, abs=1e-6)


def test_bpr_explanation_is_labelled_approximate_and_adds_up(data):
    model = fitted("bpr", data)
    exp = model.explainer(data).explain(6, 13, k=1000)
    assert exp.method.startswith("approximate:") and exp.units == "score"
    assert set(exp.terms) == {"item bias", "user factors outside their items' span"}
    assert sum(c.effect for c in exp.contributions) + sum(exp.terms.values()) == pytest.approx(exp.prediction,
                                                                                               rel=1e-4, abs=1e-5)


def test_explaining_a_user_with_no_interaction_says_popularity(data):
    for name in ("als", "bpr"):
        model = fitted(name, data)
        exp = model.explainer(data).explain(-1, 3, k=3)
        assert exp.method == POPULARITY_REASON and exp.contributions == []
        assert exp.prediction == float(data.item_counts()[3])


# ----------------------------------------------------------------------------- artefacts
@pytest.mark.parametrize("name", ["als", "bpr"])
def test_artefact_round_trip_scores_identically(tmp_path, data, name):
    model = fitted(name, data)
    save_artefact(tmp_path / name, model, data)
    loaded = load_artefact(tmp_path / name).model
    assert type(loaded) is type(model) and loaded.config == model.config
    users = torch.tensor([-1, 0, 5, 39])
    assert torch.equal(loaded.score_all(users), model.score_all(users))
    # the loaded model folds in as the original does
    rows = data.users == 5
    items, values = torch.from_numpy(data.items[rows]), torch.from_numpy(data.values[rows])
    assert torch.allclose(loaded.fold_in_user(items, values), model.fold_in_user(items, values))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, bad", [
    ("als", {"embedding_size": 0}), ("als", {"reg": -1.0}), ("als", {"alpha": 0.0}),
    ("als", {"confidence": "log"}), ("als", {"weighting": "ratings"}), ("als", {"iterations": 0}),
    ("als", {"num_threads": -2}), ("bpr", {"learning_rate": 0.0}), ("bpr", {"embedding_size": 2.5}),
    ("bpr", {"fold_in_reg": -1.0}),
])
def test_bad_config_values_are_clear_errors(name, bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        build_model(name, 3, 3, (0.0, 1.0), bad)


def test_fit_and_fold_in_reject_mismatched_input(data):
    model = ALS(data.n_users + 1, data.n_items, data.rating_scale, ALSConfig(**SMALL_ALS))
    with pytest.raises(ValueError, match="built for"):
        model.fit(data)
    model = BPR(data.n_users, data.n_items, data.rating_scale, BPRConfig(**SMALL_BPR))
    with pytest.raises(IndexError, match="outside"):
        model.fold_in_user(torch.tensor([data.n_items]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="values"):
        model.fold_in_user(torch.tensor([1, 2]), torch.tensor([1.0]))


# ----------------------------------------------------------------------------- MovieLens
def test_als_and_bpr_beat_popularity_on_ml100k_u1(ml100k_u1):
    require_ml100k()
    from recsys.evaluate import evaluate_ranking

    train, test = ml100k_u1
    popularity = fitted("als", train)
    popularity.known_users.zero_()  # every user answered by popularity
    pop = evaluate_ranking(popularity, train, test, k=10)["ndcg"]
    for name, config in (("als", {"embedding_size": 64, "iterations": 15}), ("bpr", {"embedding_size": 64})):
        model = build_model(name, train.n_users, train.n_items, train.rating_scale, config)
        model.fit(train)
        assert evaluate_ranking(model, train, test, k=10)["ndcg"] > pop + 0.05
