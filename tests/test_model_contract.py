"""The contract every registered model follows, tested once for all of them.

`ModelContract` is a mixin of tests (after implicit's shared recommender test mixin): every
test takes the model by its ``model_name``, and the fixture runs it for every entry of
`recsys.models.MODELS`. Adding a model is one registry entry (plus a small config in
`SMALL_CONFIGS`, so that the suite stays fast); a model needing a variation subclasses
`ModelContract` and pins ``model_name``.

Covered: fit (the `Trainer`), predict (finite, on the scale, clipped), score_all (shape;
known and unknown users), save and load (identical predictions; corrupt artefacts are clear
errors), fold-in (`base.FoldIn` models), online update (`base.OnlineLearner`), explanation
shape (`base.Explainable`), unknown ids (fallback for ``-1``, `IndexError` beyond the tables).
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
from recsys.models import MODELS, build_model
from recsys.models.base import Contribution, Explainable, Explanation, FoldIn, OnlineLearner
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings, with_new_ratings

#: a small config per registered model (seconds to train on the synthetic ratings)
SMALL_CONFIGS = {"mf": {"embedding_size": 8, "n_blocks": 2},
                 "rec": {"embedding_size": 8, "hidden_size": 16, "prototypes": 4, "fanouts": (4, 2)}}
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
    assert set(SMALL_CONFIGS) == set(MODELS)


def test_unknown_config_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown mf config keys"):
        build_model("mf", 2, 2, (1, 5), {"embeding_size": 3})


class ModelContract:
    """The tests every model passes (a mixin: collected through `TestEveryModel`)."""

    @pytest.fixture(scope="class", params=sorted(MODELS))
    @classmethod
    def model_name(cls, request) -> str:
        """The model under test: every registered one (a subclass may pin one)."""
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
