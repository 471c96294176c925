"""The most-popular ranker: counts (or sums) per item, the same list for everyone, online
counts, no interaction credited, artefacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.artefact import load_artefact, save_artefact
from recsys.models import MODELS, build_model
from recsys.models.base import Explainable, OnlineLearner, RankingModel
from recsys.models.popularity import PopularityConfig, PopularityRanker
from recsys.models.popularity.model import REASON
from recsys.ratings import Ratings
from tests.conftest import make_ratings, with_new_ratings


def three_users() -> Ratings:
    # item x: 3 users (ratings 5, 1, 2), item y: 1 user (5), item z: 2 users (4, 4)
    return Ratings.from_arrays(["a", "b", "c", "a", "b", "c"], ["x", "x", "x", "y", "z", "z"],
                               [5, 1, 2, 5, 4, 4], rating_scale=(1, 5))


def fitted(r: Ratings, **cfg) -> PopularityRanker:
    m = build_model("popular", r.n_users, r.n_items, r.rating_scale, cfg)
    m.fit(r)
    return m


def test_popular_is_a_registered_ranking_model():
    assert MODELS["popular"] == (PopularityRanker, PopularityConfig)
    m = PopularityRanker(2, 2)
    assert isinstance(m, RankingModel) and m.task == "ranking"
    assert isinstance(m, OnlineLearner) and isinstance(m, Explainable)


def test_scores_are_interaction_counts_the_same_for_every_user():
    m = fitted(three_users())
    expected = torch.tensor([3.0, 1.0, 2.0])
    torch.testing.assert_close(m.score_all(torch.tensor([0, 2, -1])), expected.expand(3, -1))
    torch.testing.assert_close(m.item_counts, expected)


def test_sum_weighting_adds_the_interaction_values():
    m = fitted(three_users(), weighting="sum")
    torch.testing.assert_close(m.score_all(torch.tensor([1]))[0], torch.tensor([8.0, 5.0, 8.0]))


def test_a_bad_weighting_is_refused_by_name():
    with pytest.raises(ValueError, match="weighting"):
        PopularityConfig(weighting="stars")


@pytest.mark.parametrize("weighting, after", [("count", [3.0, 2.0, 2.0]), ("sum", [8.0, 5.0, 8.0])])
def test_learn_counts_a_new_pair_once_and_a_pair_given_again_replaces_its_value(weighting, after):
    r = three_users()
    m = fitted(r, weighting=weighting)
    grown, new = with_new_ratings(r, ["a"], ["y"], [2.0])  # a pair given again: 5 -> 2
    m.learn(grown, new)
    grown2, new2 = with_new_ratings(grown, ["d"], ["y"], [3.0])  # a new user
    m.learn(grown2, new2)
    assert m.n_users == 4 and bool(m.known_users[3])
    torch.testing.assert_close(m.score_all(torch.tensor([3]))[0], torch.tensor(after))
    refit = fitted(grown2.subset(np.array([0, 1, 2, 4, 5, 6, 7])), weighting=weighting)  # without a's old row
    torch.testing.assert_close(m.item_scores, refit.item_scores)


def test_learn_refuses_an_item_the_model_was_not_fitted_on():
    r = three_users()
    m = fitted(r)
    grown, new = with_new_ratings(r, ["a"], ["w"], [4.0])
    with pytest.raises(ValueError, match="items it was not fitted on"):
        m.learn(grown, new)


def test_every_user_is_on_the_popularity_path_and_no_interaction_explains_a_score():
    r = three_users()
    m = fitted(r)
    assert m.path(0) == "popularity" and m.path(-1) == "popularity"
    e = m.explainer(r).explain(0, 2, k=3)
    assert e.method == REASON and e.method.startswith("none: popularity")
    assert e.contributions == [] and e.prediction == 2.0 and e.user == "a" and e.item == "z"


def test_an_artefact_round_trip_gives_identical_scores(tmp_path):
    r = make_ratings()
    m = fitted(r, weighting="sum")
    save_artefact(tmp_path / "pop", m, r)
    loaded = load_artefact(tmp_path / "pop").model
    assert isinstance(loaded, PopularityRanker) and loaded.config == m.config
    users = torch.tensor([0, 3, -1])
    assert torch.equal(loaded.score_all(users), m.score_all(users))
