"""Faithfulness of the ranking MF's explanations (issue 20) on MovieLens-100K u1, and its
NDCG@10 at the registry defaults.

Faithfulness (`recsys.experiments.rank_faithfulness`): a small rank-mf (``default_config``:
D=32, BPR, one negative, batch 4096, 10 epochs) fitted on all of u1.base (binary
interactions) through the shared Trainer with an exact rollback log; ``--predictions`` users
each with an item of their top 10 × ``--candidates`` random interactions sharing the user's
or the item's row, each removed by a same-trajectory retrain; Spearman/Pearson/slope of the
estimated against the true score effects, and the removal of each method's top-1 beside a
random candidate (share pushed down the list); a re-seeded retrain as the noise floor.

NDCG@10 (``--ndcg``): `RankMFConfig()` defaults on u1 with `recsys.evaluate.evaluate_ranking`
(relevant = test rating >= 4, training items excluded).

``--tune``: the small validation grid the defaults were picked from (a random 10% of
u1.base held out as validation; the test file is never read).

    RECSYS_DATA=/work/shared/data python benchmarks/rankmf_faithfulness.py [--quick] [--ndcg] [--tune]

Runs on one thread (the steps are small; intra-op threads only contend on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from results_file import write_json  # this folder is on the path when run as a script

from recsys.datasets import load_split
from recsys.evaluate import evaluate_ranking
from recsys.experiments.rank_faithfulness import default_config, run
from recsys.models.rankmf import RankingMF, RankMFConfig

RESULTS = Path(__file__).parent / "results" / "rankmf_faithfulness.json"


def tune(train, seed: int = 0) -> list[dict]:
    """A small grid on a validation slice of ``train`` (10% of its rows, random)."""
    rng = np.random.default_rng(seed)
    hold = rng.random(len(train)) < 0.1
    fit_part, val = train.subset(~hold), train.subset(hold)
    grid = [{}, {"loss": "bpr"}, {"optimizer": "sparse-adam"}, {"reg": 0.02}, {"epochs": 15},
            {"weighting": "liking"}, {"embedding_size": 128}]
    rows = []
    for extra in grid:
        cfg = replace(RankMFConfig(), **extra)
        model = RankingMF(train.n_users, train.n_items, train.rating_scale, cfg)
        summary = model.fit(fit_part)
        res = evaluate_ranking(model, fit_part, val, k=10)
        rows.append({"changes": extra, "ndcg": res["ndcg"], "recall": res["recall"],
                     "fit_seconds": summary["fit_seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predictions", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--optimizer", default="sparse-adam")
    ap.add_argument("--quick", action="store_true", help="3 predictions x 4 candidates")
    ap.add_argument("--ndcg", action="store_true", help="also NDCG@10 of RankMFConfig() on u1 test")
    ap.add_argument("--tune", action="store_true", help="only the validation grid")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, test = load_split("ml-100k", "u1")
    if args.tune:
        print(json.dumps(tune(train), indent=1))
        return
    n_pred, n_cand = (3, 4) if args.quick else (args.predictions, args.candidates)
    t0 = time.perf_counter()
    res = run(train, default_config(args.optimizer), n_predictions=n_pred, n_candidates=n_cand, progress=True)
    out = {"benchmark": "rankmf_faithfulness", "dataset": "ml-100k u1.base (all 80000 interactions, binary)",
           "machine": platform.platform(), "threads": 1, "faithfulness": res}
    if args.ndcg:
        model = RankingMF(train.n_users, train.n_items, train.rating_scale, RankMFConfig())
        summary = model.fit(train)
        out["ndcg_defaults_u1"] = {"config": asdict(RankMFConfig()), "fit_seconds": summary["fit_seconds"],
                                   **evaluate_ranking(model, train, test, k=10)}
    out["seconds"] = time.perf_counter() - t0
    write_json(args.out, out)
    brief = {k: v for k, v in res.items() if k not in ("points", "removals")}
    print(json.dumps(brief, indent=1))
    if "ndcg_defaults_u1" in out:
        print("NDCG@10 u1 (defaults):", out["ndcg_defaults_u1"]["ndcg"])


if __name__ == "__main__":
    main()
