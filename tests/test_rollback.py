"""The gradient-rollback log: complete and exact for SGD on every step path, the compiled
kernel's log equal to the autograd path's, Adam's preconditioned credit, artefact round trip,
growth with online updates; the compact log against the exact one (measured error, exact
parts, round trip, exact online overlay)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from recsys.artefact import load_artefact, save_artefact
from recsys.explain.rollback import RollbackCallback
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.models.mf.log import CompactRollbackLog, RollbackLog, append_ratings, online_sgd
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings

SLOT_NAMES = ("user_factors", "user_bias", "item_factors", "item_bias")


def _model(r, **kw) -> MatrixFactorization:
    return MatrixFactorization(r.n_users, r.n_items, r.rating_scale, MFConfig(embedding_size=8, n_blocks=2, **kw))


def _fit(r, model, batch_size=1, optimizer="sgd", factory=None, epochs=3, mode="exact"):
    cb = RollbackCallback(mode=mode)
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


@pytest.mark.parametrize("mode", ["exact", "compact"])
def test_logging_does_not_change_training(small_ratings, mode):
    r = small_ratings
    plain, logged = _model(r), _model(r)
    cfg = TrainConfig(epochs=3, learning_rate=0.02, patience=None, progress=False)
    Trainer(cfg).fit(plain, r)
    log, _ = _fit(r, logged, mode=mode)
    assert log.mode == mode
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


@pytest.mark.parametrize("optimizer,extra", [
    ("kfac", {}), ("ekfac", {}), ("tkfac", {}), ("tekfac", {}),
    ("kfac", {"salr": {"every": 2}}),
    ("cov-noise", {"noise": {"scale": 0.0, "batch": 2}}),
    ("cov-noise", {"noise": {"scale": 0.0, "batch": 4, "estimator": "sub-batch", "base": "sgd"}}),
    ("cov-noise", {"noise": {"scale": 0.0, "batch": 5, "estimator": "sub-batch", "base": "sgd"}}),
    ("cov-noise", {"noise": {"scale": 0.0, "batch": 4, "estimator": "sub-batch", "base": "adagrad"}}),
    ("sgd", {"salr": {"every": 2}}),
])
def test_preconditioned_credits_sum_to_every_rows_change(small_ratings, optimizer, extra):
    # The K-FAC family's row preconditioner is linear in the row's gradient, so crediting each
    # example its own gradient through it splits every step exactly; over a whole fit the
    # credits of a row's examples sum to the row's change. Covariance noise at scale 0 (both
    # estimators; the sub-batch one credits each sub-batch by its share of the batch, also when
    # the last sub-batch is short: 16 = 5 + 5 + 5 + 1) and SALR's rescaled rate (its extra
    # passes are not logged) split exactly too; Adagrad under sub-batches is exact per step.
    r = small_ratings
    model = _model(r)
    init = {n: getattr(model, n).weight.detach().clone() for n in SLOT_NAMES}
    cb = RollbackCallback()
    lr = 0.005 if optimizer in ("kfac", "ekfac", "tkfac", "tekfac") else 0.02
    cfg = TrainConfig(epochs=2, batch_size=16, learning_rate=lr, optimizer=optimizer, patience=None,
                      progress=False, **extra)
    result = Trainer(cfg, callbacks=[cb]).fit(model, r)
    assert result.step_kind == "autograd"
    sums = cb.log.row_sums(r, r.n_users, r.n_items)
    for n in SLOT_NAMES:
        change = getattr(model, n).weight.detach() - init[n]
        assert change.abs().max() > 1e-4
        torch.testing.assert_close(sums[n], change, atol=2e-6, rtol=1e-4)


def test_injected_covariance_noise_is_credited_to_no_example(small_ratings):
    r = small_ratings
    model = _model(r)
    init = {n: getattr(model, n).weight.detach().clone() for n in SLOT_NAMES}
    cb = RollbackCallback()
    cfg = TrainConfig(epochs=2, batch_size=16, learning_rate=0.02, optimizer="cov-noise",
                      noise={"batch": 2, "scale": 1.0}, patience=None, progress=False)
    Trainer(cfg, callbacks=[cb]).fit(model, r)
    assert "noise is not attributed" in cb.log.attribution
    sums = cb.log.row_sums(r, r.n_users, r.n_items)
    change = model.user_factors.weight.detach() - init["user_factors"]
    residual = (change - sums["user_factors"]).abs().max()
    assert residual > 1e-4  # the noise is in the weights, not in the log


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


# --------------------------------------------------------------------------- the compact log
def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_the_default_on_the_kernel_is_the_compact_log_and_modes_are_checked(small_ratings):
    cb = RollbackCallback()
    Trainer(TrainConfig(epochs=2, patience=None, progress=False), callbacks=[cb]).fit(_model(small_ratings),
                                                                                      small_ratings)
    assert isinstance(cb.log, CompactRollbackLog) and cb.log.closed and cb.log.knot_passes == [0.0, 1.0, 2.0]
    cb = RollbackCallback()  # other step paths log exactly
    Trainer(TrainConfig(epochs=1, batch_size=8, patience=None, progress=False), callbacks=[cb]).fit(
        _model(small_ratings), small_ratings)
    assert isinstance(cb.log, RollbackLog)
    with pytest.raises(ValueError, match="compact"):
        RollbackCallback(mode="approximate")


@pytest.mark.parametrize("epochs", [1, 3, 12])
def test_compact_log_reconstructs_the_exact_log_within_its_measured_error(small_ratings, epochs):
    # Same training, both logs: the factor updates within a few percent (rows interpolated
    # between knots), the bias updates within a fraction of a percent, and the terms an
    # explanation reads equal to those of the full reconstruction.
    r = small_ratings
    m_exact, m_compact = _model(r), _model(r)
    exact, _ = _fit(r, m_exact, epochs=epochs)
    compact, _ = _fit(r, m_compact, epochs=epochs, mode="compact")
    expected_knots = {1: [0, 1], 3: [0, 1, 2, 3], 12: [0, 1, 2, 4, 8, 12]}[epochs]
    assert compact.knot_passes == expected_knots
    for n in SLOT_NAMES:
        torch.testing.assert_close(getattr(m_exact, n).weight, getattr(m_compact, n).weight, atol=1e-6, rtol=0)
    ids = np.arange(len(r))
    e, c = exact.rows(ids), compact.rows(ids)
    d = exact.block_size
    assert _rel(c[..., :2 * d], e[..., :2 * d]) < 0.06
    assert _rel(c[..., 2 * d:], e[..., 2 * d:]) < 2e-3
    full = compact.to_exact()
    np.testing.assert_allclose(full.rows(ids), c, rtol=1e-6, atol=1e-7)
    u, i = 3, 4
    from recsys.explain.influence import candidates

    cand, su, si = candidates(r, u, i)
    p = m_compact.user_factors.weight.detach().double().numpy()[u].reshape(2, d)
    q = m_compact.item_factors.weight.detach().double().numpy()[i].reshape(2, d)
    fast = compact.projected(cand, su, si, u, i, p, q)
    slow = full.projected(cand, su, si, u, i, p, q)
    for term, ref, mask in zip(fast, slow, (su, si, su, si), strict=True):
        np.testing.assert_allclose(term[:, mask], ref[:, mask], rtol=1e-5, atol=1e-8)


def test_compact_log_handles_epochs_that_repeat_examples(small_ratings):
    # Sampling with replacement: some examples are visited twice in an epoch, others never,
    # so the visit weights are kept per example; the error stays that of the permutations.
    r = small_ratings
    cfg = dict(epochs=6, learning_rate=0.02, sampler="with-replacement", patience=None, progress=False)
    logs = []
    for mode in ("exact", "compact"):
        cb = RollbackCallback(mode=mode)
        Trainer(TrainConfig(**cfg), callbacks=[cb]).fit(_model(r), r)
        logs.append(cb.log)
    ids = np.arange(len(r))
    e, c = logs[0].rows(ids), logs[1].rows(ids)
    d = logs[0].block_size
    assert _rel(c[..., :2 * d], e[..., :2 * d]) < 0.06 and _rel(c[..., 2 * d:], e[..., 2 * d:]) < 2e-3


def test_compact_bias_updates_equal_the_exact_log_up_to_float16_without_bias_regularisation(small_ratings):
    # Σ_j c_j = Σ_t lr_t e_t exactly, and the compact log stores each segment's sum as one float16:
    # with bias_reg = 0 only that rounding (2^-11 of the segment's sum) separates the logs.
    r = small_ratings
    exact, _ = _fit(r, _model(r, bias_reg=0.0), epochs=5)
    compact, _ = _fit(r, _model(r, bias_reg=0.0), epochs=5, mode="compact")
    ids = np.arange(len(r))
    d = exact.block_size
    exact_bias = exact.rows(ids)[..., 2 * d:]
    scale = np.abs(exact_bias).max()
    np.testing.assert_allclose(compact.rows(ids)[..., 2 * d:], exact_bias, rtol=2e-3, atol=2e-3 * scale)


def test_compact_log_round_trips_through_the_artefact_and_float16(small_ratings, tmp_path):
    r = small_ratings
    model = _model(r)
    log, _ = _fit(r, model, epochs=4, mode="compact")
    ids = np.arange(len(r))
    save_artefact(tmp_path / "m", model, r, rollback=log)
    back = load_artefact(tmp_path / "m").rollback
    assert isinstance(back, CompactRollbackLog) and back.n_examples == len(r) and back.knot_passes == log.knot_passes
    np.testing.assert_array_equal(back.rows(ids), log.rows(ids))
    half = copy.deepcopy(log).compact(torch.float16)
    assert half.dtype == torch.float16 and half.nbytes < log.nbytes
    save_artefact(tmp_path / "h", model, r, rollback=half)
    back = load_artefact(tmp_path / "h").rollback
    assert back.dtype == torch.float16
    np.testing.assert_allclose(back.rows(ids), log.rows(ids), atol=2e-3, rtol=2e-2)


def test_compact_log_logs_online_updates_exactly(small_ratings):
    r = small_ratings
    first, rest = r.subset(np.arange(250)), r.subset(np.arange(250, len(r)))
    model = _model(r)
    log, _ = _fit(first, model, mode="compact")
    old = log.rows(np.arange(250))
    combined, new_ids = append_ratings(first, rest)
    with pytest.raises(ValueError, match="extend"):
        online_sgd(model, log, combined, new_ids, 0.02)
    log.extend(len(new_ids))
    before = {n: getattr(model, n).weight.detach().clone() for n in SLOT_NAMES}
    online_sgd(model, log, combined, new_ids, 0.02, epochs=2)
    np.testing.assert_array_equal(log.rows(np.arange(250)), old)  # earlier examples untouched
    assert np.array_equal(log.overlay_ids, new_ids)
    fresh = RollbackLog(len(combined), log.n_blocks, log.block_size)
    fresh.data[:, 250:] = torch.from_numpy(log.rows(new_ids)).float()
    sums = fresh.row_sums(combined, r.n_users, r.n_items)
    for n in SLOT_NAMES:
        torch.testing.assert_close(sums[n], getattr(model, n).weight.detach() - before[n], atol=2e-6, rtol=0)


def test_compact_overlay_grows_in_place_one_ingestion_at_a_time_and_still_takes_ids_out_of_order(small_ratings):
    """The service logs every ingestion into the overlay: ids arriving in order append (the
    backing arrays grow geometrically instead of being copied each time), an id out of order
    still lands on its own row, and each example's row is the sum of what it was given."""
    r = small_ratings
    first = r.subset(np.arange(250))
    log, _ = _fit(first, _model(r), mode="compact")
    log.extend(len(r) - 250)
    d = log.block_size * log.n_blocks
    expected = {}

    def give(ids):
        ids = np.asarray(ids)
        rows = torch.arange(1, len(ids) + 1, dtype=torch.float32)[:, None]
        log.add(ids, rows.expand(-1, d), rows.expand(-1, log.n_blocks), 2 * rows.expand(-1, d),
                2 * rows.expand(-1, log.n_blocks))
        for z, v in zip(ids.tolist(), rows[:, 0].tolist(), strict=True):
            expected[z] = expected.get(z, 0.0) + v

    for start in range(250, 270, 4):  # in order, one batch at a time
        give(np.arange(start, start + 4))
    backing = log.overlay.base
    give([270, 271])
    assert log.overlay.base is backing  # appended into the same buffer
    give([265, 251])  # again, out of order: existing rows
    give([len(r) - 1])
    give([280])  # new and before the last id: merged in place of an append
    assert np.array_equal(log.overlay_ids, np.sort(list(expected)))
    rows = log.rows(np.array(sorted(expected)))  # [K, m, 2d+2]
    d_block = log.block_size
    for j, z in enumerate(sorted(expected)):
        np.testing.assert_allclose(rows[:, j, :d_block], expected[z], rtol=0, atol=1e-6)
        np.testing.assert_allclose(rows[:, j, 2 * d_block + 1], 2 * expected[z], rtol=0, atol=1e-6)
