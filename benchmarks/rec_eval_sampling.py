"""How REC's prediction-time sampling trades accuracy for latency, on MovieLens-100K.

REC is trained once per fold with its defaults (as ``rec_accuracy.py`` does: early stopping
on a validation slice of the training fold); then the *same* parameters predict the
validation slice and the test fold with other prediction-time settings: ``eval_passes``
(independent samplings averaged) and ``fanouts`` (neighbours per hop). Nothing is retrained,
so the differences are the sampling's alone. Choose on the validation columns; the test
columns are reported beside them, not chosen on.

    RECSYS_DATA=../shared/data python benchmarks/rec_eval_sampling.py [--folds u1]
        [--passes 1,3,5,8] [--fanouts 16-8-4,32-8-4] [--threads 1]

Writes ``benchmarks/results/rec_eval_sampling.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from recsys.datasets import load_split
from recsys.evaluate import evaluate_ratings
from recsys.models import EvidenceChainModel, build_model
from recsys.splits import validation_slice
from recsys.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", default="u1")
    parser.add_argument("--passes", default="1,3,5,8")
    parser.add_argument("--fanouts", default="16-8-4,32-8-4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "rec_eval_sampling.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    passes = [int(p) for p in args.passes.split(",")]
    fanouts = [tuple(int(f) for f in spec.split("-")) for spec in args.fanouts.split(",")]
    rows = []
    for fold in args.folds.split(","):
        train, test = load_split("ml-100k", fold)
        fit, val = validation_slice(train, 0.05, seed=args.seed)
        model = build_model("rec", train.n_users, train.n_items, train.rating_scale, {"seed": args.seed})
        tc = TrainConfig(**{**EvidenceChainModel.training_defaults, "seed": args.seed, "patience": 4,
                            "progress": False})
        res = Trainer(tc).fit(model, fit, val)
        trained = model.config
        print(f"{fold}: trained {len(res.history)} epochs (best {res.best_epoch}, validation "
              f"{res.best_validation_rmse:.4f}) in {res.fit_seconds:.0f} s", flush=True)
        for f in fanouts:
            for p in passes:
                model.config = dataclasses.replace(trained, fanouts=f, eval_passes=p)
                t0 = time.perf_counter()
                v = evaluate_ratings(model, val)["rmse"]
                t = evaluate_ratings(model, test)["rmse"]
                row = {"fold": fold, "fanouts": list(f), "eval_passes": p, "validation_rmse": v,
                       "test_rmse": t, "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(f"  fanouts {'-'.join(map(str, f))} passes {p}: validation {v:.4f} test {t:.4f}", flush=True)
        model.config = trained
    out = {"benchmark": "rec_eval_sampling", "dataset": "ml-100k", "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "trained_config": dataclasses.asdict(trained),
           "train_config": {**EvidenceChainModel.training_defaults}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=list))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
