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

    RECSYS_DATA=../shared/data python benchmarks/tune_ease.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
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

RESULTS = Path(__file__).parent / "results"
FOLDS = ("u1", "u2", "u3", "u4", "u5")
VALIDATION_FRACTION = 0.15
GRID = {
    "reg": [50.0, 100.0, 200.0, 300.0, 500.0, 800.0],
    "disliked_weight": [1.0, 0.5, 0.35, 0.2],
    "gram_weights": [True, False],
}
BASELINE = {"weighting": "binary", "reg": 500.0}


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
               "gram_weights": gram if disliked != 1.0 else True}  # at weight 1 the Gram is binary either way
        key = tuple(sorted(cfg.items()))
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def fit_and_score(cfg: dict, fit: Ratings, held_out: Ratings) -> tuple[dict, float]:
    model = build_model("ease", fit.n_users, fit.n_items, fit.rating_scale, cfg)
    summary = model.fit(fit)
    return evaluate_ranking(model, fit, held_out, k=10), summary["fit_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="u1 only and a 2x2x2 grid (a smoke run)")
    args = parser.parse_args()
    folds = FOLDS[:1] if args.quick else FOLDS
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
            "test": test, "grid": rows,
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_threads": torch.get_num_threads()},
        })


if __name__ == "__main__":
    main()
