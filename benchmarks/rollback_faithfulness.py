"""Faithfulness and cost of MF explanations on MovieLens-100K u1 (issue 5), per optimizer.

Tests (see `recsys.experiments.faithfulness`): B, exact same-trajectory leave-one-out for
``--pairs`` test predictions x ``--candidates`` random candidates (plus a re-seeded retrain for
``--reseed-pairs`` of them); A, removal of each method's top-1 / top-10 beside random
neighbours and a noise floor; C, training time of an unlogged fit and of fits logged with the
compact log (the default on the compiled kernel) and the exact log, alternating in the same
run (default MF config, compiled kernel), log bytes per example, explanation latency p50/p99
(default MF config, D=128), all on one thread. Faithfulness runs use D=32, one block (`default_setup`); with SGD
(the compiled kernel) the rollback estimate is scored from both logs ("rollback" from the
compact log, "rollback-exact" from the exact one, on the same leave-one-out points), and the
compact log's reconstruction error against the exact log is reported for both configs.

    RECSYS_DATA=../shared/data python benchmarks/rollback_faithfulness.py [--quick]
    RECSYS_DATA=../shared/data python benchmarks/rollback_faithfulness.py --overhead-only

``--overhead-only`` (and runs of a subset of ``--optimizers``) update their parts of an
existing results file and keep the rest.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numba
import numpy as np
import torch
from results_file import write_json  # this folder is on the path when run as a script
from scipy import stats

from recsys.datasets import load_split
from recsys.experiments.faithfulness import (
    agreement,
    agreement_stats,
    cached_newton_latency,
    default_setup,
    explain_latency,
    removal,
    sample_pairs,
)
from recsys.explain.influence import DEFAULT_METHOD, METHODS, estimate_effects
from recsys.explain.rollback import RollbackCallback
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.ratings import Ratings
from recsys.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"
MODES = ("plain", "compact", "exact")


def fit(train: Ratings, model_config: MFConfig, train_config: TrainConfig, mode: str | None, cpu: list | None = None):
    """One ``Trainer.fit``; ``mode`` None: no log. Returns (model, log, wall seconds); appends
    the process CPU seconds to ``cpu`` if given."""
    model = MatrixFactorization(train.n_users, train.n_items, train.rating_scale, model_config)
    cbs = [] if mode is None else [RollbackCallback(mode=mode)]
    t0, c0 = time.perf_counter(), time.process_time()
    Trainer(train_config, callbacks=cbs).fit(model, train)
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return model, (cbs[0].log if cbs else None), time.perf_counter() - t0


def overhead(train: Ratings, reps: int) -> dict:
    """Test C, training: wall and CPU time of unlogged, compact-logged and exact-logged fits
    at the default configs, alternating in a rotating order (after a warm-up of each); ratios
    of the medians. (CPU
    time leaves out the waits for a core when other jobs share the machine.)"""
    tc = TrainConfig(patience=None, progress=False)
    for mode in MODES:
        fit(train, MFConfig(), TrainConfig(epochs=1, patience=None, progress=False), None if mode == "plain" else mode)
    secs: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    logs = {}
    for rep in range(reps):
        for mode in MODES[rep % 3:] + MODES[:rep % 3]:  # rotate which mode runs first
            _, log, s = fit(train, MFConfig(), tc, None if mode == "plain" else mode, cpu[mode])
            secs[mode].append(s)
            if log is not None:
                logs[mode] = log
    med = {m: float(np.median(v)) for m, v in secs.items()}
    med_cpu = {m: float(np.median(v)) for m, v in cpu.items()}
    return {"config": "MFConfig() + TrainConfig(patience=None): D=128, 4 blocks, 32 epochs, compiled kernel",
            "numba_threads": numba.get_num_threads(), "torch_threads": torch.get_num_threads(), "reps": reps,
            "seconds": secs, "median_seconds": med, "cpu_seconds": cpu, "median_cpu_seconds": med_cpu,
            "overhead_ratio_compact": med["compact"] / med["plain"],
            "overhead_ratio_exact": med["exact"] / med["plain"],
            "overhead_ratio_compact_cpu": med_cpu["compact"] / med_cpu["plain"],
            "overhead_ratio_exact_cpu": med_cpu["exact"] / med_cpu["plain"],
            "log_megabytes": {m: logs[m].nbytes / 1e6 for m in logs},
            "log_bytes_per_example": {m: logs[m].bytes_per_example for m in logs}}


def compare_logs(model: MatrixFactorization, train: Ratings, test: Ratings, exact, compact, n_pairs: int,
                 chunk: int = 8192) -> dict:
    """The compact log against the exact log of the same training: relative error of Δ (factor
    and bias parts, over all examples, and per example) and of the rollback effects of
    ``n_pairs`` test pairs."""
    d = exact.block_size
    num = {"factors": 0.0, "biases": 0.0}
    den = {"factors": 0.0, "biases": 0.0}
    per_example = []
    for lo in range(0, len(train), chunk):
        ids = np.arange(lo, min(len(train), lo + chunk))
        e, c = exact.rows(ids), compact.rows(ids)
        for part, sl in (("factors", slice(0, 2 * d)), ("biases", slice(2 * d, 2 * d + 2))):
            num[part] += float(np.square(c[..., sl] - e[..., sl]).sum())
            den[part] += float(np.square(e[..., sl]).sum())
        per_example.append(np.linalg.norm((c - e).transpose(1, 0, 2).reshape(len(ids), -1), axis=1)
                           / np.maximum(np.linalg.norm(e.transpose(1, 0, 2).reshape(len(ids), -1), axis=1), 1e-30))
    pe = np.concatenate(per_example)
    pairs = sample_pairs(train, test, n_pairs, np.random.default_rng(0))
    ex, co, rho, top1 = [], [], [], []
    for u, i in pairs:
        a = estimate_effects(model, train, u, i, "rollback", exact)[1]
        b = estimate_effects(model, train, u, i, "rollback", compact)[1]
        ex.append(a)
        co.append(b)
        if len(a) > 2 and np.std(a) > 0 and np.std(b) > 0:
            rho.append(stats.spearmanr(a, b)[0])
        top1.append(int(np.argmax(np.abs(a)) == np.argmax(np.abs(b))))
    ea, ca = np.concatenate(ex), np.concatenate(co)
    return {"knots": compact.knot_passes,
            "delta_relative_error": {k: (num[k] / den[k]) ** 0.5 for k in num},
            "delta_per_example_relative_error": {"median": float(np.median(pe)), "p90": float(np.percentile(pe, 90)),
                                                 "max": float(pe.max())},
            "effects": {"n_pairs": len(pairs), "n_effects": int(len(ea)),
                        "relative_error": float(np.linalg.norm(ca - ea) / np.linalg.norm(ea)),
                        "spearman_all": float(stats.spearmanr(ea, ca)[0]),
                        "spearman_per_pair_mean": float(np.nanmean(rho)), "same_top1": float(np.mean(top1)),
                        "mean_abs_exact": float(np.abs(ea).mean()), "mean_abs_compact": float(np.abs(ca).mean())}}


def reconstruction_error(train: Ratings, test: Ratings, model_config: MFConfig, train_config: TrainConfig,
                         n_pairs: int = 300) -> dict:
    """`compare_logs` on the exact and compact logs of one training with these configs."""
    model, exact, _ = fit(train, model_config, train_config, "exact")
    _, compact, _ = fit(train, model_config, train_config, "compact")
    return {"model": {"embedding_size": model_config.embedding_size, "n_blocks": model_config.n_blocks},
            "epochs": train_config.epochs, **compare_logs(model, train, test, exact, compact, n_pairs)}


def exact_log_scores(train: Ratings, setup, b_points: list[dict], model: MatrixFactorization) -> dict:
    """Test B's figures of the rollback estimate from the exact log, on the points (pairs,
    candidates, true leave-one-out effects) already measured for the compact log."""
    _, exact, _ = fit(train, setup.model, setup.train, "exact")
    by_pair: dict[tuple[int, int], list[dict]] = {}
    for pt in b_points:
        by_pair.setdefault((pt["user"], pt["item"]), []).append(pt)
    est, true, prec = [], [], []
    for (u, i), pts in by_pair.items():
        ids, eff, _, _ = estimate_effects(model, train, u, i, "rollback", exact)
        lookup = dict(zip(ids.tolist(), eff, strict=True))
        e = np.array([lookup[pt["example"]] for pt in pts])
        t = np.array([pt["true"] for pt in pts])
        est.append(e)
        true.append(t)
        prec.append(len(set(np.argsort(-np.abs(e))[:5]) & set(np.argsort(-np.abs(t))[:5])) / min(5, len(t)))
    e_all, t_all = np.concatenate(est), np.concatenate(true)
    per_pair = [stats.spearmanr(e, t)[0] for e, t in zip(est, true, strict=True) if np.std(e) > 0 and np.std(t) > 0]
    return {**agreement_stats(e_all, t_all), "spearman_per_pair_mean": float(np.nanmean(per_pair)),
            "precision_at_5": float(np.mean(prec)), "estimate_mean_abs": float(np.abs(e_all).mean())}


def rollback_latency(model: MatrixFactorization, logs: dict, train: Ratings, test: Ratings, n: int = 300,
                     k: int = 5) -> dict:
    """`explain(method="rollback")` wall time from each log, alternating per test pair (the
    same pairs as `explain_latency`), so that machine noise hits every log alike."""
    from recsys.explain.influence import explain

    pairs = sample_pairs(train, test, n, np.random.default_rng(0))
    raw = [(train.user_ids.raw(u), train.item_ids.raw(i)) for u, i in pairs]
    for log in logs.values():
        for ru, ri in raw[:5]:
            explain(model, log, train, ru, ri, k, "rollback")
    times: dict[str, list[float]] = {name: [] for name in logs}
    cpu: dict[str, list[float]] = {name: [] for name in logs}
    for ru, ri in raw:
        for name, log in logs.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            explain(model, log, train, ru, ri, k, "rollback")
            cpu[name].append(time.thread_time() - c0)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, t in times.items():
        ms, cpu_ms = np.array(t) * 1e3, np.array(cpu[name]) * 1e3
        out[name] = {"method": "rollback", "log": name, "n": len(ms), "p50_ms": float(np.percentile(ms, 50)),
                     "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
                     # thread CPU time: what the query costs when the machine's other jobs preempt it
                     "cpu_p50_ms": float(np.percentile(cpu_ms, 50)), "cpu_p99_ms": float(np.percentile(cpu_ms, 99))}
    return out




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer pairs (a smoke run)")
    ap.add_argument("--optimizers", default="sgd,adam")
    ap.add_argument("--overhead-only", action="store_true",
                    help="only test C (training overhead, latency) and the compact log's reconstruction error")
    ap.add_argument("--no-overhead", action="store_true",
                    help="skip test C (only the faithfulness tests A and B of --optimizers)")
    ap.add_argument("--reps", type=int, default=5, help="fits per mode for the overhead (alternating)")
    ap.add_argument("--out", type=Path, default=RESULTS / "rollback_faithfulness.json")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the faithfulness retrains (A, B)")
    args = ap.parse_args()
    train, test = load_split("ml-100k", "u1")
    torch.set_num_threads(args.threads)
    sizes = {"sgd": dict(b_pairs=15, cands=15, reseed=5, a_pairs=20, ks=(1, 10)),
             "adam": dict(b_pairs=4, cands=8, reseed=0, a_pairs=6, ks=(1,)),
             # the K-FAC family and cov-noise: a re-seeded retrain measures the floor that
             # their sampled Fisher targets / injected noise put under a leave-one-out change
             **{o: dict(b_pairs=5, cands=8, reseed=2, a_pairs=6, ks=(1,))
                for o in ("kfac", "ekfac", "tkfac", "tekfac", "cov-noise")}}
    if args.quick:
        sizes = {k: dict(b_pairs=3, cands=6, reseed=1, a_pairs=3, ks=(1,)) for k in sizes}
    out: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}
    out.update({"dataset": "ml-100k", "split": "u1", "machine": platform.machine(), "default_method": DEFAULT_METHOD,
                "ground_truth": "same-trajectory retrain (same seed, init, order; removed ids filtered; "
                                "L2 weights and global mean of the full set)"})
    out.setdefault("optimizers", {})
    updated = []
    for opt in ([] if args.overhead_only else args.optimizers.split(",")):
        s = sizes.get(opt, sizes["adam"])
        setup = default_setup(opt)
        t0 = time.perf_counter()
        model, log, fit_s = fit(train, setup.model, setup.train, "compact")
        b = agreement(train, test, setup, model, log, n_pairs=s["b_pairs"], n_candidates=s["cands"],
                      reseed_pairs=s["reseed"])
        a = removal(train, test, setup, model, log, n_pairs=s["a_pairs"], ks=s["ks"])
        methods = dict(b.methods)
        if log.mode == "compact":  # the same points scored from the exact log
            methods["rollback-exact"] = exact_log_scores(train, setup, b.points, model)
        res = {"setup": setup.to_dict(), "log": log.mode, "attribution": log.attribution, "fit_seconds_logged": fit_s,
               "B": {"n_pairs": b.n_pairs, "n_candidates": b.n_candidates, "true_mean_abs": b.true_mean_abs,
                     "methods": methods, "reseeded": b.reseeded},
               "A": {"n_pairs": a.n_pairs, "strategies": a.strategies},
               "seconds": time.perf_counter() - t0}
        out["optimizers"][opt] = res
        updated.append(opt)
        print(f"== {opt} ({res['seconds']:.0f} s, {log.mode} log)")
        for m, v in methods.items():
            print(f"  B {m:14s} spearman {v['spearman']:+.3f} pearson {v['pearson']:+.3f} "
                  f"sign {v['sign_agreement']:.2f} slope {v['slope']:.2f} p@5 {v['precision_at_5']:.2f}")
        for name, v in a.strategies.items():
            print(f"  A {name:20s} direction {v['direction_rate']:.2f} mean change along {v['mean_change_along_predicted']:+.4f}")
    if args.no_overhead:
        out["last_run"] = {"parts": updated, "date": time.strftime("%Y-%m-%d")}
        write_json(args.out, out)
        print(f"wrote {args.out}")
        return
    # Test C at the default MF config (D=128, 4 blocks, compiled kernel), one thread.
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    cost = overhead(train, args.reps)
    print(f"== C overhead compact {cost['overhead_ratio_compact']:.2f}x, exact {cost['overhead_ratio_exact']:.2f}x "
          f"(median s: {cost['median_seconds']}); CPU time: compact {cost['overhead_ratio_compact_cpu']:.2f}x, "
          f"exact {cost['overhead_ratio_exact_cpu']:.2f}x; bytes/example {cost['log_bytes_per_example']}")
    recon = {"default": reconstruction_error(train, test, MFConfig(), TrainConfig(patience=None, progress=False))}
    sgd = default_setup("sgd")
    recon["faithfulness-sgd"] = reconstruction_error(train, test, sgd.model, sgd.train)
    for name, r in recon.items():
        print(f"  compact vs exact ({name}): Δ rel. error {r['delta_relative_error']}, effects {r['effects']}")
    big, big_log, _ = fit(train, MFConfig(), TrainConfig(patience=None, progress=False), "compact")
    _, big_exact, _ = fit(train, MFConfig(), TrainConfig(patience=None, progress=False), "exact")
    latency = {m: explain_latency(big, big_log, train, test, n=300, method=m) for m in METHODS if m != "rollback"}
    alternating = rollback_latency(big, {"compact": big_log, "exact": big_exact}, train, test, n=300)
    latency["rollback"] = alternating["compact"]
    latency["rollback-exact-log"] = alternating["exact"]
    latency["newton-cached"] = cached_newton_latency(big, train, test, n=300)
    out["C"] = {**cost, "latency": latency, "compact_vs_exact": recon}
    for m, v in latency.items():
        print(f"  explain {m:18s} p50 {v['p50_ms']:.2f} ms  p99 {v['p99_ms']:.2f} ms")
    out["last_run"] = {"parts": ["C", *updated], "date": time.strftime("%Y-%m-%d")}
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
