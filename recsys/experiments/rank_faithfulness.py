"""How faithful are the ranking MF's explanations? Exact leave-one-out by retraining.

Ground truth is *same-trajectory* removal, as for rating MF (`recsys.experiments.faithfulness`):
retrain from the same initial weights and seed, visiting every epoch's examples in the same
order and batches, with the removed interaction's weight set to 0 (its ranking loss and L2
vanish; the batch keeps its ``1/|B|`` scale and every example draws the same negatives from
the model's seeded generator). With nothing removed `retrain` reproduces `RankingMF.fit`
bit for bit (tested). A re-seeded retrain (other initial weights, shuffles and negatives)
gives the noise floor: how much a score moves from training noise alone.

For N predictions (user, an item of the user's top 10) and C candidate interactions each
(sharing the user's or the item's row), it measures the true change of the item's score and
of its rank in the user's list (training items excluded) and compares it with each method's
estimate (`recsys.models.rankmf.explain`): Spearman, Pearson, slope of true on estimated,
sign agreement. Removal test: for every prediction, retrain without each method's top-1
(the largest estimated positive effect) and without a random candidate, and report the share
whose item moved down the list and the mean rank and score changes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from scipy import stats

from recsys.explain.rollback import RollbackCallback
from recsys.models.rankmf import RankingMF, RankMFConfig
from recsys.models.rankmf.explain import estimate_effects
from recsys.models.rankmf.log import RankRollbackLog
from recsys.optim.factory import build_optimizer
from recsys.optim.sampling import make_sampler
from recsys.ratings import Ratings


def default_config(optimizer: str = "sparse-adam", *, seed: int = 0) -> RankMFConfig:
    """The small configuration of the faithfulness runs (a u1 retrain is about a second on
    one core): D=32, BPR with one negative, batch 4096, 10 epochs."""
    lr = {"sgd": 2.0, "adagrad": 0.1}.get(optimizer, 0.02)
    return RankMFConfig(embedding_size=32, reg=0.01, bias_reg=0.01, learning_rate=lr, lr_decay=0.9, epochs=10,
                        batch_size=4096, negatives=1, loss="bpr", optimizer=optimizer, seed=seed)


def fit_logged(train: Ratings, config: RankMFConfig) -> tuple[RankingMF, RankRollbackLog, float]:
    """Fit through `RankingMF.fit` (the shared Trainer) with an exact `RollbackCallback`."""
    model = RankingMF(train.n_users, train.n_items, train.rating_scale, config)
    cb = RollbackCallback(mode="exact")
    summary = model.fit(train, callbacks=[cb])
    assert isinstance(cb.log, RankRollbackLog)
    return model, cb.log, summary["fit_seconds"]


def retrain(train: Ratings, config: RankMFConfig, removed: Sequence[int] | np.ndarray = (), *,
            seed: int | None = None) -> RankingMF:
    """Same-trajectory retrain without the interactions ``removed`` (module docstring);
    ``seed`` re-seeds the initial weights, the shuffles and the negatives."""
    c = config if seed is None else replace(config, seed=seed)
    torch.manual_seed(c.seed)
    model = RankingMF(train.n_users, train.n_items, train.rating_scale, c)
    weighted = model.weighted(train)
    model.prepare(weighted)
    users, items, weights = weighted.tensors()
    weights = weights.clone()
    weights[torch.as_tensor(np.asarray(removed, dtype=np.int64))] = 0.0
    optimizer = build_optimizer(c.optimizer, model, c.learning_rate, seed=c.seed)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=c.lr_decay)
    sampler = make_sampler("reshuffle", len(train), c.seed)
    for epoch in range(c.epochs):
        model.train()
        order = torch.from_numpy(sampler.epoch_order(epoch))
        for s in range(0, len(order), c.batch_size):
            ids = order[s:s + c.batch_size]
            optimizer.zero_grad(set_to_none=True)
            model.loss(users[ids], items[ids], weights[ids]).backward()
            optimizer.step()
        scheduler.step()
    model.eval()
    return model


def score_and_rank(model: RankingMF, train: Ratings, user: int, item: int) -> tuple[float, int]:
    """The score of ``(user, item)`` and the item's rank (1 = first) in the user's list of
    items they have no training interaction with."""
    scores = model.score_all(torch.tensor([user]))[0].double().numpy()
    seen = train.items[train.by_user.examples[train.by_user.row(user)]]
    mask = np.ones(len(scores), dtype=bool)
    mask[seen] = False
    mask[item] = True
    s = float(scores[item])
    return s, int((scores[mask] > s).sum()) + 1


def sample_predictions(model: RankingMF, train: Ratings, n: int, rng: np.random.Generator,
                       min_interactions: int = 5) -> list[tuple[int, int]]:
    """``n`` (user, item) pairs: random users with at least ``min_interactions``, each with a
    random item of their top 10 (training items excluded)."""
    counts = train.user_counts()
    users = rng.choice(np.flatnonzero(counts >= min_interactions), size=n, replace=False)
    out = []
    for u in users:
        scores = model.score_all(torch.tensor([int(u)]))[0].numpy().copy()
        scores[train.items[train.by_user.examples[train.by_user.row(int(u))]]] = -np.inf
        top = np.argsort(-scores, kind="stable")[:10]
        out.append((int(u), int(rng.choice(top))))
    return out


def agreement_stats(est: np.ndarray, true: np.ndarray) -> dict:
    """Pearson, Spearman, sign agreement and least-squares slope of true on estimated."""
    if len(est) < 3 or np.std(est) == 0 or np.std(true) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "sign_agreement": float("nan"),
                "slope": float("nan")}
    ec = est - est.mean()
    nz = np.abs(true) > 1e-9
    return {"pearson": float(stats.pearsonr(est, true)[0]), "spearman": float(stats.spearmanr(est, true)[0]),
            "sign_agreement": float(np.mean(np.sign(est[nz]) == np.sign(true[nz]))) if nz.any() else float("nan"),
            "slope": float(ec @ (true - true.mean()) / (ec @ ec))}


def run(train: Ratings, config: RankMFConfig, *, n_predictions: int = 20, n_candidates: int = 12, seed: int = 0,
        methods: Sequence[str] | None = None, noise_floor: bool = True, progress: bool = False) -> dict:
    """The agreement and removal tests (module docstring) on ``train``; returns a JSON-ready
    dict with the figures, the setup and every (estimate, true) point."""
    methods = list(methods or (("rollback", "newton") if config.loss == "bpr" else ("rollback",)))
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    model, log, fit_s = fit_logged(train, config)
    full = retrain(train, config)
    same = bool(all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), model.state_dict().values(),
                                                       strict=True)))
    preds = sample_predictions(model, train, n_predictions, rng)
    alt = retrain(train, config, seed=config.seed + 1000) if noise_floor else None
    points: list[dict] = []
    removal: dict[str, list[dict]] = {**{m: [] for m in methods}, "random": []}
    noise: list[dict] = []
    for n, (u, i) in enumerate(preds):
        s0, r0 = score_and_rank(model, train, u, i)
        effects = {}
        for m in methods:
            ids, eff, su, si, _ = estimate_effects(model, train, u, i, m, log if m == "rollback" else None)
            effects[m] = dict(zip(ids.tolist(), eff.tolist(), strict=True))
        shared = np.flatnonzero((train.users == u) | (train.items == i))
        pick = rng.choice(shared, size=min(n_candidates, len(shared)), replace=False)
        cache: dict[int, tuple[float, int]] = {}

        def removed(z: int, u: int = u, i: int = i, cache: dict = cache) -> tuple[float, int]:
            if z not in cache:
                cache[z] = score_and_rank(retrain(train, config, [z]), train, u, i)
            return cache[z]

        for z in pick.tolist():
            s1, r1 = removed(z)
            points.append({"user": u, "item": i, "example": z, "shares": "user" if train.users[z] == u else "item",
                           "true_score_effect": s0 - s1, "true_rank_change": r1 - r0,
                           **{m: effects[m].get(z, 0.0) for m in methods}})
        for m in [*methods, "random"]:
            if m == "random":
                z = int(rng.choice(shared))
                est = float("nan")
            else:
                z, est = max(effects[m].items(), key=lambda kv: kv[1])
            s1, r1 = removed(int(z))
            removal[m].append({"user": u, "item": i, "example": int(z), "estimated": est, "score_change": s1 - s0,
                               "rank_before": r0, "rank_after": r1})
        if alt is not None:
            s_alt, r_alt = score_and_rank(alt, train, u, i)
            noise.append({"score_change": s_alt - s0, "rank_change": r_alt - r0})
        if progress:
            print(f"  prediction {n + 1}/{len(preds)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    true_s = np.array([p["true_score_effect"] for p in points])
    true_r = np.array([p["true_rank_change"] for p in points], dtype=np.float64)
    agreement = {}
    for m in methods:
        est = np.array([p[m] for p in points])
        per_pred = []
        for u, i in preds:
            sel = np.array([(p["user"], p["item"]) == (u, i) for p in points])
            if sel.sum() >= 3 and np.std(est[sel]) > 0 and np.std(true_s[sel]) > 0:
                per_pred.append(stats.spearmanr(est[sel], true_s[sel])[0])
        agreement[m] = {**agreement_stats(est, true_s),
                        "spearman_rank_change": float(stats.spearmanr(est, true_r)[0]) if np.std(true_r) > 0
                        else float("nan"),
                        "spearman_per_prediction_mean": float(np.nanmean(per_pred)) if per_pred else float("nan"),
                        "estimate_mean_abs": float(np.abs(est).mean())}
    removal_summary = {}
    for m, rows in removal.items():
        drop = np.array([r["rank_after"] - r["rank_before"] for r in rows], dtype=np.float64)
        change = np.array([r["score_change"] for r in rows])
        removal_summary[m] = {"share_pushed_down": float(np.mean(drop > 0)), "share_unchanged": float(np.mean(drop == 0)),
                              "mean_rank_change": float(drop.mean()), "median_rank_change": float(np.median(drop)),
                              "mean_score_change": float(change.mean())}
    out = {
        "n_predictions": len(preds), "n_candidates": n_candidates, "n_points": len(points),
        "config": config_dict(config), "fit_seconds_logged": fit_s,
        "retrain_reproduces_fit": same,
        "true_score_effect_mean_abs": float(np.abs(true_s).mean()),
        "true_rank_change_mean_abs": float(np.abs(true_r).mean()),
        "agreement": agreement, "removal_top1": removal_summary,
        "points": points, "removals": removal, "seconds": time.perf_counter() - t0,
    }
    if noise:
        out["noise_floor_reseeded"] = {
            "score_change_mean_abs": float(np.mean([abs(x["score_change"]) for x in noise])),
            "rank_change_mean_abs": float(np.mean([abs(x["rank_change"]) for x in noise])),
        }
    return out


def config_dict(config: RankMFConfig) -> dict:
    from dataclasses import asdict

    return asdict(config)
