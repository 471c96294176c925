"""`Recommender.add_ratings` and `validate`: which rows are applied, skipped or refused, and
in which order (the one-pass loop that looks each item up once)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.artefact import save_artefact
from recsys.errors import UnknownIdError
from recsys.models import build_model
from recsys.recommender import Recommender
from recsys.store import NewRating, StoredRating
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings


@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
    train = make_ratings(n_users=20, n_items=15, n=200)
    model = build_model("mf", train.n_users, train.n_items, train.rating_scale, {"embedding_size": 4, "n_blocks": 2})
    Trainer(TrainConfig(epochs=2, progress=False)).fit(model, train)
    path = tmp_path_factory.mktemp("art") / "mf"
    save_artefact(path, model, train, {})
    return path, train


def live_rows(rec: Recommender, n_train: int) -> list[tuple[str, str, float, int]]:
    r = rec.ratings
    return [(r.user_ids.raw(int(u)), r.item_ids.raw(int(i)), float(v), int(t))
            for u, i, v, t in zip(r.users[n_train:], r.items[n_train:], r.values[n_train:], r.timestamps[n_train:],
                                  strict=True)]


def test_stored_rows_are_applied_in_order_skipping_duplicates_seen_seqs_and_unmappable_ones(artefact):
    path, train = artefact
    rec = Recommender.load(path, warm=False)
    item = train.item_ids.raw(3)
    rows = [StoredRating(1, "u-new", item, 4.0, 100, None),
            StoredRating(2, train.user_ids.raw(0), "no-such-item", 3.0, 101, None),
            StoredRating(3, train.user_ids.raw(1), item, 9.0, 102, None),
            StoredRating(4, train.user_ids.raw(1), item, math.nan, 103, "e4"),
            StoredRating(2, train.user_ids.raw(1), item, 2.0, 104, "e2", duplicate=True),
            StoredRating(5, "u-new", train.item_ids.raw(0), 1.0, 105, None)]
    assert rec.add_ratings(rows, skip_unmappable=True) == 2
    assert live_rows(rec, len(train)) == [("u-new", item, 4.0, 100), ("u-new", train.item_ids.raw(0), 1.0, 105)]
    assert rec.last_seq == 5 and rec.n_skipped == 3 and rec.skipped_seqs(1, 5) == [2, 3, 4]
    reasons = [e["reason"] for e in rec.skipped_examples]
    assert reasons[0] == "unknown item id 'no-such-item'" and "outside the scale 1..5" in reasons[1]
    assert "rating nan" in reasons[2]
    # replayed again with one more: only seq 6 is new
    assert rec.add_ratings([*rows, StoredRating(6, "u2", item, 5.0, 106, None)], skip_unmappable=True) == 1
    assert rec.last_seq == 6 and rec.n_ingested == 3


def test_out_of_order_seqs_and_unmappable_rows_refuse_the_whole_call(artefact):
    path, train = artefact
    rec = Recommender.load(path, warm=False)
    item, user = train.item_ids.raw(2), train.user_ids.raw(0)
    with pytest.raises(ValueError, match="seq 2 after 3"):
        rec.add_ratings([StoredRating(1, user, item, 4.0, 1, None), StoredRating(3, user, "nope", 4.0, 1, None),
                         StoredRating(2, user, item, 4.0, 1, None)], skip_unmappable=True)
    with pytest.raises(UnknownIdError):  # the unknown item comes first
        rec.add_ratings([StoredRating(1, user, item, 4.0, 1, None), StoredRating(3, user, "nope", 4.0, 1, None),
                         StoredRating(2, user, item, 4.0, 1, None)])
    with pytest.raises(ValueError, match="outside the scale"):
        rec.add_ratings([NewRating(user, item, 4.0), NewRating(user, item, 0.5)])
    assert len(rec.ratings) == len(train) and rec.last_seq == 0 and rec.n_skipped == 0


def test_new_ratings_without_seq_or_timestamp_and_ids_that_are_not_strings(artefact):
    path, train = artefact
    rec = Recommender.load(path, warm=False)
    raw_item = train.item_ids.raw(4)
    assert raw_item.isdigit()
    assert rec.add_ratings([NewRating(7, int(raw_item), 5), NewRating("7", raw_item, 2.0, 50)]) == 2
    (u1, i1, v1, t1), (u2, i2, v2, t2) = live_rows(rec, len(train))
    assert (u1, i1, v1) == (u2, i2, 5.0) == ("7", raw_item, 5.0) and t1 > 1e9 and (v2, t2) == (2.0, 50)
    assert np.array_equal(rec.ratings.users[-2:], [rec.user_ids.index("7")] * 2)


def test_validate_names_the_first_bad_rating(artefact):
    path, train = artefact
    rec = Recommender.load(path, warm=False)
    item = train.item_ids.raw(1)
    rec.validate([NewRating("x", item, 1.0), NewRating("x", item, 5), NewRating("x", int(item), 3.0)])
    with pytest.raises(UnknownIdError, match="zzz"):
        rec.validate([NewRating("x", item, 3.0), NewRating("x", "zzz", 3.0), NewRating("x", item, 7.0)])
    for bad in (7.0, math.inf, -math.inf, math.nan, 0.99):
        with pytest.raises(ValueError, match="outside the scale"):
            rec.validate([NewRating("x", item, 3.0), NewRating("x", item, bad), NewRating("x", "zzz", 3.0)])


def _stored_batch(train, n: int, first_seq: int, seed: int) -> list[StoredRating]:
    rng = np.random.default_rng(seed)
    users = [train.user_ids.raw(int(u)) for u in rng.integers(train.n_users, size=n)]
    users[::7] = [f"new-{k}" for k in range(len(users[::7]))]  # some users the model has never seen
    return [StoredRating(first_seq + k, u, train.item_ids.raw(int(rng.integers(train.n_items))),
                         float(rng.integers(1, 6)), 1000 + k, None) for k, u in enumerate(users)]


def _model_state(rec: Recommender) -> list[np.ndarray]:
    return [t.detach().numpy().copy() for t in rec.model.state_dict().values()]


@pytest.mark.parametrize("n", [64, 300])
def test_a_batch_of_stored_rows_read_by_column_is_applied_as_one_read_row_by_row(artefact, n):
    path, train = artefact
    by_column, by_row = Recommender.load(path, warm=False), Recommender.load(path, warm=False)
    by_row.columns_from = 10**9  # every rating through the per-rating loop
    batch = _stored_batch(train, n, 1, seed=n)
    assert by_column._stored_columns(batch) is not None and by_row._stored_columns(batch) is None
    assert by_column.add_ratings(batch) == by_row.add_ratings(batch) == n
    assert live_rows(by_column, len(train)) == live_rows(by_row, len(train))
    assert by_column.ratings.user_ids == by_row.ratings.user_ids and by_column.last_seq == by_row.last_seq == n
    for a, b in zip(_model_state(by_column), _model_state(by_row), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_stored_batch_the_columns_cannot_take_goes_row_by_row(artefact):
    path, train = artefact
    rec = Recommender.load(path, warm=False)
    good = _stored_batch(train, 80, 1, seed=0)
    unknown_item = [*good[:40], good[40]._replace(item="no-such-item"), *good[41:]]
    off_scale = [*good[:40], good[40]._replace(rating=7.0), *good[41:]]
    seen_already = good[:40]
    assert rec._stored_columns(unknown_item) is None and rec._stored_columns(off_scale) is None
    assert rec._stored_columns([*good[:40], good[40]._replace(duplicate=True), *good[41:]]) is None
    assert rec._stored_columns([*good[41:], *good[:41]]) is None  # out of order: the loop raises
    assert rec.add_ratings(unknown_item, skip_unmappable=True) == 79
    assert rec.n_skipped == 1 and rec.skipped_seqs(1, 80) == [41]
    assert rec._stored_columns(seen_already) is None  # seqs already applied: the loop skips them
    assert rec.add_ratings(seen_already) == 0
