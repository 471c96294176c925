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

The whole protocol runs once per ``--seeds`` split (which users are held out, the revealed
order, REC's and the validation slice's seeds); the verdict is on the mean over the splits,
each split's curve is kept. Seed 1 is the split REC's cold-start options were tuned on
(``docs/evidence_chain.md``), so the default splits leave it out.

Writes ``benchmarks/results/rec_cold_start.json`` and ``rec_cold_start.png``.

    RECSYS_DATA=../shared/data python benchmarks/rec_cold_start.py [--epochs 20] [--seeds 0,2,3] [--jobs 2 --threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Sequence
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


def run_split(seed: int, config: dict, epochs: int | None, cold_shrinks: Sequence[float] = ()) -> dict:
    """The cold-start curve of REC, MF fold-in and bias-only on the held-out split ``seed``;
    with ``cold_shrinks``, also REC's curve at each of those ``cold_shrink`` values (the same
    trained model, an inference-only setting) under ``rec_by_cold_shrink``."""
    ratings = load_dataset("ml-100k")
    split = cold_start_users(ratings, 0.2, max(KS), seed=seed)
    cold = split.cold_users
    is_cold_row = np.isin(split.train.users, cold)
    base = split.train.subset(~is_cold_row)
    pool = split.train.subset(is_cold_row)
    # each cold user's 20 revealed ratings in a fixed random order; k reveals the first k
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(pool)), pool.users))
    starts = np.searchsorted(pool.users[order], pool.users[order], side="left")
    rank = np.arange(len(order)) - starts
    rank_of_row = np.empty(len(pool), dtype=np.int64)
    rank_of_row[order] = rank
    test = split.test
    truth = test.values.astype(np.float64)
    tu, ti = torch.from_numpy(test.users), torch.from_numpy(test.items)

    # ---- REC, trained once on the other users
    fit, val = validation_slice(base, 0.05, seed=seed)
    rec = build_model("rec", base.n_users, base.n_items, base.rating_scale, {**config, "seed": seed})
    tc = {**EvidenceChainModel.training_defaults, "patience": 3, "progress": False, "seed": seed}
    if epochs:
        tc["epochs"] = epochs
    t0 = time.perf_counter()
    rec_fit = Trainer(TrainConfig(**tc)).fit(rec, fit, val)
    rec_seconds = time.perf_counter() - t0
    live = rec.ratings
    # ---- MF, trained once on the other users (default config, as everywhere)
    mf = build_model("mf", base.n_users, base.n_items, base.rating_scale, {})
    Trainer(TrainConfig(progress=False)).fit(mf, base)
    mu = float(rec.global_mean)
    item_bias = rec.live()[1][base.n_users:].cpu().numpy().astype(np.float64)
    lam = rec.config.bias_reg

    results = {"k": list(KS), "rec": [], "mf_fold_in": [], "bias_only": [], "rec_fallback_share": []}
    by_shrink: dict[str, list[float]] = {str(float(c)): [] for c in cold_shrinks}
    for k in KS:
        shown = pool.subset(rank_of_row < k)
        # REC: insert the revealed ratings, predict, no parameter update
        rec.bind_ratings(live)
        if k:
            rec.add_ratings(shown.user_ids.raw_ids[shown.users], shown.item_ids.raw_ids[shown.items], shown.values)
        rec.eval()
        p_rec = rec.predict(tu, ti).cpu().numpy()
        own = rec.config
        for c in cold_shrinks:
            rec.config = dataclasses.replace(own, cold_shrink=float(c))
            by_shrink[str(float(c))].append(rmse(rec.predict(tu, ti).cpu().numpy(), truth))
        rec.config = own
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
        print(f"seed {seed} k={k:2d}  REC {results['rec'][-1]:.4f}  MF fold-in {results['mf_fold_in'][-1]:.4f}  "
              f"bias-only {results['bias_only'][-1]:.4f}", flush=True)
    return {"seed": seed, "cold_users": int(len(cold)), "test_ratings": int(len(test)), "train_ratings": int(len(base)),
            "rec_config": rec.config_dict(), "rec_train": tc, "rec_fit_seconds": rec_seconds,
            "rec_epochs_run": len(rec_fit.history), "rec_best_validation_rmse": rec_fit.best_validation_rmse,
            **results, **({"rec_by_cold_shrink": by_shrink} if cold_shrinks else {})}


def beats_mf_for_small_k(rec: list[float], mf: list[float]) -> bool:
    """Whether the curve ``rec`` is below ``mf`` at every k in 1..5."""
    return all(r < m for kk, r, m in zip(KS, rec, mf, strict=True) if 0 < kk <= 5)


def _run_split_threads(seed: int, config: dict, epochs: int | None, threads: int) -> dict:
    """`run_split` in a worker process of ``threads`` torch threads (``--jobs``)."""
    torch.set_num_threads(threads)
    return run_split(seed, config, epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,2,3,4,5", help="held-out splits (comma-separated)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--config", default="{}", help="JSON overrides of the REC config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1, help="splits run at once, one process each")
    parser.add_argument("--out", type=Path, default=RESULTS / "rec_cold_start.json",
                        help="JSON path (the plot is written beside it, .png)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = json.loads(args.config)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            splits = list(pool.map(_run_split_threads, seeds, [config] * len(seeds), [args.epochs] * len(seeds),
                                   [args.threads] * len(seeds)))
    else:
        splits = [run_split(seed, config, args.epochs) for seed in seeds]
    mean = {name: np.mean([s[name] for s in splits], axis=0).tolist() for name in ("rec", "mf_fold_in", "bias_only")}
    spread = {name: np.std([s[name] for s in splits], axis=0).tolist() for name in ("rec", "mf_fold_in", "bias_only")}
    gap = np.array([np.array(s["rec"]) - np.array(s["mf_fold_in"]) for s in splits])  # [splits, k]
    for j, k in enumerate(KS):
        print(f"mean k={k:2d}  REC {mean['rec'][j]:.4f}  MF fold-in {mean['mf_fold_in'][j]:.4f}  "
              f"bias-only {mean['bias_only'][j]:.4f}  REC - MF {gap[:, j].mean():+.4f} "
              f"(splits: {', '.join(f'{x:+.4f}' for x in gap[:, j])})", flush=True)
    out = {"benchmark": "rec_cold_start", "dataset": "ml-100k", "seeds": [s["seed"] for s in splits], "k": list(KS),
           "mean": mean, "std": spread, "rec_minus_mf_fold_in": gap.mean(0).tolist(),
           "rec_beats_mf_fold_in_for_k_le_5": beats_mf_for_small_k(mean["rec"], mean["mf_fold_in"]),
           "splits_where_rec_beats_mf_fold_in_for_k_le_5": sum(beats_mf_for_small_k(s["rec"], s["mf_fold_in"]) for s in splits),
           "rec_config": splits[0]["rec_config"], "rec_train": splits[0]["rec_train"], "splits": splits}
    print(f"REC beats MF fold-in for k <= 5 on the mean: {out['rec_beats_mf_fold_in_for_k_le_5']}; "
          f"on {out['splits_where_rec_beats_mf_fold_in_for_k_le_5']} of {len(splits)} splits", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("rec", "REC (no retraining)"), ("mf_fold_in", "MF fold-in"), ("bias_only", "bias-only")):
        ax.errorbar(KS, mean[name], yerr=spread[name], marker="o", capsize=3, label=label)
    ax.set_xlabel("revealed ratings per held-out user (k)")
    ax.set_ylabel(f"test RMSE (mean ± sd over {len(splits)} splits)")
    ax.set_title(f"MovieLens-100K cold start: {splits[0]['cold_users']} held-out users")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
