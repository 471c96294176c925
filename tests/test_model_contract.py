"""The contract every model follows, tested once for all of them (add new models to MODELS
and they are covered): unknown users and items survive, predictions stay on the scale,
rankings have the right shape, artefacts round-trip exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recsys.artefact import load_artefact, save_artefact
from recsys.errors import ArtefactError
from recsys.models import MODELS, build_model
from recsys.train import TrainConfig, Trainer

SMALL_CONFIGS = {"mf": {"embedding_size": 8, "n_blocks": 2},
                 "rec": {"embedding_size": 8, "hidden_size": 16, "prototypes": 4, "fanouts": (4, 2)}}


@pytest.fixture(params=sorted(MODELS))
def trained(request, small_ratings):
    name = request.param
    # Ratings whose maps hold one user and one item with no rating at all.
    r = small_ratings
    maps = (r.user_ids.extend(["ghost-user"]), r.item_ids.extend(["ghost-item"]))
    train = r.with_id_maps(*maps)
    model = build_model(name, train.n_users, train.n_items, train.rating_scale, SMALL_CONFIGS.get(name))
    Trainer(TrainConfig(epochs=3, progress=False)).fit(model, train)
    return model, train


def test_every_model_is_listed_with_a_small_config():
    assert set(SMALL_CONFIGS) == set(MODELS)


def test_predictions_are_finite_and_on_the_scale(trained):
    model, train = trained
    u, i, _ = train.tensors()
    pred = model.predict(u, i)
    assert pred.shape == u.shape and torch.isfinite(pred).all()
    assert pred.min() >= 1 and pred.max() <= 5


def test_unknown_users_and_items_get_the_fallback_not_an_error(trained):
    model, train = trained
    ghost_u, ghost_i = train.user_ids.index("ghost-user"), train.item_ids.index("ghost-item")
    users = torch.tensor([ghost_u, 0, ghost_u, -1, 0])
    items = torch.tensor([0, ghost_i, ghost_i, 0, -1])
    pred = model.predict(users, items)
    assert torch.isfinite(pred).all() and pred.min() >= 1 and pred.max() <= 5
    user_known, item_known = model.known_mask(users, items)
    assert user_known.tolist() == [False, True, False, False, True]
    assert item_known.tolist() == [True, False, False, True, False]
    # an unseen user is predicted the same whether it has an index or not
    assert float(pred[0]) == pytest.approx(float(pred[3]))


def test_score_all_ranks_every_item_for_known_and_unknown_users(trained):
    model, train = trained
    scores = model.score_all(torch.tensor([0, 1, -1]))
    assert scores.shape == (3, train.n_items) and torch.isfinite(scores).all()


def test_artefact_round_trip_gives_identical_predictions(trained, tmp_path):
    model, train = trained
    save_artefact(tmp_path / "m", model, train, {"note": "test"})
    art = load_artefact(tmp_path / "m")
    u, i, _ = train.tensors()
    assert torch.equal(art.model.predict(u, i), model.predict(u, i))
    assert art.user_ids == train.user_ids and art.item_ids == train.item_ids
    assert np.array_equal(art.train.values, train.values)
    assert art.metadata["note"] == "test"


def test_corrupt_or_mismatched_artefacts_are_clear_errors(trained, tmp_path):
    model, train = trained
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


def test_saving_replaces_an_old_artefact_atomically(trained, tmp_path):
    model, train = trained
    save_artefact(tmp_path / "m", model, train, {"v": 1})
    save_artefact(tmp_path / "m", model, train, {"v": 2})
    assert load_artefact(tmp_path / "m").metadata["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_models_reject_out_of_range_indices(trained):
    model, _ = trained
    with pytest.raises(IndexError):
        model.predict(torch.tensor([model.n_users]), torch.tensor([0]))


def test_unknown_config_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown mf config keys"):
        build_model("mf", 2, 2, (1, 5), {"embeding_size": 3})
