"""EASE: the closed form on a hand-sized dataset, exact explanations, the memory guard, top-k
pruning, exact fold-in and online learning, artefacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.artefact import load_artefact, save_artefact
from recsys.evaluate import evaluate_ranking
from recsys.models import MODELS, build_model
from recsys.models.base import Explainable, FoldIn, OnlineLearner, RankingModel
from recsys.models.ease import EASE, EASEConfig
from recsys.models.ease.explain import METHOD, POPULARITY_REASON, PRIOR_TERM
from recsys.ratings import IdMap, Ratings
from tests.conftest import make_ratings, with_new_ratings

# 5 users x 4 items, ratings on 1..5 (0: no rating); user "u5" rated nothing
TABLE = np.array([
    [5, 4, 0, 1],
    [0, 5, 2, 0],
    [3, 0, 5, 4],
    [4, 4, 4, 0],
    [0, 0, 0, 0],
], dtype=np.float32)


#: the input weight of a rating below 4 in these tests (set explicitly: not the tuned default)
DISLIKED = 0.35


def tiny() -> Ratings:
    users, items = np.nonzero(TABLE)
    return Ratings.from_arrays(
        [f"u{u + 1}" for u in users], [f"i{i + 1}" for i in items], TABLE[users, items], np.arange(len(users)),
        rating_scale=(1, 5), user_ids=IdMap([f"u{u + 1}" for u in range(TABLE.shape[0])]),
        item_ids=IdMap([f"i{i + 1}" for i in range(TABLE.shape[1])]))


def closed_form(x_gram: np.ndarray, reg: float) -> np.ndarray:
    """Steck's EASE, written out: B = I - P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹."""
    p = np.linalg.inv(x_gram.T @ x_gram + reg * np.eye(x_gram.shape[1]))
    return np.eye(len(p)) - p / np.diag(p)[None, :]


def liked(values: np.ndarray, threshold: float = 4.0, disliked: float = DISLIKED) -> np.ndarray:
    return np.where(values == 0, 0.0, np.where(values >= threshold, 1.0, disliked))


def fitted(r: Ratings, **cfg) -> EASE:
    """EASE fitted on ``r``; the popularity prior is off unless ``cold_weight`` is given, so
    the closed-form checks compare against x_u·B alone."""
    m = build_model("ease", r.n_users, r.n_items, r.rating_scale,
                    {"disliked_weight": DISLIKED, "cold_weight": 0.0, **cfg})
    m.fit(r)
    return m


def test_ease_is_a_registered_ranking_model_with_the_serving_capabilities():
    assert MODELS["ease"] == (EASE, EASEConfig)
    m = EASE(3, 4, (1, 5))
    assert isinstance(m, RankingModel) and m.task == "ranking"
    assert isinstance(m, OnlineLearner) and isinstance(m, FoldIn) and isinstance(m, Explainable)


@pytest.mark.parametrize("gram_weights", [True, False])
@pytest.mark.parametrize("reg", [0.5, 3.0])
def test_scores_are_the_closed_form_on_a_hand_sized_dataset(reg, gram_weights):
    r = tiny()
    m = fitted(r, reg=reg, weighting="liked", disliked_weight=0.35, gram_weights=gram_weights)
    x_in = liked(TABLE)
    b = closed_form(x_in if gram_weights else (TABLE > 0).astype(np.float64), reg)
    np.testing.assert_allclose(m.weights.numpy(), b, rtol=1e-5, atol=1e-6)
    known = torch.arange(4)  # u5 has no interaction: tested below
    np.testing.assert_allclose(m.score_all(known).numpy(), x_in[:4] @ b, rtol=1e-5, atol=1e-6)


def test_weighting_modes_give_the_input_rows_they_name():
    r = tiny()
    b_binary = closed_form((TABLE > 0).astype(np.float64), 1.0)
    m = fitted(r, reg=1.0, weighting="binary")
    np.testing.assert_allclose(m.score_all(torch.arange(4)).numpy(), (TABLE[:4] > 0) @ b_binary, rtol=1e-5, atol=1e-6)
    b_value = closed_form(TABLE.astype(np.float64), 1.0)
    m = fitted(r, reg=1.0, weighting="value")
    np.testing.assert_allclose(m.score_all(torch.arange(4)).numpy(), TABLE[:4] @ b_value, rtol=1e-4, atol=1e-5)


def test_auto_weighting_is_liked_for_star_ratings_and_the_value_for_implicit_feedback():
    assert EASE(2, 2, (1, 5)).input_weighting == "liked"
    assert EASE(2, 2, (0.5, 1.5)).input_weighting == "value"  # all-ones implicit feedback
    implicit = Ratings.from_arrays(["a", "a", "b"], ["x", "y", "y"], [1, 1, 1])
    m = fitted(implicit, reg=1.0)
    x = np.array([[1, 1], [0, 1]], dtype=np.float64)
    np.testing.assert_allclose(m.score_all(torch.arange(2)).numpy(), x @ closed_form(x, 1.0), rtol=1e-5, atol=1e-6)


def test_the_weight_matrix_has_a_zero_diagonal():
    m = fitted(make_ratings(), reg=5.0)
    assert torch.count_nonzero(torch.diagonal(m.weights)) == 0
    assert torch.count_nonzero(m.weights) > 0


def test_users_without_interactions_and_unknown_users_get_the_popularity_ranking():
    r = tiny()
    m = fitted(r, reg=1.0)
    counts = torch.tensor((TABLE > 0).sum(0), dtype=torch.float32)
    torch.testing.assert_close(m.score_all(torch.tensor([4, -1])), counts.expand(2, -1))
    assert m.path(4) == "popularity" and m.path(-1) == "popularity" and m.path(0) == "model"
    with pytest.raises(IndexError):
        m.score_all(torch.tensor([5]))


@pytest.mark.parametrize("cold_weight", [0.0, 6.0])
@pytest.mark.parametrize("top_k", [None, 3])
def test_explanation_credits_each_interaction_its_exact_share_and_they_sum_to_the_score(top_k, cold_weight):
    """Contributions + terms = score: the popularity prior, credited to no interaction, is
    the one term (absent when the prior is off)."""
    r = make_ratings()
    m = fitted(r, reg=5.0, top_k=top_k, cold_weight=cold_weight)
    explainer = m.explainer(r)
    scores = m.score_all(torch.arange(r.n_users))
    for user in (0, 7, 29):
        n_rated = int(r.user_counts()[user])
        for item in (0, 5, 19):
            e = explainer.explain(user, item, k=n_rated)
            assert e.method == METHOD and e.units == "score" and e.n_candidates == n_rated
            assert e.prediction == pytest.approx(float(scores[user, item]))
            terms = e.terms or {}
            if cold_weight:
                assert set(terms) == {PRIOR_TERM} and terms[PRIOR_TERM] > 0
            else:
                assert e.terms is None
            total = sum(c.effect for c in e.contributions) + sum(terms.values())
            assert total == pytest.approx(e.prediction, rel=1e-5, abs=1e-6)
            # each effect is x_uj · B_j,item for the interaction's own row
            for c in e.contributions:
                j = int(r.items[c.example])
                assert int(r.users[c.example]) == user and c.item == r.item_ids.raw(j)
                x = 1.0 if c.rating >= 4 else DISLIKED
                sources, weights = m.item_weights(item)
                b = dict(zip(sources.tolist(), weights.tolist(), strict=True)).get(j, 0.0)
                assert c.effect == pytest.approx(x * b, rel=1e-6, abs=1e-9)
    top2 = explainer.explain(0, 5, k=2).contributions
    assert len(top2) == 2 and abs(top2[0].effect) >= abs(top2[1].effect)


@pytest.mark.parametrize("top_k", [None, 3])
def test_a_list_explained_at_once_is_each_item_explained_alone(top_k):
    """`explain_many` (one gather for a whole recommendation list) gives, item by item, the
    explanation `explain` gives, popularity users included."""
    r = make_ratings()
    explainer = fitted(r, reg=5.0, top_k=top_k).explainer(r)
    items = [19, 0, 5, 5, 11]
    for user in (0, 7, 29, r.n_users + 3):
        together = explainer.explain_many(user, items, 3)
        alone = [explainer.explain(user, item, 3) for item in items]
        assert together == alone
    with pytest.raises(IndexError):
        explainer.explain_many(0, [0, r.n_items], 3)


def test_a_user_with_no_interaction_is_explained_by_popularity():
    r = tiny()
    e = fitted(r, reg=1.0).explainer(r).explain(4, 2, k=3)
    assert e.method == POPULARITY_REASON and e.method.startswith("none:") and e.contributions == []
    assert e.prediction == float((TABLE[:, 2] > 0).sum())


def test_the_memory_guard_refuses_a_catalogue_past_max_items_with_a_clear_message():
    with pytest.raises(ValueError) as err:
        build_model("ease", 10, 60_000, (1, 5), {"max_items": 20_000})
    message = str(err.value)
    assert "60,000 items" in message and "86.4 GB" in message and "top_k" in message
    assert "max_items=20,000" in message
    with pytest.raises(ValueError, match="12 items"):
        EASE(3, 12, (1, 5), EASEConfig(max_items=10, top_k=4))
    EASE(3, 10, (1, 5), EASEConfig(max_items=10))  # at the limit: fine


@pytest.mark.parametrize("bad", [{"reg": 0.0}, {"reg": -1.0}, {"weighting": "stars"}, {"disliked_weight": -0.1},
                                 {"top_k": 0}, {"max_items": 0}])
def test_bad_settings_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EASEConfig(**bad)


def test_pruning_keeps_the_top_k_weights_of_each_column_as_the_dense_model_has_them():
    r = make_ratings(n_users=40, n_items=25, n=500, seed=2)
    dense, pruned = fitted(r, reg=3.0), fitted(r, reg=3.0, top_k=6)
    b = dense.weights.numpy()
    assert pruned.neighbours.shape == (25, 6) and pruned.weights.shape == (25, 6)
    b_pruned = np.zeros_like(b)
    for i in range(25):
        kept = pruned.neighbours[i].numpy()
        assert sorted(kept.tolist()) == sorted(np.argsort(-np.abs(b[:, i]), kind="stable")[:6].tolist())
        np.testing.assert_allclose(pruned.weights[i].numpy(), b[kept, i], rtol=1e-6, atol=1e-7)
        b_pruned[kept, i] = b[kept, i]
    x = np.zeros((r.n_users, r.n_items), dtype=np.float32)
    x[r.users, r.items] = np.where(r.values >= 4, 1.0, DISLIKED)
    np.testing.assert_allclose(pruned.score_all(torch.arange(r.n_users)).numpy(), x @ b_pruned, rtol=1e-5, atol=1e-5)


def test_buffer_shapes_depend_only_on_the_sizes_and_the_config():
    assert {k: tuple(v.shape) for k, v in EASE(3, 7, (1, 5)).state_dict().items()}["weights"] == (7, 7)
    shapes = {k: tuple(v.shape) for k, v in EASE(3, 7, (1, 5), EASEConfig(top_k=4)).state_dict().items()}
    assert shapes["neighbours"] == (7, 4) and shapes["weights"] == (7, 4)
    assert EASE(3, 3, (1, 5), EASEConfig(top_k=10)).weights.shape == (3, 3)  # k capped at n_items


@pytest.mark.parametrize("top_k", [None, 5])
def test_fold_in_of_a_new_user_by_learn_is_exactly_the_score_of_their_row(top_k):
    """EASE's B depends on every training user; what a fold-in must equal is the model's own
    answer for that row with B held fixed (x_u·B), which is exact: no approximation is made."""
    r = make_ratings()
    m = fitted(r, reg=5.0, top_k=top_k)
    b_before = m.weights.clone()
    items, values = ["3", "7", "11"], [5.0, 2.0, 4.0]
    grown, new = with_new_ratings(r, ["newcomer"] * 3, items, values)
    u = grown.user_ids.index("newcomer")
    assert u == m.n_users and m.path(u) == "popularity"
    m.learn(grown, new)
    assert m.n_users == grown.n_users and bool(m.known_users[u]) and m.path(u) == "model"
    idx = torch.from_numpy(grown.item_ids.indices(items))
    direct = m.fold_in_user(idx, torch.tensor(values))
    torch.testing.assert_close(m.score_all(torch.tensor([u]))[0], direct)
    torch.testing.assert_close(m.weights, b_before)  # B fixed
    x = np.zeros(r.n_items, dtype=np.float32)
    x[idx.numpy()] = [1.0, DISLIKED, 1.0]
    b = m.weights.numpy() if top_k is None else _dense(m)
    np.testing.assert_allclose(direct.numpy(), x @ b, rtol=1e-5, atol=1e-6)
    # the old users' scores did not move
    fresh = fitted(r, reg=5.0, top_k=top_k)
    torch.testing.assert_close(m.score_all(torch.arange(r.n_users)), fresh.score_all(torch.arange(r.n_users)))


def _dense(m: EASE) -> np.ndarray:
    b = np.zeros((m.n_items, m.n_items), dtype=np.float32)
    for i in range(m.n_items):
        b[m.neighbours[i].numpy(), i] = m.weights[i].numpy()
    return b


def test_an_interaction_learnt_online_changes_the_users_list_at_once_and_a_rating_given_again_replaces_it():
    r = make_ratings()
    m = fitted(r, reg=5.0)
    user = 0
    rated = set(r.items[r.users == user].tolist())
    item = next(i for i in range(r.n_items) if i not in rated)
    raw_u, raw_i = r.user_ids.raw(user), r.item_ids.raw(item)
    grown, new = with_new_ratings(r, [raw_u], [raw_i], [5.0])
    before = m.score_all(torch.tensor([user]))[0].clone()
    m.learn(grown, new)
    after = m.score_all(torch.tensor([user]))[0]
    torch.testing.assert_close(after - before, m.weights[item], rtol=1e-5, atol=1e-5)  # x = 1 for a liked rating
    again, new2 = with_new_ratings(grown, [raw_u], [raw_i], [1.0])
    m.learn(again, new2)
    torch.testing.assert_close(m.score_all(torch.tensor([user]))[0] - before, DISLIKED * m.weights[item],
                               rtol=1e-5, atol=1e-5)
    e = m.explainer(again).explain(user, 3, k=100)
    assert new2[0] in {c.example for c in e.contributions} and new[0] not in {c.example for c in e.contributions}
    assert sum(c.effect for c in e.contributions) == pytest.approx(e.prediction, rel=1e-5, abs=1e-6)


def test_batches_merged_into_the_rows_equal_the_rows_built_from_all_ratings():
    from recsys.models.ease.rows import UserRows

    r = make_ratings()
    rows = UserRows(r)
    rng = np.random.default_rng(0)
    grown = r
    for size in (1, 7, 40, 3, -1, -1):  # trained and new users, pairs repeated within a batch and across
        if size < 0:  # a batch of one rating
            users, items = ["new-user"], [r.item_ids.raw(int(rng.integers(0, 2)))]
        else:
            users = [grown.user_ids.raw(int(u)) for u in rng.integers(0, r.n_users, size)] + ["new-user"] * 2
            items = [grown.item_ids.raw(int(i)) for i in rng.integers(0, r.n_items, size)] + [r.item_ids.raw(0)] * 2
        grown, new = with_new_ratings(grown, users, items, rng.integers(1, 6, len(users)).astype(float).tolist())
        touched = rows.add(grown, new)
        assert sorted(touched.tolist()) == sorted(set(grown.users[new].tolist()))
    rebuilt = UserRows(grown)  # from scratch: the latest example of each (user, item) pair
    for u in range(grown.n_users):
        for mine, theirs in zip(rows.row(u), rebuilt.row(u), strict=True):
            assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs)


@pytest.mark.parametrize("merge_at", [2, 256])
def test_rows_read_between_batches_and_queues_merged_early_equal_the_rows_built_from_all_ratings(merge_at):
    """`add` queues example ids per user; a row read mid-way (or a queue reaching
    ``merge_at``) is merged then, and what comes after merges into that merged row."""
    from recsys.models.ease.rows import UserRows

    r = make_ratings()
    rows = UserRows(r)
    rows.merge_at = merge_at
    rng = np.random.default_rng(1)
    grown = r
    for size in (5, 1, 30, 2, 12):
        users = [grown.user_ids.raw(int(u)) for u in rng.integers(0, 4, size)] + ["late-user"]
        items = [grown.item_ids.raw(int(i)) for i in rng.integers(0, 3, size)] + [r.item_ids.raw(1)]
        grown, new = with_new_ratings(grown, users, items, rng.integers(1, 6, len(users)).astype(float).tolist())
        rows.add(grown, new)
        rebuilt = UserRows(grown)
        for u in rng.integers(0, grown.n_users, 3).tolist() + [grown.n_users - 1]:  # a few rows read now
            for mine, theirs in zip(rows.row(u), rebuilt.row(u), strict=True):
                assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs)
    users = np.arange(grown.n_users)
    rebuilt = UserRows(grown)
    assert np.array_equal(rows.degrees(users), rebuilt.degrees(users))
    weights = np.ones_like
    assert (rows.matrix(users, grown.n_items, weights) != rebuilt.matrix(users, grown.n_items, weights)).nnz == 0


def test_learn_refuses_an_item_the_model_was_not_fitted_on():
    r = make_ratings()
    m = fitted(r, reg=5.0)
    grown, new = with_new_ratings(r, ["0"], ["brand-new item"], [4.0])
    with pytest.raises(ValueError, match="items it was not fitted on"):
        m.learn(grown, new)


def test_learn_rebinds_when_its_rows_are_not_those_the_model_holds():
    r = make_ratings()
    m = fitted(r, reg=5.0)
    half = r.subset(np.arange(len(r)) < len(r) // 2)
    m.bind_ratings(half)  # the model now holds other rows than those before `new`
    grown, new = with_new_ratings(r, ["0"], ["1"], [4.0])
    m.learn(grown, new)
    reference = fitted(r, reg=5.0)
    reference.learn(grown, new)
    torch.testing.assert_close(m.score_all(torch.arange(r.n_users)), reference.score_all(torch.arange(r.n_users)))


@pytest.mark.parametrize("top_k", [None, 4])
def test_an_artefact_round_trip_gives_identical_scores(tmp_path, top_k):
    r = make_ratings()
    m = fitted(r, reg=5.0, top_k=top_k)
    save_artefact(tmp_path / "ease", m, r)
    loaded = load_artefact(tmp_path / "ease")
    assert isinstance(loaded.model, EASE) and loaded.model.config == m.config
    users = torch.tensor([0, 5, 29, -1])
    assert torch.equal(loaded.model.score_all(users), m.score_all(users))
    e1, e2 = m.explainer(r).explain(3, 4, 5), loaded.model.explainer(loaded.train).explain(3, 4, 5)
    assert e1.to_dict() == e2.to_dict()


def test_fit_refuses_interactions_of_another_size():
    r = make_ratings()
    with pytest.raises(ValueError, match="cannot fit"):
        EASE(r.n_users, r.n_items + 1, r.rating_scale).fit(r)


def test_fold_in_with_no_interactions_is_the_popularity_ranking_and_a_bad_item_is_refused():
    r = make_ratings()
    m = fitted(r, reg=5.0)
    torch.testing.assert_close(m.fold_in_user(torch.zeros(0, dtype=torch.int64), torch.zeros(0)), m.item_counts)
    with pytest.raises(ValueError, match="item indices"):
        m.fold_in_user(torch.tensor([r.n_items]), torch.tensor([4.0]))


def test_on_movielens_u1_the_default_beats_binary_ease_and_popularity(ml100k_u1):
    """A guard on the tuned default, not the benchmark: on u1 the default (liked weighting,
    chosen on validation slices) ranks better than binary EASE at lambda 500."""
    train, test = ml100k_u1
    default = build_model("ease", train.n_users, train.n_items, train.rating_scale, {})
    default.fit(train)
    binary = fitted(train, weighting="binary", reg=500.0)
    popular = build_model("popular", train.n_users, train.n_items, train.rating_scale, {})
    popular.fit(train)
    ndcg = {name: evaluate_ranking(model, train, test, k=10)["ndcg"]
            for name, model in (("default", default), ("binary", binary), ("popular", popular))}
    assert ndcg["default"] > ndcg["binary"] > ndcg["popular"]
    assert ndcg["default"] > 0.45


# ------------------------------------------------------------------ the popularity prior
def test_cold_weight_zero_gives_exactly_the_prior_free_scores_and_the_default_is_on():
    r = make_ratings()
    off = fitted(r, reg=5.0, cold_weight=0.0)
    x = np.zeros((r.n_users, r.n_items), dtype=np.float32)
    x[r.users, r.items] = np.where(r.values >= 4, 1.0, DISLIKED)
    users = torch.arange(r.n_users)
    b = off.weights
    assert torch.equal(off.score_all(users), torch.from_numpy(x) @ b)  # bit for bit x_u·B
    assert torch.count_nonzero(off.prior_scores(off.score_all(users), np.full(r.n_users, 3))) == 0
    assert EASEConfig().cold_weight > 0
    on = fitted(r, reg=5.0, cold_weight=EASEConfig().cold_weight)
    torch.testing.assert_close(on.weights, off.weights)  # the prior does not touch B
    assert not torch.equal(on.score_all(users), off.score_all(users))


def test_the_prior_is_c_over_n_plus_c_times_the_users_top_score_times_scaled_popularity():
    r = make_ratings()
    c = 4.0
    on, off = fitted(r, reg=5.0, cold_weight=c), fitted(r, reg=5.0, cold_weight=0.0)
    users = torch.arange(r.n_users)
    ease = off.score_all(users).double()
    n = torch.from_numpy(r.user_counts()).double()  # make_ratings: one rating per (user, item)
    pop = on.item_counts.double() / on.item_counts.max()
    expected = ease + (c / (n + c) * ease.abs().amax(dim=1))[:, None] * pop[None, :]
    torch.testing.assert_close(on.score_all(users).double(), expected, rtol=1e-5, atol=1e-6)


def test_the_prior_vanishes_as_the_user_interacts_more():
    """One user revealed 1, 2, 4, ... interactions: the prior's share of the score on the most
    popular item, relative to the user's top EASE score, is exactly c/(n + c), falling to 0."""
    r = make_ratings(n_users=30, n_items=60, n=900, seed=3)
    c = 5.0
    m = fitted(r, reg=5.0, cold_weight=c)
    off = fitted(r, reg=5.0, cold_weight=0.0)
    top = int(torch.argmax(m.item_counts))
    shares = []
    order = np.random.default_rng(0).permutation(r.n_items)
    for n in (1, 2, 4, 8, 16, 32, 59):
        items = torch.from_numpy(order[:n].copy())
        values = torch.full((n,), 5.0)
        ease = off.fold_in_user(items, values)
        prior = m.fold_in_user(items, values) - ease
        share = float(prior[top]) / float(ease.abs().max())
        assert share == pytest.approx(c / (n + c), rel=1e-4)
        torch.testing.assert_close(prior, (c / (n + c)) * ease.abs().max() * m.item_counts / m.item_counts.max())
        shares.append(share)
    assert all(a > b for a, b in zip(shares, shares[1:], strict=False)) and shares[-1] < 0.08


def test_with_the_prior_on_a_user_with_no_interaction_still_gets_popularity_exactly():
    r = tiny()
    m = fitted(r, reg=1.0, cold_weight=6.0)
    counts = torch.tensor((TABLE > 0).sum(0), dtype=torch.float32)
    assert torch.equal(m.score_all(torch.tensor([4, -1])), counts.expand(2, -1))
    assert torch.equal(m.fold_in_user(torch.zeros(0, dtype=torch.int64), torch.zeros(0)), counts)
    e = m.explainer(r).explain(4, 2, k=3)
    assert e.method == POPULARITY_REASON and e.prediction == float(counts[2]) and not e.terms


def test_with_the_prior_on_fold_in_by_learn_equals_the_direct_fold_in_of_the_row():
    r = make_ratings()
    m = fitted(r, reg=5.0, cold_weight=6.0)
    items, values = ["3", "7", "11"], [5.0, 2.0, 4.0]
    grown, new = with_new_ratings(r, ["newcomer"] * 3, items, values)
    m.learn(grown, new)
    u = grown.user_ids.index("newcomer")
    idx = torch.from_numpy(grown.item_ids.indices(items))
    torch.testing.assert_close(m.score_all(torch.tensor([u]))[0], m.fold_in_user(idx, torch.tensor(values)))
    e = m.explainer(grown).explain(u, 0, k=3)
    assert sum(c.effect for c in e.contributions) + e.terms[PRIOR_TERM] == pytest.approx(e.prediction, rel=1e-5)


def test_a_bad_cold_weight_is_refused_by_name():
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="cold_weight"):
            EASEConfig(cold_weight=bad)
