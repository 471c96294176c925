"""MovieLens-100K, canonical folds u1..u5: the evidence-chain model (REC) beside our default
MF, in the same run. Prints RMSE/MAE/fit seconds per fold and the means; writes
``benchmarks/results/rec_accuracy.json``.

REC trains with its `training_defaults` (Adam) on the fold's training ratings minus a
``--validation`` slice used for early stopping (patience ``--patience``); the held-out slice
is not evidence at test time either (the live ratings are what it was fitted on). MF trains
with its own defaults on the whole training fold, as in ``mf_vs_surprise.py``.

    RECSYS_DATA=../shared/data python benchmarks/rec_accuracy.py [--folds u1,u2] [--epochs 30]
        [--config '{"fanouts": [32, 8, 4]}'] [--train '{"batch_size": 512}'] [--patience 4]
        [--threads 2] [--jobs 1] [--no-mf] [--verbose] [--out PATH]

``--verbose`` prints every epoch's validation RMSE; the JSON keeps each fold's validation
curve (``validation_history``). Tuning runs: write them elsewhere with ``--out`` and choose
on ``best_validation_rmse``, never on the test RMSE.

``--jobs N`` runs N folds at once in separate processes of ``--threads`` threads each (same
figures as one by one: each fold is seeded on its own).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from recsys.datasets import load_split
from recsys.evaluate import evaluate_ratings
from recsys.models import EvidenceChainModel, build_model
from recsys.splits import validation_slice
from recsys.train import Callback, EpochRecord, TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"


def fit_mf(train, test) -> dict:
    model = build_model("mf", train.n_users, train.n_items, train.rating_scale, {})
    res = Trainer(TrainConfig(progress=False)).fit(model, train)
    return {**evaluate_ratings(model, test), "fit_seconds": res.fit_seconds}


class _PrintEpoch(Callback):
    """Prints each epoch's validation RMSE (``--verbose``)."""

    def __init__(self, fold: str) -> None:
        self.fold = fold

    def on_epoch_end(self, record: EpochRecord) -> None:
        val = "-" if record.validation_rmse is None else f"{record.validation_rmse:.4f}"
        print(f"  {self.fold} epoch {record.epoch}: lr {record.learning_rate:.2e} train loss "
              f"{record.train_mse:.4f} validation {val} ({record.seconds:.0f} s)", flush=True)


def fit_rec(train, test, config: dict, train_over: dict, validation: float, patience: int, seed: int,
            fold: str = "", verbose: bool = False) -> dict:
    fit, val = validation_slice(train, validation, seed=seed) if validation else (train, None)
    model = build_model("rec", train.n_users, train.n_items, train.rating_scale, {**config, "seed": seed})
    tc = TrainConfig(**{**EvidenceChainModel.training_defaults, **train_over, "seed": seed,
                        "patience": patience if val is not None else None, "progress": False})
    res = Trainer(tc, callbacks=[_PrintEpoch(fold)] if verbose else []).fit(model, fit, val)
    t0 = time.perf_counter()
    metrics = evaluate_ratings(model, test)
    return {**metrics, "fit_seconds": res.fit_seconds, "epochs_run": len(res.history),
            "best_epoch": res.best_epoch, "best_validation_rmse": res.best_validation_rmse,
            "seconds_per_epoch": float(np.mean([h.seconds for h in res.history])),
            "evaluate_seconds": time.perf_counter() - t0, "parameters": model.parameter_count(),
            "validation_history": [h.validation_rmse for h in res.history]}


def run_fold(fold: str, config: dict, train_over: dict, validation: float, patience: int, seed: int,
             threads: int, with_mf: bool, verbose: bool = False) -> dict:
    torch.set_num_threads(threads)
    train, test = load_split("ml-100k", fold)
    row = {"fold": fold, "rec": fit_rec(train, test, config, train_over, validation, patience, seed, fold, verbose)}
    if with_mf:
        row["mf"] = fit_mf(train, test)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", default="u1,u2,u3,u4,u5")
    parser.add_argument("--epochs", type=int, default=None, help="REC epochs (default: its training_defaults)")
    parser.add_argument("--config", default="{}", help="JSON overrides of the REC config")
    parser.add_argument("--train", default="{}", help="JSON overrides of REC's TrainConfig")
    parser.add_argument("--validation", type=float, default=0.05)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1, help="folds run at once, one process each")
    parser.add_argument("--no-mf", action="store_true", help="skip MF (for quick REC-only trials)")
    parser.add_argument("--verbose", action="store_true", help="print every epoch's validation RMSE")
    parser.add_argument("--out", type=Path, default=RESULTS / "rec_accuracy.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = json.loads(args.config)
    train_over = json.loads(args.train)
    if args.epochs:
        train_over["epochs"] = args.epochs
    folds = args.folds.split(",")
    task = (config, train_over, args.validation, args.patience, args.seed, args.threads, not args.no_mf, args.verbose)

    def report(row: dict) -> None:
        print(f"{row['fold']}: REC {row['rec']['rmse']:.4f} ({row['rec']['fit_seconds']:.0f} s, "
              f"{row['rec']['epochs_run']} epochs)" + (f"  MF {row['mf']['rmse']:.4f}" if "mf" in row else ""),
              flush=True)

    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_fold, fold, *task) for fold in folds]
            rows = []
            for f in futures:
                rows.append(f.result())
                report(rows[-1])
    else:
        rows = []
        for fold in folds:
            rows.append(run_fold(fold, *task))
            report(rows[-1])
    models = ["rec"] + ([] if args.no_mf else ["mf"])
    mean = {m: {k: float(np.mean([r[m][k] for r in rows])) for k in ("rmse", "mae", "fit_seconds")} for m in models}
    out = {
        "benchmark": "rec_accuracy", "dataset": "ml-100k", "folds": [r["fold"] for r in rows],
        "rec_config": build_model("rec", 2, 2, (1, 5), config).config_dict(),
        "rec_train_config": {**EvidenceChainModel.training_defaults, **train_over},
        "validation": args.validation, "patience": args.patience, "seed": args.seed,
        "parameters": rows[0]["rec"]["parameters"], "per_fold": rows, "mean": mean,
        "target_rmse": 0.915, "threads": args.threads, "jobs": args.jobs, "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(" ".join(f"{m}: mean RMSE {mean[m]['rmse']:.4f} MAE {mean[m]['mae']:.4f} fit {mean[m]['fit_seconds']:.0f} s"
                   for m in models))


if __name__ == "__main__":
    main()
