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
from collections.abc import Sequence
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


@dataclass(frozen=True)
class Variant:
    """How a set of retrains differs from the served model's: ``seed`` (the model's and the
    trainer's: initial weights, prototypes, orders, sampling keys) and ``background``, a far
    training rating removed from every run of the set (-1: none), which perturbs the training
    without touching any measured prediction's user or item: a *replica* of the retraining
    whose change differs from the served model's only by the training's own sensitivity."""

    seed: int = 0
    background: int = -1

    @property
    def name(self) -> str:
        """``""`` for the served model's retrains, else ``s<seed>`` and/or ``b<background>``."""
        return "-".join(([f"s{self.seed}"] if self.seed else []) + ([f"b{self.background}"] if self.background >= 0 else []))


def retrain_predictions(train: Ratings, model_config: RECConfig, train_config: TrainConfig, removed: int,
                        pairs: list[tuple[int, int]], *, variant: Variant = Variant(), save: Path | None = None) -> dict:
    """One same-trajectory retrain (`recsys.experiments.rec_rollback.retrain`) without the
    training rating ``removed`` (-1: nothing removed) under ``variant``: the unclipped
    predictions of ``pairs`` with the removed ratings removed from the live ratings, as the
    retrain trained. ``save``: the retrained model's artefact."""
    from recsys.artefact import save_artefact
    from recsys.experiments.rec_rollback import predict_without, retrain

    torch.set_num_threads(1)
    if variant.seed:
        model_config = dataclasses.replace(model_config, seed=variant.seed)
        train_config = dataclasses.replace(train_config, seed=variant.seed)
    gone = [z for z in (removed, variant.background) if z >= 0]
    t0 = time.perf_counter()
    model = retrain(train, model_config, dataclasses.replace(train_config, progress=False), gone)
    seconds = time.perf_counter() - t0
    if save is not None:
        save_artefact(save, model, train)
    predictions = [predict_without(model, u, i, gone) for u, i in pairs]
    return {"removed": removed, "variant": variant.name, "pairs": [list(p) for p in pairs],
            "predictions": predictions, "seconds": seconds}


def _changes(runs: dict, removed: int, variant: str) -> dict[tuple[int, int], float] | None:
    """The retrained change (full run's prediction minus the run without ``removed``) of each
    pair that run predicted, in ``variant``; None when either run is missing."""
    base, run = runs.get((-1, variant)), runs.get((removed, variant))
    if base is None or run is None:
        return None
    full = {tuple(p): v for p, v in zip(base["pairs"], base["predictions"], strict=True)}
    return {tuple(p): full[tuple(p)] - v for p, v in zip(run["pairs"], run["predictions"], strict=True)}


def retrained_scores(model: EvidenceChainModel, picks: list[Removal], runs: dict[tuple[int, str], dict],
                     replicas: Sequence[str] = ("",), reseeded: str | None = None) -> dict:
    """The served effects (and the first-hop shares) of the removed ratings against the
    retrained changes, on every pair whose served explanation lists the rating (``runs``: the
    `retrain_predictions` results by ``(removed, variant name)``; variant ``""`` is
    ``model``'s own retraining, whose full run is ``model``).

    The truth of a point is its change averaged over the ``replicas`` (variant names: the
    served model's retraining and perturbed replicas of it, `Variant.background`), on the
    points every replica has; ``one_retrain`` scores the served model's retraining alone, on
    all its points. Noise floors: ``replica_floor_*`` one replica's change against another's
    (how much of a single retrain's change is the training's sensitivity to any
    perturbation); ``noise_floor_*`` (with ``reseeded``, a variant under another seed) the
    re-seeded change against the served model's. ``top1_direction_rate``: on the points
    where the removed rating is the prediction's served top-1, the share whose true change
    has the served effect's sign (``random_direction_rate``: the same on the other points)."""
    from recsys.experiments.rec_rollback import predict_without, raw_prediction

    rows = []
    explainer = model.explainer(model.ratings)
    variants = list(dict.fromkeys([*replicas, *([reseeded] if reseeded is not None else [])]))
    for pick in picks:
        changes = {v: _changes(runs, pick.example, v) for v in variants}
        if changes[replicas[0]] is None:
            continue
        for (u, i) in changes[replicas[0]]:
            exp = explainer.explain(u, i, 10_000)
            effect = {c.example: c.effect for c in exp.contributions}
            if pick.example not in effect:
                continue
            share_ids, share = first_hop_shares(model, u, i)
            rows.append({"pair": [u, i], "removed": pick.example, "served": float(effect[pick.example]),
                         "share": float(share[list(share_ids).index(pick.example)]),
                         "top1": exp.contributions[0].example == pick.example,
                         "no_retrain": raw_prediction(model, u, i) - predict_without(model, u, i, [pick.example]),
                         **{f"change[{v}]": None if changes[v] is None else float(changes[v][(u, i)])
                            for v in variants}})

    def column(name: str, keep: np.ndarray) -> np.ndarray:
        return np.array([r[name] for r, k in zip(rows, keep, strict=True) if k], dtype=np.float64)

    every = np.ones(len(rows), dtype=bool)
    complete = np.array([all(r[f"change[{v}]"] is not None for v in replicas) for r in rows], dtype=bool)
    s = column("served", complete)
    t = np.mean([column(f"change[{v}]", complete) for v in replicas], axis=0) if complete.any() else np.zeros(0)
    top = column("top1", complete).astype(bool)
    agree = agreement_stats(s, t)
    moved = (np.sign(s) == np.sign(t)) & (t != 0)
    removals = {r["removed"] for r in rows}
    out = {"spearman": agree["spearman"], "slope": agree["slope"], "pearson": agree["pearson"],
           "sign_agreement": agree["sign_agreement"], "n_replicas": len(replicas),
           "top1_direction_rate": float(moved[top].mean()) if top.any() else None, "n_top1": int(top.sum()),
           "random_direction_rate": float(moved[~top].mean()) if (~top).any() else None,
           "n_removals": len({r["removed"] for r, k in zip(rows, complete, strict=True) if k}),
           "n_points": int(complete.sum()),
           # n_pairs: test predictions scored; n_candidates: removed ratings (each scored on its predictions)
           "n_pairs": len({tuple(r["pair"]) for r, k in zip(rows, complete, strict=True) if k}),
           "n_candidates": len({r["removed"] for r, k in zip(rows, complete, strict=True) if k}),
           "true_mean_abs": float(np.abs(t).mean()) if len(t) else None,
           "estimate_mean_abs": float(np.abs(s).mean()) if len(s) else None,
           "shares": agreement_stats(column("share", complete), t),
           "no_retrain_max_abs_difference": float(np.abs(column("no_retrain", every) - column("served", every)).max())
           if rows else None,
           "noise_floor_spearman": None, "noise_floor_slope": None,
           "replica_floor_spearman": None, "replica_floor_slope": None}
    one = agreement_stats(column("served", every), column(f"change[{replicas[0]}]", every))
    out["one_retrain"] = {**one, "n_points": len(rows), "n_removals": len(removals)}
    if len(replicas) > 1:
        a, b = column(f"change[{replicas[1]}]", complete), column(f"change[{replicas[0]}]", complete)
        floor = agreement_stats(a, b)
        out.update(replica_floor_spearman=floor["spearman"], replica_floor_slope=floor["slope"])
        out["replica_floor"] = {"replicas": list(replicas[:2]), "n_points": int(complete.sum()), **floor,
                                "served_vs_one_replica": agreement_stats(s, b)}
    if reseeded is not None:
        both = np.array([r[f"change[{reseeded}]"] is not None for r in rows], dtype=bool)
        if both.sum() > 2:
            truth0 = column(f"change[{replicas[0]}]", both)
            floor = agreement_stats(column(f"change[{reseeded}]", both), truth0)
            out.update(noise_floor_spearman=floor["spearman"], noise_floor_slope=floor["slope"])
            out["noise_floor"] = {"variant": reseeded, "n_points": int(both.sum()), **floor,
                                  "served_vs_retrained_same_points": agreement_stats(column("served", both), truth0)}
    out["points"] = rows
    out["retrain_seconds"] = {f"{k[0]}@{k[1]}": v["seconds"] for k, v in runs.items()}
    return out


def far_ratings(train: Ratings, picks: list[Removal], n: int, seed: int = 0) -> list[int]:
    """``n`` random training ratings whose user and item are neither a removal's nor any
    measured prediction's: the background removals of perturbed replicas (`Variant`)."""
    users = {u for r in picks for u, _ in r.pairs} | {r.user for r in picks}
    items = {i for r in picks for _, i in r.pairs} | {int(train.items[r.example]) for r in picks}
    far = [int(z) for z in np.random.default_rng(seed + 1000).permutation(len(train))
           if int(train.users[z]) not in users and int(train.items[z]) not in items]
    return far[:n]


def _fingerprint(ratings: Ratings) -> str:
    """A digest of the ratings' users, items and values (which training data a retrain used)."""
    import hashlib

    digest = hashlib.sha256()
    for array in (ratings.users, ratings.items, ratings.values):
        digest.update(np.ascontiguousarray(array).tobytes())
    return f"{len(ratings)} ratings, sha256 {digest.hexdigest()[:16]}"


def _write_json(path: Path, data: object) -> None:
    """``data`` as JSON at ``path``, whole or not at all (a run killed mid-write leaves no
    half file that a resumed run would take for a finished retrain)."""
    import json
    import os

    staged = path.with_name(path.name + ".part")
    staged.write_text(json.dumps(data, indent=1))
    os.replace(staged, path)


def _claim(path: Path, setup: dict) -> None:
    """Record what the retrains in ``path``'s folder are of, or refuse a folder that holds
    retrains of something else (their results would be mixed with this run's)."""
    import json

    from recsys.errors import RecsysError

    setup = json.loads(json.dumps(setup))  # as it reads back (tuples become lists)
    if path.is_file():
        held = json.loads(path.read_text())
        if held != setup:
            diff = sorted(k for k in set(held) | set(setup) if held.get(k) != setup.get(k))
            raise RecsysError(f"{path.parent} holds retrains of another setup (differs in: {', '.join(diff)}); "
                              "give another work folder")
    else:
        _write_json(path, setup)


def retrained_run(train: Ratings, test: Ratings, model_config: dict, train_config: TrainConfig, *,
                  n_removals: int = 8, replica_removals: int = 8, noise_removals: int = 4, noise_seed: int = 1,
                  workers: int = 1, seed: int = 0, work_dir: Path | None = None) -> tuple[EvidenceChainModel, dict]:
    """REC's served explanations against same-trajectory retraining (`retrained_scores`):
    the model ``recsys train`` fits with ``model_config`` (`RECConfig` fields) and
    ``train_config``, retrained without each of ``n_removals`` ratings (`removal_picks`);
    the first ``replica_removals`` of them retrained again in a perturbed replica (a far
    rating removed from every run of it, `far_ratings`), the truth being the two retrains'
    mean change (0: one retrain); the first ``noise_removals`` retrained under ``noise_seed``
    too (the noise floor; 0: none). Each retrain is one process's job (``workers`` processes,
    one thread each). ``work_dir``: where each retrain writes its result (JSON) and each full
    run its artefact; a retrain whose result is already there is not run again (full runs'
    predictions are read from their artefacts, so picks may be added). Returns the full
    model (the retrain with nothing removed, which is `Trainer.fit`) and the scores, with
    ``truth``, the configs' ``embedding_size`` and ``fit_seconds``."""
    import json
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from recsys.artefact import load_artefact
    from recsys.experiments.rec_rollback import predict_without

    mc = RECConfig(**model_config)
    picks = removal_picks(train, test, n_removals, max_ratings=mc.fanouts[0], seed=seed)
    served = Variant()
    sets: list[tuple[Variant, list[Removal]]] = [(served, picks)]
    replicas = [served.name]
    if replica_removals:
        replica = Variant(background=far_ratings(train, picks, 1, seed)[0])
        sets.append((replica, picks[:replica_removals]))
        replicas.append(replica.name)
    reseeded = Variant(seed=noise_seed) if noise_removals else None
    if reseeded is not None:
        sets.append((reseeded, picks[:noise_removals]))
    jobs = []
    for variant, chosen in sets:
        jobs.append((-1, variant, sorted({p for r in chosen for p in r.pairs})))
        jobs += [(r.example, variant, r.pairs) for r in chosen]
    folder = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="rec_retrained_"))
    folder.mkdir(parents=True, exist_ok=True)
    _claim(folder / "setup.json", {"model": dataclasses.asdict(mc), "train": repr(train_config),
                                   "ratings": _fingerprint(train), "seed": seed})

    def result(removed: int, variant: Variant) -> Path:
        return folder / (f"{removed}.json" if not variant.name else f"{removed}-{variant.name}.json")

    def full(variant: Variant) -> Path:
        return folder / ("full" if not variant.name else f"full-{variant.name}")

    todo = [j for j in jobs if not result(j[0], j[1]).is_file() or (j[0] < 0 and not full(j[1]).is_dir())]
    calls = [((train, mc, train_config, z, pairs), {"variant": v, "save": full(v) if z < 0 else None})
             for z, v, pairs in todo]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(retrain_predictions, *a, **k) for a, k in calls]
            for (z, v, _), f in zip(todo, futures, strict=True):
                _write_json(result(z, v), f.result())
    else:
        for (z, v, _), (a, k) in zip(todo, calls, strict=True):
            _write_json(result(z, v), retrain_predictions(*a, **k))
    runs = {(z, v.name): json.loads(result(z, v).read_text()) for z, v, _ in jobs}
    for _, v, pairs in [j for j in jobs if j[0] < 0]:  # a folder's full runs may predate some picks
        base = load_artefact(full(v)).model.eval()
        gone = [v.background] if v.background >= 0 else []
        runs[(-1, v.name)].update(pairs=[list(p) for p in pairs],
                                  predictions=[predict_without(base, u, i, gone) for u, i in pairs])
    model = load_artefact(full(served)).model.eval()
    scores = retrained_scores(model, picks, runs, replicas, None if reseeded is None else reseeded.name)
    if replica_removals:  # what the far removal alone did to the measured predictions
        served_full = {tuple(p): v for p, v in zip(runs[(-1, "")]["pairs"], runs[(-1, "")]["predictions"], strict=True)}
        moved = np.abs([served_full[tuple(p)] - v for p, v in
                        zip(runs[(-1, replicas[1])]["pairs"], runs[(-1, replicas[1])]["predictions"], strict=True)])
        scores["far_removal"] = {"example": replica.background, "n_predictions": len(moved),
                                 "mean_abs_change": float(moved.mean()), "p50": float(np.percentile(moved, 50)),
                                 "p90": float(np.percentile(moved, 90)), "max": float(moved.max())}
    scores.update(model="rec", method=model.explainer(model.ratings).method, embedding_size=mc.embedding_size,
                  truth="same-trajectory retraining without the rating (same initial weights, orders and sampling "
                        "keys; the rating at loss weight 0 and hidden from every chain, baselines refitted), the "
                        "change averaged over the served model's retraining and a replica perturbed by a far "
                        "rating's removal; noise floors: one replica against the other, and the retraining under "
                        "another seed",
                  fit_seconds=runs[(-1, "")]["seconds"])
    return model, scores
