"""Cold start on MovieLens-100K: REC's prediction-time evidence shrinkage ``cold_shrink``.

For each split (``--seeds``, the tuning split 1 first) REC and MF are trained once, as
`benchmarks/rec_cold_start.py` trains them by default; REC's cold-start curve is then
evaluated at every ``cold_shrink`` in ``--shrinks`` with the same trained model (the setting
is inference-only), beside MF fold-in and bias-only from the same run. ``cold_shrink`` is
chosen on split 1 alone: the best mean RMSE over k in {1, 3, 5} among the values not worse
than 0 at k = 10 and 20 by more than 0.001; the other splits are reported at that value.

Writes ``benchmarks/results/rec_cold_shrink.json`` (after every split).

    RECSYS_DATA=../shared/data python benchmarks/rec_cold_shrink.py [--seeds 1,0,2,3] [--threads 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from rec_cold_start import (  # this folder is on the path when run as a script
    KS,
    RESULTS,
    beats_mf_for_small_k,
    run_split,
)
from results_file import write_json  # this folder is on the path when run as a script

SHRINKS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)
TUNING_SEED = 1


def choose(split: dict, tol: float = 1e-3) -> float:
    """The ``cold_shrink`` of ``split`` with the best mean RMSE over k in {1, 3, 5}, among
    those not worse than 0 at k = 10 and 20 by more than ``tol``."""
    curves = split["rec_by_cold_shrink"]
    small = [KS.index(k) for k in (1, 3, 5)]
    large = [KS.index(k) for k in (10, 20)]
    off = curves[str(0.0)]
    ok = {c: v for c, v in curves.items() if all(v[j] <= off[j] + tol for j in large)}
    return float(min(ok, key=lambda c: np.mean([ok[c][j] for j in small])))


def summary(splits: list[dict], c: float) -> dict:
    """Mean and per-split curves of the test splits at ``cold_shrink`` = ``c`` and 0."""
    test = [s for s in splits if s["seed"] != TUNING_SEED]
    if not test:
        return {}
    curves = {"rec_at_chosen": [s["rec_by_cold_shrink"][str(c)] for s in test],
              "rec_at_0": [s["rec_by_cold_shrink"][str(0.0)] for s in test],
              "mf_fold_in": [s["mf_fold_in"] for s in test], "bias_only": [s["bias_only"] for s in test]}
    mean = {name: np.mean(v, axis=0).tolist() for name, v in curves.items()}
    return {"seeds": [s["seed"] for s in test], "cold_shrink": c, "mean": mean,
            "rec_at_chosen_beats_mf_fold_in_for_k_le_5": beats_mf_for_small_k(mean["rec_at_chosen"], mean["mf_fold_in"]),
            "splits_where_rec_at_chosen_beats_mf_fold_in_for_k_le_5":
                sum(beats_mf_for_small_k(r, m) for r, m in zip(curves["rec_at_chosen"], curves["mf_fold_in"], strict=True)),
            "rec_at_0_beats_mf_fold_in_for_k_le_5": beats_mf_for_small_k(mean["rec_at_0"], mean["mf_fold_in"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,0,2,3", help="splits, the tuning split 1 first")
    parser.add_argument("--shrinks", default=",".join(str(c) for c in SHRINKS))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "rec_cold_shrink.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shrinks = [float(c) for c in args.shrinks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if seeds[0] != TUNING_SEED:
        raise SystemExit(f"the tuning split {TUNING_SEED} must come first")
    splits: list[dict] = []
    chosen = None
    for seed in seeds:
        splits.append(run_split(seed, {}, args.epochs, cold_shrinks=shrinks))
        s = splits[-1]
        for c, curve in s["rec_by_cold_shrink"].items():
            print(f"seed {seed} cold_shrink {c:>4}: " + "  ".join(f"k={k} {v:.4f}" for k, v in zip(KS, curve, strict=True)),
                  flush=True)
        if seed == TUNING_SEED:
            chosen = choose(s)
            print(f"chosen on split {TUNING_SEED}: cold_shrink = {chosen}", flush=True)
        out = {"benchmark": "rec_cold_shrink", "dataset": "ml-100k", "k": list(KS), "shrinks": shrinks,
               "tuning_seed": TUNING_SEED, "chosen_cold_shrink": chosen, "test": summary(splits, chosen),
               "splits": splits}
        write_json(args.out, out)  # after every split, whole or not at all
    test = summary(splits, chosen)
    if test:
        for j, k in enumerate(KS):
            print(f"mean k={k:2d}  REC c={chosen} {test['mean']['rec_at_chosen'][j]:.4f}  REC c=0 "
                  f"{test['mean']['rec_at_0'][j]:.4f}  MF fold-in {test['mean']['mf_fold_in'][j]:.4f}  "
                  f"bias-only {test['mean']['bias_only'][j]:.4f}", flush=True)


if __name__ == "__main__":
    main()
