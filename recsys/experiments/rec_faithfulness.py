"""Faithfulness of the evidence-chain model's explanations as served (issue 22).

The service explains a REC prediction with its explainer (`EvidenceChainModel.explainer`,
`recsys.models.rec.explain`): the first-hop evidence ratings, each with an effect in rating
points, the exact change of the prediction when the rating is removed from the live ratings
and the trained parameters are kept. Two truths score it:

- **Retraining** (`retrained_run`, what ``recsys explain-eval --model rec`` reports): the
  model retrained on the same trajectory without the rating (`recsys.experiments.rec_rollback.retrain`:
  same initial weights, orders and sampling keys; the rating at loss weight 0 and hidden from
  every chain). A retrain gives the true change of every test prediction whose served
  explanation lists the rating, so one retrain scores many points: ``n_removals`` random
  ratings (`removal_picks`), pooled. Keys as MF's ``explain-eval``: ``spearman``, ``slope``
  (least squares of true on served), ``pearson``, ``sign_agreement``;
  ``top1_direction_rate`` on the points where the removed rating is the served top-1,
  ``random_direction_rate`` on the others; ``noise_floor_spearman`` / ``_slope``: the same
  changes retrained under another seed against these (how much of the truth is the training
  run).
- **No retraining** (`served_run`): the same trained parameters, the rating removed from the
  live ratings (hidden from every sampled chain under the evaluation key, baselines
  refitted: `recsys.experiments.rec_rollback.evidence_effects`), on ``n_pairs`` test
  predictions x up to ``n_candidates`` of their first-hop ratings. The served effects are
  this recomputation, so they match it by construction; what it measures is the sampling
  noise floor (the same under another evaluation seed) and the first-hop *shares* served
  before. It is the whole truth for REC's cold start: ``fold_in`` scores users built from 5
  of their ratings (`fold_in_run`), which REC serves without any training.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from recsys.experiments.faithfulness import agreement_stats
from recsys.experiments.rec_rollback import evidence_effects
from recsys.models.rec.model import EvidenceChainModel, RECConfig
from recsys.ratings import Ratings
from recsys.train import TrainConfig


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


# ----------------------------------------------------------------------------- against retraining
@dataclass(frozen=True)
class Removal:
    """One training rating to remove and retrain without: ``example`` (a row of the training
    ratings, rated by ``user``) and the test ``pairs`` (user, item indices) whose change is
    measured: the user's test items and the rated item's test users."""

    user: int
    example: int
    pairs: list[tuple[int, int]]


def removal_picks(train: Ratings, test: Ratings, n: int, *, max_ratings: int, seed: int = 0) -> list[Removal]:
    """``n`` removals: random test users with 2..``max_ratings`` training ratings (all of them
    first-hop evidence of every prediction for the user when ``max_ratings`` is the first
    fanout), one random rating of each. The first ``m`` of ``n`` picks are the picks of ``m``."""
    counts = np.bincount(train.users, minlength=train.n_users)
    rated = np.bincount(train.items, minlength=train.n_items) > 0
    rng = np.random.default_rng(seed)
    out: list[Removal] = []
    for u in rng.permutation(np.unique(test.users)):
        u = int(u)
        if u >= train.n_users or not 2 <= counts[u] <= max_ratings:
            continue
        items = [int(i) for i in test.items[test.users == u] if i < train.n_items and rated[i]]
        if not items:
            continue
        z = int(rng.choice(np.flatnonzero(train.users == u)))
        i = int(train.items[z])
        users = [int(v) for v in test.users[test.items == i] if v < train.n_users and counts[v] > 0 and v != u]
        out.append(Removal(u, z, [(u, j) for j in items] + [(v, i) for v in users]))
        if len(out) == n:
            break
    return out


def retrain_predictions(train: Ratings, model_config: RECConfig, train_config: TrainConfig, removed: int,
                        pairs: list[tuple[int, int]], *, seed: int = 0, save: Path | None = None) -> dict:
    """One same-trajectory retrain (`recsys.experiments.rec_rollback.retrain`) without the
    training rating ``removed`` (-1: nothing removed) under the configs with ``seed`` (the
    model's and the trainer's: initial weights, prototypes, orders, sampling keys): the
    unclipped predictions of ``pairs`` with the rating removed from the live ratings, as the
    retrain trained. ``save``: the retrained model's artefact (nothing removed only)."""
    from recsys.artefact import save_artefact
    from recsys.experiments.rec_rollback import predict_without, raw_prediction, retrain

    torch.set_num_threads(1)
    if seed:
        model_config = dataclasses.replace(model_config, seed=seed)
        train_config = dataclasses.replace(train_config, seed=seed)
    t0 = time.perf_counter()
    model = retrain(train, model_config, dataclasses.replace(train_config, progress=False),
                    [] if removed < 0 else [removed])
    seconds = time.perf_counter() - t0
    if removed < 0:
        predictions = [raw_prediction(model, u, i) for u, i in pairs]
        if save is not None:
            save_artefact(save, model, train)
    else:
        predictions = [predict_without(model, u, i, [removed]) for u, i in pairs]
    return {"removed": removed, "seed": seed, "pairs": [list(p) for p in pairs], "predictions": predictions,
            "seconds": seconds}


def _changes(runs: dict, removed: int, seed: int) -> dict[tuple[int, int], float] | None:
    """The retrained change (full run's prediction minus the run without ``removed``) of each
    pair that run predicted, under ``seed``; None when either run is missing."""
    base, run = runs.get((-1, seed)), runs.get((removed, seed))
    if base is None or run is None:
        return None
    full = {tuple(p): v for p, v in zip(base["pairs"], base["predictions"], strict=True)}
    return {tuple(p): full[tuple(p)] - v for p, v in zip(run["pairs"], run["predictions"], strict=True)}


def retrained_scores(model: EvidenceChainModel, picks: list[Removal], runs: dict[tuple[int, int], dict],
                     noise_seed: int | None = None) -> dict:
    """The served effects (and the first-hop shares) of the removed ratings against the
    retrained changes, on every pair whose served explanation lists the rating (``runs``: the
    `retrain_predictions` results by ``(removed, seed)``; seed 0 is ``model``'s, which is the
    retrain with nothing removed). With ``noise_seed``: the retrain noise floor, the same
    changes retrained under that seed against seed 0's, on the points both have.
    ``top1_direction_rate``: on the points where the removed rating is the prediction's served
    top-1, the share whose retrained change has the served effect's sign
    (``random_direction_rate``: the same on the other points)."""
    from recsys.experiments.rec_rollback import predict_without, raw_prediction

    served, shares, true, no_retrain, reseeded, top1, scored = [], [], [], [], [], [], set()
    explainer = model.explainer(model.ratings)
    for pick in picks:
        change = _changes(runs, pick.example, 0)
        if change is None:
            continue
        change_noise = _changes(runs, pick.example, noise_seed) if noise_seed is not None else None
        for (u, i), true_change in change.items():
            exp = explainer.explain(u, i, 10_000)
            effect = {c.example: c.effect for c in exp.contributions}
            if pick.example not in effect:
                continue
            share_ids, share = first_hop_shares(model, u, i)
            served.append(effect[pick.example])
            shares.append(float(share[list(share_ids).index(pick.example)]))
            true.append(true_change)
            top1.append(exp.contributions[0].example == pick.example)
            scored.add((u, i))
            no_retrain.append(raw_prediction(model, u, i) - predict_without(model, u, i, [pick.example]))
            reseeded.append(np.nan if change_noise is None else change_noise[(u, i)])
    s, sh, t, nr, rs = (np.array(a, dtype=np.float64) for a in (served, shares, true, no_retrain, reseeded))
    top = np.array(top1, dtype=bool)
    agree = agreement_stats(s, t)
    moved = (np.sign(s) == np.sign(t)) & (t != 0)
    out = {"spearman": agree["spearman"], "slope": agree["slope"], "pearson": agree["pearson"],
           "sign_agreement": agree["sign_agreement"],
           "top1_direction_rate": float(moved[top].mean()) if top.any() else None, "n_top1": int(top.sum()),
           "random_direction_rate": float(moved[~top].mean()) if (~top).any() else None,
           "n_removals": len([p for p in picks if (p.example, 0) in runs]), "n_points": int(len(t)),
           # n_pairs: test predictions scored; n_candidates: removed ratings (each scored on its predictions)
           "n_pairs": len(scored), "n_candidates": len([p for p in picks if (p.example, 0) in runs]),
           "true_mean_abs": float(np.abs(t).mean()) if len(t) else None,
           "estimate_mean_abs": float(np.abs(s).mean()) if len(s) else None,
           "shares": agreement_stats(sh, t),
           "no_retrain_max_abs_difference": float(np.abs(nr - s).max()) if len(s) else None,
           "noise_floor_spearman": None, "noise_floor_slope": None,
           "points": [{"served": float(a), "share": float(b), "retrained": float(c),
                       "retrained_reseeded": None if np.isnan(d) else float(d), "top1": bool(e)}
                      for a, b, c, d, e in zip(s, sh, t, rs, top, strict=True)],
           "retrain_seconds": {f"{k[0]}@{k[1]}": v["seconds"] for k, v in runs.items()}}
    both = ~np.isnan(rs)
    if both.sum() > 2:
        floor = agreement_stats(rs[both], t[both])
        out.update(noise_floor_spearman=floor["spearman"], noise_floor_slope=floor["slope"])
        out["noise_floor"] = {
            "seed": noise_seed, "n_points": int(both.sum()), "reseeded_vs_retrained": floor,
            "served_vs_retrained_same_points": agreement_stats(s[both], t[both]),
            "served_vs_reseeded": agreement_stats(s[both], rs[both])}
    return out


def retrained_run(train: Ratings, test: Ratings, model_config: dict, train_config: TrainConfig, *,
                  n_removals: int = 8, noise_removals: int = 4, noise_seed: int = 1, workers: int = 1,
                  seed: int = 0, work_dir: Path | None = None) -> tuple[EvidenceChainModel, dict]:
    """REC's served explanations against same-trajectory retraining (`retrained_scores`):
    the model ``recsys train`` fits with ``model_config`` (`RECConfig` fields) and
    ``train_config``, retrained without each of ``n_removals`` ratings (`removal_picks`), and
    the full run and the first ``noise_removals`` removals retrained under ``noise_seed`` too
    (the noise floor; 0: none). ``workers``: processes for the retrains, one thread each.
    ``work_dir``: where each retrain writes its result (JSON) and each full run its artefact
    (``full``, ``full-s<seed>``); a retrain whose result is already there is not run again
    (the full runs' predictions are read from their artefacts, so picks may be added). Returns the full model (the
    retrain with nothing removed, which is `Trainer.fit`) and the scores, with
    ``truth``, the configs' ``embedding_size`` and ``fit_seconds``."""
    import json
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from recsys.artefact import load_artefact
    from recsys.experiments.rec_rollback import raw_prediction

    mc = RECConfig(**model_config)
    picks = removal_picks(train, test, n_removals, max_ratings=mc.fanouts[0], seed=seed)
    noisy = picks[:noise_removals]
    jobs = [(-1, 0, sorted({p for r in picks for p in r.pairs}))] + [(r.example, 0, r.pairs) for r in picks]
    if noisy:
        jobs += [(-1, noise_seed, sorted({p for r in noisy for p in r.pairs}))]
        jobs += [(r.example, noise_seed, r.pairs) for r in noisy]
    folder = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="rec_retrained_"))
    folder.mkdir(parents=True, exist_ok=True)

    def result(removed: int, sd: int) -> Path:
        return folder / (f"{removed}.json" if sd == 0 else f"{removed}-s{sd}.json")

    def full(sd: int) -> Path:
        return folder / ("full" if sd == 0 else f"full-s{sd}")

    todo = [j for j in jobs if not result(j[0], j[1]).is_file() or (j[0] < 0 and not full(j[1]).is_dir())]
    saves = [full(sd) if z < 0 else None for z, sd, _ in todo]
    args = ([train] * len(todo), [mc] * len(todo), [train_config] * len(todo), [j[0] for j in todo],
            [j[2] for j in todo])
    kw = [{"seed": j[1], "save": s} for j, s in zip(todo, saves, strict=True)]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(retrain_predictions, *a, **k) for *a, k in zip(*args, kw, strict=True)]
            for j, f in zip(todo, futures, strict=True):
                result(j[0], j[1]).write_text(json.dumps(f.result()))
    else:
        for *a, k in zip(*args, kw, strict=True):
            out = retrain_predictions(*a, **k)
            result(out["removed"], out["seed"]).write_text(json.dumps(out))
    runs = {(z, sd): json.loads(result(z, sd).read_text()) for z, sd, _ in jobs}
    for _, sd, pairs in [j for j in jobs if j[0] < 0]:  # a folder's full runs may predate some picks
        base = load_artefact(full(sd)).model.eval()
        runs[(-1, sd)].update(pairs=[list(p) for p in pairs], predictions=[raw_prediction(base, u, i) for u, i in pairs])
    model = load_artefact(full(0)).model.eval()
    scores = retrained_scores(model, picks, runs, noise_seed if noisy else None)
    scores.update(model="rec", method=model.explainer(model.ratings).method, embedding_size=mc.embedding_size,
                  truth="same-trajectory retraining without the rating (same initial weights, orders and sampling "
                        "keys; the rating at loss weight 0 and hidden from every chain, baselines refitted); noise "
                        "floor: the same retraining under another seed",
                  fit_seconds=runs[(-1, 0)]["seconds"])
    return model, scores
