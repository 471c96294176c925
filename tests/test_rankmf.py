"""The project's own ranking MF (rank-mf): training through the shared Trainer, ranking
quality, its gradient-rollback log, its explainer, artefacts and the leave-one-out harness."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from recsys.evaluate import evaluate_ranking
from recsys.explain.rollback import RollbackCallback
from recsys.models import MODELS, build_model
from recsys.models.base import Explainable, Explanation, RankingModel
from recsys.models.rankmf import RankingMF, RankMFConfig
from recsys.models.rankmf.log import RankRollbackLog
from recsys.ratings import Ratings

SMALL = RankMFConfig(embedding_size=8, epochs=15, batch_size=64, negatives=2, learning_rate=0.05,
                     optimizer="adam", loss="bpr", reg=0.01, bias_reg=0.01, lr_decay=1.0)


def clustered(n_users: int = 60, n_items: int = 40, per_user: int = 10, seed: int = 0) -> tuple[Ratings, Ratings]:
    """Implicit interactions with structure: 4 user groups, each choosing mostly from its own
    quarter of the catalogue; 3 held-out interactions per user form the test set (value 5)."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        group = u % 4
        own = np.arange(group * n_items // 4, (group + 1) * n_items // 4)
        chosen = rng.choice(own, size=per_user, replace=False)
        users += [u] * per_user
        items += chosen.tolist()
    users, items = np.array(users), np.array(items)
    everything = Ratings.from_arrays(users, items, np.full(len(users), 5.0), rating_scale=(1, 5))
    test_rows = np.zeros(len(users), dtype=bool)
    for u in range(n_users):
        test_rows[rng.choice(np.flatnonzero(everything.users == u), size=3, replace=False)] = True
    return everything.subset(~test_rows), everything.subset(test_rows)


@pytest.fixture(scope="module")
def data() -> tuple[Ratings, Ratings]:
    return clustered()


@pytest.fixture(scope="module")
def fitted(data):
    train, _ = data
    model = RankingMF(train.n_users, train.n_items, train.rating_scale, SMALL)
    cb = RollbackCallback(mode="exact")
    summary = model.fit(train, callbacks=[cb])
    return model, cb.log, summary


def test_is_a_registered_ranking_model():
    assert MODELS["rank-mf"] == (RankingMF, RankMFConfig)
    model = build_model("rank-mf", 5, 4, (1, 5), {"embedding_size": 4})
    assert isinstance(model, RankingModel) and model.task == "ranking" and isinstance(model, Explainable)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown loss"):
        RankMFConfig(loss="hinge")
    with pytest.raises(ValueError, match="K-FAC"):
        RankMFConfig(optimizer="kfac")
    with pytest.raises(ValueError, match="weighting"):
        RankMFConfig(weighting="log")


def test_loss_decreases_and_ranking_beats_popularity(data, fitted):
    train, test = data
    model, _, summary = fitted
    first = RankingMF(train.n_users, train.n_items, train.rating_scale, replace(SMALL, epochs=1))
    assert summary["final_loss"] < first.fit(train)["final_loss"]
    ours = evaluate_ranking(model, train, test, k=5)
    popular = RankingMF(train.n_users, train.n_items, train.rating_scale, SMALL)
    popular.prepare(train)
    popular.known_users.zero_()  # every user unknown: the popularity ranking
    base = evaluate_ranking(popular, train, test, k=5)
    assert ours["ndcg"] > base["ndcg"] + 0.2


@pytest.mark.parametrize("loss", ["bpr", "softmax"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "sparse-adam"])
def test_fit_is_reproducible_for_a_seed(data, loss, optimizer):
    train, _ = data
    cfg = replace(SMALL, epochs=2, loss=loss, optimizer=optimizer)
    a, b = (RankingMF(train.n_users, train.n_items, train.rating_scale, cfg) for _ in range(2))
    a.fit(train)
    b.fit(train)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_sampling_state_replays_the_negatives():
    model = RankingMF(3, 50, config=SMALL)
    state = model.sampling_state()
    first = model.sample_negatives(20)
    model.set_sampling_state(state)
    assert torch.equal(model.sample_negatives(20), first)


def test_unknown_users_get_the_popularity_ranking(data, fitted):
    train, _ = data
    model, _, _ = fitted
    counts = torch.from_numpy(train.item_counts().astype(np.float32))
    scores = model.score_all(torch.tensor([-1, 0]))
    assert torch.equal(scores[0], counts)
    assert not torch.equal(scores[1], counts)
    with_ghost = train.with_id_maps(train.user_ids.extend(["ghost"]), train.item_ids)  # a user with no interaction
    bigger = RankingMF(with_ghost.n_users, train.n_items, train.rating_scale, replace(SMALL, epochs=1))
    bigger.fit(with_ghost)
    assert torch.equal(bigger.score_all(torch.tensor([train.n_users]))[0], counts)


@pytest.mark.parametrize("mode", ["exact", "compact"])
def test_sgd_log_is_complete(data, mode):
    """With plain SGD, the logged updates of each row sum to the row's total change over
    training (the negatives' updates included)."""
    train, _ = data
    cfg = replace(SMALL, optimizer="sgd", learning_rate=0.5, epochs=3)
    model = RankingMF(train.n_users, train.n_items, train.rating_scale, cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cb = RollbackCallback(mode=mode)
    model.fit(train, callbacks=[cb])
    log = cb.log
    assert isinstance(log, RankRollbackLog) and log.n_examples == len(train)
    assert log.negatives == (mode == "exact")
    sums = log.row_sums(train, train.n_users, train.n_items)
    for name in ("user_factors", "item_factors", "item_bias"):
        change = model.state_dict()[f"{name}.weight"] - start[f"{name}.weight"]
        assert change.abs().max() > 1e-3
        torch.testing.assert_close(sums[name], change, atol=2e-5, rtol=1e-4)
    if mode == "exact":  # the ledger sums to the negatives' per-item total
        per_item = torch.zeros_like(log.negative_total).index_add_(0, log.neg_items, log.neg_updates)
        torch.testing.assert_close(per_item, log.negative_total, atol=1e-5, rtol=1e-4)


def test_log_save_load_round_trip(tmp_path, fitted):
    _, log, _ = fitted
    log.save(tmp_path / "log.safetensors")
    back = RankingMF.load_update_log(tmp_path / "log.safetensors")
    assert back.negatives and back.optimizer == log.optimizer
    for a, b in ((log.rows, back.rows), (log.neg_examples, back.neg_examples), (log.neg_updates, back.neg_updates)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["rollback", "newton"])
def test_explainer_returns_at_most_k_interactions_of_the_pair(data, fitted, method):
    train, _ = data
    model, log, _ = fitted
    user = 3
    item = int(torch.argmax(model.score_all(torch.tensor([user]))[0]))
    ex = model.explainer(train, log, method).explain(user, item, 4)
    assert isinstance(ex, Explanation) and ex.units == "score" and ex.method == method
    assert 0 < len(ex.contributions) <= 4
    assert ex.prediction == pytest.approx(float(model.score_all(torch.tensor([user]))[0, item]))
    effects = [c.effect for c in ex.contributions]
    assert effects == sorted(effects, reverse=True)
    for c in ex.contributions:
        z = c.example
        assert 0 <= z < len(train)
        touches = {"user": train.users[z] == user, "item": train.items[z] == item, "negative": True}
        touches["both"] = touches["user"] and touches["item"]
        assert touches[c.shares]
        assert c.user == train.user_ids.raw(int(train.users[z])) and c.item == train.item_ids.raw(int(train.items[z]))
    assert len(model.explainer(train, log, method).explain(user, item, 1000).contributions) == ex.n_candidates


def test_explainer_of_an_unknown_user_says_popularity(data, fitted):
    train, _ = data
    model, log, _ = fitted
    ex = model.explainer(train, log).explain(-1, 0, 3)
    assert ex.contributions == [] and ex.method.startswith("none: popularity")


def test_rollback_effect_is_the_score_change_of_rolling_the_log_back(data, fitted):
    """The closed form equals recomputing the score with the candidate's logged updates
    subtracted from the user and item rows."""
    from recsys.models.rankmf.explain import estimate_effects

    train, _ = data
    model, log, _ = fitted
    user = 5
    item = int(train.items[train.by_user.examples[train.by_user.row(user)][0]])  # a training pair: both rows
    ids, eff, su, si, _ = estimate_effects(model, train, user, item, "rollback", log)
    d = model.config.embedding_size
    p, q, b = (model.user_factors.weight[user].detach().double(), model.item_factors.weight[item].detach().double(),
               float(model.item_bias.weight[item, 0]))
    drew, neg = log.negative_updates(item)
    for n, z in enumerate(ids):
        dp = torch.from_numpy(log.user_updates([z])[0]) if su[n] else torch.zeros(d, dtype=torch.float64)
        dr = torch.from_numpy(log.positive_updates([z])[0]) if si[n] else torch.zeros(d + 1, dtype=torch.float64)
        dr = dr + torch.from_numpy(neg[drew == z].sum(0)) if (drew == z).any() else dr
        rolled = float((p - dp) @ (q - dr[:d])) + b - float(dr[d])
        assert eff[n] == pytest.approx(float(p @ q) + b - rolled, abs=1e-6)


def test_artefact_round_trip_gives_identical_scores(tmp_path, data, fitted):
    from recsys.artefact import load_artefact, save_artefact

    train, _ = data
    model, log, _ = fitted
    save_artefact(tmp_path / "m", model, train, rollback=log)
    art = load_artefact(tmp_path / "m")
    users = torch.tensor([-1, 0, 7, train.n_users - 1])
    assert art.task == "ranking" and isinstance(art.model, RankingMF)
    assert torch.equal(art.model.score_all(users), model.score_all(users))
    assert isinstance(art.rollback, RankRollbackLog) and torch.equal(art.rollback.rows, log.rows)


def test_leave_one_out_retrain_reproduces_fit_and_removal_changes_it(data):
    from recsys.experiments.rank_faithfulness import retrain

    train, _ = data
    cfg = replace(SMALL, epochs=3, optimizer="sparse-adam")
    model = RankingMF(train.n_users, train.n_items, train.rating_scale, cfg)
    model.fit(train)
    same = retrain(train, cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values(), strict=True))
    without = retrain(train, cfg, [0])
    assert not torch.equal(without.user_factors.weight, model.user_factors.weight)


def test_rollback_agrees_with_leave_one_out_on_a_small_problem(data):
    """Estimated and true (same-trajectory retrain) effects of the user's and item's
    interactions on one score are positively rank-correlated."""
    from scipy import stats

    from recsys.experiments.rank_faithfulness import retrain, score_and_rank
    from recsys.models.rankmf.explain import estimate_effects

    train, _ = data
    cfg = replace(SMALL, epochs=5, optimizer="sgd", learning_rate=0.5, lr_decay=0.9)
    model = RankingMF(train.n_users, train.n_items, train.rating_scale, cfg)
    cb = RollbackCallback(mode="exact")
    model.fit(train, callbacks=[cb])
    est, true = [], []
    for user in (2, 9):
        item = int(torch.argmax(model.score_all(torch.tensor([user]))[0]))
        ids, eff, su, si, _ = estimate_effects(model, train, user, item, "rollback", cb.log)
        s0, _ = score_and_rank(model, train, user, item)
        for n in np.flatnonzero(su | si)[:8]:
            est.append(eff[n])
            true.append(s0 - score_and_rank(retrain(train, cfg, [int(ids[n])]), train, user, item)[0])
    assert stats.spearmanr(est, true)[0] > 0.4
