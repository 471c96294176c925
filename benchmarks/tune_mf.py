"""How MF's defaults were chosen: a grid search scored on validation slices only.

For each canonical fold u1..u5 of MovieLens-100K, 5% of the *training* ratings are held out
(`validation_slice`, seed 0) and every configuration is fitted on the rest; configurations
are ranked by the mean validation RMSE over the five folds. The test files are never read.
The best configurations are written to ``benchmarks/results/tune_mf.json``.

    RECSYS_DATA=../shared/data python benchmarks/tune_mf.py [--quick]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4-configuration smoke run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    folds = []
    for name in ("u1", "u2", "u3", "u4", "u5"):
        train, _test = load_split("ml-100k", name)
        fit, val = validation_slice(train, 0.05, seed=0)
        folds.append((name, fit, val))
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
