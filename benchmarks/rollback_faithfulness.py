"""Faithfulness and cost of MF explanations on MovieLens-100K u1 (issue 5), per optimizer.

Tests (see `recsys.explain.faithfulness`): B, exact same-trajectory leave-one-out for
``--pairs`` test predictions x ``--candidates`` random candidates (plus a re-seeded retrain for
``--reseed-pairs`` of them); A, removal of each method's top-1 / top-10 beside random
neighbours and a noise floor; C, training time with and without logging in the same run
(default MF config, compiled kernel), log bytes per example, explanation latency p50/p99
(default MF config, D=128). Faithfulness runs use D=32, one block (`default_setup`).

    RECSYS_DATA=../shared/data python benchmarks/rollback_faithfulness.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from recsys.datasets import load_split
from recsys.explain.faithfulness import (
    agreement,
    cached_newton_latency,
    default_setup,
    explain_latency,
    fit_logged,
    removal,
    training_overhead,
)
from recsys.explain.influence import DEFAULT_METHOD, METHODS
from recsys.explain.rollback import RollbackCallback
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer pairs (a smoke run)")
    ap.add_argument("--optimizers", default="sgd,adam")
    ap.add_argument("--out", type=Path, default=RESULTS / "rollback_faithfulness.json")
    args = ap.parse_args()
    train, test = load_split("ml-100k", "u1")
    torch.set_num_threads(2)
    sizes = {"sgd": dict(b_pairs=15, cands=15, reseed=5, a_pairs=20, ks=(1, 10)),
             "adam": dict(b_pairs=4, cands=8, reseed=0, a_pairs=6, ks=(1,))}
    if args.quick:
        sizes = {k: dict(b_pairs=3, cands=6, reseed=1, a_pairs=3, ks=(1,)) for k in sizes}
    out: dict = {"dataset": "ml-100k", "split": "u1", "machine": platform.machine(), "default_method": DEFAULT_METHOD,
                 "ground_truth": "same-trajectory retrain (same seed, init, order; removed ids filtered; "
                                 "L2 weights and global mean of the full set)", "optimizers": {}}
    for opt in args.optimizers.split(","):
        s = sizes.get(opt, sizes["adam"])
        setup = default_setup(opt)
        t0 = time.perf_counter()
        model, log, fit_s = fit_logged(train, setup)
        b = agreement(train, test, setup, model, log, n_pairs=s["b_pairs"], n_candidates=s["cands"],
                      reseed_pairs=s["reseed"])
        a = removal(train, test, setup, model, log, n_pairs=s["a_pairs"], ks=s["ks"])
        res = {"setup": setup.to_dict(), "attribution": log.attribution, "fit_seconds_logged": fit_s,
               "B": {"n_pairs": b.n_pairs, "n_candidates": b.n_candidates, "true_mean_abs": b.true_mean_abs,
                     "methods": b.methods, "reseeded": b.reseeded},
               "A": {"n_pairs": a.n_pairs, "strategies": a.strategies},
               "seconds": time.perf_counter() - t0}
        out["optimizers"][opt] = res
        print(f"== {opt} ({res['seconds']:.0f} s)")
        for m, v in b.methods.items():
            print(f"  B {m:9s} spearman {v['spearman']:+.3f} pearson {v['pearson']:+.3f} sign {v['sign_agreement']:.2f} "
                  f"slope {v['slope']:.2f} p@5 {v['precision_at_5']:.2f}")
        for name, v in a.strategies.items():
            print(f"  A {name:20s} direction {v['direction_rate']:.2f} mean change along {v['mean_change_along_predicted']:+.4f}")
    # Test C at the default MF config (D=128, 4 blocks, compiled kernel).
    cost = training_overhead(train, MFConfig(), TrainConfig(patience=None, progress=False), reps=3)
    big = MatrixFactorization(train.n_users, train.n_items, train.rating_scale, MFConfig())
    cb = RollbackCallback()
    Trainer(TrainConfig(patience=None, progress=False), callbacks=[cb]).fit(big, train)
    latency = {m: explain_latency(big, cb.log, train, test, n=300, method=m) for m in METHODS}
    latency["newton-cached"] = cached_newton_latency(big, train, test, n=300)
    out["C"] = {**cost, "latency": latency}
    print(f"== C overhead {cost['overhead_ratio']:.2f}x ({cost['plain_seconds']} vs {cost['logged_seconds']}), "
          f"{cost['log_bytes_per_example_float32']:.0f} B/example float32")
    for m, v in latency.items():
        print(f"  explain {m:9s} p50 {v['p50_ms']:.2f} ms  p99 {v['p99_ms']:.2f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
