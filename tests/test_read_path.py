"""The service's read path (`Recommender.predict`, `recommend`, `user_info`, EASE's one-user
scores and explanations): the fast paths give the answers the general ones give, and what
they cache follows online learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.artefact import save_artefact
from recsys.models import build_model
from recsys.recommender import Recommender
from recsys.store import NewRating
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings, with_new_ratings


def ease(r, **cfg):
    m = build_model("ease", r.n_users, r.n_items, r.rating_scale, {"reg": 5.0, **cfg})
    m.fit(r)
    return m


@pytest.mark.parametrize("top_k", [None, 6])
@pytest.mark.parametrize("cold_weight", [0.0, 6.0])
def test_one_users_scores_are_the_batched_scores(top_k, cold_weight):
    r = make_ratings(n_users=30, n_items=20, n=300)
    m = ease(r, top_k=top_k, cold_weight=cold_weight)
    batched = m.score_all(torch.arange(r.n_users))  # many users: the sparse-matrix product
    for u in range(r.n_users):
        torch.testing.assert_close(m.score_all(torch.tensor([u]))[0], batched[u], rtol=1e-5, atol=1e-5)


def test_a_users_cached_scores_follow_learning_and_refitting():
    r = make_ratings(n_users=30, n_items=20, n=300)
    m = ease(r)
    user = 3
    m.score_all(torch.tensor([user]))  # cached
    rated = set(r.items[r.users == user].tolist())
    item = next(i for i in range(r.n_items) if i not in rated)
    grown, new = with_new_ratings(r, [r.user_ids.raw(user)], [r.item_ids.raw(item)], [5.0])
    m.learn(grown, new)
    torch.testing.assert_close(m.score_all(torch.tensor([user]))[0], m.score_all(torch.tensor([user, 0]))[0],
                               rtol=1e-5, atol=1e-5)
    before = m.score_all(torch.tensor([user]))[0].clone()
    m.fit(make_ratings(n_users=30, n_items=20, n=300, seed=5))  # new weights, new rows
    after = m.score_all(torch.tensor([user]))[0]
    torch.testing.assert_close(after, m.score_all(torch.tensor([user, 0]))[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_the_scores_handed_out_cannot_change_the_cached_ones():
    r = make_ratings()
    m = ease(r)
    first = m.score_all(torch.tensor([2]))[0]
    first.fill_(-1.0)
    ease_part = m.score_parts(torch.tensor([2]))[0][0]
    ease_part.fill_(-2.0)
    torch.testing.assert_close(m.score_all(torch.tensor([2]))[0], m.score_all(torch.tensor([2, 0]))[0])


@pytest.mark.parametrize("k", [1, 3, 50])
def test_an_explanation_lists_the_k_largest_shares_in_order_and_they_sum_to_the_score(k):
    r = make_ratings(n_users=30, n_items=20, n=300)
    m = ease(r)
    explainer = m.explainer(r)
    for user, item in ((0, 5), (4, 1), (11, 19)):
        e = explainer.explain(user, item, k)
        examples, effects = explainer.contributions(user, item)
        order = np.argsort(-np.abs(effects), kind="stable")[:k]
        assert [c.example for c in e.contributions] == examples[order].tolist()
        total = effects.sum() + sum((e.terms or {}).values())
        assert total == pytest.approx(e.prediction, rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
    train = make_ratings(n_users=40, n_items=30, n=700)
    model = build_model("mf", train.n_users, train.n_items, train.rating_scale, {"embedding_size": 8, "n_blocks": 2})
    result = Trainer(TrainConfig(epochs=10, progress=False)).fit(model, train)
    path = tmp_path_factory.mktemp("art") / "mf"
    save_artefact(path, model, train, {"training": {"train_config": {"learning_rate": 0.015, "epochs":
                                                                      len(result.history)}}},
                  ranker=ease(train))
    return path, train


def test_an_explained_prediction_has_the_rating_of_the_unexplained_one(artefact):
    path, train = artefact
    rec = Recommender.load(path)
    for u, i in ((0, 0), (5, 7), (39, 29), (12, 3)):
        user, item = train.user_ids.raw(u), train.item_ids.raw(i)
        explained, plain = rec.predict(user, item, explain=3), rec.predict(user, item)
        assert explained.rating == pytest.approx(plain.rating, abs=1e-5) and explained.path == plain.path
        assert explained.explanation and plain.explanation is None
    fallback = rec.predict("nobody", train.item_ids.raw(0), explain=3)
    assert fallback.path == "fallback" and fallback.rating is not None and fallback.explanation is None


def test_items_rated_online_in_several_batches_leave_the_list_and_are_counted(artefact):
    path, train = artefact
    rec = Recommender.load(path)
    user = train.user_ids.raw(1)
    n_train = rec.user_info(user).n_training_ratings
    seen = set()
    for batch in range(3):
        top = [p.item for p in rec.recommend(user, 3).items]
        assert not set(top) & seen
        rec.add_ratings([NewRating(user, item, 4.0) for item in top[:2]]
                        + [NewRating(train.user_ids.raw(2), top[0], 3.0)])
        seen.update(top[:2])
        info = rec.user_info(user)
        assert info.n_live_ratings == 2 * (batch + 1) and info.n_ratings == n_train + info.n_live_ratings
    assert not {p.item for p in rec.recommend(user, 30).items} & seen
    assert rec.user_info(train.user_ids.raw(2)).n_live_ratings == 3
