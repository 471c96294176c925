"""The contract every registered model follows, tested once for all of them.

`ModelContract` is a mixin of tests (after implicit's shared recommender test mixin): every
test takes the model by its ``model_name``, and the fixture runs it for every rating model
(``task == "rating"``) of `recsys.models.MODELS`; `RankingContract` does the same for every
ranking model (``task == "ranking"``). Adding a model is one registry entry (plus a small
config in `SMALL_CONFIGS` or `SMALL_RANKER_CONFIGS`, so that the suite stays fast); a model
needing a variation subclasses its contract and pins ``model_name``.

Covered: fit (the `Trainer`), predict (finite, on the scale, clipped), score_all (shape;
known and unknown users), save and load (identical predictions; corrupt artefacts are clear
errors), fold-in (`base.FoldIn` models), online update (`base.OnlineLearner`), explanation
shape (`base.Explainable`), unknown ids (fallback for ``-1``, `IndexError` beyond the tables).
Ranking models (`RankingContract`): fit (their own ``fit``), score_all (shape, finite; users
with no interaction get `RankingModel.popularity_scores`), save and load (identical scores),
online learning (``learn``: a new user's list moves toward the items like theirs, a trained
user's list changes) and explanations (`base.Explanation` whose contributions are rows of the
user's interactions). A model whose ``path`` of a trained user is ``popularity`` ranks
everyone alike (the popularity ranker): the personalisation tests do not apply to it.

The capability tests are written against the protocols of `recsys.models.base` only: no test
here names a concrete model class.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from recsys.artefact import load_artefact, save_artefact
from recsys.errors import ArtefactError
from recsys.models import MODELS, build_model, ranking_models, rating_models
from recsys.models.base import Contribution, Explainable, Explanation, FoldIn, OnlineLearner
from recsys.ratings import Ratings
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings, with_new_ratings

#: a small config per registered rating model (seconds to train on the synthetic ratings)
SMALL_CONFIGS = {"mf": {"embedding_size": 8, "n_blocks": 2},
                 "rec": {"embedding_size": 8, "hidden_size": 16, "prototypes": 4, "fanouts": (4, 2)}}
#: a small config per registered ranking model (a second or so to fit on `ranking_data`)
#: (the two-taste data is of rank two: a few factors suffice, more would memorise it)
#: (EASE without its popularity prior for few-interaction users, tested in test_ease.py: the
#: two-taste data's popularity favours one taste by construction, which the prior would follow)
SMALL_RANKER_CONFIGS = {"ease": {"reg": 10.0, "cold_weight": 0.0}, "popular": {},
                        "als": {"embedding_size": 2, "iterations": 10, "reg": 0.1},
                        "bpr": {"embedding_size": 4, "iterations": 100},
                        "rank-mf": {"embedding_size": 4, "epochs": 40, "learning_rate": 0.05}}
EPOCHS = 3
#: the raw ids in the maps with no training rating
GHOST_USER, GHOST_ITEM = "ghost-user", "ghost-item"


def contract_ratings():
    """Small synthetic ratings (`tests.conftest.make_ratings`) whose maps also hold one user
    and one item with no rating at all."""
    r = make_ratings()
    return r.with_id_maps(r.user_ids.extend([GHOST_USER]), r.item_ids.extend([GHOST_ITEM]))


def fit(name: str):
    """``(model, training ratings, TrainResult)``: model ``name`` trained by the `Trainer`."""
    train = contract_ratings()
    model = build_model(name, train.n_users, train.n_items, train.rating_scale, SMALL_CONFIGS.get(name))
    result = Trainer(TrainConfig(epochs=EPOCHS, progress=False)).fit(model, train)
    return model, train, result


def _tensors(result: object) -> list[torch.Tensor]:
    """A fold-in's result (a tensor or a tuple of them) as a flat list of tensors."""
    parts = result if isinstance(result, tuple | list) else (result,)
    return [torch.as_tensor(t).reshape(-1) for t in parts]


def test_every_model_is_listed_with_a_small_config():
    assert set(SMALL_CONFIGS) == set(rating_models())
    assert set(ranking_models()) <= set(SMALL_RANKER_CONFIGS)
    assert set(rating_models()) | set(ranking_models()) == set(MODELS)  # every model has a task


def test_unknown_config_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown mf config keys"):
        build_model("mf", 2, 2, (1, 5), {"embeding_size": 3})


class ModelContract:
    """The tests every model passes (a mixin: collected through `TestEveryModel`)."""

    @pytest.fixture(scope="class", params=rating_models())
    @classmethod
    def model_name(cls, request) -> str:
        """The model under test: every registered rating model (a subclass may pin one)."""
        return request.param

    @pytest.fixture(scope="class")
    @classmethod
    def trained(cls, model_name):
        """One trained model per model name, for the tests that do not change it."""
        return fit(model_name)

    @pytest.fixture
    def fresh(self, model_name):
        """A newly trained model, for the tests that change it (online updates)."""
        return fit(model_name)

    # ------------------------------------------------------------------ capabilities
    def test_implements_the_service_protocols_online_learner_and_explainable(self, trained):
        model, _, _ = trained
        assert isinstance(model, OnlineLearner), f"{model.name} lacks learn/path (base.OnlineLearner)"
        assert isinstance(model, Explainable), f"{model.name} lacks explainer (base.Explainable)"

    # ------------------------------------------------------------------ fit
    def test_fit_trains_through_the_trainer_with_finite_losses(self, trained):
        model, train, result = trained
        assert len(result.history) == EPOCHS
        assert all(math.isfinite(h.train_mse) for h in result.history)
        assert not model.training  # fit leaves the model in eval mode
        assert model.known_users.tolist() == (train.user_counts() > 0).tolist()

    # ------------------------------------------------------------------ predict
    def test_predictions_are_finite_and_on_the_scale(self, trained):
        model, train, _ = trained
        u, i, _ = train.tensors()
        pred = model.predict(u, i)
        assert pred.shape == u.shape and torch.isfinite(pred).all()
        assert pred.min() >= 1 and pred.max() <= 5

    def test_predictions_are_the_clipped_forward_pass(self, trained):
        model, train, _ = trained
        u, i, _ = train.tensors()
        with torch.no_grad():
            raw = model(u, i)
        assert torch.allclose(model.predict(u, i), raw.clamp(*train.rating_scale), atol=1e-5)

    # ------------------------------------------------------------------ score_all
    def test_score_all_ranks_every_item_for_known_and_unknown_users(self, trained):
        model, train, _ = trained
        ghost = train.user_ids.index(GHOST_USER)
        scores = model.score_all(torch.tensor([0, 1, -1, ghost]))
        assert scores.shape == (4, train.n_items) and torch.isfinite(scores).all()
        # users with no rating get the one non-personalised ranking; known users their own
        assert torch.allclose(scores[2], scores[3])
        assert not torch.allclose(scores[0], scores[2])

    # ------------------------------------------------------------------ save and load
    def test_artefact_round_trip_gives_identical_predictions(self, trained, tmp_path):
        model, train, _ = trained
        save_artefact(tmp_path / "m", model, train, {"note": "test"})
        art = load_artefact(tmp_path / "m")
        u, i, _ = train.tensors()
        assert torch.equal(art.model.predict(u, i), model.predict(u, i))
        assert art.user_ids == train.user_ids and art.item_ids == train.item_ids
        assert np.array_equal(art.train.values, train.values)
        assert art.metadata["note"] == "test"

    def test_corrupt_or_mismatched_artefacts_are_clear_errors(self, trained, tmp_path):
        model, train, _ = trained
        path = save_artefact(tmp_path / "m", model, train)
        (path / "weights.safetensors").write_bytes(b"not a tensor file")
        with pytest.raises(ArtefactError, match="corrupt tensor file"):
            load_artefact(path)
        path = save_artefact(tmp_path / "m", model, train)
        meta = json.loads((path / "model.json").read_text())
        meta["format_version"] = 999
        (path / "model.json").write_text(json.dumps(meta))
        with pytest.raises(ArtefactError, match="format version 999"):
            load_artefact(path)
        path = save_artefact(tmp_path / "m", model, train)
        ids = json.loads((path / "ids.json").read_text())
        ids["users"] = ids["users"][:-1]
        (path / "ids.json").write_text(json.dumps(ids))
        with pytest.raises(ArtefactError, match="does not match"):
            load_artefact(path)
        with pytest.raises(ArtefactError, match="no such model directory"):
            load_artefact(tmp_path / "missing")
        (path / "ratings.safetensors").unlink()
        with pytest.raises(ArtefactError, match="missing ratings.safetensors"):
            load_artefact(path)

    def test_saving_replaces_an_old_artefact_atomically(self, trained, tmp_path):
        model, train, _ = trained
        save_artefact(tmp_path / "m", model, train, {"v": 1})
        save_artefact(tmp_path / "m", model, train, {"v": 2})
        assert load_artefact(tmp_path / "m").metadata["v"] == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

    # ------------------------------------------------------------------ unknown ids
    def test_unknown_users_and_items_get_the_fallback_not_an_error(self, trained):
        model, train, _ = trained
        ghost_u, ghost_i = train.user_ids.index(GHOST_USER), train.item_ids.index(GHOST_ITEM)
        users = torch.tensor([ghost_u, 0, ghost_u, -1, 0])
        items = torch.tensor([0, ghost_i, ghost_i, 0, -1])
        pred = model.predict(users, items)
        assert torch.isfinite(pred).all() and pred.min() >= 1 and pred.max() <= 5
        user_known, item_known = model.known_mask(users, items)
        assert user_known.tolist() == [False, True, False, False, True]
        assert item_known.tolist() == [True, False, False, True, False]
        # an unseen user is predicted the same whether it has an index or not
        assert float(pred[0]) == pytest.approx(float(pred[3]))

    def test_models_reject_out_of_range_indices(self, trained):
        model, _, _ = trained
        with pytest.raises(IndexError):
            model.predict(torch.tensor([model.n_users]), torch.tensor([0]))
        with pytest.raises(IndexError):
            model.predict(torch.tensor([0]), torch.tensor([model.n_items]))

    # ------------------------------------------------------------------ online update
    def test_online_learner_a_trained_user_s_new_ratings_change_their_predictions(self, fresh):
        model, train, _ = fresh
        if not isinstance(model, OnlineLearner):
            pytest.fail(f"{model.name} is not a base.OnlineLearner")
        user = 0
        unrated = np.setdiff1d(np.arange(train.n_items), train.items[train.users == user])
        unrated = unrated[train.item_counts()[unrated] > 0][:3]
        assert len(unrated), "the synthetic user rated every item"
        every = torch.arange(train.n_items)
        before = model.predict(torch.full_like(every, user), every)
        raw_user = train.user_ids.raw(user)
        raw_items = [train.item_ids.raw(int(i)) for i in unrated]
        # ratings against the model's current guess, so that any update must move it
        values = [1.0 if float(before[int(i)]) > 3 else 5.0 for i in unrated]
        ratings, new = with_new_ratings(train, [raw_user] * len(raw_items), raw_items, values)
        model.learn(ratings, new)
        after = model.predict(torch.full_like(every, user), every)
        assert torch.isfinite(after).all() and after.min() >= 1 and after.max() <= 5
        assert not torch.allclose(before, after)
        assert model.path(user) in ("model", "online", "fold-in")

    def test_online_learner_a_new_user_leaves_the_fallback_toward_their_ratings(self, fresh):
        """A user the model never saw rates a few items high (another user: low): after
        `learn`, `path` no longer says fallback and the predictions for those items move from
        the fallback toward the ratings."""
        model, train, _ = fresh
        if not isinstance(model, OnlineLearner):
            pytest.fail(f"{model.name} is not a base.OnlineLearner")
        assert model.path(-1) == "fallback"
        assert model.path(train.user_ids.index(GHOST_USER)) == "fallback"
        items = np.arange(6)
        fallback = model.predict(torch.full((len(items),), -1), torch.from_numpy(items))
        raw_items = [train.item_ids.raw(int(i)) for i in items]
        ratings, new = with_new_ratings(train, ["fan"] * 6 + ["critic"] * 6, raw_items * 2,
                                        [5.0] * 6 + [1.0] * 6)
        model.learn(ratings, new)
        fan, critic = ratings.user_ids.index("fan"), ratings.user_ids.index("critic")
        assert model.path(fan) != "fallback" and model.path(critic) != "fallback"
        t_items = torch.from_numpy(items)
        high = model.predict(torch.full_like(t_items, fan), t_items)
        low = model.predict(torch.full_like(t_items, critic), t_items)
        assert torch.isfinite(high).all() and torch.isfinite(low).all()
        assert float(high.mean()) > float(fallback.mean()) > float(low.mean())
        # still nothing known of a user with no rating
        assert model.path(-1) == "fallback"

    # ------------------------------------------------------------------ fold-in
    def test_fold_in_a_new_user_is_placed_from_their_ratings_alone(self, fresh):
        """`base.FoldIn` models: the fold-in of a new user's ratings is finite and the same
        each time, does not move the model, and a new user learnt online is answered by it."""
        model, train, _ = fresh
        if not isinstance(model, FoldIn):
            pytest.skip(f"{model.name} does not implement base.FoldIn")
        items = torch.arange(5)
        u, i, _ = train.tensors()
        before = model.predict(u, i)
        high = _tensors(model.fold_in_user(items, torch.full((5,), 5.0)))
        again = _tensors(model.fold_in_user(items, torch.full((5,), 5.0)))
        low = _tensors(model.fold_in_user(items, torch.full((5,), 1.0)))
        assert high and all(torch.isfinite(t).all() for t in high)
        assert all(torch.equal(a, b) for a, b in zip(high, again, strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(high, low, strict=True))
        assert torch.equal(model.predict(u, i), before)  # a fold-in alone changes nothing
        if isinstance(model, OnlineLearner):
            raw_items = [train.item_ids.raw(int(x)) for x in items]
            ratings, new = with_new_ratings(train, ["newcomer"] * 5, raw_items, [5.0] * 5)
            model.learn(ratings, new)
            assert model.path(ratings.user_ids.index("newcomer")) == "fold-in"

    # ------------------------------------------------------------------ explanation
    def test_explainable_explanations_have_the_one_shape(self, trained):
        model, train, _ = trained
        if not isinstance(model, Explainable):
            pytest.fail(f"{model.name} is not a base.Explainable")
        explainer = model.explainer(train)
        assert isinstance(explainer.method, str) and explainer.method
        k = 4
        for user, item in ((0, int(train.items[train.users == 0][0])), (1, 2), (3, 0)):
            exp = explainer.explain(user, item, k)
            assert isinstance(exp, Explanation)
            assert exp.user == train.user_ids.raw(user) and exp.item == train.item_ids.raw(item)
            assert math.isfinite(exp.prediction)
            assert isinstance(exp.method, str) and exp.method
            assert 0 < len(exp.contributions) <= k
            assert len(exp.contributions) <= exp.n_candidates
            effects = [c.effect for c in exp.contributions]
            assert all(math.isfinite(e) for e in effects)
            assert [abs(e) for e in effects] == sorted((abs(e) for e in effects), reverse=True)
            for c in exp.contributions:
                assert isinstance(c, Contribution)
                assert 0 <= c.example < len(train)
                assert c.user == train.user_ids.raw(int(train.users[c.example]))
                assert c.item == train.item_ids.raw(int(train.items[c.example]))
                assert c.rating == pytest.approx(float(train.values[c.example]))
            assert json.loads(json.dumps(exp.to_dict()))["user"] == exp.user

    def test_explainable_the_fallback_path_is_explained_by_no_rating(self, trained):
        model, train, _ = trained
        if not isinstance(model, Explainable):
            pytest.fail(f"{model.name} is not a base.Explainable")
        ghost = train.user_ids.index(GHOST_USER)
        exp = model.explainer(train).explain(ghost, 0, 5)
        assert isinstance(exp, Explanation) and exp.user == GHOST_USER
        assert exp.contributions == [] and exp.method.startswith("none")
        assert math.isfinite(exp.prediction)


class TestEveryModel(ModelContract):
    """`ModelContract` for every entry of `recsys.models.MODELS`."""


# =============================================================================== ranking models
#: items of the two tastes in `ranking_data` (the second is the more popular)
TASTE_A, TASTE_B = np.arange(0, 12), np.arange(12, 24)


def ranking_data() -> Ratings:
    """Implicit interactions (value 1, scale (0, 1), timestamps) of two tastes: 30 users
    choose mostly among items 0-11 (`TASTE_A`), 45 users mostly among items 12-23
    (`TASTE_B`, hence the more popular); the maps also hold a user and an item with no
    interaction."""
    rng = np.random.default_rng(7)
    users, items = [], []
    for u in range(75):
        own, other = (TASTE_A, TASTE_B) if u < 30 else (TASTE_B, TASTE_A)
        chosen = np.concatenate([rng.choice(own, size=6, replace=False), rng.choice(other, size=1)])
        users += [f"u{u}"] * len(chosen)
        items += [f"i{i}" for i in chosen]
    order = rng.permutation(len(users))
    r = Ratings.from_arrays(np.asarray(users)[order], np.asarray(items)[order], np.ones(len(users)),
                            np.arange(len(users)) * 10, rating_scale=(0.0, 1.0))
    return r.with_id_maps(r.user_ids.extend([GHOST_USER]), r.item_ids.extend([GHOST_ITEM]))


def fit_ranker(name: str, data: Ratings | None = None):
    """``(model, interactions, fit summary)``: ranking model ``name`` fitted on ``data``
    (default `ranking_data`)."""
    train = ranking_data() if data is None else data
    model = build_model(name, train.n_users, train.n_items, train.rating_scale, SMALL_RANKER_CONFIGS.get(name))
    summary = model.fit(train)
    return model, train, summary


def _item_index(train: Ratings, items: np.ndarray) -> np.ndarray:
    return train.item_ids.indices([f"i{i}" for i in items])


def _top(scores: torch.Tensor, exclude: np.ndarray, k: int) -> np.ndarray:
    s = scores.clone()
    s[torch.from_numpy(exclude)] = -torch.inf
    return torch.topk(s, k).indices.numpy()


class RankingContract:
    """The tests every ranking model passes (a mixin: collected through `TestEveryRanker`)."""

    @pytest.fixture(scope="class", params=ranking_models())
    @classmethod
    def model_name(cls, request) -> str:
        """The model under test: every registered ranking model (a subclass may pin one)."""
        return request.param

    @pytest.fixture(scope="class")
    @classmethod
    def fitted(cls, model_name):
        return fit_ranker(model_name)

    @pytest.fixture
    def fresh(self, model_name):
        return fit_ranker(model_name)

    @staticmethod
    def personalised(model, train: Ratings) -> bool:
        return model.path(train.user_ids.index("u0")) != "popularity"

    # ------------------------------------------------------------------ capabilities
    def test_is_a_ranking_model_with_the_service_protocols(self, fitted):
        model, _, _ = fitted
        assert model.task == "ranking"
        assert isinstance(model, OnlineLearner), f"{model.name} lacks learn/path (base.OnlineLearner)"
        assert isinstance(model, Explainable), f"{model.name} lacks explainer (base.Explainable)"

    # ------------------------------------------------------------------ fit
    def test_fit_knows_the_users_and_items_and_reports_its_time(self, fitted):
        model, train, summary = fitted
        assert math.isfinite(summary["fit_seconds"]) and summary["fit_seconds"] >= 0
        json.dumps(summary)  # JSON-ready
        assert model.known_users.tolist() == (train.user_counts() > 0).tolist()
        assert model.known_items.tolist() == (train.item_counts() > 0).tolist()

    def test_fits_explicit_ratings_too(self, model_name):
        model, train, _ = fit_ranker(model_name, contract_ratings())
        scores = model.score_all(torch.arange(5))
        assert scores.shape == (5, train.n_items) and torch.isfinite(scores).all()

    # ------------------------------------------------------------------ score_all
    def test_score_all_shape_and_finite_and_unknown_users_get_popularity(self, fitted):
        model, train, _ = fitted
        ghost = train.user_ids.index(GHOST_USER)
        users = torch.tensor([0, 1, 40, -1, ghost])
        scores = model.score_all(users)
        assert scores.shape == (5, train.n_items) and scores.dtype == torch.float32
        assert torch.isfinite(scores).all()
        popularity = model.popularity_scores(1)[0]
        assert torch.allclose(scores[3], popularity) and torch.allclose(scores[4], popularity)
        # popularity: the more often chosen item first
        counts = torch.from_numpy(train.item_counts().astype(np.float32))
        assert int(torch.argmax(popularity)) in torch.nonzero(counts == counts.max()).reshape(-1).tolist()

    def test_trained_users_get_their_own_lists(self, fitted):
        model, train, _ = fitted
        if not self.personalised(model, train):
            pytest.skip(f"{model.name} ranks every user alike")
        a, b = train.user_ids.index("u0"), train.user_ids.index("u50")
        scores = model.score_all(torch.tensor([a, b]))
        assert not torch.allclose(scores[0], scores[1])
        # each user's top unseen items are of their own taste
        for row, user, taste in ((0, a, TASTE_A), (1, b, TASTE_B)):
            seen = train.items[train.users == user]
            top = _top(scores[row], seen, 3)
            assert np.isin(top, _item_index(train, taste)).sum() >= 2, (model.name, user, top)

    # ------------------------------------------------------------------ save and load
    def test_artefact_round_trip_gives_identical_scores(self, fitted, tmp_path):
        model, train, _ = fitted
        save_artefact(tmp_path / "r", model, train, {"note": "ranker"})
        art = load_artefact(tmp_path / "r")
        assert art.model.task == "ranking" and art.metadata["task"] == "ranking"
        users = torch.tensor([0, 1, 40, -1, train.user_ids.index(GHOST_USER)])
        assert torch.allclose(art.model.score_all(users), model.score_all(users), atol=1e-6, rtol=1e-6)
        assert art.user_ids == train.user_ids and art.item_ids == train.item_ids

    # ------------------------------------------------------------------ online learning
    def test_learn_moves_a_new_user_s_list_toward_their_items(self, fresh):
        """A user the model never saw chooses four items of the less popular taste: before,
        their list is the popularity list (mostly the other taste); after `learn`, with no
        refit, most of their top five are of their taste."""
        model, train, _ = fresh
        taste_a = _item_index(train, TASTE_A)
        chosen = taste_a[:4]
        before = model.score_all(torch.tensor([-1]))[0]
        assert np.isin(_top(before, chosen, 5), taste_a).sum() <= 2
        ratings, new = with_new_ratings(train, ["newcomer"] * 4, [train.item_ids.raw(int(i)) for i in chosen],
                                        [1.0] * 4)
        model.learn(ratings, new)
        u = ratings.user_ids.index("newcomer")
        after = model.score_all(torch.tensor([u]))[0]
        assert after.shape == (train.n_items,) and torch.isfinite(after).all()
        if not self.personalised(model, train):
            assert model.path(u) == "popularity"
            return
        assert model.path(u) != "popularity"
        assert np.isin(_top(after, chosen, 5), taste_a).sum() >= 4, (model.name, _top(after, chosen, 5))
        assert model.path(-1) == "popularity" or model.path(-1) == "fallback"

    def test_learn_changes_a_trained_user_s_scores(self, fresh):
        model, train, _ = fresh
        if not self.personalised(model, train):
            pytest.skip(f"{model.name} ranks every user alike")
        user = train.user_ids.index("u0")
        before = model.score_all(torch.tensor([user]))[0]
        unseen = np.setdiff1d(_item_index(train, TASTE_B), train.items[train.users == user])[:3]
        ratings, new = with_new_ratings(train, ["u0"] * 3, [train.item_ids.raw(int(i)) for i in unseen], [1.0] * 3)
        model.learn(ratings, new)
        after = model.score_all(torch.tensor([user]))[0]
        assert torch.isfinite(after).all() and not torch.allclose(before, after)

    # ------------------------------------------------------------------ explanation
    def test_explanations_are_the_interactions_behind_the_score(self, fitted):
        model, train, _ = fitted
        explainer = model.explainer(train)
        assert isinstance(explainer.method, str) and explainer.method
        k = 3
        for raw in ("u0", "u50"):
            user = train.user_ids.index(raw)
            seen = train.items[train.users == user]
            item = int(_top(model.score_all(torch.tensor([user]))[0], seen, 1)[0])
            exp = explainer.explain(user, item, k)
            assert isinstance(exp, Explanation)
            assert exp.user == raw and exp.item == train.item_ids.raw(item)
            assert math.isfinite(exp.prediction)
            if not self.personalised(model, train):
                assert exp.method.startswith("none") and exp.contributions == []
                continue
            assert 0 < len(exp.contributions) <= k and len(exp.contributions) <= exp.n_candidates
            effects = [c.effect for c in exp.contributions]
            assert all(math.isfinite(e) for e in effects)
            # largest first: by size (additive splits) or by how much they raised the score
            assert (effects == sorted(effects, reverse=True)
                    or [abs(e) for e in effects] == sorted((abs(e) for e in effects), reverse=True))
            for c in exp.contributions:
                assert isinstance(c, Contribution)
                assert 0 <= c.example < len(train)
                # an interaction of the user, or one that reaches the score through the item's
                # row (another user's interaction with it, or a sampled negative of the model)
                assert int(train.users[c.example]) == user or c.shares in ("item", "negative")
                assert c.user == train.user_ids.raw(int(train.users[c.example]))
                assert c.item == train.item_ids.raw(int(train.items[c.example]))
                assert c.rating == pytest.approx(float(train.values[c.example]))
            assert json.loads(json.dumps(exp.to_dict()))["user"] == raw

    def test_explaining_a_user_with_no_interaction_credits_none(self, fitted):
        model, train, _ = fitted
        ghost = train.user_ids.index(GHOST_USER)
        exp = model.explainer(train).explain(ghost, 0, 5)
        assert isinstance(exp, Explanation) and exp.user == GHOST_USER
        assert exp.contributions == [] and exp.method.startswith("none")


class TestEveryRanker(RankingContract):
    """`RankingContract` for every ranking model of `recsys.models.MODELS`."""
