"""The compact rollback log's storage (issue 22): what it keeps per example and per knot, its
save/load round trip (standalone and inside an artefact, where the training ratings hold the
examples' users and items), and its reconstruction against the exact log of the same
training: exact where nothing is interpolated (one block), within the measured error
otherwise, and complete (summed per row, the rows' changes over training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from recsys.artefact import load_artefact, save_artefact
from recsys.explain.influence import candidates
from recsys.explain.rollback import RollbackCallback
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.models.mf.log import CompactRollbackLog, RollbackLog
from recsys.train import TrainConfig, Trainer

SLOT_NAMES = ("user_factors", "user_bias", "item_factors", "item_bias")


def _model(r, **kw) -> MatrixFactorization:
    kw = {"embedding_size": 8, "n_blocks": 2, **kw}
    return MatrixFactorization(r.n_users, r.n_items, r.rating_scale, MFConfig(**kw))


def _fit(r, model, mode: str, epochs: int = 4):
    cb = RollbackCallback(mode=mode)
    Trainer(TrainConfig(epochs=epochs, learning_rate=0.02, patience=None, progress=False), callbacks=[cb]).fit(model, r)
    return cb.log


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_compact_log_keeps_one_float16_per_example_and_segment_and_int8_knots(small_ratings):
    r = small_ratings
    log = _fit(r, _model(r), "compact", epochs=4)  # knots after passes 0, 1, 2, 4: three segments
    assert log.knot_passes == [0, 1, 2, 4] and log.n_segments == 3
    assert log.coefficients.shape == (len(r), 3) and log.coefficients.dtype == np.float16
    assert log.example_visit_weights.shape == (len(r), 0)  # every epoch a permutation: one weight per segment
    t = log.knot_tables
    assert t["user_factors"].dtype == np.int8 and t["user_factors"].shape == (r.n_users, 4, 8)
    assert t["item_scale"].dtype == np.float16 and t["item_bias"].shape == (r.n_items, 4, 2)


def test_one_block_reconstruction_is_exact_up_to_float16_and_int8(small_ratings):
    # With one block the mean error is the block's error: nothing but the rows is interpolated,
    # and with bias_reg = 0 the bias updates are Σ lr·e exactly (float16 coefficients aside).
    r = small_ratings
    exact = _fit(r, _model(r, n_blocks=1, bias_reg=0.0), "exact", epochs=5)
    compact = _fit(r, _model(r, n_blocks=1, bias_reg=0.0), "compact", epochs=5)
    ids = np.arange(len(r))
    e, c = exact.rows(ids), compact.rows(ids)
    np.testing.assert_allclose(c[..., 16:], e[..., 16:], rtol=2e-3, atol=2e-5)
    assert _rel(c[..., :16], e[..., :16]) < 0.06


@pytest.mark.parametrize("n_blocks", [1, 2, 4])
def test_compact_reconstruction_is_within_its_measured_error_and_complete(small_ratings, n_blocks):
    r = small_ratings
    m_exact, m_compact = _model(r, n_blocks=n_blocks), _model(r, n_blocks=n_blocks)
    init = {n: getattr(m_compact, n).weight.detach().clone() for n in SLOT_NAMES}
    exact, compact = _fit(r, m_exact, "exact", 6), _fit(r, m_compact, "compact", 6)
    ids = np.arange(len(r))
    e, c = exact.rows(ids), compact.rows(ids)
    d = 8 // n_blocks
    assert _rel(c[..., :2 * d], e[..., :2 * d]) < 0.06
    assert _rel(c[..., 2 * d:], e[..., 2 * d:]) < 5e-3
    sums = compact.row_sums(r, r.n_users, r.n_items)  # completeness, up to the reconstruction's error
    for n in SLOT_NAMES:
        change = getattr(m_compact, n).weight.detach() - init[n]
        assert _rel(sums[n].numpy(), change.numpy()) < (0.06 if "factors" in n else 5e-3)


def test_projected_terms_equal_those_of_the_full_reconstruction(small_ratings):
    r = small_ratings
    model = _model(r)
    log = _fit(r, model, "compact")
    full = log.to_exact()
    for u, i in ((3, 4), (0, 0), (7, 11)):
        cand, su, si = candidates(r, u, i)
        p = model.user_factors.weight.detach().double().numpy()[u].reshape(2, 4)
        q = model.item_factors.weight.detach().double().numpy()[i].reshape(2, 4)
        fast = log.projected(cand, su, si, u, i, p, q)
        slow = full.projected(cand, su, si, u, i, p, q)
        for term, ref, mask in zip(fast, slow, (su, si, su, si), strict=True):
            np.testing.assert_allclose(term[:, mask], ref[:, mask], rtol=1e-4, atol=1e-7)


def test_compact_log_round_trips_standalone_and_inside_an_artefact_without_its_examples(small_ratings, tmp_path):
    r = small_ratings
    model = _model(r)
    log = _fit(r, model, "compact")
    ids = np.arange(len(r))
    log.save(tmp_path / "log.safetensors")
    back = RollbackLog.load(tmp_path / "log.safetensors")
    assert isinstance(back, CompactRollbackLog) and back.knot_passes == log.knot_passes
    np.testing.assert_array_equal(back.rows(ids), log.rows(ids))
    save_artefact(tmp_path / "m", model, r, rollback=log)
    with safe_open(str(tmp_path / "m" / "rollback.safetensors"), framework="pt") as fh:
        assert "users" not in fh.keys() and "items" not in fh.keys()  # ratings.safetensors holds them
    loaded = load_artefact(tmp_path / "m").rollback
    np.testing.assert_array_equal(loaded.rows(ids), log.rows(ids))
    with pytest.raises(ValueError, match="training ratings"):
        CompactRollbackLog.load(tmp_path / "m" / "rollback.safetensors")


def test_saved_bytes_are_two_per_example_and_segment_plus_the_knots(small_ratings, tmp_path):
    r = small_ratings
    model = _model(r, embedding_size=16, n_blocks=4)
    log = _fit(r, model, "compact", epochs=8)  # knots 0, 1, 2, 4, 8
    save_artefact(tmp_path / "m", model, r, rollback=log)
    size = (tmp_path / "m" / "rollback.safetensors").stat().st_size
    per_example = 2 * 4  # four float16 segment coefficients
    per_row_and_knot = 16 + 2 + 4 * 4  # int8 factors, float16 scale, float32 bias slots
    payload = len(r) * per_example + 5 * (r.n_users + r.n_items) * per_row_and_knot
    regs = 4 * 2 * (r.n_users + r.n_items)
    assert payload + regs <= size <= payload + regs + 4096  # header and the few scalars
    log.compact(torch.float16)  # float16 bias snapshots
    save_artefact(tmp_path / "h", model, r, rollback=log)
    half = (tmp_path / "h" / "rollback.safetensors").stat().st_size
    assert abs(half - (size - 5 * (r.n_users + r.n_items) * 4 * 2)) <= 64  # header padding


def test_a_log_of_the_older_compact_format_is_refused_with_a_clear_error(small_ratings, tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "old.safetensors"), metadata={"format": "recsys-rollback-compact-1"})
    with pytest.raises(ValueError, match="older recsys"):
        RollbackLog.load(tmp_path / "old.safetensors")
