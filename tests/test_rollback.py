"""The gradient-rollback log: complete and exact for SGD on every step path, the compiled
kernel's log equal to the autograd path's, Adam's preconditioned credit, artefact round trip,
growth with online updates."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from recsys.artefact import load_artefact, save_artefact
from recsys.explain.rollback import RollbackCallback, RollbackLog, append_ratings, online_sgd
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings

SLOT_NAMES = ("user_factors", "user_bias", "item_factors", "item_bias")


def _model(r, **kw) -> MatrixFactorization:
    return MatrixFactorization(r.n_users, r.n_items, r.rating_scale, MFConfig(embedding_size=8, n_blocks=2, **kw))


def _fit(r, model, batch_size=1, optimizer="sgd", factory=None, epochs=3):
    cb = RollbackCallback()
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=0.02, optimizer=optimizer,
                      patience=None, progress=False)
    result = Trainer(cfg, callbacks=[cb], optimizer_factory=factory).fit(model, r)
    return cb.log, result


@pytest.mark.parametrize("batch_size,factory,kind", [
    (1, None, "kernel"),
    (8, None, "closed-form"),
    (4, lambda m: torch.optim.SGD(m.parameters(), lr=0.02), "autograd"),
])
def test_sgd_log_is_complete_every_rows_change_is_the_sum_of_its_examples_logs(small_ratings, batch_size,
                                                                                factory, kind):
    r = small_ratings
    model = _model(r)
    init = {n: getattr(model, n).weight.detach().clone() for n in SLOT_NAMES}
    log, result = _fit(r, model, batch_size, factory=factory)
    assert result.step_kind == kind
    sums = log.row_sums(r, r.n_users, r.n_items)
    for n in SLOT_NAMES:
        change = getattr(model, n).weight.detach() - init[n]
        assert change.abs().max() > 1e-3
        torch.testing.assert_close(sums[n], change, atol=2e-6, rtol=0)


def test_kernel_log_equals_the_autograd_path_log_for_batch_one(small_ratings):
    r = small_ratings
    m1, m2 = _model(r), _model(r)
    kernel_log, res1 = _fit(r, m1, 1)
    auto_log, res2 = _fit(r, m2, 1, factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.02))
    assert (res1.step_kind, res2.step_kind) == ("kernel", "autograd")
    torch.testing.assert_close(kernel_log.data, auto_log.data, atol=2e-6, rtol=1e-4)


def test_logging_does_not_change_training(small_ratings):
    r = small_ratings
    plain, logged = _model(r), _model(r)
    cfg = TrainConfig(epochs=3, learning_rate=0.02, patience=None, progress=False)
    Trainer(cfg).fit(plain, r)
    _fit(r, logged)
    for n in SLOT_NAMES:
        torch.testing.assert_close(getattr(plain, n).weight, getattr(logged, n).weight, atol=1e-6, rtol=0)


def test_adam_credit_is_the_gradient_through_the_preconditioner():
    # One Adam step: m̂ = g, so the update is -lr*g/(|g|+eps) per coordinate; with distinct
    # users and items in the batch, the credited updates are exactly the step.
    r = make_ratings(n_users=6, n_items=6, n=6)
    model = _model(r)
    init = {n: getattr(model, n).weight.detach().clone() for n in SLOT_NAMES}
    cb = RollbackCallback()
    cfg = TrainConfig(epochs=1, batch_size=len(r), learning_rate=0.01, optimizer="adam", patience=None,
                      progress=False)
    Trainer(cfg, callbacks=[cb]).fit(model, r)
    assert cb.log.optimizer == "adam" and "approximate" in cb.log.attribution
    sums = cb.log.row_sums(r, r.n_users, r.n_items)
    for n in SLOT_NAMES:
        torch.testing.assert_close(sums[n], getattr(model, n).weight.detach() - init[n], atol=1e-6, rtol=1e-4)


def test_log_round_trips_through_the_artefact_and_compacts_to_float16(small_ratings, tmp_path):
    r = small_ratings
    model = _model(r)
    log, _ = _fit(r, model)
    save_artefact(tmp_path / "m", model, r, rollback=log)
    art = load_artefact(tmp_path / "m")
    assert art.rollback is not None and art.rollback.optimizer == "sgd"
    assert torch.equal(art.rollback.data, log.data)
    half = copy.deepcopy(log).compact(torch.float16)
    assert half.nbytes * 2 == log.nbytes and half.bytes_per_example == (2 * 8 + 2 * 2) * 2
    save_artefact(tmp_path / "h", model, r, rollback=half)
    back = load_artefact(tmp_path / "h").rollback
    assert back.dtype == torch.float16
    torch.testing.assert_close(back.data.float(), log.data, atol=1e-3, rtol=1e-2)
    save_artefact(tmp_path / "none", model, r)
    assert load_artefact(tmp_path / "none").rollback is None
    with pytest.raises(ValueError, match="rows"):
        save_artefact(tmp_path / "bad", model, r, rollback=RollbackLog.for_model(model, 3))


def test_not_a_log_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a recsys rollback log"):
        RollbackLog.load(tmp_path / "x.safetensors")


def test_log_grows_with_online_updates_and_logs_them_completely(small_ratings):
    r = small_ratings
    first, rest = r.subset(np.arange(250)), r.subset(np.arange(250, len(r)))
    model = _model(r)
    log, _ = _fit(first, model)
    old = log.data.clone()
    combined, new_ids = append_ratings(first, rest)
    assert len(combined) == len(r) and np.array_equal(new_ids, np.arange(250, len(r)))
    with pytest.raises(ValueError, match="extend"):
        online_sgd(model, log, combined, new_ids, 0.02)
    log.extend(len(new_ids))
    assert log.n_examples == len(combined)
    before = {n: getattr(model, n).weight.detach().clone() for n in SLOT_NAMES}
    online_sgd(model, log, combined, new_ids, 0.02, epochs=2)
    assert torch.equal(log.data[:, :250], old)  # earlier examples' logs untouched
    assert log.data[:, 250:].abs().sum(-1).min() > 0  # every new example logged
    fresh = RollbackLog(len(combined), log.n_blocks, log.block_size)
    fresh.data[:, 250:] = log.data[:, 250:]
    sums = fresh.row_sums(combined, r.n_users, r.n_items)
    for n in SLOT_NAMES:
        torch.testing.assert_close(sums[n], getattr(model, n).weight.detach() - before[n], atol=2e-6, rtol=0)
