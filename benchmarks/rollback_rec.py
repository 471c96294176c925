"""Faithfulness and cost of REC explanations (evidence effect + gradient rollback through the
prototype rows) on MovieLens-100K u1 (issue 5, the evidence-chain side).

Setup: a small REC (K=16, hidden 32, 50 prototypes per side, fanouts (8, 4), 2 evaluation
passes), Adam lr 3e-3, batch 256, ``--epochs`` epochs, one thread. One logged fit
(`RECRollbackCallback`, sampling states recorded) and one unlogged fit of the same config
alternate for the overhead. Then:

- noise floors: a retrain with nothing removed (must reproduce the fit bit for bit), a
  re-seeded full retrain (how much the predictions move with another seed), and per pair the
  removal of a random rating touching neither the user nor the item (what a removal moves
  through the shared networks and the sampler's shifted draws).
- test B: for ``--pairs`` test predictions, ``--candidates`` candidate training ratings each
  (the top-1 of each estimate, then random ratings that fed the prediction and random ratings
  of the user or item that did not), the true change by same-trajectory retraining without
  the rating (`recsys.experiments.rec_rollback.retrain`); Pearson / Spearman / sign agreement /
  slope of the evidence-only, rollback-only and combined estimates against it.
- test A (from the same retrains): removing each estimate's top-1 moves the prediction in
  the predicted direction in what share of pairs, against a random candidate and a random far
  rating (judged against the combined estimate's direction).
- cost: explanation latency p50/p99, log size.

    NUMBA_NUM_THREADS=1 RECSYS_DATA=../shared/data .venv/bin/python benchmarks/rollback_rec.py
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # numba's OpenMP pool otherwise slows torch ~40x here

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from recsys.datasets import load_split  # noqa: E402
from recsys.experiments.faithfulness import agreement_stats, sample_pairs  # noqa: E402
from recsys.experiments.rec_rollback import (  # noqa: E402
    RECRollbackCallback,
    evidence_candidates,
    evidence_effects,
    explain_rec,
    neighbourhood_candidates,
    predict_without,
    raw_prediction,
    retrain,
    rollback_effects,
)
from recsys.models.rec.model import EvidenceChainModel, RECConfig  # noqa: E402
from recsys.train import TrainConfig, Trainer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = ("evidence", "rollback", "combined")


def fit(train, mc: RECConfig, tc: TrainConfig, logged: bool):
    model = EvidenceChainModel(train.n_users, train.n_items, train.rating_scale, mc)
    cbs = [RECRollbackCallback(record_sampling=True)] if logged else []
    t0, c0 = time.perf_counter(), time.process_time()
    Trainer(tc, callbacks=cbs).fit(model, train)
    return model, (cbs[0] if cbs else None), time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--pool-neighbours", type=int, default=40, help="non-evidence neighbour ratings scored per pair")
    ap.add_argument("--latency-pairs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "rollback_rec.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    train, test = load_split("ml-100k", "u1")
    mc = RECConfig(embedding_size=16, hidden_size=32, prototypes=50, fanouts=(8, 4), eval_passes=2, seed=args.seed)
    tc = TrainConfig(epochs=args.epochs, optimizer="adam", learning_rate=3e-3, lr_decay=1.0, batch_size=256,
                     patience=None, progress=False, seed=args.seed, threads=1)
    out: dict = {"command": "NUMBA_NUM_THREADS=1 RECSYS_DATA=../shared/data .venv/bin/python benchmarks/rollback_rec.py "
                 + " ".join(sys.argv[1:]),
                 "machine": f"{platform.processor() or platform.machine()}, 2 cores shared with other jobs, 1 thread",
                 "model_config": {**asdict(mc), "fanouts": list(mc.fanouts)}, "train_config": asdict(tc)}

    # -- cost: unlogged and logged fits of the same config, alternating
    _, _, plain_s, plain_cpu = fit(train, mc, tc, logged=False)
    model, cb, logged_s, logged_cpu = fit(train, mc, tc, logged=True)
    log = cb.log
    u, i, v = test.tensors()
    rmse = float(((model.predict(u, i) - v) ** 2).mean().sqrt())
    out["training"] = {"plain_seconds": plain_s, "logged_seconds": logged_s, "overhead_ratio": logged_s / plain_s,
                       "plain_cpu_seconds": plain_cpu, "logged_cpu_seconds": logged_cpu,
                       "cpu_overhead_ratio": logged_cpu / plain_cpu, "logging_seconds": cb.seconds,
                       "test_rmse": rmse}
    reached = log.reached_per_example()
    out["log"] = {"nnz": log.nnz, "prototype_rows": log.n_slots, "rows_per_example_mean": float(reached.mean()),
                  "rows_per_example_max": int(reached.max()), "bytes_per_example_float32": log.bytes_per_example,
                  "bytes_per_example_float16": (log.nbytes - 2 * log.nnz * log.embedding_size) / log.n_examples,
                  "megabytes_float32": log.nbytes / 1e6}
    print(json.dumps(out["training"]), json.dumps(out["log"]), flush=True)

    # -- noise floors
    again = retrain(train, mc, tc, sampling_states=cb.sampling_states)
    identical = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                      strict=True))
    rng = np.random.default_rng(args.seed)
    pairs = sample_pairs(train, test, args.pairs, rng, min_candidates=args.candidates + 5)
    reseeded = retrain(train, RECConfig(**{**asdict(mc), "seed": args.seed + 1}),
                       TrainConfig(**{**asdict(tc), "seed": args.seed + 1}))
    base = {p: raw_prediction(model, *p) for p in pairs}
    reseed_diff = np.array([raw_prediction(reseeded, *p) - base[p] for p in pairs])
    out["noise_floor"] = {"no_removal_retrain_bit_for_bit": identical,
                          "reseeded_prediction_change_mean_abs": float(np.abs(reseed_diff).mean()),
                          "reseeded_prediction_change_max_abs": float(np.abs(reseed_diff).max())}
    print(json.dumps(out["noise_floor"]), flush=True)

    # -- estimates for every pair's candidate pool, then retrain on a few candidates per pair
    points, removal_rows = [], []
    for n, (pu, pi) in enumerate(pairs):
        fed, hops = evidence_candidates(model, pu, pi)
        nb = np.setdiff1d(neighbourhood_candidates(train, pu, pi), fed)
        nb = rng.choice(nb, size=min(args.pool_neighbours, len(nb)), replace=False) if len(nb) else nb
        pool = np.concatenate([fed, nb])
        hop = np.concatenate([hops, np.zeros(len(nb), np.int64)])
        ev = evidence_effects(model, pu, pi, pool, components=True)
        rb = rollback_effects(model, log, pu, pi, pool)
        est = {"evidence": ev.total, "rollback": rb, "combined": ev.total + rb}
        chosen: list[int] = []
        for m in ("combined", "evidence", "rollback"):
            j = int(np.argmax(np.abs(est[m])))
            if j not in chosen:
                chosen.append(j)
        n_top = len(chosen)
        fed_idx, nb_idx = np.flatnonzero(hop > 0), np.flatnonzero(hop == 0)
        while len(chosen) < min(args.candidates, len(pool)):
            side = fed_idx if (len(chosen) % 2 == 0 and len(fed_idx)) or not len(nb_idx) else nb_idx
            j = int(rng.choice(side))
            if j not in chosen:
                chosen.append(j)
        random_j = chosen[n_top] if len(chosen) > n_top else None  # the first random candidate
        b = base[(pu, pi)]
        for j in chosen:
            z = int(pool[j])
            t0 = time.perf_counter()
            without = retrain(train, mc, tc, [z], sampling_states=cb.sampling_states)
            true = b - predict_without(without, pu, pi, [z])
            points.append({"pair": n, "user": pu, "item": pi, "example": z, "hop": int(hop[j]), "true": float(true),
                           **{m: float(est[m][j]) for m in METHODS},
                           "evidence_chain": float(ev.chain[j]), "evidence_baseline": float(ev.baseline[j]),
                           "retrain_seconds": time.perf_counter() - t0})
            print(json.dumps(points[-1]), flush=True)
        touching = np.zeros(len(train), bool)
        touching[neighbourhood_candidates(train, pu, pi)] = True
        far = int(rng.choice(np.flatnonzero(~touching)))
        far_change = predict_without(retrain(train, mc, tc, [far], sampling_states=cb.sampling_states), pu, pi,
                                     [far]) - b
        by_ex = {p["example"]: p for p in points if p["pair"] == n}
        direction = {m: -np.sign(est[m][int(np.argmax(np.abs(est[m])))]) for m in METHODS}
        row = {"pair": n, "pool": len(pool), "fed": len(fed)}
        for m in METHODS:
            top = by_ex[int(pool[int(np.argmax(np.abs(est[m])))])]
            row[m] = {"change": -top["true"], "direction": direction[m],
                      "predicted_change": -float(est[m][int(np.argmax(np.abs(est[m])))])}
        if random_j is not None:
            rnd = by_ex[int(pool[random_j])]
            row["random-candidate"] = {"change": -rnd["true"], "direction": direction["combined"]}
        row["random-far"] = {"change": float(far_change), "direction": direction["combined"]}
        removal_rows.append(row)
        print(json.dumps(row), flush=True)

    true = np.array([p["true"] for p in points])
    agree = {}
    for m in METHODS:
        e = np.array([p[m] for p in points])
        entry = {**agreement_stats(e, true), "estimate_mean_abs": float(np.abs(e).mean())}
        for name, mask in (("fed", np.array([p["hop"] > 0 for p in points])),
                           ("not_fed", np.array([p["hop"] == 0 for p in points]))):
            if mask.sum() >= 3:
                entry[name] = {**agreement_stats(e[mask], true[mask]), "n": int(mask.sum())}
        per_pair = [stats.spearmanr(e[[p["pair"] == k for p in points]], true[[p["pair"] == k for p in points]])[0]
                    for k in range(len(pairs))]
        entry["spearman_per_pair_mean"] = float(np.nanmean(per_pair))
        agree[m] = entry
    out["agreement"] = {"n_pairs": len(pairs), "n_points": len(points), "true_mean_abs": float(np.abs(true).mean()),
                        "methods": agree,
                        "precision_at_5": "not measured: too few candidates per prediction for a top-5"}
    removal = {}
    for name in (*METHODS, "random-candidate", "random-far"):
        ch = np.array([r[name]["change"] for r in removal_rows if name in r])
        d = np.array([r[name]["direction"] for r in removal_rows if name in r])
        along = ch * d
        removal[name] = {"direction_rate": float(np.mean(along > 0)), "mean_change_along_predicted": float(along.mean()),
                         "mean_abs_change": float(np.abs(ch).mean())}
        if name in METHODS:
            removal[name]["mean_predicted_change_along"] = float(np.mean([r[name]["predicted_change"] * r[name]["direction"]
                                                                          for r in removal_rows]))
    out["removal_top1"] = {"n_pairs": len(removal_rows), "strategies": removal}

    # -- latency of explain_rec (ratings that fed the prediction as candidates)
    lat_pairs = sample_pairs(train, test, args.latency_pairs, np.random.default_rng(args.seed + 7))
    times, n_cands = [], []
    for pu, pi in lat_pairs:
        ru, ri = train.user_ids.raw(pu), train.item_ids.raw(pi)
        t0 = time.perf_counter()
        e = explain_rec(model, log, ru, ri, k=5)
        times.append(time.perf_counter() - t0)
        n_cands.append(e.candidates)
    ms = np.array(times) * 1e3
    out["latency"] = {"method": "explain_rec (evidence + rollback, candidates = ratings that fed the prediction)",
                      "n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                      "candidates_mean": float(np.mean(n_cands))}
    out["points"] = points
    out["removal_rows"] = removal_rows
    out["total_seconds"] = time.perf_counter() - t_start
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print(json.dumps({k: out[k] for k in ("agreement", "removal_top1", "latency", "total_seconds")}, indent=1,
                     default=float))


if __name__ == "__main__":
    main()
