"""Cold start on MovieLens-100K: REC with no retraining vs MF fold-in vs bias-only.

Protocol: `recsys.splits.cold_start_users` holds out 20% of the users (``--seed``) with 20
revealed ratings each; the models are trained once on the other users' ratings. For each
k in {0, 1, 3, 5, 10, 20}, each held-out user reveals the first k of their 20 revealed
ratings (a fixed random order), and every model is scored on the same test set (the held-out
users' ratings beyond the 20), so the curve compares like with like:

- REC: the revealed ratings are inserted into the live ratings with `add_ratings`; no
  parameter changes (the model is re-bound to the training ratings between k's).
- MF fold-in: our default MF; each held-out user's factors and bias are solved on the fixed
  item factors (`MatrixFactorization.fold_in_user`); k = 0 is MF's fallback (μ + b_i).
- bias-only: μ + b_i + b_u with REC's own baseline (the same regularised biases REC adds its
  vector term to), b_u solved from the revealed ratings; k = 0 is μ + b_i.

Writes ``benchmarks/results/rec_cold_start.json`` and ``rec_cold_start.png``.

    RECSYS_DATA=../shared/data python benchmarks/rec_cold_start.py [--epochs 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from recsys.datasets import load_dataset
from recsys.models import EvidenceChainModel, build_model
from recsys.splits import cold_start_users, validation_slice
from recsys.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"


KS = (0, 1, 3, 5, 10, 20)


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    return math.sqrt(float(np.mean((np.asarray(pred, dtype=np.float64) - truth) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--config", default="{}", help="JSON overrides of the REC config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "rec_cold_start.json",
                        help="JSON path (the plot is written beside it, .png)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratings = load_dataset("ml-100k")
    split = cold_start_users(ratings, 0.2, max(KS), seed=args.seed)
    cold = split.cold_users
    is_cold_row = np.isin(split.train.users, cold)
    base = split.train.subset(~is_cold_row)
    pool = split.train.subset(is_cold_row)
    # each cold user's 20 revealed ratings in a fixed random order; k reveals the first k
    rng = np.random.default_rng(args.seed)
    order = np.lexsort((rng.random(len(pool)), pool.users))
    starts = np.searchsorted(pool.users[order], pool.users[order], side="left")
    rank = np.arange(len(order)) - starts
    rank_of_row = np.empty(len(pool), dtype=np.int64)
    rank_of_row[order] = rank
    test = split.test
    truth = test.values.astype(np.float64)
    tu, ti = torch.from_numpy(test.users), torch.from_numpy(test.items)

    # ---- REC, trained once on the other users
    config = json.loads(args.config)
    fit, val = validation_slice(base, 0.05, seed=args.seed)
    rec = build_model("rec", base.n_users, base.n_items, base.rating_scale, {**config, "seed": args.seed})
    tc = {**EvidenceChainModel.training_defaults, "patience": 3, "progress": False, "seed": args.seed}
    if args.epochs:
        tc["epochs"] = args.epochs
    t0 = time.perf_counter()
    rec_fit = Trainer(TrainConfig(**tc)).fit(rec, fit, val)
    rec_seconds = time.perf_counter() - t0
    live = rec.ratings
    # ---- MF, trained once on the other users (default config, as everywhere)
    mf = build_model("mf", base.n_users, base.n_items, base.rating_scale, {})
    Trainer(TrainConfig(progress=False)).fit(mf, base)
    mu = float(rec.global_mean)
    item_bias = rec._live()[1][base.n_users:].cpu().numpy().astype(np.float64)
    lam = rec.config.bias_reg

    results = {"k": list(KS), "rec": [], "mf_fold_in": [], "bias_only": [], "rec_fallback_share": []}
    for k in KS:
        shown = pool.subset(rank_of_row < k)
        # REC: insert the revealed ratings, predict, no parameter update
        rec.bind_ratings(live)
        if k:
            rec.add_ratings(shown.user_ids.raw_ids[shown.users], shown.item_ids.raw_ids[shown.items], shown.values)
        rec.eval()
        p_rec = rec.predict(tu, ti).cpu().numpy()
        user_known, item_known = rec.known_mask(tu, ti)
        results["rec_fallback_share"].append(float((~(user_known & item_known)).float().mean()))
        # MF fold-in
        with torch.no_grad():
            mf.known_users[torch.from_numpy(cold)] = False
        if k:
            for u in cold:
                rows = shown.users == u
                f, b = mf.fold_in_user(torch.from_numpy(shown.items[rows]), torch.from_numpy(shown.values[rows]))
                mf.set_user(int(u), f, b)
        p_mf = mf.predict(tu, ti).cpu().numpy()
        # bias-only on REC's baseline
        bu = np.zeros(base.n_users)
        if k:
            resid = np.bincount(shown.users, weights=shown.values - mu - item_bias[shown.items], minlength=base.n_users)
            bu = resid / (lam + np.bincount(shown.users, minlength=base.n_users))
        p_bias = np.clip(mu + bu[test.users] + item_bias[test.items], *base.rating_scale)
        for name, p in (("rec", p_rec), ("mf_fold_in", p_mf), ("bias_only", p_bias)):
            results[name].append(rmse(p, truth))
        print(f"k={k:2d}  REC {results['rec'][-1]:.4f}  MF fold-in {results['mf_fold_in'][-1]:.4f}  "
              f"bias-only {results['bias_only'][-1]:.4f}", flush=True)
    out = {"benchmark": "rec_cold_start", "dataset": "ml-100k", "cold_users": int(len(cold)),
           "test_ratings": int(len(test)), "train_ratings": int(len(base)), "seed": args.seed,
           "rec_config": rec.config_dict(), "rec_train": tc, "rec_fit_seconds": rec_seconds,
           "rec_epochs_run": len(rec_fit.history),
           "rec_best_validation_rmse": rec_fit.best_validation_rmse, **results,
           "rec_beats_mf_fold_in_for_k_le_5": all(r < m for kk, r, m in zip(KS, results["rec"], results["mf_fold_in"],
                                                                         strict=True) if 0 < kk <= 5)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("rec", "REC (no retraining)"), ("mf_fold_in", "MF fold-in"), ("bias_only", "bias-only")):
        ax.plot(KS, results[name], marker="o", label=label)
    ax.set_xlabel("revealed ratings per held-out user (k)")
    ax.set_ylabel("test RMSE")
    ax.set_title(f"MovieLens-100K cold start: {len(cold)} held-out users")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
