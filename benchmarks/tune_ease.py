"""How EASE's defaults were chosen: a grid scored on validation slices carved from the training
folds only; the test files are read only afterwards, to report the chosen default.

For each canonical fold u1..u5 of MovieLens-100K, 15% of each user's *training* ratings (drawn
at random, seed 0; at least one rating per user stays in the fit part) are held out as the
validation slice, and every configuration of the grid is fitted on the rest. Each is scored
by NDCG@10 with `recsys.evaluate.evaluate_ranking` (relevant = validation rating >= 4, the fit
part's items excluded from each list, users with a relevant validation item). The grid:
reg (λ) ∈ {50, 100, 200, 300, 500, 800} × disliked_weight ∈ {1, 0.5, 0.35, 0.2} (the input
weight of a rating below 4; 1 is binary EASE) × gram_weights on/off (whether XᵀX uses the same
weights; moot at disliked_weight 1). The configuration with the best mean validation NDCG over
the five folds wins and becomes `EASEConfig`'s default.

Only then is each canonical test file read: the winner is fitted on the whole training fold
and its test NDCG@10 (and P@10, R@10, MAP, coverage) reported beside binary EASE at λ=500,
the reference run's baseline. Results: ``benchmarks/results/tune_ease.json``.

The popularity prior (`EASEConfig.cold_weight`, ``c``) is chosen afterwards, the other
settings at their defaults, again on the training folds only (`cold_prior_grid`):

- cold validation: from each training fold u1..u5, 20% of the users with more than 5 training
  ratings (seed 0) are held out of the fit; k ∈ {1, 3, 5} of their training ratings (random)
  are revealed by ``learn`` and the rest of their training ratings are the validation targets
  (relevant = rating >= 4, the revealed items masked); NDCG@10 over those users;
- warm validation: the 15% per-user slices above, all users, NDCG@10.

The ``c`` of `COLD_WEIGHTS` with the best mean cold NDCG@10 (over k and folds) whose mean
warm NDCG@10 stays within `WARM_TOLERANCE` of the prior-free value (c = 0) wins and becomes
the default. ``--prior-only`` runs only this part and merges it into the existing results file.

    RECSYS_DATA=../shared/data python benchmarks/tune_ease.py [--quick | --prior-only]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from results_file import write_json  # this folder is on the path when run as a script

from recsys.datasets import load_split
from recsys.evaluate import evaluate_ranking
from recsys.models import build_model
from recsys.models.ease import EASEConfig
from recsys.ratings import Ratings
from recsys.splits import reveal_order

RESULTS = Path(__file__).parent / "results"
FOLDS = ("u1", "u2", "u3", "u4", "u5")
VALIDATION_FRACTION = 0.15
GRID = {
    "reg": [50.0, 100.0, 200.0, 300.0, 500.0, 800.0],
    "disliked_weight": [1.0, 0.5, 0.35, 0.2],
    "gram_weights": [True, False],
}
BASELINE = {"weighting": "binary", "reg": 500.0, "cold_weight": 0.0}
#: the popularity prior's strengths tried (0: off)
COLD_WEIGHTS = [0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 13.0, 20.0, 50.0]
REVEAL = (1, 3, 5)
COLD_SHARE = 0.2
#: how much mean warm validation NDCG@10 the prior may cost
WARM_TOLERANCE = 0.002


def per_user_holdout(train: Ratings, fraction: float, seed: int = 0) -> tuple[Ratings, Ratings]:
    """``(fit, validation)``: per user, ``round(fraction · c)`` of their ``c`` ratings drawn at
    random go to validation, at most ``c - 1`` (every user keeps a fit rating)."""
    rng = np.random.default_rng(seed)
    n = len(train)
    order = np.lexsort((rng.random(n), train.users))  # random order within each user
    counts = train.user_counts()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[train.users[order]]
    n_val = np.minimum(np.floor(fraction * counts + 0.5).astype(np.int64), np.maximum(counts - 1, 0))
    is_val = rank < n_val[train.users]
    return train.subset(~is_val), train.subset(is_val)


def configurations(quick: bool) -> list[dict]:
    grid = {"reg": [200.0, 500.0], "disliked_weight": [1.0, 0.35], "gram_weights": [True, False]} if quick else GRID
    seen, out = set(), []
    for reg, disliked, gram in itertools.product(grid["reg"], grid["disliked_weight"], grid["gram_weights"]):
        cfg = {"reg": reg, "weighting": "liked", "disliked_weight": disliked,
               "gram_weights": gram if disliked != 1.0 else True,  # at weight 1 the Gram is binary either way
               "cold_weight": 0.0}  # the prior is chosen afterwards (cold_prior_grid)
        key = tuple(sorted(cfg.items()))
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def fit_and_score(cfg: dict, fit: Ratings, held_out: Ratings) -> tuple[dict, float]:
    model = build_model("ease", fit.n_users, fit.n_items, fit.rating_scale, cfg)
    summary = model.fit(fit)
    return evaluate_ranking(model, fit, held_out, k=10), summary["fit_seconds"]


def cold_slices(train: Ratings, share: float = COLD_SHARE, reveal=REVEAL, seed: int = 0):
    """``(base, {k: (seen, new, targets)})``: ``share`` of the users with more than
    ``max(reveal)`` ratings (drawn with ``seed``) are held out of ``base``; for each ``k``,
    ``seen`` = ``base`` followed by ``k`` random ratings of each held-out user (``new``: their
    example ids in ``seen``), ``targets`` = the rest of the held-out users' ratings."""
    held, rank = reveal_order(train, np.flatnonzero(train.user_counts() > max(reveal)), share, seed)
    is_held = rank >= 0
    base = train.subset(~is_held)
    out = {}
    for k in reveal:
        revealed = train.subset(np.flatnonzero(is_held & (rank < k)))
        seen = base.append(revealed)
        out[k] = (seen, np.arange(len(base), len(seen), dtype=np.int64),
                  train.subset(np.flatnonzero(is_held & (rank >= k))))
    return base, out, len(held)


def with_cold_weight(model, c: float):
    model.config = dataclasses.replace(model.config, cold_weight=float(c))
    return model


def cold_prior_grid(folds, weights=COLD_WEIGHTS) -> dict:
    """Cold and warm validation NDCG@10 of every ``cold_weight`` in ``weights`` (the other
    settings at `EASEConfig`'s defaults; ``B`` does not depend on ``c``, so each fold is fitted
    once for the cold slices and once for the warm one)."""
    base_cfg = {**dataclasses.asdict(EASEConfig()), "cold_weight": 0.0}
    cold = {c: {k: [] for k in REVEAL} for c in weights}
    popular = {k: [] for k in REVEAL}  # reference: the popularity ranker fitted on the same users
    warm = {c: [] for c in weights}
    n_held = {}
    for name in folds:
        train = load_split("ml-100k", name)[0]  # the training file only
        base, slices, n_held[name] = cold_slices(train)
        model = build_model("ease", train.n_users, train.n_items, train.rating_scale, base_cfg)
        model.fit(base)
        pop = build_model("popular", train.n_users, train.n_items, train.rating_scale, {})
        pop.fit(base)
        for k, (seen, new, targets) in slices.items():
            popular[k].append(evaluate_ranking(pop, seen, targets, k=10)["ndcg"])
            m = copy.deepcopy(model)
            m.learn(seen, new)
            for c in weights:
                cold[c][k].append(evaluate_ranking(with_cold_weight(m, c), seen, targets, k=10)["ndcg"])
        fit, val = per_user_holdout(train, VALIDATION_FRACTION, seed=0)
        model = build_model("ease", fit.n_users, fit.n_items, fit.rating_scale, base_cfg)
        model.fit(fit)
        for c in weights:
            warm[c].append(evaluate_ranking(with_cold_weight(model, c), fit, val, k=10)["ndcg"])
        print(f"{name}: {n_held[name]} users held out; cold k=1 NDCG@10 at c=0 {cold[0.0][1][-1]:.4f}", flush=True)
    rows = []
    for c in weights:
        by_k = {str(k): float(np.mean(cold[c][k])) for k in REVEAL}
        rows.append({"cold_weight": c, "cold_ndcg_by_k": by_k, "cold_ndcg_mean": float(np.mean(list(by_k.values()))),
                     "warm_ndcg": float(np.mean(warm[c])),
                     "per_fold": {"cold": {str(k): cold[c][k] for k in REVEAL}, "warm": warm[c]}})
        print(f"cold_weight {c:>5g}: cold NDCG@10 " + " / ".join(f"{v:.4f}" for v in by_k.values())
              + f" (mean {rows[-1]['cold_ndcg_mean']:.4f}), warm {rows[-1]['warm_ndcg']:.4f}", flush=True)
    pop_by_k = {str(k): float(np.mean(popular[k])) for k in REVEAL}
    print("popularity (reference): cold NDCG@10 " + " / ".join(f"{v:.4f}" for v in pop_by_k.values()))
    floor = next(r["warm_ndcg"] for r in rows if r["cold_weight"] == 0.0) - WARM_TOLERANCE
    allowed = [r for r in rows if r["warm_ndcg"] >= floor]
    best = max(allowed, key=lambda r: r["cold_ndcg_mean"])
    print(f"chosen cold_weight {best['cold_weight']:g} (cold mean {best['cold_ndcg_mean']:.4f}, "
          f"warm {best['warm_ndcg']:.4f} >= {floor:.4f}); EASEConfig() has {EASEConfig().cold_weight:g}")
    return {
        "protocol": {
            "folds": list(folds),
            "cold": f"per training fold: {COLD_SHARE:.0%} of users with > {max(REVEAL)} training ratings "
                    "(seed 0) held out of the fit; k of their training ratings (random) revealed by learn, "
                    "the rest are the targets (relevant = rating >= 4, revealed items masked); NDCG@10",
            "warm": f"per-user random {VALIDATION_FRACTION:g} of each training fold (seed 0), all users; NDCG@10",
            "rule": f"max mean cold NDCG@10 over k {list(REVEAL)} and folds, with mean warm NDCG@10 >= "
                    f"the c=0 value - {WARM_TOLERANCE}",
            "other_settings": base_cfg, "test_files": "unread"},
        "n_held_out_users": n_held, "popularity_cold_ndcg_by_k": pop_by_k, "grid": rows, "chosen_cold_weight": best["cold_weight"],
        "chosen": best, "default_matches_choice": EASEConfig().cold_weight == best["cold_weight"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="u1 only and a 2x2x2 grid (a smoke run)")
    parser.add_argument("--prior-only", action="store_true",
                        help="only the popularity prior's grid, merged into the existing results file")
    args = parser.parse_args()
    folds = FOLDS[:1] if args.quick else FOLDS
    if args.prior_only:
        prior = cold_prior_grid(folds)
        path = RESULTS / "tune_ease.json"
        if not args.quick:
            report = json.loads(path.read_text()) if path.exists() else {}
            report["cold_prior"] = prior
            write_json(path, report)
        return
    data = {name: load_split("ml-100k", name)[0] for name in folds}  # training files only
    slices = {name: per_user_holdout(train, VALIDATION_FRACTION, seed=0) for name, train in data.items()}
    for name, (fit, val) in slices.items():
        print(f"{name}: fit {len(fit):,} ratings, validation {len(val):,}", flush=True)

    rows = []
    started = time.perf_counter()
    for cfg in configurations(args.quick):
        per_fold, seconds = [], []
        for name in folds:
            res, fit_s = fit_and_score(cfg, *slices[name])
            per_fold.append(res["ndcg"])
            seconds.append(fit_s)
        rows.append({**cfg, "validation_ndcg": float(np.mean(per_fold)), "per_fold": per_fold,
                     "fit_seconds": float(np.median(seconds))})
        print(f"reg {cfg['reg']:>5g}  disliked {cfg['disliked_weight']:<4g} gram {cfg['gram_weights']!s:<5}  "
              f"validation NDCG@10 {rows[-1]['validation_ndcg']:.4f}", flush=True)
    rows.sort(key=lambda r: -r["validation_ndcg"])
    winner = {k: rows[0][k] for k in ("reg", "weighting", "disliked_weight", "gram_weights")}
    print(f"\nwinner (validation only): {winner}  NDCG@10 {rows[0]['validation_ndcg']:.4f}  "
          f"({time.perf_counter() - started:.0f} s)")
    prior = cold_prior_grid(folds)  # training folds only, like the grid
    winner["cold_weight"] = prior["chosen_cold_weight"]

    # ---- only now: the test files, for the chosen configuration and the reference baseline
    test = {}
    for label, cfg in (("winner", winner), ("binary_lambda_500", BASELINE)):
        per_fold = []
        for name in folds:
            train, test_part = load_split("ml-100k", name)
            res, fit_s = fit_and_score(cfg, train, test_part)
            per_fold.append({"fold": name, "fit_seconds": fit_s, **res})
        mean = {m: float(np.mean([f[m] for f in per_fold])) for m in ("precision", "recall", "ndcg", "map", "coverage")}
        test[label] = {"config": cfg, "mean": mean, "folds": per_fold}
        print(f"test {label:<18} NDCG@10 {mean['ndcg']:.4f}  P@10 {mean['precision']:.4f}  "
              f"R@10 {mean['recall']:.4f}  coverage {mean['coverage']:.3f}")
    default = EASEConfig()
    matches = all(getattr(default, k) == v for k, v in winner.items() if k != "weighting") and \
        default.weighting in ("auto", "liked")
    print(f"EASEConfig() defaults match the winner: {matches}")
    if not args.quick:
        write_json(RESULTS / "tune_ease.json", {
            "protocol": {"folds": list(folds), "validation": f"per-user random {VALIDATION_FRACTION:g} of each "
                         "training fold (seed 0), test files unread while choosing",
                         "metric": "NDCG@10, relevant = rating >= 4, fit items excluded (evaluate_ranking)",
                         "grid": GRID},
            "winner": winner, "winner_validation_ndcg": rows[0]["validation_ndcg"],
            "defaults_match_winner": matches,
            "test": test, "grid": rows, "cold_prior": prior,
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_threads": torch.get_num_threads()},
        })


if __name__ == "__main__":
    main()
