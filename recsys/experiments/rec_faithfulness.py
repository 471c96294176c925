"""Faithfulness of the evidence-chain model's explanations as served (issue 22).

The service explains a REC prediction with its explainer (`EvidenceChainModel.explainer`,
`recsys.models.rec.explain`): the first-hop evidence ratings, each with an effect in rating
points. This harness scores those served effects against leave-one-out: the same trained
parameters, the rating removed from the live ratings (its edge hidden from every sampled
chain under the same evaluation sampling seed, the baseline biases refitted without it:
`recsys.experiments.rec_rollback.evidence_effects`). REC builds its representations from the
ratings matrix on demand, so this is what removing the rating does to the served model short
of retraining the prototypes and networks (not measured here).

Figures (the keys of MF's ``explain-eval``):

- ``spearman``, ``slope``: served effects against leave-one-out, pooled over ``n_pairs``
  test predictions x up to ``n_candidates`` of their first-hop evidence ratings (a seeded
  random subset when there are more; ``n_points`` in all); slope: least squares of true on
  served.
- ``top1_direction_rate``: share of ``n_removal_pairs`` predictions whose served top-1
  rating, removed, moves the prediction the way its effect's sign says;
  ``random_direction_rate``: the same for a random first-hop rating of the prediction.
- ``noise_floor_spearman``: leave-one-out under another evaluation sampling seed against
  leave-one-out under the served seed, on the same points (how much of the truth is
  sampling).
- ``fold_in``: cold users, each built from 5 of their training ratings (the others removed
  from the live ratings, baselines refitted, as `add_ratings` builds a new user): served
  effects of those 5 against leave-one-out among them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy import stats

from recsys.experiments.faithfulness import agreement_stats
from recsys.experiments.rec_rollback import evidence_effects
from recsys.models.rec.model import EvidenceChainModel, RECConfig
from recsys.ratings import Ratings
from recsys.train import TrainConfig, Trainer


def _served(model: EvidenceChainModel, user: int, item: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The served explanation of ``(user, item)`` with every contribution: ``(example ids,
    effects, method)``, in the explainer's order (largest |effect| first)."""
    exp = model.explainer(model.ratings).explain(user, item, 10_000)
    ids = np.array([c.example for c in exp.contributions], dtype=np.int64)
    eff = np.array([c.effect for c in exp.contributions], dtype=np.float64)
    return ids, eff, exp.method


def first_hop_shares(model: EvidenceChainModel, user: int, item: int) -> tuple[np.ndarray, np.ndarray]:
    """The first-hop shares of ``u·v`` (`EvidenceChainModel.explain`, the estimate served
    before): ``(example ids, shares)``, largest |share| first."""
    r = model.ratings
    res = model.explain(r.user_ids.raw(user), r.item_ids.raw(item), top=None)
    first = [e for e in res["evidence"] if e["hop"] == 1]
    return (np.array([int(e["example"]) for e in first], dtype=np.int64),
            np.array([float(e["share"]) for e in first], dtype=np.float64))


def _reseeded(model: EvidenceChainModel, seed: int) -> EvidenceChainModel:
    """The same trained model with another sampling seed (evaluation draws other chains)."""
    twin = EvidenceChainModel(model.n_users, model.n_items, model.rating_scale,
                              dataclasses.replace(model.config, seed=seed))
    twin.load_state_dict(model.state_dict())
    twin.bind_ratings(model.ratings)
    return twin.to(model.device).eval()


def _test_pairs(model: EvidenceChainModel, test: Ratings, n: int, rng: np.random.Generator,
                min_evidence: int = 2) -> list[tuple[int, int]]:
    """Up to ``n`` random test pairs the model predicts from evidence (known user and item,
    at least ``min_evidence`` first-hop ratings served)."""
    out = []
    for k in rng.permutation(len(test)):
        u, i = int(test.users[k]), int(test.items[k])
        if model.path(u) != "model" or not bool(model.known_mask(torch.tensor([u]), torch.tensor([i]))[1]):
            continue
        if len(_served(model, u, i)[0]) >= min_evidence:
            out.append((u, i))
        if len(out) == n:
            break
    return out


def _direction(est: float, true: float) -> bool:
    return bool(np.sign(est) == np.sign(true) and true != 0)


def _scores(est: np.ndarray, true: np.ndarray, per_pair: list[float], top1: list[bool], rand: list[bool]) -> dict:
    agree = agreement_stats(est, true)
    return {"spearman": agree["spearman"], "slope": agree["slope"], "pearson": agree["pearson"],
            "sign_agreement": agree["sign_agreement"],
            "spearman_per_pair_mean": float(np.mean(per_pair)) if per_pair else float("nan"),
            "top1_direction_rate": float(np.mean(top1)), "random_direction_rate": float(np.mean(rand)),
            "estimate_mean_abs": float(np.abs(est).mean())}


def served_run(model: EvidenceChainModel, test: Ratings, *, n_pairs: int = 30, n_candidates: int = 20,
               n_removal_pairs: int = 50, n_fold_in_users: int = 20, fold_in_ratings: int = 5,
               noise_floor: bool = True, seed: int = 0) -> dict:
    """All figures above for ``model`` (bound to its training ratings) on test pairs from
    ``test``; a dict with the keys of MF's ``explain-eval`` for the served explanations, and
    the same figures for the first-hop shares (``shares``) on the same points.
    ``noise_floor=False`` skips the re-seeded leave-one-out (``noise_floor_spearman`` None)."""
    model.eval()
    rng = np.random.default_rng(seed)
    twin = _reseeded(model, model.config.seed + 1000) if noise_floor else None
    pairs = _test_pairs(model, test, max(n_pairs, n_removal_pairs), rng)
    names = ("served", "shares")
    est: dict[str, list[np.ndarray]] = {n: [] for n in names}
    per_pair: dict[str, list[float]] = {n: [] for n in names}
    top1: dict[str, list[bool]] = {n: [] for n in names}
    rand: dict[str, list[bool]] = {n: [] for n in names}
    true_all, noise_all = [], []
    method = ""
    for k, (u, i) in enumerate(pairs):
        ids, served, method = _served(model, u, i)
        share_ids, shares = first_hop_shares(model, u, i)
        share_of = dict(zip(share_ids.tolist(), shares, strict=True))
        by = {"served": served, "shares": np.array([share_of[z] for z in ids.tolist()])}
        if k < n_removal_pairs:  # each estimate's top-1 and a random first-hop rating, removed
            j = int(rng.integers(len(ids)))
            tops = {n: int(np.argmax(np.abs(by[n]))) for n in names}
            pick = np.array([tops["served"], tops["shares"], j])
            t = evidence_effects(model, u, i, ids[pick]).total
            for n, top in zip(names, (0, 1), strict=True):
                top1[n].append(_direction(by[n][pick[top]], t[top]))
                rand[n].append(_direction(by[n][j], t[2]))
        if k < n_pairs:
            pick = np.sort(rng.choice(len(ids), size=min(n_candidates, len(ids)), replace=False))
            truth = evidence_effects(model, u, i, ids[pick]).total
            true_all.append(truth)
            if twin is not None:
                noise_all.append(evidence_effects(twin, u, i, ids[pick]).total)
            for n in names:
                est[n].append(by[n][pick])
                if len(pick) > 2 and np.std(truth) > 0 and np.std(by[n][pick]) > 0:
                    per_pair[n].append(stats.spearmanr(by[n][pick], truth)[0])
    true = np.concatenate(true_all)
    noise = agreement_stats(np.concatenate(noise_all), true) if noise_all else {"spearman": None, "slope": None}
    scores = {n: _scores(np.concatenate(est[n]), true, per_pair[n], top1[n], rand[n]) for n in names}
    return {
        "model": "rec", "method": method, "embedding_size": model.config.embedding_size,
        **scores["served"],
        "n_pairs": min(n_pairs, len(pairs)), "n_candidates": n_candidates, "n_points": int(len(true)),
        "n_removal_pairs": len(top1["served"]),
        "noise_floor_spearman": noise["spearman"], "noise_floor_slope": noise["slope"],
        "true_mean_abs": float(np.abs(true).mean()),
        "truth": "leave-one-out on the served model: the rating hidden from every sampled chain under the "
                 "evaluation seed, baseline biases refitted; prototypes and networks not retrained (the served "
                 "effects are this recomputation, so they match it by construction); noise floor: the same "
                 "leave-one-out under another evaluation sampling seed",
        "shares": scores["shares"],
        "fold_in": (fold_in_run(model, test, n_users=n_fold_in_users, n_ratings=fold_in_ratings, seed=seed)
                    if n_fold_in_users else None),
    }


def fit_and_run(train: Ratings, test: Ratings, model_config: dict, train_config: TrainConfig, **kw: object) -> dict:
    """Train REC with ``model_config`` (`RECConfig` fields) and ``train_config`` on ``train``
    (as ``recsys train --model rec`` does) and run `served_run` on it (``kw``: its options)."""
    model = EvidenceChainModel(train.n_users, train.n_items, train.rating_scale, RECConfig(**model_config))
    result = Trainer(train_config).fit(model, train)
    out = served_run(model, test, **kw)
    out["fit_seconds"] = result.fit_seconds
    return out


def fold_in_run(model: EvidenceChainModel, test: Ratings, *, n_users: int = 20, n_ratings: int = 5,
                seed: int = 0) -> dict:
    """Cold users built from ``n_ratings`` of their training ratings: for each, one test
    prediction explained as served, against leave-one-out among those ratings (in the
    model rebound to the reduced ratings; the model is rebound to its own ratings after)."""
    train = model.ratings
    rng = np.random.default_rng(seed + 1)
    counts = np.bincount(train.users, minlength=train.n_users)
    tested = np.unique(test.users[test.users < train.n_users])
    users = [int(u) for u in rng.permutation(tested) if counts[u] > n_ratings][:n_users]
    est_all, share_all, true_all = [], [], []
    try:
        for u in users:
            own = np.flatnonzero(train.users == u)
            keep_own = rng.choice(own, size=n_ratings, replace=False)
            keep = np.ones(len(train), dtype=bool)
            keep[own] = False
            keep[keep_own] = True
            reduced = train.subset(np.flatnonzero(keep))
            model.bind_ratings(reduced)
            items = test.items[(test.users == u) & (test.items < train.n_items)]
            items = [int(i) for i in items if bool(model.known_mask(torch.tensor([u]), torch.tensor([int(i)]))[1])]
            if not items:
                continue
            i = items[int(rng.integers(len(items)))]
            ids, eff, _ = _served(model, u, i)
            share_ids, shares = first_hop_shares(model, u, i)
            share_of = dict(zip(share_ids.tolist(), shares, strict=True))
            own_rows = np.flatnonzero(reduced.users == u)
            sel = np.isin(ids, own_rows)  # the user's own ratings among the served evidence
            if sel.sum() < 1:
                continue
            truth = evidence_effects(model, u, i, ids[sel]).total
            est_all.append(eff[sel])
            share_all.append(np.array([share_of[z] for z in ids[sel].tolist()]))
            true_all.append(truth)
    finally:
        model.bind_ratings(train)
    if not est_all:
        return {"spearman": float("nan"), "slope": float("nan"), "n_users": 0, "n_candidates": 0}
    est, true = np.concatenate(est_all), np.concatenate(true_all)
    agree = agreement_stats(est, true)
    shares = agreement_stats(np.concatenate(share_all), true)
    return {"method": f"leave-one-out (user built from {n_ratings} ratings)", "spearman": agree["spearman"],
            "slope": agree["slope"], "sign_agreement": agree["sign_agreement"],
            "n_users": len(est_all), "n_candidates": int(len(est)), "ratings_per_user": n_ratings,
            "true_mean_abs": float(np.abs(true).mean()),
            "shares": {"spearman": shares["spearman"], "slope": shares["slope"],
                       "sign_agreement": shares["sign_agreement"]}}
