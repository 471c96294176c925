"""Faithfulness and latency of the explanations the service serves, for MF (issue 22).

Part A (`recsys.experiments.faithfulness.served_run`, what ``recsys explain-eval`` prints):
the model ``recsys train`` fits by default on MovieLens-100K u1 (D=128 in 4 blocks, the
compiled SGD kernel, 32 epochs), its served explainer (the one-row Newton estimate cached per
row), scored against exact same-trajectory leave-one-out retraining on ``--pairs`` test
predictions x ``--candidates`` random candidates, with the truth retrained under another seed
as the noise floor; top-1 removal on ``--removal-pairs`` other predictions beside a random
neighbour; cold users folded in from 5 ratings against the exact re-fold; trained users who
send 5 ratings online against the online SGD re-run without each.

Part A2: the log-based estimates on the same points (plain rollback; rollback corrected for
the rows' later contraction, `recsys.models.mf.explain.contracted_rollback`) and the Newton
estimate damped by the training's summed learning rate (not served).

Part B: latency of the service path in-process (`recsys.recommender.Recommender` loaded from
a saved artefact, explainers warmed as the service does): ``explain(user, item, 5)`` and
``predict(user, item, explain=5)`` for ``--latency-pairs`` test pairs of trained users, and
``explain`` for users folded in through ``add_ratings`` and for trained users who sent 5
ratings through ``add_ratings`` (learnt by online SGD); wall and thread-CPU p50 / p99
(thread CPU is what a query costs when other processes preempt it).

    RECSYS_DATA=../shared/data python benchmarks/explain_faithfulness.py [--quick] [--latency-only]
    RECSYS_DATA=../shared/data python benchmarks/explain_faithfulness.py --synthetic-ratings 1e7

Part C (``--synthetic-ratings 1e7``, alone): the same explainer's latency on the synthetic
10^7-rating model `serve_latency.py` builds (random pairs, items by popularity, right after
online ratings of ``--online-users`` users, drawn uniformly or with ``--online-draw activity``
as likely as their number of ratings (heavy users; key ``..._online_activity``), and the CPU of
`MFExplainer.update` per rating learnt online; `synthetic_latency`).

Writes ``benchmarks/results/explain_faithfulness.json`` (``--latency-only`` keeps part A of an
existing file; ``--synthetic-ratings`` keeps parts A and B).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from results_file import write_json  # this folder is on the path when run as a script

from recsys.artefact import save_artefact
from recsys.datasets import load_split
from recsys.experiments.faithfulness import (
    agreement_stats,
    online_agreement,
    sample_pairs,
    served_run,
    served_setup,
)
from recsys.explain.influence import NewtonInfluence, estimate_effects
from recsys.explain.rollback import RollbackCallback
from recsys.models.mf import MatrixFactorization
from recsys.models.mf.explain import contracted_rollback
from recsys.ratings import Ratings
from recsys.recommender import Recommender
from recsys.store import NewRating
from recsys.train import Trainer

RESULTS = Path(__file__).parent / "results" / "explain_faithfulness.json"


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def _timed(call, args: list[tuple]) -> dict:
    """Wall and thread-CPU percentiles of ``call(*a)`` over ``args`` (after 5 warm-up calls)."""
    for a in args[:5]:
        call(*a)
    wall, cpu = [], []
    for a in args:
        t0, c0 = time.perf_counter(), time.thread_time()
        call(*a)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return {"wall": _percentiles(wall), "thread_cpu": _percentiles(cpu)}


def _right_after(rec: Recommender, batches: list[tuple[list[NewRating], list[tuple[str, str]]]]) -> dict:
    """Thread-CPU percentiles of ``explain(user, item, 5)`` for the queries of each batch of
    ratings, asked right after `add_ratings` applied it (no warm-up call in between: the
    rows the ratings made stale are rebuilt inside the timed calls)."""
    cpu = []
    for ratings, queries in batches:
        rec.add_ratings(ratings)
        for u, i in queries:
            c0 = time.thread_time()
            rec.explain(u, i, 5)
            cpu.append(time.thread_time() - c0)
    return {"thread_cpu": _percentiles(cpu)}


def service_path_latency(artefact: Path, train: Ratings, pairs: list[tuple[int, int]], n_cold: int,
                         seed: int = 0) -> dict:
    """Part B on a saved artefact: load it as the service does (explainers warmed), then the
    explain / predict figures for trained users, fold-in users and online users."""
    t0 = time.perf_counter()
    rec = Recommender.load(artefact)  # warms the cached Newton rows, as the service does
    load_s = time.perf_counter() - t0
    twin = rec.model.explainer(rec.train)  # the explainer the service builds, warmed alone: its time and bytes
    t0, c0 = time.perf_counter(), time.process_time()
    twin.warm()
    warm = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "cache_mb": twin.cache_bytes / 1e6}
    del twin
    raw = [(train.user_ids.raw(u), train.item_ids.raw(i)) for u, i in pairs]
    out = {"load_seconds_with_warm_explainer": load_s, "explainer_warm": warm,
           "explain_trained": _timed(lambda u, i: rec.explain(u, i, 5), raw),
           "predict_explain5_trained": _timed(lambda u, i: rec.predict(u, i, explain=5), raw)}
    rng = np.random.default_rng(seed + 3)
    counts = train.user_counts()
    donors = rng.choice(np.flatnonzero(counts >= 5), size=n_cold, replace=False)
    cold = []
    for d in donors:
        rows = rng.choice(train.by_user.examples[train.by_user.row(int(d))], size=5, replace=False)
        name = f"cold-{train.user_ids.raw(int(d))}"
        rec.add_ratings([NewRating(name, train.item_ids.raw(int(train.items[z])), float(train.values[z]))
                         for z in rows])
        cold.extend((name, train.item_ids.raw(int(i))) for i in rng.choice(train.n_items, size=10, replace=False))
    first = rec.explain(cold[0][0], cold[0][1], 5)
    out["explain_fold_in"] = {**_timed(lambda u, i: rec.explain(u, i, 5), cold), "method": first.method}
    out["predict_explain5_fold_in"] = _timed(lambda u, i: rec.predict(u, i, explain=5), cold)
    online = []
    for u in rng.choice(np.flatnonzero(counts >= 5), size=n_cold, replace=False):
        name = train.user_ids.raw(int(u))
        rated = set(train.by_user.columns[train.by_user.row(int(u))].tolist())
        fresh = [j for j in rng.permutation(train.n_items)[:40].tolist() if j not in rated][:5]
        rec.add_ratings([NewRating(name, train.item_ids.raw(j), float(rng.integers(1, 6))) for j in fresh])
        online.extend((name, train.item_ids.raw(int(i))) for i in rng.choice(train.n_items, size=10, replace=False))
    out["explain_online"] = {**_timed(lambda u, i: rec.explain(u, i, 5), online),
                             "method": rec.explain(online[0][0], online[0][1], 5).method}
    out["method_trained"] = rec.explain(*raw[0], 5).method
    # right after ratings arrive: each batch's queries timed straight after it was applied
    rng = np.random.default_rng(seed + 5)
    fold_in, online = [], []
    for d in rng.choice(np.flatnonzero(counts >= 5), size=n_cold, replace=False):
        rows = rng.choice(train.by_user.examples[train.by_user.row(int(d))], size=5, replace=False)
        name = f"late-cold-{train.user_ids.raw(int(d))}"
        fold_in.append(([NewRating(name, train.item_ids.raw(int(train.items[z])), float(train.values[z]))
                         for z in rows],
                        [(name, train.item_ids.raw(int(i))) for i in rng.choice(train.n_items, size=10, replace=False)]))
    for u in rng.choice(np.flatnonzero(counts >= 5), size=n_cold, replace=False):
        name = train.user_ids.raw(int(u))
        rated = set(train.by_user.columns[train.by_user.row(int(u))].tolist())
        fresh = [j for j in rng.permutation(train.n_items)[:40].tolist() if j not in rated][:5]
        online.append(([NewRating(name, train.item_ids.raw(j), float(rng.integers(1, 6))) for j in fresh],
                       [(name, train.item_ids.raw(int(i))) for i in rng.choice(train.n_items, size=10, replace=False)]))
    out["explain_fold_in_right_after_ratings"] = _right_after(rec, fold_in)
    out["explain_online_right_after_ratings"] = _right_after(rec, online)
    return out


def latency(train: Ratings, test: Ratings, n_pairs: int, n_cold: int, seed: int = 0) -> dict:
    """Part B (see the module docstring)."""
    setup = served_setup(seed=seed)
    model = MatrixFactorization(train.n_users, train.n_items, train.rating_scale, setup.model)
    Trainer(setup.train).fit(model, train)
    pairs = sample_pairs(train, test, n_pairs, np.random.default_rng(seed))
    with tempfile.TemporaryDirectory() as tmp:
        save_artefact(Path(tmp) / "model", model, train, {"split": "u1"})
        return service_path_latency(Path(tmp) / "model", train, pairs, n_cold, seed)


def _appended(ratings: Ratings, users: np.ndarray, items: np.ndarray, values: np.ndarray) -> tuple[Ratings, np.ndarray]:
    """``ratings`` with rows ``(users, items, values)`` (indices of known users and items)
    appended, as ratings received online arrive: ``(all ratings, the new example ids)``."""
    n = len(ratings)
    stamps = None if ratings.timestamps is None else np.full(len(users), int(ratings.timestamps.max()) + 1)
    new = Ratings(np.asarray(users, np.int64), np.asarray(items, np.int64), np.asarray(values, np.float32), stamps,
                  ratings.user_ids, ratings.item_ids, ratings.rating_scale)
    return ratings.append(new), np.arange(n, n + len(users), dtype=np.int64)


def synthetic_latency(n_ratings: int, n_users: int, n_items: int, n_pairs: int = 400, n_online: int = 20,
                      seed: int = 0, online_draw: str = "uniform") -> dict:
    """Part C: ``MFExplainer.explain(user, item, 5)`` (the service's explainer, warmed as
    the service warms it: its CPU time and bytes) on the synthetic model `serve_latency.py`
    builds and caches (10^7: 200,000 users x 10,000 items, D=128 in 4 blocks): random pairs
    (a user with ratings, any item) and pairs whose item is drawn by popularity, 3 rounds of
    ``n_pairs`` each; then ``n_online`` trained users each send 5 ratings of random items,
    learnt online (`MatrixFactorization.learn`, `MFExplainer.update`), and their 10 queries
    are timed right after (thread CPU, ms; with how many rows those queries built and
    updated in place, `NewtonInfluence.update_above`). ``online_draw``: ``uniform`` (any
    user with ratings, as likely) or ``activity`` (a user as likely as their number of
    ratings: the heavy users who rate most, whose own rows cost most to rebuild). Last, the
    CPU of `MFExplainer.update` per rating learnt online, for batches of 1, 5, 100 and 1000
    ratings of random trained users and items (``update_cost``; the learning not counted)."""
    from serve_latency import synthetic_model

    from recsys.artefact import load_artefact

    t0 = time.perf_counter()
    art = load_artefact(synthetic_model(n_ratings, n_users, n_items))
    model, train = art.model, art.train
    out: dict = {"ratings": len(train), "users": train.n_users, "items": train.n_items,
                 "load_seconds": time.perf_counter() - t0}
    explainer = model.explainer(train)
    t0, c0 = time.perf_counter(), time.process_time()
    explainer.warm()
    out["explainer_warm"] = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                             "cache_mb": explainer.cache_bytes / 1e6}
    rng = np.random.default_rng(seed)
    user_counts, item_counts = train.user_counts(), train.item_counts()
    rated = np.flatnonzero(user_counts > 0)

    def timed(pairs: list[tuple[int, int]]) -> dict:
        cpu = []
        for u, i in pairs:
            c0 = time.thread_time()
            explainer.explain(u, i, 5)
            cpu.append(time.thread_time() - c0)
        return _percentiles(cpu)

    for name in ("random_pairs", "items_by_popularity"):
        out[name] = []
        for _ in range(3):
            items = (rng.integers(train.n_items, size=n_pairs) if name == "random_pairs" else
                     rng.choice(train.n_items, size=n_pairs, p=item_counts / item_counts.sum()))
            out[name].append(timed(list(zip(rng.choice(rated, size=n_pairs).tolist(), items.tolist(), strict=True))))
    model.start_online(train)
    ratings = train.reserve(1 << 16)
    explainer.update(ratings, np.zeros(0, np.int64))
    cpu, update_us = [], []
    counts_before = explainer.row_counts
    if online_draw not in ("uniform", "activity"):
        raise ValueError(f"online_draw must be uniform or activity, got {online_draw!r}")
    weights = None if online_draw == "uniform" else user_counts[rated] / user_counts[rated].sum()
    online_users = rng.choice(rated, size=n_online, replace=False, p=weights)
    for u in online_users.tolist():
        ratings, new = _appended(ratings, np.full(5, u), rng.choice(train.n_items, size=5, replace=False),
                                 rng.integers(1, 6, size=5))
        model.learn(ratings, new)
        c0 = time.thread_time()
        explainer.update(ratings, new)
        update_us.append((time.thread_time() - c0) * 1e6)
        for i in rng.choice(train.n_items, size=10, replace=False).tolist():
            c0 = time.thread_time()
            explainer.explain(u, i, 5)
            cpu.append(time.thread_time() - c0)
    counts = explainer.row_counts  # rows built / updated in place by the timed queries
    out["online_right_after_ratings"] = {**_percentiles(cpu), "update_us_p50": float(np.median(update_us)),
                                         "online_draw": online_draw,
                                         "user_ratings": [int(user_counts[u]) for u in online_users],
                                         "first_query_ms": [round(c * 1e3, 3) for c in cpu[::10]],
                                         "rows": {key: counts[key] - counts_before[key] for key in counts},
                                         "cache_mb_after": explainer.cache_bytes / 1e6}
    out["update_cost"] = {}
    for size, batches in ((1, 400), (5, 200), (100, 40), (1000, 8)):
        per_rating = []
        for _ in range(batches):
            ratings, new = _appended(ratings, rng.choice(rated, size=size), rng.integers(train.n_items, size=size),
                                     rng.integers(1, 6, size=size))
            model.learn(ratings, new)
            c0 = time.thread_time()
            explainer.update(ratings, new)
            per_rating.append((time.thread_time() - c0) * 1e6 / size)
        out["update_cost"][str(size)] = {"batches": batches, "us_per_rating_p50": float(np.median(per_rating)),
                                         "us_per_rating_mean": float(np.mean(per_rating)),
                                         "us_per_batch_max": float(np.max(per_rating) * size)}
    return out


def log_based(train: Ratings, points: list[dict], seed: int = 0) -> dict:
    """Part A2: the log-based estimates scored on part A's agreement points (the same truths):
    the served model trained again with the exact log (the same weights: logging does not
    change training), plain rollback (`estimate_effects(..., "rollback")`) and the rollback
    corrected for the rows' later contraction (`contracted_rollback`); beside them the Newton
    estimate damped by the summed learning rate (`NewtonInfluence(learning_rate_sum=...)`, not
    served: the service's explainer is not given the schedule)."""
    setup = served_setup(seed=seed)
    model = MatrixFactorization(train.n_users, train.n_items, train.rating_scale, setup.model)
    callback = RollbackCallback(mode="exact")
    Trainer(setup.train, callbacks=[callback]).fit(model, train)
    c = setup.train
    lr_sum = float(sum(c.learning_rate * c.lr_decay ** e for e in range(c.epochs)))
    true = np.array([p["true"] for p in points])
    plain, contracted, damped = [], [], []
    damped_newton = NewtonInfluence(model, train, learning_rate_sum=lr_sum)
    for p in points:
        u, i, z = p["user"], p["item"], p["example"]
        ids, eff = damped_newton.effects(u, i)
        damped.append(eff[ids == z][0])
        ids, eff, _, _ = estimate_effects(model, train, u, i, "rollback", callback.log)
        plain.append(eff[ids == z][0])
        ids, eff = contracted_rollback(model, train, callback.log, u, i, lr_sum)
        contracted.append(eff[ids == z][0])
    out = {"learning_rate_sum": lr_sum, "true_mean_abs": float(np.abs(true).mean())}
    alt = np.array([p.get("true_reseeded", np.nan) for p in points])
    for name, est in (("rollback", np.array(plain)), ("rollback_contracted", np.array(contracted)),
                      ("newton_damped_not_served", np.array(damped))):
        out[name] = {**agreement_stats(est, true), "estimate_mean_abs": float(np.abs(est).mean())}
        if np.isfinite(alt).all():
            out[name]["spearman_vs_reseeded"] = agreement_stats(est, alt)["spearman"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run, minutes less)")
    ap.add_argument("--latency-only", action="store_true")
    ap.add_argument("--rescore", type=Path, help="a results file whose part A points part A2 rescores "
                                                  "(no retraining: A2 only, written beside A)")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--removal-pairs", type=int, default=50)
    ap.add_argument("--fold-in-users", type=int, default=20)
    ap.add_argument("--latency-pairs", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="processes for the leave-one-out retrains")
    ap.add_argument("--synthetic-ratings", type=float,
                    help="part C only: explain latency on serve_latency.py's synthetic model of this many ratings "
                         "(e.g. 1e7; built and cached on first use), written beside parts A and B")
    ap.add_argument("--synthetic-users", type=int, default=200_000)
    ap.add_argument("--synthetic-items", type=int, default=10_000)
    ap.add_argument("--online-users", type=int, default=20,
                    help="part C: trained users who each send 5 ratings online (10 queries timed after each)")
    ap.add_argument("--online-draw", choices=("uniform", "activity"), default="uniform",
                    help="part C: those users drawn uniformly, or as likely as their number of ratings (heavy users)")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.candidates, args.removal_pairs, args.fold_in_users, args.latency_pairs = 4, 5, 4, 3, 50
    torch.set_num_threads(args.threads)
    train, test = load_split("ml-100k", "u1")
    out = json.loads(RESULTS.read_text()) if (args.latency_only or args.rescore or args.synthetic_ratings) \
        and RESULTS.exists() else {}
    if args.synthetic_ratings:
        t0 = time.perf_counter()
        part = synthetic_latency(int(args.synthetic_ratings), args.synthetic_users, args.synthetic_items,
                                 n_online=args.online_users, seed=args.seed, online_draw=args.online_draw)
        part["seconds"] = time.perf_counter() - t0
        part["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "load_average_at_end": os.getloadavg()}
        part["command"] = ("RECSYS_DATA=../shared/data python benchmarks/explain_faithfulness.py "
                           "--synthetic-ratings " + f"{args.synthetic_ratings:g}".replace("e+0", "e").replace("e+", "e")
                           + (f" --online-users {args.online_users}" if args.online_users != 20 else "")
                           + (f" --online-draw {args.online_draw}" if args.online_draw != "uniform" else ""))
        suffix = "" if args.online_draw == "uniform" else f"_online_{args.online_draw}"
        out[f"latency_synthetic_{int(args.synthetic_ratings)}{suffix}"] = part
        print(json.dumps(part, indent=1))
        write_json(RESULTS, out)
        print(f"wrote {RESULTS}")
        return
    if args.rescore:
        points = json.loads(args.rescore.read_text())
        points = points.get("served_mf", points)["points"]
        out["log_based_mf"] = log_based(train, points, seed=args.seed)
        print(json.dumps(out["log_based_mf"], indent=1))
        if "served_mf" in out:  # part A's online users (no retraining: recomputed with part A2)
            setup = served_setup(seed=args.seed)
            model = MatrixFactorization(train.n_users, train.n_items, train.rating_scale, setup.model)
            Trainer(setup.train).fit(model, train)
            out["served_mf"]["online"] = online_agreement(model, train, test, n_users=args.fold_in_users,
                                                          seed=args.seed)
            print(json.dumps({"online": out["served_mf"]["online"]}, indent=1))
        if RESULTS.exists() and args.rescore.resolve() == RESULTS.resolve():
            write_json(RESULTS, out)
        return
    if not args.latency_only:
        t0 = time.perf_counter()
        served = served_run(train, test, n_predictions=args.pairs, n_candidates=args.candidates,
                            n_removal_pairs=args.removal_pairs, fold_in_users=args.fold_in_users, seed=args.seed,
                            workers=args.workers)
        served["seconds"] = time.perf_counter() - t0
        out["served_mf"] = served
        shown = {k: v for k, v in served.items() if k not in ("points", "setup")}
        print(json.dumps(shown, indent=1))
        out["log_based_mf"] = log_based(train, served["points"], seed=args.seed)
        print(json.dumps(out["log_based_mf"], indent=1))
    t0 = time.perf_counter()
    out["latency"] = latency(train, test, args.latency_pairs, 20 if not args.quick else 3, seed=args.seed)
    out["latency"]["seconds"] = time.perf_counter() - t0
    print(json.dumps(out["latency"], indent=1))
    out["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                      "load_average_at_end": os.getloadavg(), "torch": torch.__version__}
    out["command"] = "RECSYS_DATA=../shared/data python benchmarks/explain_faithfulness.py" + (
        " --quick" if args.quick else "") + (" --latency-only" if args.latency_only else "")
    if not args.quick:
        write_json(RESULTS, out)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
