"""Gradient rollback for the evidence-chain model (REC) and its evidence effects: what the
log holds, that per-example credits are exact where they should be, and that the evidence
effect is the prediction recomputed without the rating. Small synthetic data only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.experiments.rec_rollback import (
    ChainTap,
    RECRollbackCallback,
    RECRollbackLog,
    baselines_without,
    evidence_candidates,
    evidence_effects,
    explain_rec,
    neighbourhood_candidates,
    per_example_gradients,
    predict_without,
    raw_prediction,
    retrain,
    rollback_effects,
    training_baseline,
)
from recsys.models.rec.model import EvidenceChainModel, RECConfig, fit_baseline
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings

SMALL = {"embedding_size": 8, "hidden_size": 16, "prototypes": 4, "fanouts": (6, 4), "eval_passes": 2}


@pytest.fixture(scope="module")
def ratings():
    return make_ratings(n_users=40, n_items=25, n=500, seed=1)


def build(ratings, **over) -> EvidenceChainModel:
    return EvidenceChainModel(ratings.n_users, ratings.n_items, ratings.rating_scale, RECConfig(**{**SMALL, **over}))


def sgd(epochs=2, batch=64, lr=0.05, **over) -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer="sgd", learning_rate=lr, lr_decay=1.0, batch_size=batch,
                       patience=None, progress=False, **over)


def fit(ratings, config, model_over=None, **cb):
    model = build(ratings, **(model_over or {}))
    callback = RECRollbackCallback(**cb)
    Trainer(config, callbacks=[callback]).fit(model, ratings)
    return model, callback


@pytest.fixture(scope="module")
def adam_fit(ratings):
    config = TrainConfig(epochs=3, optimizer="adam", learning_rate=0.01, batch_size=64, lr_decay=1.0,
                         patience=None, progress=False)
    model, cb = fit(ratings, config, record_sampling=True)
    return model, cb, config


# ---------------------------------------------------------------------------- per-example gradients
@pytest.mark.parametrize("fanouts", [(6, 4), (6, 4, 3)])
def test_expanded_recomputation_reproduces_the_batch_and_splits_its_gradient_exactly(ratings, fanouts):
    """Each example's private copy of its chains gives the batch's prediction, and the
    per-example prototype gradients sum to the batch gradient of the prototype table, also
    for rows reached by several examples (completeness), with evidence dropout and, at depth
    3, the parent skip."""
    model = build(ratings, fanouts=fanouts, evidence_dropout=0.3)
    model.prepare(ratings)
    model.train()
    u, i, _ = ratings.tensors()
    idx = torch.arange(96)
    with ChainTap(model) as tap:
        out = model.forward(u[idx], i[idx])
    roots, chains = tap.calls[0]
    graph, _ = model.live()
    root_bias, baseline = training_baseline(model, graph, roots, chains, u[idx], i[idx],
                                            tap.kwargs[0].get("root_keep"))
    group, slot, grad, scores = per_example_gradients(model, chains, roots, u[idx], i[idx], root_bias)
    pred = baseline + scores
    assert torch.allclose(pred, out.detach(), atol=1e-6)
    w = torch.randn(len(idx), generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    (out * w).sum().backward()
    split = torch.zeros_like(model.prototype_vectors).index_add_(0, slot, grad * w[group].unsqueeze(1))
    assert torch.allclose(split, model.prototype_vectors.grad, atol=1e-5)
    # rows really are shared within the batch: the split is not a trivial one
    per_slot = torch.bincount(slot, minlength=len(model.prototype_vectors))
    assert int(per_slot.max()) > 5


# ---------------------------------------------------------------------------- the log
def test_log_is_compact_sparse_csr_over_examples_and_prototype_rows(ratings, adam_fit):
    model, cb, _ = adam_fit
    log = cb.log
    assert isinstance(log, RECRollbackLog) and log.optimizer == "adam"
    n_slots = len(model.prototype_vectors)
    assert log.n_examples == len(ratings) and log.n_slots == n_slots
    assert log.indptr.shape == (len(ratings) + 1,) and int(log.indptr[-1]) == log.nnz
    assert log.slots.dtype == torch.int32 and log.updates.shape == (log.nnz, model.config.embedding_size)
    reached = log.reached_per_example()
    assert reached.max() <= n_slots and (reached > 0).mean() > 0.9
    # sorted, unique slots per example
    for z in range(0, len(ratings), 37):
        s, _ = log.rows(z)
        assert torch.all(s[1:] > s[:-1])
    assert log.nbytes == 8 * (log.n_examples + 1) + 4 * log.nnz + 4 * log.nnz * model.config.embedding_size
    # three epochs of sampling states, one per step plus the start
    steps = 3 * int(np.ceil(len(ratings) / 64))
    assert len(cb.sampling_states) == steps + 1


def test_log_round_trips_compacts_and_grows(ratings, adam_fit, tmp_path):
    _, cb, _ = adam_fit
    log = cb.log
    log.save(tmp_path / "rec_rollback.safetensors")
    back = RECRollbackLog.load(tmp_path / "rec_rollback.safetensors")
    assert torch.equal(back.indptr, log.indptr) and torch.equal(back.slots, log.slots)
    assert torch.equal(back.updates, log.updates) and back.optimizer == "adam"
    half = RECRollbackLog.load(tmp_path / "rec_rollback.safetensors").compact()
    assert half.dtype == torch.float16 and half.nbytes < log.nbytes
    grown = RECRollbackLog.load(tmp_path / "rec_rollback.safetensors").extend(3)
    assert grown.n_examples == log.n_examples + 3 and len(grown.rows(log.n_examples + 2)[0]) == 0
    ids = torch.tensor([0, 0, 5])
    slots = torch.tensor([int(log.rows(0)[0][0]), 10**6 % log.n_slots, int(log.rows(5)[0][-1])])
    got = log.lookup(ids, slots)
    assert torch.equal(got[0], log.rows(0)[1][0]) and torch.equal(got[2], log.rows(5)[1][-1])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError):
        RECRollbackLog.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("chain_group", [256, 24])
def test_sgd_log_is_complete_every_prototype_rows_change_is_credited(ratings, chain_group):
    """Plain SGD without the prototype L2: the log summed per prototype row equals the row's
    total change over training (every update credited to the examples that caused it), also
    when each batch is sampled in several chain groups."""
    model = build(ratings, reg=0.0, chain_group=chain_group)
    model.prepare(ratings)
    start = model.prototype_vectors.detach().clone()
    cb = RECRollbackCallback()
    Trainer(sgd(epochs=2), callbacks=[cb]).fit(model, ratings)
    change = model.prototype_vectors.detach() - start
    assert torch.allclose(cb.log.row_sums(), change, atol=1e-5)
    assert float(change.abs().max()) > 1e-3


def test_one_sgd_step_logged_update_equals_brute_force_removal(ratings):
    """One SGD step over the whole data: removing an example (same chains, loss weight 0)
    moves the prototype rows by exactly the logged update."""
    config = sgd(epochs=1, batch=len(ratings), lr=0.5)
    over = {"reg": 0.0, "evidence_dropout": 0.0}
    model, cb = fit(ratings, config, over, record_sampling=True)
    for z in (3, 77, 250):
        without = retrain(ratings, RECConfig(**{**SMALL, **over}), config, [z],
                          sampling_states=cb.sampling_states, evidence=False)
        true = model.prototype_vectors.detach() - without.prototype_vectors.detach()
        slots, upd = cb.log.rows(z)
        logged = torch.zeros_like(true).index_add_(0, slots, upd)
        assert torch.allclose(logged, true, atol=2e-6)


def test_many_sgd_steps_logged_update_vs_brute_force_error_is_measured(ratings):
    """Several SGD epochs: later steps see the changed rows and MLPs, so the log is no longer
    exact; the measured error on the prototype rows stays moderate (about 10-30% here)."""
    config = sgd(epochs=3, batch=32, lr=0.05)
    over = {"reg": 0.0, "evidence_dropout": 0.0}
    model, cb = fit(ratings, config, over, record_sampling=True)
    errs, cos = [], []
    for z in (3, 77, 250, 401):
        without = retrain(ratings, RECConfig(**{**SMALL, **over}), config, [z],
                          sampling_states=cb.sampling_states, evidence=False)
        true = model.prototype_vectors.detach() - without.prototype_vectors.detach()
        slots, upd = cb.log.rows(z)
        logged = torch.zeros_like(true).index_add_(0, slots, upd)
        errs.append(float((logged - true).norm() / true.norm()))
        cos.append(float(torch.nn.functional.cosine_similarity(logged.flatten(), true.flatten(), dim=0)))
    print("relative error", np.round(errs, 3), "cosine", np.round(cos, 3))
    assert np.median(errs) < 0.6 and min(cos) > 0.8


# ---------------------------------------------------------------------------- retraining
def test_retrain_with_nothing_removed_reproduces_trainer_fit_bit_for_bit(ratings, adam_fit):
    model, cb, config = adam_fit
    again = retrain(ratings, RECConfig(**SMALL), config, sampling_states=cb.sampling_states)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    free = retrain(ratings, RECConfig(**SMALL), config)  # the sampler's own stream: the same
    assert torch.equal(free.prototype_vectors, model.prototype_vectors)


def test_a_retrain_without_a_rating_keeps_the_full_runs_sampling_stream_in_step(ratings, adam_fit):
    """Keyed draws take one key per step whatever the chains hide, so retraining without a
    rating on the sampler's own stream is the retrain restarted from the full run's recorded
    state before every step: the same trajectory, with no states to record."""
    _, cb, config = adam_fit
    z = [7]
    restarted = retrain(ratings, RECConfig(**SMALL), config, z, sampling_states=cb.sampling_states)
    free = retrain(ratings, RECConfig(**SMALL), config, z)
    for (name, a), (_, b) in zip(restarted.state_dict().items(), free.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------- evidence effect
def test_vectorised_baseline_refit_equals_fit_baseline_without_the_rating(ratings):
    ids = np.array([0, 17, 333])
    bu, bi = baselines_without(ratings, ids, 3.5, 10.0, item_reg=4.0)
    for c, z in enumerate(ids):
        keep = np.ones(len(ratings), dtype=bool)
        keep[z] = False
        kw = {"item_reg": 4.0} if "item_reg" in fit_baseline.__code__.co_varnames else None
        if kw is None:
            pytest.skip("fit_baseline has no separate item regularisation")
        wu, wi = fit_baseline(ratings.users[keep], ratings.items[keep], ratings.values[keep], ratings.n_users,
                              ratings.n_items, 3.5, 10.0, **kw)
        assert np.allclose(bu[c], wu, atol=1e-12) and np.allclose(bi[c], wi, atol=1e-12)


def test_evidence_effect_is_the_prediction_recomputed_without_the_rating(ratings):
    """With fanouts above every degree the chains take whole rows, so removing a rating from
    the live ratings and rebuilding the graph (`bind_ratings`) is an independent brute force:
    the evidence effect equals the prediction minus that recomputed prediction."""
    model = build(ratings, fanouts=(60, 60), evidence_dropout=0.0)
    Trainer(TrainConfig(epochs=2, optimizer="adam", learning_rate=0.01, batch_size=64, lr_decay=1.0,
                        patience=None, progress=False)).fit(model, ratings)
    u, i = int(ratings.users[5]), int(ratings.items[9])
    ids, hops = evidence_candidates(model, u, i)
    assert len(ids) and set(hops.tolist()) <= {1, 2}
    pick = np.concatenate([ids[:4], np.setdiff1d(neighbourhood_candidates(ratings, u, i), ids)[:2]])
    eff = evidence_effects(model, u, i, pick, components=True)
    base = raw_prediction(model, u, i)
    for c, z in enumerate(pick):
        keep = np.ones(len(ratings), dtype=bool)
        keep[z] = False
        model.bind_ratings(ratings.subset(keep))
        brute = base - raw_prediction(model, u, i)
        model.bind_ratings(ratings)
        assert abs(eff.total[c] - brute) < 1e-5, (c, eff.total[c], brute)
        assert abs(predict_without(model, u, i, [z]) - (base - eff.total[c])) < 1e-6
    # a rating that did not feed the prediction moves it only through the baseline
    fed = np.isin(pick, ids)
    assert np.all(eff.chain[~fed] == 0) and np.all(eff.baseline != 0)
    assert np.any(np.abs(eff.chain[fed]) > 1e-4)


# ---------------------------------------------------------------------------- rollback effect and explain
def test_rollback_effect_is_the_prediction_with_the_logged_rows_rolled_back(ratings, adam_fit):
    model, cb, _ = adam_fit
    u, i = int(ratings.users[11]), int(ratings.items[30])
    cands = neighbourhood_candidates(ratings, u, i)[:6]
    est = rollback_effects(model, cb.log, u, i, cands)
    base = raw_prediction(model, u, i)
    theta = model.prototype_vectors.detach().clone()
    for c, z in enumerate(cands):
        slots, upd = cb.log.rows(int(z))
        with torch.no_grad():
            model.prototype_vectors.index_add_(0, slots, -upd)
        brute = base - raw_prediction(model, u, i)
        with torch.no_grad():
            model.prototype_vectors.copy_(theta)
        assert abs(est[c] - brute) < 1e-5
    assert np.any(np.abs(est) > 0)


def test_explain_rec_lists_signed_effects_with_raw_ids(ratings, adam_fit):
    model, cb, _ = adam_fit
    ru, ri = ratings.user_ids.raw(int(ratings.users[3])), ratings.item_ids.raw(int(ratings.items[40]))
    e = explain_rec(model, cb.log, ru, ri, k=4).to_dict()
    assert e["units"] == "rating points" and e["method"] == "evidence+rollback" and len(e["contributions"]) == 4
    effects = [c["effect"] for c in e["contributions"]]
    assert effects == sorted(effects, key=lambda x: -abs(x))
    for c in e["contributions"]:
        assert abs(c["effect"] - c["evidence_effect"] - c["training_effect"]) < 1e-9
        assert c["user"] in ratings.user_ids and c["item"] in ratings.item_ids
    assert explain_rec(model, cb.log, "no-such-user", ri).method.startswith("fallback")


def test_callback_refuses_what_it_cannot_attribute(ratings):
    model = build(ratings)
    with pytest.raises(ValueError):
        Trainer(TrainConfig(epochs=1, optimizer="adam", salr=True, batch_size=64, progress=False, patience=None),
                callbacks=[RECRollbackCallback()]).fit(model, ratings)


def test_a_chain_tap_watches_and_masks_one_model_only(ratings):
    """Explaining one REC model must not change what another live model (e.g. in the same
    service) samples: the tap uses the model's own public hooks (`observing`, `substituted`),
    not the module, and swaps no sampler."""
    watched, other = build(ratings), build(ratings)
    watched.prepare(ratings)
    other.prepare(ratings)
    watched.eval()
    other.eval()
    u, i = torch.tensor([0, 1]), torch.tensor([0, 1])
    expected = other(u, i)
    hide_all = torch.arange(ratings.n_users * ratings.n_items)  # hide every rating
    with ChainTap(watched, hidden=hide_all) as tap:
        assert torch.equal(other(u, i), expected)
        masked = watched(u, i)
    assert len(tap.calls) == watched.config.eval_passes
    assert watched.chain_sampler is other.chain_sampler  # restored
    # the mask and the observer are gone after the block; within it every chain was empty
    assert all(len(lvl.examples) == 0 for _, ch in tap.calls for lvl in ch.levels)
    assert not watched.sampling_observers
    assert not torch.equal(watched(u, i), masked)
