"""The evidence-chain model's served explanations (issue 22): each first-hop evidence rating is
credited with its leave-one-out effect, the prediction minus the prediction recomputed with
the rating removed from the live ratings (hidden from the chains under the same sampling
seed, the baseline refitted without it); the faithfulness harness reports MF's keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recsys.experiments.rec_faithfulness import first_hop_shares, served_run
from recsys.models.rec.explain import (
    METHOD,
    BaselineSystem,
    baselines_without,
    leave_one_out_effects,
    leave_one_out_effects_reference,
    unclipped_prediction,
)
from recsys.models.rec.model import EvidenceChainModel, RECConfig, fit_baseline
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings

SMALL = {"embedding_size": 8, "hidden_size": 16, "prototypes": 4, "fanouts": (6, 4), "eval_passes": 2}


@pytest.fixture(scope="module")
def split():
    r = make_ratings(n_users=40, n_items=25, n=600, seed=1)
    order = np.random.default_rng(0).permutation(len(r))
    return r.subset(np.sort(order[:520])), r.subset(np.sort(order[520:]))


@pytest.fixture(scope="module")
def model(split):
    train, _ = split
    m = EvidenceChainModel(train.n_users, train.n_items, train.rating_scale, RECConfig(**SMALL))
    Trainer(TrainConfig(epochs=2, optimizer="adam", learning_rate=0.01, batch_size=64, patience=None,
                        progress=False)).fit(m, train)
    return m.eval()


def _without(model: EvidenceChainModel, user: int, item: int, z: int) -> float:
    """The prediction recomputed with rating ``z`` removed: its pair hidden from every chain,
    the baseline refitted by `fit_baseline` on the other ratings."""
    r = model.ratings
    keep = np.ones(len(r), dtype=bool)
    keep[z] = False
    c = model.config
    bu, bi = fit_baseline(r.users[keep], r.items[keep], r.values[keep], r.n_users, r.n_items,
                          float(model.global_mean), c.bias_reg, item_reg=c.item_reg)
    biases = torch.from_numpy(np.concatenate([bu, bi]).astype(np.float32))
    key = torch.tensor([int(r.users[z]) * r.n_items + int(r.items[z])])
    with model.substituted(hidden_pairs=key, biases=biases):
        return unclipped_prediction(model, user, item)


def test_each_served_effect_is_the_prediction_recomputed_without_the_rating(model):
    r = model.ratings
    u, i = int(r.users[0]), int(r.items[5])
    exp = model.explainer(r).explain(u, i, 100)
    assert exp.method == METHOD and exp.contributions
    base = unclipped_prediction(model, u, i)
    for c in exp.contributions:
        assert c.shares == "hop 1"
        assert c.effect == pytest.approx(base - _without(model, u, i, c.example), abs=2e-5)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("rated", [False, True])
def test_batched_leave_one_out_equals_one_substituted_forward_per_rating(model, rated, compiled, monkeypatch):
    """The served (batched) effects are the reference's, one `substituted` forward per
    rating, for an unrated pair and for a rated one (whose own rating the chains hide too),
    with the compiled kernels (one aggregation for all ratings) and without (a loop)."""
    monkeypatch.setattr(model, "compiled_kernels", compiled)
    r = model.ratings
    u = int(r.users[10])
    own = set(r.items[r.users == u].tolist())
    i = int(r.items[10]) if rated else min(set(range(r.n_items)) - own)
    assert (i in own) == rated
    evidence, _ = first_hop_shares(model, u, i)
    ids = np.asarray(evidence, dtype=np.int64)
    assert len(ids) >= 3
    reference = leave_one_out_effects_reference(model, u, i, ids)[0]
    reused = BaselineSystem(r, float(model.global_mean))
    for _ in range(2):  # the baseline set-up is reusable across calls
        served = leave_one_out_effects(model, u, i, ids, baselines=reused)[0]
        np.testing.assert_allclose(served, reference, atol=1e-5, rtol=0)
    np.testing.assert_allclose(leave_one_out_effects(model, u, i, ids)[0], reference, atol=1e-5, rtol=0)
    assert np.abs(reference).max() > 0


def test_masked_predictions_hide_ratings_met_at_every_depth_as_a_redrawn_forward_does(model):
    """The batched masked predictions draw the chains once and drop each hidden rating's
    edges (keyed draws): equal to the model's forward with the rating hidden (which draws
    again), for ratings the query's chains meet at the first hop and deeper."""
    graph, bias = model.live()
    r = model.ratings
    u = 2
    i = min(set(range(r.n_items)) - set(r.items[r.users == u].tolist()))  # unrated: nothing else hidden
    roots = torch.unique(torch.tensor([u, graph.n_users + i]))
    chains = model.chain_sampler(graph, roots, model.config.fanouts, model._generator(fresh=True),
                                 passes=model.config.eval_passes)
    met = [np.unique(k) for k in chains.edge_pair_keys(graph)]
    assert all(len(m) for m in met)
    keys = torch.from_numpy(np.unique(np.concatenate([m[:5] for m in met])))
    masked = model.masked_predictions(u, i, keys, bias.unsqueeze(0).repeat(len(keys), 1))
    for key, value in zip(keys, masked, strict=True):
        with model.substituted(hidden_pairs=key.reshape(1)):
            assert float(value) == pytest.approx(unclipped_prediction(model, u, i), abs=1e-5)
    assert len(set(np.round(masked.numpy(), 6))) > 1  # hiding them moves the prediction


def test_baselines_without_each_rating_equal_a_refit_on_the_other_ratings(model):
    r = model.ratings
    ids = np.array([0, 7, 123, len(r) - 1])
    c = model.config
    bu, bi = baselines_without(r, ids, float(model.global_mean), c.bias_reg, item_reg=c.item_reg)
    assert bu.shape == (4, r.n_users) and bi.shape == (4, r.n_items)
    for k, z in enumerate(ids):
        keep = np.arange(len(r)) != z
        fu, fi = fit_baseline(r.users[keep], r.items[keep], r.values[keep], r.n_users, r.n_items,
                              float(model.global_mean), c.bias_reg, item_reg=c.item_reg)
        np.testing.assert_allclose(bu[k], fu, atol=1e-9)
        np.testing.assert_allclose(bi[k], fi, atol=1e-9)


def test_served_contributions_are_the_first_hop_evidence_largest_effect_first(model):
    r = model.ratings
    u, i = int(r.users[3]), int(r.items[7])
    full = model.explainer(r).explain(u, i, 1000)
    evidence, _ = first_hop_shares(model, u, i)
    assert sorted(c.example for c in full.contributions) == sorted(evidence.tolist())
    assert full.n_candidates == len(evidence)
    effects = [abs(c.effect) for c in full.contributions]
    assert effects == sorted(effects, reverse=True)
    top = model.explainer(r).explain(u, i, 2)
    assert [c.example for c in top.contributions] == [c.example for c in full.contributions[:2]]


def test_faithfulness_harness_reports_mf_keys_and_scores_shares_beside(model, split):
    _, test = split
    out = served_run(model, test, n_pairs=3, n_candidates=4, n_removal_pairs=4, n_fold_in_users=2, seed=0)
    for key in ("spearman", "slope", "top1_direction_rate", "random_direction_rate", "n_pairs", "n_candidates",
                "noise_floor_spearman", "embedding_size", "method"):
        assert key in out
    assert set(out["fold_in"]) >= {"spearman", "slope"}
    assert out["method"] == METHOD and out["embedding_size"] == 8 and out["n_candidates"] == 4
    assert out["n_pairs"] == 3 and 3 <= out["n_points"] <= 12
    assert out["spearman"] == pytest.approx(1.0) and out["top1_direction_rate"] == 1.0  # exact by construction
    assert -1.0 <= out["shares"]["spearman"] <= 1.0 and -1.0 <= out["noise_floor_spearman"] <= 1.0


def test_cli_explain_eval_rec_scores_the_served_explainer_against_retraining(tmp_path, capsys):
    """`recsys explain-eval --model rec` retrains without each of a few ratings (same
    trajectory) and scores the served effects on every prediction that lists them, with the
    re-seeded noise floor, the no-retrain figures and fold-in users beside; a second run in
    the same --work-dir reuses the retrains."""
    from recsys.cli import main

    path = tmp_path / "ratings.csv"
    make_ratings(n_users=40, n_items=25, n=600, seed=1).to_frame()[["user", "item", "rating", "timestamp"]].to_csv(
        path, index=False, header=False)
    argv = ["explain-eval", "--ratings", str(path), "--columns", "user,item,rating,timestamp", "--split",
            "random:0.15", "--model", "rec", "--embedding-size", "8", "--hidden-size", "16", "--prototypes", "4",
            "--fanouts", "30,4", "--epochs", "2", "--retrain-removals", "3", "--pairs", "3", "--candidates", "4",
            "--removal-pairs", "3", "--fold-in-users", "2", "--work-dir", str(tmp_path / "work"), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"spearman", "slope", "top1_direction_rate", "random_direction_rate", "n_pairs", "n_candidates",
            "noise_floor_spearman", "embedding_size", "method", "fold_in"} <= set(out)
    assert out["method"] == METHOD and out["embedding_size"] == 8 and out["truth"].startswith("same-trajectory")
    assert out["n_removals"] == 3 and out["n_points"] >= 3 and out["n_pairs"] >= 2
    assert -1 <= out["spearman"] <= 1 and -1 <= out["noise_floor_spearman"] <= 1
    assert out["no_retrain_max_abs_difference"] < 1e-5  # served = leave-one-out on the served model
    assert out["no_retrain"]["spearman"] == pytest.approx(1.0) and set(out["fold_in"]) >= {"spearman", "slope"}
    results = sorted(p.name for p in (tmp_path / "work").glob("*.json") if p.name != "setup.json")
    assert len(results) == 3 * (1 + 3)  # full run and 3 removals: served model, perturbed replica, seed 1
    assert out["n_replicas"] == 2 and -1 <= out["replica_floor_spearman"] <= 1
    assert out["far_removal"]["n_predictions"] >= out["n_pairs"] and out["far_removal"]["mean_abs_change"] >= 0
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*.json")}
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["spearman"] == out["spearman"] and again["slope"] == out["slope"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*.json")} == stamp  # nothing retrained
    other = [a if a != "2" else "3" for a in argv]  # --epochs 3: the folder holds another setup's retrains
    assert main(other) == 2
    assert "holds retrains of another setup (differs in: train)" in capsys.readouterr().err


def test_retrained_scores_pool_every_prediction_that_lists_a_removed_rating(model, split):
    """Scores against given retrained predictions: a truth equal to the served effects scores
    1.0; the noise floor reads the re-seeded runs; predictions that do not list the rating are
    skipped."""
    from recsys.experiments.rec_faithfulness import Removal, retrained_scores

    train, test = split
    explainer = model.explainer(model.ratings)
    picks, runs = [], {}
    for u in range(6):
        own = np.flatnonzero(train.users == u)
        z = int(own[0])
        pairs = [(u, int(i)) for i in range(train.n_items) if i not in set(train.items[own].tolist())][:12]
        picks.append(Removal(u, z, pairs))
        effects = [{c.example: c.effect for c in explainer.explain(a, b, 1000).contributions}.get(z, 0.0)
                   for a, b in pairs]
        for variant, scale in (("", 1.2), ("b1", 0.8), ("s1", 0.5)):
            runs.setdefault((-1, variant), {"pairs": [], "predictions": [], "seconds": 0.0})
            runs[(-1, variant)]["pairs"] += [list(p) for p in pairs]
            runs[(-1, variant)]["predictions"] += [1.0] * len(pairs)
            runs[(z, variant)] = {"pairs": [list(p) for p in pairs], "predictions": [1.0 - scale * e for e in effects],
                                  "seconds": 0.0}
    out = retrained_scores(model, picks, runs, replicas=("", "b1"), reseeded="s1")
    assert out["n_points"] >= 5 and 1 <= out["n_removals"] <= 6 and out["n_replicas"] == 2
    # the truth is the replicas' mean change (1.2 and 0.8 times the served effect)
    assert out["spearman"] == pytest.approx(1.0) and out["slope"] == pytest.approx(1.0, abs=1e-4)
    assert out["one_retrain"]["slope"] == pytest.approx(1.2, abs=1e-4)
    assert out["replica_floor_slope"] == pytest.approx(1.5, abs=1e-4)  # served model's change on the replica's
    assert out["noise_floor_spearman"] == pytest.approx(1.0) and out["noise_floor_slope"] == pytest.approx(2.4, abs=1e-4)
    listed = sum(1 for p in picks for a, b in p.pairs
                 if p.example in {c.example for c in explainer.explain(a, b, 1000).contributions})
    assert out["n_points"] == listed


def test_batched_leave_one_out_holds_when_the_deepest_level_samples_nothing(split):
    """With one prototype per side, a query's last level (prototypes only) often samples no
    edge: the batched effects still equal the reference's there."""
    train, _ = split
    m = EvidenceChainModel(train.n_users, train.n_items, train.rating_scale,
                           RECConfig(**{**SMALL, "prototypes": 1, "fanouts": (3, 1, 1)}))
    Trainer(TrainConfig(epochs=1, optimizer="adam", learning_rate=0.01, batch_size=64, patience=None,
                        progress=False)).fit(m, train)
    m.eval()
    graph, _ = m.live()
    found = 0
    for u, i in [(u, i) for u in range(12) for i in range(0, train.n_items, 3)]:
        roots = torch.unique(torch.tensor([u, graph.n_users + i]))
        chains = m.chain_sampler(graph, roots, m.config.fanouts, m._generator(fresh=True), passes=m.config.eval_passes)
        ids = np.asarray(first_hop_shares(m, u, i)[0], dtype=np.int64)
        if len(chains.levels[-1].parent) or len(ids) < 2:
            continue
        found += 1
        np.testing.assert_allclose(leave_one_out_effects(m, u, i, ids)[0],
                                   leave_one_out_effects_reference(m, u, i, ids)[0], atol=1e-5, rtol=0)
    assert found >= 1
