"""Trainer: samplers, determinism, early stopping, divergence errors, callbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.errors import TrainingDivergedError
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.optim.sampling import SAMPLERS, make_sampler
from recsys.train import Callback, TrainConfig, Trainer


def model_for(r, **cfg):
    return MatrixFactorization(r.n_users, r.n_items, r.rating_scale,
                               MFConfig(**{"embedding_size": 8, "n_blocks": 2, **cfg}))


def rmse(m, r):
    u, i, v = r.tensors()
    return float(((m.predict(u, i) - v) ** 2).mean().sqrt())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_are_reproducible_per_epoch(name):
    a, b = make_sampler(name, 100, seed=3), make_sampler(name, 100, seed=3)
    assert np.array_equal(a.epoch_order(4), b.epoch_order(4))
    assert a.epoch_order(0).dtype == np.int64 and len(a.epoch_order(0)) == 100


def test_permutation_samplers_visit_every_example_once():
    for name in ("reshuffle", "shuffle-once", "fixed"):
        order = make_sampler(name, 57, seed=1).epoch_order(2)
        assert np.array_equal(np.sort(order), np.arange(57))
    rr = make_sampler("reshuffle", 57, seed=1)
    assert not np.array_equal(rr.epoch_order(0), rr.epoch_order(1))
    once = make_sampler("shuffle-once", 57, seed=1)
    assert np.array_equal(once.epoch_order(0), once.epoch_order(5))
    assert np.array_equal(make_sampler("fixed", 5).epoch_order(0), np.arange(5))


def test_with_replacement_repeats_some_examples():
    order = make_sampler("with-replacement", 1000, seed=0).epoch_order(0)
    assert len(np.unique(order)) < 1000


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        TrainConfig(sampler="nope")


@pytest.mark.parametrize("config", [
    TrainConfig(epochs=5, progress=False),
    TrainConfig(epochs=5, batch_size=16, learning_rate=0.5, progress=False),
    TrainConfig(epochs=5, batch_size=16, optimizer="adam", learning_rate=0.01, progress=False),
])
def test_training_is_deterministic_for_a_seed_and_lowers_the_error(small_ratings, config):
    runs = []
    for _ in range(2):
        m = model_for(small_ratings)
        m.prepare(small_ratings)
        before = rmse(m, small_ratings)
        Trainer(config).fit(m, small_ratings)
        runs.append(m)
        assert rmse(m, small_ratings) < before
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_trains(small_ratings, sampler):
    m = model_for(small_ratings)
    res = Trainer(TrainConfig(epochs=3, sampler=sampler, progress=False)).fit(m, small_ratings)
    assert len(res.history) == 3


def test_step_kind_follows_optimizer_batch_and_device(small_ratings):
    m = model_for(small_ratings)
    assert Trainer(TrainConfig()).step_kind(m) == "kernel"
    assert Trainer(TrainConfig(batch_size=64)).step_kind(m) == "closed-form"
    assert Trainer(TrainConfig(optimizer="adagrad")).step_kind(m) == "autograd"


def test_divergence_names_epoch_and_batch(small_ratings):
    m = model_for(small_ratings, init_std=1.0)
    with pytest.raises(TrainingDivergedError, match=r"epoch \d+, batch \d+"):
        Trainer(TrainConfig(epochs=20, batch_size=8, learning_rate=1e4, progress=False)).fit(m, small_ratings)


def test_early_stopping_restores_the_best_validation_epoch(small_ratings):
    r = small_ratings
    fit, val = r.subset(np.arange(len(r)) % 5 != 0), r.subset(np.arange(len(r)) % 5 == 0)
    m = model_for(r, reg=0.0, bias_reg=0.0, embedding_size=32, n_blocks=1)  # overfits quickly
    res = Trainer(TrainConfig(epochs=60, learning_rate=0.05, lr_decay=1.0, patience=3, progress=False)).fit(m, fit, val)
    assert res.best_epoch is not None
    assert res.stopped_early and len(res.history) == res.best_epoch + 3
    assert rmse(m, val) == pytest.approx(res.best_validation_rmse, abs=1e-6)


def test_callbacks_see_every_training_example_each_epoch(small_ratings):
    seen: list[np.ndarray] = []

    class Record(Callback):
        def on_batch_end(self, example_ids, loss):
            seen.append(example_ids.copy())

    for config in (TrainConfig(epochs=2, progress=False, chunk_size=50),
                   TrainConfig(epochs=2, batch_size=32, progress=False)):
        seen.clear()
        Trainer(config, callbacks=[Record()]).fit(model_for(small_ratings), small_ratings)
        ids = np.concatenate(seen)
        assert np.array_equal(np.bincount(ids, minlength=len(small_ratings)), np.full(len(small_ratings), 2))


def test_for_model_layers_model_then_optimizer_defaults_then_overrides():
    from recsys.models import EvidenceChainModel, MatrixFactorization

    assert TrainConfig.for_model(MatrixFactorization) == TrainConfig()
    adam = TrainConfig.for_model(MatrixFactorization, optimizer="adam")
    assert (adam.batch_size, adam.learning_rate) == (256, MatrixFactorization.optimizer_defaults["adam"]["learning_rate"])
    assert TrainConfig.for_model(MatrixFactorization, optimizer="adam", learning_rate=0.5).learning_rate == 0.5
    rec = TrainConfig.for_model(EvidenceChainModel)
    assert rec.optimizer == EvidenceChainModel.training_defaults["optimizer"]
