"""How MF's defaults were chosen: a grid search scored on validation slices only.

For each canonical fold u1..u5 of MovieLens-100K, 5% of the *training* ratings are held out
(`validation_slice`, seed 0) and every configuration is fitted on the rest; configurations
are ranked by the mean validation RMSE over the five folds. The test files are never read.
The best configurations are written to ``benchmarks/results/tune_mf.json``.

``--schedules`` refines the epoch schedule of the best model configuration on the same
validation slices and picks the cheapest schedule within 0.0005 validation RMSE of the best
(``benchmarks/results/tune_mf_schedules.json``): that is how the default's 30 epochs were
chosen.

``--fold-in`` tunes the fold-in ridge weights instead: MF is trained without 20% of the users
(`cold_start_users`, seed 1 — cold-start benchmarks report seed 0), each held-out user is
folded in from k ∈ {1, 3, 5, 10, 20} revealed ratings, and the mean RMSE on their other
ratings over k ranks the (factor, bias) weights (``benchmarks/results/tune_mf_fold_in.json``).

    RECSYS_DATA=../shared/data python benchmarks/tune_mf.py [--quick | --schedules | --fold-in]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from recsys.datasets import load_split
from recsys.evaluate import evaluate_ratings
from recsys.models import build_model
from recsys.splits import validation_slice
from recsys.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"

GRID = {
    "embedding_size": [64, 128],
    "n_blocks": [1, 2, 4],
    "reg": [0.05, 0.1, 0.15],
    "reg_exponent": [0.0, 0.5],
    # (epochs, learning rate, decay per epoch)
    "schedule": [(25, 0.02, 0.92), (40, 0.015, 0.95), (60, 0.01, 0.97)],
}


#: (epochs, learning rate, decay per epoch) around the grid's best model configuration
SCHEDULES = [(40, 0.015, 0.95), (35, 0.016, 0.95), (32, 0.018, 0.94), (30, 0.018, 0.94), (30, 0.02, 0.93),
             (28, 0.02, 0.92), (25, 0.02, 0.92)]
TOLERANCE = 0.0005


def tune_schedules(folds) -> None:
    rows = []
    for epochs, lr, decay in SCHEDULES:
        scores, seconds = [], []
        for _name, fit, val in folds:
            model = build_model("mf", fit.n_users, fit.n_items, fit.rating_scale, {})
            res = Trainer(TrainConfig(epochs=epochs, learning_rate=lr, lr_decay=decay, progress=False)).fit(model, fit)
            scores.append(evaluate_ratings(model, val)["rmse"])
            seconds.append(res.fit_seconds)
        rows.append({"epochs": epochs, "learning_rate": lr, "lr_decay": decay,
                     "validation_rmse": float(np.mean(scores)), "fit_seconds": float(np.median(seconds))})
        print(json.dumps(rows[-1]), flush=True)
    best = min(r["validation_rmse"] for r in rows)
    chosen = min((r for r in rows if r["validation_rmse"] <= best + TOLERANCE), key=lambda r: r["fit_seconds"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tune_mf_schedules.json").write_text(json.dumps(
        {"rule": f"cheapest schedule within {TOLERANCE} validation RMSE of the best", "chosen": chosen,
         "rows": rows}, indent=2))
    print("chosen:", json.dumps(chosen))


FOLD_IN_GRID = [(0.3, 1.0), (1.0, 1.0), (3.0, 1.0), (0.5, 3.0), (1.0, 3.0), (3.0, 3.0), (1.0, 10.0)]


def tune_fold_in() -> None:
    from recsys.datasets import load_dataset
    from recsys.splits import cold_start_users

    ratings = load_dataset("ml-100k")
    scores: dict[tuple[float, float], list[float]] = {w: [] for w in FOLD_IN_GRID}
    for k in (1, 3, 5, 10, 20):
        split = cold_start_users(ratings, 0.2, k, seed=1)
        is_cold = np.isin(split.train.users, split.cold_users)
        warm, revealed = split.train.subset(~is_cold), split.train.subset(is_cold)
        base = build_model("mf", ratings.n_users, ratings.n_items, ratings.rating_scale, {})
        Trainer(TrainConfig(progress=False)).fit(base, warm)
        for reg, bias_reg in FOLD_IN_GRID:
            model = build_model("mf", ratings.n_users, ratings.n_items, ratings.rating_scale, {})
            model.load_state_dict(base.state_dict())
            by_user = revealed.by_user
            for user in split.cold_users:
                rows = by_user.row(int(user))
                p, b = model.fold_in_user(torch.from_numpy(by_user.columns[rows]),
                                          torch.from_numpy(by_user.values[rows]), reg=reg, bias_reg=bias_reg)
                model.set_user(int(user), p, b)
            rmse = evaluate_ratings(model, split.test)["rmse"]
            scores[(reg, bias_reg)].append(rmse)
            print(f"k={k:2d} reg={reg:<4} bias_reg={bias_reg:<4} RMSE {rmse:.4f}", flush=True)
    rows = sorted(({"fold_in_reg": r, "fold_in_bias_reg": b, "mean_rmse": float(np.mean(v)),
                    "rmse_by_k": dict(zip(("1", "3", "5", "10", "20"), v, strict=True))}
                   for (r, b), v in scores.items()), key=lambda row: row["mean_rmse"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tune_mf_fold_in.json").write_text(json.dumps({"protocol": "cold_start_users(0.2, k, seed=1)", "ranked": rows}, indent=2))
    print("best:", json.dumps(rows[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4-configuration smoke run")
    parser.add_argument("--fold-in", action="store_true", help="tune the fold-in ridge weights")
    parser.add_argument("--schedules", action="store_true", help="refine the epoch schedule of the default")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.fold_in:
        tune_fold_in()
        return
    folds = []
    for name in ("u1", "u2", "u3", "u4", "u5"):
        train, _test = load_split("ml-100k", name)
        fit, val = validation_slice(train, 0.05, seed=0)
        folds.append((name, fit, val))
    if args.schedules:
        tune_schedules(folds)
        return
    keys = list(GRID)
    combos = list(itertools.product(*GRID.values()))
    if args.quick:
        combos = combos[:4]
    rows = []
    start = time.perf_counter()
    for n, combo in enumerate(combos, 1):
        cfg = dict(zip(keys, combo, strict=True))
        epochs, lr, decay = cfg.pop("schedule")
        if cfg["embedding_size"] % cfg["n_blocks"]:
            continue
        scores, seconds = [], []
        for _name, fit, val in folds:
            model = build_model("mf", fit.n_users, fit.n_items, fit.rating_scale, cfg)
            res = Trainer(TrainConfig(epochs=epochs, learning_rate=lr, lr_decay=decay, progress=False)).fit(model, fit)
            scores.append(evaluate_ratings(model, val)["rmse"])
            seconds.append(res.fit_seconds)
        row = {**cfg, "epochs": epochs, "learning_rate": lr, "lr_decay": decay,
               "validation_rmse": float(np.mean(scores)), "fit_seconds": float(np.median(seconds))}
        rows.append(row)
        print(f"[{n}/{len(combos)}] val {row['validation_rmse']:.4f} fit {row['fit_seconds']:.3f}s {row}", flush=True)
    rows.sort(key=lambda r: r["validation_rmse"])
    out = {
        "protocol": "mean validation RMSE over u1..u5, 5% validation slice of each training fold (seed 0); test never read",
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads()},
        "seconds": time.perf_counter() - start,
        "best": rows[:10],
        "all": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("tune_mf_quick.json" if args.quick else "tune_mf.json")).write_text(json.dumps(out, indent=2))
    print("best:", json.dumps(rows[0]))


if __name__ == "__main__":
    main()
