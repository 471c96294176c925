"""The faithfulness harness: its retrain reproduces the Trainer exactly, removal changes only
what it should, the tests A/B produce their figures, and the CLI commands."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from recsys.cli import main
from recsys.experiments.faithfulness import Setup, agreement, fit_logged, removal, retrain
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.splits import random_split
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings


@pytest.mark.parametrize("batch_size,optimizer,stats_freq", [(1, "sgd", 1), (16, "sgd", 1), (16, "adam", 1),
                                                             (16, "kfac", 1), (16, "kfac", 3), (16, "ekfac", 1),
                                                             (16, "cov-noise", 1)])
def test_retrain_with_nothing_removed_reproduces_the_trainer(small_ratings, batch_size, optimizer, stats_freq):
    setup = Setup(MFConfig(embedding_size=8, n_blocks=2),
                  TrainConfig(epochs=3, batch_size=batch_size, optimizer=optimizer, learning_rate=0.005,
                              noise={"batch": 4}, kfac={"stats_freq": stats_freq}, patience=None, progress=False))
    ref = MatrixFactorization(small_ratings.n_users, small_ratings.n_items, small_ratings.rating_scale, setup.model)
    Trainer(setup.train).fit(ref, small_ratings)
    again = retrain(small_ratings, setup)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_removing_an_example_is_filtering_it_out_of_every_epoch(small_ratings):
    # Batch 1 with a fixed order: removing example z is training on the others in order.
    r = small_ratings
    setup = Setup(MFConfig(embedding_size=8, n_blocks=1),
                  TrainConfig(epochs=2, sampler="fixed", patience=None, progress=False))
    z = 17
    without = retrain(r, setup, [z])
    manual = MatrixFactorization(r.n_users, r.n_items, r.rating_scale, setup.model)
    manual.prepare(r)
    order = np.delete(np.arange(len(r)), z)
    for epoch in range(2):
        manual.sgd_examples(r, order, setup.train.learning_rate * setup.train.lr_decay ** epoch)
    torch.testing.assert_close(without.user_factors.weight, manual.user_factors.weight, atol=0, rtol=0)


def test_agreement_and_removal_report_every_method():
    r = make_ratings(n_users=40, n_items=30, n=700, seed=1)
    split = random_split(r, 0.1, seed=0)
    setup = Setup(MFConfig(embedding_size=8, n_blocks=1),
                  TrainConfig(epochs=8, learning_rate=0.02, patience=None, progress=False))
    model, log, _ = fit_logged(split.train, setup)
    b = agreement(split.train, split.test, setup, model, log, n_pairs=3, n_candidates=6, reseed_pairs=1)
    assert set(b.methods) == {"newton", "rollback", "fia"} and b.n_pairs == 3
    assert all(-1 <= v["spearman"] <= 1 and 0 <= v["precision_at_5"] <= 1 for v in b.methods.values())
    assert b.methods["newton"]["spearman"] > 0.3
    assert b.reseeded is not None and len(b.points) == 18
    a = removal(split.train, split.test, setup, model, log, n_pairs=3, ks=(1,))
    assert {"newton@1", "rollback@1", "fia@1", "random-neighbour@1", "random-far@1"} == set(a.strategies)
    assert all(0 <= s["direction_rate"] <= 1 for s in a.strategies.values())


@pytest.fixture
def ratings_file(tmp_path):
    frame = make_ratings(n_users=40, n_items=30, n=600).to_frame()
    path = tmp_path / "ratings.csv"
    frame[["user", "item", "rating", "timestamp"]].to_csv(path, index=False, header=False)
    return path


def test_cli_train_with_rollback_then_explain(ratings_file, tmp_path, capsys):
    assert main(["train", "--ratings", str(ratings_file), "--columns", "user,item,rating,timestamp",
                 "--epochs", "3", "--embedding-size", "8", "--n-blocks", "2", "--rollback",
                 "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert (tmp_path / "m" / "rollback.safetensors").is_file()
    capsys.readouterr()
    for method in ("rollback", "newton"):
        assert main(["explain", "--model", str(tmp_path / "m"), "--user", "3", "--item", "4", "--k", "3",
                     "--json", "--method", method]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["method"] == method and len(out["contributions"]) == 3 and out["units"] == "rating points"
    assert main(["explain", "--model", str(tmp_path / "m"), "--user", "3", "--item", "4"]) == 0
    assert "newton" in capsys.readouterr().out
    assert main(["explain", "--model", str(tmp_path / "m"), "--user", "nobody", "--item", "4"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "recsys: error: unknown user id 'nobody'"


def test_cli_rollback_method_without_a_log_is_a_clear_error(ratings_file, tmp_path, capsys):
    assert main(["train", "--ratings", str(ratings_file), "--epochs", "2", "--embedding-size", "8",
                 "--out", str(tmp_path / "m"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["explain", "--model", str(tmp_path / "m"), "--user", "3", "--item", "4",
                 "--method", "rollback"]) == 2
    assert "train it with `recsys train --rollback`" in capsys.readouterr().err


def test_setup_reseeding_changes_the_trajectory(small_ratings):
    setup = Setup(MFConfig(embedding_size=8, n_blocks=1), TrainConfig(epochs=2, patience=None, progress=False))
    a, b = retrain(small_ratings, setup), retrain(small_ratings, replace(setup), seed=5)
    assert not torch.equal(a.user_factors.weight, b.user_factors.weight)


EXPLAIN_EVAL_KEYS = {"spearman", "slope", "top1_direction_rate", "random_direction_rate", "n_pairs", "n_candidates",
                     "noise_floor_spearman", "embedding_size", "method", "fold_in"}


def test_cli_explain_eval_scores_the_served_explainer_with_its_noise_floor_and_fold_in(ratings_file, capsys):
    """`recsys explain-eval` trains what `recsys train` would with the same flags and scores the
    service's explanation (cached Newton) against leave-one-out retraining, beside the
    re-seeded truth; fold-in users are explained exactly (their ridge's leave-one-out)."""
    assert main(["explain-eval", "--ratings", str(ratings_file), "--columns", "user,item,rating,timestamp",
                 "--split", "random:0.1", "--embedding-size", "8", "--n-blocks", "2", "--epochs", "4",
                 "--pairs", "3", "--candidates", "4", "--removal-pairs", "3", "--fold-in-users", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert EXPLAIN_EVAL_KEYS <= set(out)
    assert out["embedding_size"] == 8 and out["n_pairs"] == 3 and out["n_candidates"] == 4
    assert out["n_removal_pairs"] == 3 and out["method"].startswith("newton (cached")
    for key in ("spearman", "noise_floor_spearman"):
        assert -1 <= out[key] <= 1
    for key in ("top1_direction_rate", "random_direction_rate"):
        assert 0 <= out[key] <= 1
    fold_in = out["fold_in"]
    assert fold_in["method"].startswith("fold-in exact") and fold_in["n_users"] == 2
    assert fold_in["spearman"] == pytest.approx(1.0) and fold_in["slope"] == pytest.approx(1.0, abs=1e-4)
    assert fold_in["max_abs_error"] < 1e-5
    assert out["online"]["n_users"] == 0 or out["online"]["method"] == "newton + online steps"


def test_cli_explain_eval_rejects_bad_counts(ratings_file, capsys):
    assert main(["explain-eval", "--ratings", str(ratings_file), "--split", "random:0.1", "--pairs", "0"]) == 2
    assert "--pairs must be at least 1" in capsys.readouterr().err
