"""Metrics against hand-computed values, and the evaluation protocols on a fake model with
fixed scores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from recsys.evaluate import (
    catalogue_coverage,
    cross_validate,
    evaluate_ranking,
    evaluate_ratings,
    mae,
    map_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    rmse,
)
from recsys.models.base import RatingModel
from recsys.ratings import Ratings


class FixedScores(RatingModel):
    """A model whose score of ``(u, i)`` is ``scores[u, i]``; fallback is the global mean."""

    name = "fixed"

    def __init__(self, scores: torch.Tensor, rating_scale: tuple[float, float] = (1.0, 5.0)) -> None:
        super().__init__(scores.shape[0], scores.shape[1], rating_scale)
        self.register_buffer("scores", scores.to(torch.float32))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.scores[users, items]

    def fallback(self, users: torch.Tensor, items: torch.Tensor, user_known: torch.Tensor,
                 item_known: torch.Tensor) -> torch.Tensor:
        return self.global_mean.expand(users.shape)

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        return self.scores[users]

    def config_dict(self) -> dict:
        return {}


def fitted(scores: list[list[float]], train: Ratings) -> FixedScores:
    model = FixedScores(torch.tensor(scores))
    model.prepare(train)
    return model


# ---------------------------------------------------------------------------------- errors
def test_rmse_and_mae_by_hand() -> None:
    predictions, truth = [1.0, 2.0, 3.0], [1.0, 3.0, 5.0]  # errors 0, 1, 2
    assert rmse(np.array(predictions), np.array(truth)) == pytest.approx(math.sqrt(5 / 3))
    assert mae(np.array(predictions), np.array(truth)) == pytest.approx(1.0)
    assert rmse(torch.tensor(predictions), torch.tensor(truth)) == pytest.approx(1.2909944)
    assert mae(torch.tensor(predictions), np.array(truth)) == pytest.approx(1.0)


def test_error_metrics_reject_mismatched_or_empty_input() -> None:
    with pytest.raises(ValueError, match="3 values"):
        rmse(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="no ratings"):
        mae(np.zeros(0), np.zeros(0))


# ---------------------------------------------------------------------------------- ranking
HITS = torch.tensor([
    [1, 0, 1, 0],  # hits at ranks 1 and 3, 2 relevant items
    [0, 1, 0, 0],  # hit at rank 2, 3 relevant items
    [1, 1, 1, 1],  # all hits, 6 relevant items (more than k)
    [0, 0, 0, 0],  # no hit, 1 relevant item
], dtype=torch.bool)
N_RELEVANT = torch.tensor([2, 3, 6, 1])


def test_precision_and_recall_by_hand() -> None:
    np.testing.assert_allclose(precision_at_k(HITS).numpy(), [0.5, 0.25, 1.0, 0.0])
    np.testing.assert_allclose(recall_at_k(HITS, N_RELEVANT).numpy(), [1.0, 1 / 3, 4 / 6, 0.0])


def test_ndcg_by_hand() -> None:
    # row 0: DCG = 1/log2(2) + 1/log2(4) = 1.5; ideal (2 hits) = 1 + 1/log2(3) = 1.6309298
    # row 1: DCG = 1/log2(3) = 0.6309298; ideal (3 hits) = 1 + 0.6309298 + 0.5 = 2.1309298
    # row 2: ideal over min(k=4, 6) = 4 ranks, equal to DCG -> 1
    expected = [1.5 / 1.6309298, 0.6309298 / 2.1309298, 1.0, 0.0]
    np.testing.assert_allclose(ndcg_at_k(HITS, N_RELEVANT).numpy(), expected, rtol=1e-6)
    assert ndcg_at_k(HITS, N_RELEVANT)[0].item() == pytest.approx(0.9197208)


def test_map_by_hand() -> None:
    # row 0: (P@1 + P@3) / min(4, 2) = (1 + 2/3) / 2; row 1: P@2 / 3 = (1/2) / 3
    # row 2: (1 + 1 + 1 + 1) / min(4, 6)
    expected = [(1 + 2 / 3) / 2, 0.5 / 3, 1.0, 0.0]
    np.testing.assert_allclose(map_at_k(HITS, N_RELEVANT).numpy(), expected)


def test_ranking_metrics_are_undefined_without_relevant_items() -> None:
    hits, none = torch.tensor([[True, False]]), torch.tensor([0])
    for metric in (recall_at_k, ndcg_at_k, map_at_k):
        assert math.isnan(metric(hits, none)[0].item())
    assert precision_at_k(np.array([[True, False]]))[0].item() == 0.5


def test_catalogue_coverage_by_hand() -> None:
    assert catalogue_coverage(np.array([[0, 1], [1, 2]]), n_items=5) == pytest.approx(0.6)


# ---------------------------------------------------------------------------------- protocols
@pytest.fixture
def rating_case() -> tuple[Ratings, Ratings]:
    """Train: users 1, 2 and items 1-3; test: two known pairs, user 3 unknown, item 4
    unknown, and (3, 4) both unknown."""
    r = Ratings.from_arrays(
        [1, 1, 2, 2, 1, 2, 3, 2, 3],
        [1, 2, 1, 3, 3, 2, 1, 4, 4],
        [5, 3, 4, 2, 1, 4, 4, 3, 5],
        rating_scale=(1.0, 5.0),
    )
    return r.subset(np.arange(4)), r.subset(np.arange(4, 9))


def test_evaluate_ratings_counts_fallbacks(rating_case: tuple[Ratings, Ratings]) -> None:
    train, test = rating_case
    # known pairs: (u1, i3) -> 2, (u2, i2) -> 3; the other three answer the mean 14/4 = 3.5
    model = fitted([[9, 9, 2, 0], [9, 3, 9, 0], [0, 0, 0, 0]], train)
    result = evaluate_ratings(model, test)
    # errors vs truth (1, 4, 4, 3, 5): 1, -1, -0.5, 0.5, -1.5
    assert result["rmse"] == pytest.approx(math.sqrt(4.75 / 5))
    assert result["mae"] == pytest.approx(4.5 / 5)
    assert {k: result[k] for k in ("n_test", "n_unknown_user", "n_unknown_item", "n_fallback")} == {
        "n_test": 5, "n_unknown_user": 2, "n_unknown_item": 2, "n_fallback": 3,
    }
    assert evaluate_ratings(model, test, batch_size=2) == pytest.approx(result)
    json.dumps(result)


def test_evaluate_ratings_clips_predictions(rating_case: tuple[Ratings, Ratings]) -> None:
    train, test = rating_case
    model = fitted([[0, 0, 9, 0], [0, -9, 0, 0], [0, 0, 0, 0]], train)
    # (u1, i3) clipped to 5 (truth 1), (u2, i2) clipped to 1 (truth 4), then the fallbacks
    expected = math.sqrt((16 + 9 + 0.25 + 0.25 + 2.25) / 5)
    assert evaluate_ratings(model, test)["rmse"] == pytest.approx(expected)
    assert model.training  # evaluation restores the module's mode


@pytest.fixture
def ranking_case() -> tuple[Ratings, Ratings, FixedScores]:
    """Three users, six items. User 0 rated items 0, 1 in train and likes 2, 3 in test;
    user 1 has only a disliked test item (skipped); user 2 rated 0 and likes 4."""
    r = Ratings.from_arrays(
        [0, 0, 1, 2, 0, 0, 0, 1, 2],
        [0, 1, 5, 0, 2, 3, 4, 0, 4],
        [4, 4, 4, 4, 5, 4, 2, 3, 5],
        rating_scale=(1.0, 5.0),
    )
    train, test = r.subset(np.arange(4)), r.subset(np.arange(4, 9))
    model = fitted([
        [10, 9, 1, 8, 7, 0],  # training items 0, 1 masked: top-3 is 3, 4, 2
        [0, 1, 2, 3, 4, 5],
        [10, 0, 5, 4, 3, 2],  # training item 0 masked: top-3 is 2, 3, 4
    ], train)
    return train, test, model


def test_evaluate_ranking_by_hand(ranking_case: tuple[Ratings, Ratings, FixedScores]) -> None:
    train, test, model = ranking_case
    result = evaluate_ranking(model, train, test, k=3)
    # user 0: hits [1, 0, 1], 2 relevant; user 2: hits [0, 0, 1], 1 relevant
    assert result["precision"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert result["recall"] == pytest.approx(1.0)
    assert result["ndcg"] == pytest.approx((1.5 / (1 + 1 / math.log2(3)) + 0.5) / 2)
    assert result["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)
    assert result["coverage"] == pytest.approx(3 / 6)
    assert (result["n_users_evaluated"], result["n_users_skipped"]) == (2, 1)
    assert (result["k"], result["relevance_threshold"]) == (3, 4.0)
    assert evaluate_ranking(model, train, test, k=3, batch_users=1) == pytest.approx(result)
    json.dumps(result)


def test_evaluate_ranking_never_recommends_training_items(
        ranking_case: tuple[Ratings, Ratings, FixedScores]) -> None:
    train, test, model = ranking_case
    # at k=1 user 0's best-scored items (0, 1) are training items: the list is [3], a hit
    result = evaluate_ranking(model, train, test, k=1)
    assert result["precision"] == pytest.approx((1 + 0) / 2)
    # k beyond the catalogue: capped, and masked training items don't count as coverage
    wide = evaluate_ranking(model, train, test, k=10)
    assert wide["coverage"] == pytest.approx(5 / 6)  # item 0 is a training item of both
    assert wide["recall"] == pytest.approx(1.0)


def test_evaluate_ranking_threshold_and_empty(ranking_case: tuple[Ratings, Ratings, FixedScores]) -> None:
    train, test, model = ranking_case
    result = evaluate_ranking(model, train, test, k=3, relevance_threshold=5.0)
    assert (result["n_users_evaluated"], result["n_users_skipped"]) == (2, 1)
    none = evaluate_ranking(model, train, test, k=3, relevance_threshold=6.0)
    assert none["n_users_evaluated"] == 0 and none["precision"] is None
    json.dumps(none)


def test_cross_validate_reports_folds_and_means(
        ranking_case: tuple[Ratings, Ratings, FixedScores]) -> None:
    train, test, model = ranking_case

    def fit_fn(fold_train: Ratings) -> tuple[RatingModel, float]:
        return model, 1.5

    report = cross_validate(fit_fn, [("a", train, test), ("b", train, test)], ranking_k=3)
    assert [f["name"] for f in report["folds"]] == ["a", "b"]
    mean = report["mean"]
    assert mean["rmse"] == pytest.approx(report["folds"][0]["rmse"])
    assert mean["fit_seconds"] == 1.5 and mean["n_users_evaluated"] == 2
    assert "name" not in mean and "ndcg" in mean
    json.loads(json.dumps(report))
