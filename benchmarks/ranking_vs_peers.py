"""Top-N ranking on MovieLens-100K: the project's rankers beside their peers, same run, one
metric code for every model.

Splits: the canonical folds u1..u5 (mean over folds) and a per-user temporal split (each
user's latest 20% of ratings by timestamp go to test, `recsys.splits.temporal_split(full,
0.2)`; every user keeps at least one training rating).

Protocol (the project's `recsys.evaluate.evaluate_ranking` rule): a test item is relevant
when its test rating is >= 4; each user's training items are masked out of that user's list;
users with at least one relevant test item are evaluated; ``n_relevant`` counts every relevant
test item; P@10, R@10, NDCG@10 (binary gains, ideal DCG over min(10, n_relevant) hits), MAP@10
and catalogue coverage (share of all items in some evaluated user's top 10). Every model,
ours and the peers, hands back a score matrix ``[users, n_items]``; `rank_metrics` masks,
cuts and scores it with the metric functions of `recsys.evaluate` (for our rankers the result
is also checked against `evaluate_ranking` itself).

Models:
- every ranker registered in `recsys.models.MODELS` (task "ranking") at its defaults; the
  default ranker is `recsys.models.DEFAULT_RANKER` (``ease`` where it is not defined);
- peers at their documented defaults: most popular (training counts), implicit ALS and BPR
  (called directly), cornac BPR (also at the issue's anchor: k=64, 200 iterations, lr 0.01,
  reg 0.01), LensKit's ImplicitMFScorer (both through ``benchmarks/peers/run_peer.py`` in the
  peers' venv), an EASE baseline (binary input, lambda 500, numpy, Steck 2019);
- each peer also at the best of a small validation grid (`GRIDS`), chosen per split on a
  validation slice carved from that split's *training* ratings only (per user, 20% of the
  training ratings of users with >= 5: at random for the u-folds, the latest 20% for the
  temporal split), scored with the same protocol; the test files are never looked at.
  Peers see every training rating as one interaction (binary), as they do by default.

Also (on u1): recommend latency for one user on the CPU for each of our rankers (score_all +
masking the user's training items + top 10, single thread, 1,000 random users: p50/p99), and
cold start: 20% of the u1 users with more than 5 training ratings and a relevant test item are
held out of training; 1, 3 or 5 of their training ratings are revealed afterwards (by
``learn`` for an `OnlineLearner`, else by a refit, labelled as such) and NDCG@10 is measured
on their u1.test items (all their u1.base items masked), against popularity, implicit ALS
fold-in (``recalculate_user``) and the EASE baseline.

    RECSYS_DATA=/work/shared/data .venv/bin/python benchmarks/ranking_vs_peers.py
    ... --splits u1 --quick          # one fold, a smaller grid: a smoke run

Writes ``benchmarks/results/ranking_vs_peers.json`` (after every split, so a killed run keeps
what it measured).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

from recsys.datasets import data_home, load_dataset, load_split
from recsys.evaluate import evaluate_ranking, map_at_k, ndcg_at_k, precision_at_k, recall_at_k
from recsys.ratings import Ratings
from recsys.splits import reveal_order, temporal_split

sys.path.insert(0, str(Path(__file__).parent))
from peers.client import PeerError, peers_available, run_peer  # noqa: E402
from peers.run_peer import json_safe  # noqa: E402
from results_file import write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FOLDS = ("u1", "u2", "u3", "u4", "u5")
METRICS = ("ndcg", "precision", "recall", "map", "coverage")
K = 10
THRESHOLD = 4.0

#: validation grids per peer: every combination is fitted on the validation slice's fit part
GRIDS: dict[str, dict[str, list]] = {
    "implicit-als": {"factors": [64, 128], "regularization": [0.01, 0.1], "alpha": [1.0, 10.0]},
    "implicit-bpr": {"factors": [64, 128], "learning_rate": [0.01, 0.05],
                     "regularization": [0.01, 0.001]},
    "cornac-bpr": {"k": [64, 128], "learning_rate": [0.01, 0.05], "lambda_reg": [0.01, 0.001],
                   "max_iter": [200]},
    "lenskit-implicitmf": {"embedding_size": [50, 100], "weight": [10.0, 40.0],
                           "regularization": [0.1, 1.0]},
    "ease-baseline": {"lam": [100.0, 300.0, 500.0, 1000.0]},
}
QUICK_GRIDS: dict[str, dict[str, list]] = {
    "implicit-als": {"factors": [64], "regularization": [0.01, 0.1], "alpha": [1.0]},
    "implicit-bpr": {"factors": [64], "learning_rate": [0.01, 0.05], "regularization": [0.01]},
    "cornac-bpr": {"k": [64], "learning_rate": [0.01, 0.05], "lambda_reg": [0.01],
                   "max_iter": [200]},
    "lenskit-implicitmf": {"embedding_size": [50], "weight": [10.0, 40.0],
                           "regularization": [0.1]},
    "ease-baseline": {"lam": [300.0, 500.0]},
}
#: fixed configurations reported beside the defaults (the issue's anchors)
ANCHORS: dict[str, dict[str, Any]] = {
    "cornac-bpr": {"k": 64, "max_iter": 200, "learning_rate": 0.01, "lambda_reg": 0.01},
    "ease-baseline": {"lam": 500.0},
}
PEER_DEFAULTS: dict[str, dict[str, Any]] = {
    "implicit-als": {}, "implicit-bpr": {}, "cornac-bpr": {}, "lenskit-implicitmf": {},
    "ease-baseline": {"lam": 500.0},  # the EASE paper's and the issue's anchor
}
SUBPROCESS_PEERS = ("cornac-bpr", "lenskit-implicitmf")


# ---------------------------------------------------------------------------- the one metric code
def eval_users(test: Ratings, threshold: float = THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Users with at least one relevant test item (``int64 [B]``) and every user's count of
    relevant test items (``int64 [n_users]``)."""
    n_rel = test.subset(test.values >= threshold).user_counts()
    return np.flatnonzero(n_rel > 0).astype(np.int64), n_rel


def rank_metrics(scores: np.ndarray | torch.Tensor, users: np.ndarray, mask: Ratings,
                 test: Ratings, *, k: int = K, threshold: float = THRESHOLD) -> dict:
    """The ranking protocol on a score matrix ``[B, n_items]`` of the evaluated ``users [B]``:
    each user's ``mask`` items (their training items) get -inf, the top ``k`` is cut, hits
    are the relevant test items (rating >= ``threshold``) and the metrics are those of
    `recsys.evaluate`. Items scored -inf (masked, or unknown to a peer) are never shown."""
    s = torch.as_tensor(scores, dtype=torch.float32).clone()
    if s.shape[0] != len(users):
        raise ValueError(f"{s.shape[0]} score rows for {len(users)} users")
    n_items = s.shape[1]
    s = torch.nan_to_num(s, nan=-math.inf)
    pos = np.full(mask.n_users, -1, dtype=np.int64)
    pos[users] = np.arange(len(users))
    keep = pos[mask.users] >= 0
    s[torch.from_numpy(pos[mask.users[keep]]), torch.from_numpy(mask.items[keep])] = -math.inf
    top_scores, top = torch.topk(s, min(k, n_items), dim=1)
    relevant = test.subset(test.values >= threshold)
    n_rel = relevant.user_counts()[users]
    rel = torch.zeros(s.shape, dtype=torch.bool)
    keep = pos[relevant.users] >= 0
    rel[torch.from_numpy(pos[relevant.users[keep]]), torch.from_numpy(relevant.items[keep])] = True
    shown = top_scores > -math.inf
    hits = rel.gather(1, top) & shown
    n = torch.from_numpy(n_rel)
    seen = torch.zeros(n_items, dtype=torch.bool)
    seen[top[shown]] = True
    return {
        "ndcg": float(ndcg_at_k(hits, n).mean()),
        "precision": float(precision_at_k(hits).mean()),
        "recall": float(recall_at_k(hits, n).mean()),
        "map": float(map_at_k(hits, n).mean()),
        "coverage": float(seen.sum()) / n_items,
        "n_users": len(users),
    }


# ---------------------------------------------------------------------------- data helpers
def interaction_csr(r: Ratings, n_users: int | None = None) -> sp.csr_matrix:
    """Binary ``users x items`` CSR of the (user, item) pairs of ``r``."""
    shape = (n_users or r.n_users, r.n_items)
    x = sp.csr_matrix((np.ones(len(r), dtype=np.float32), (r.users, r.items)), shape=shape)
    x.data[:] = 1.0
    return x


def per_user_holdout(train: Ratings, fraction: float = 0.2, *, temporal: bool, seed: int = 0,
                     min_ratings: int = 5) -> tuple[Ratings, Ratings]:
    """``(fit, validation)`` from training ratings only: of each user with at least
    ``min_ratings`` ratings, ``round(fraction * count)`` ratings go to validation (the latest
    by timestamp when ``temporal``, else at random with ``seed``)."""
    if temporal:
        cut = temporal_split(train, fraction)
        return cut.train, cut.test
    n = len(train)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(n), train.users))
    counts = train.user_counts()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[train.users[order]]
    n_val = np.where(counts >= min_ratings, np.floor(fraction * counts + 0.5), 0).astype(np.int64)
    is_val = rank < n_val[train.users]
    return train.subset(~is_val), train.subset(is_val)


def write_tsv(r: Ratings, path: Path) -> None:
    """MovieLens-style TSV (raw user, raw item, rating, timestamp) for the peers' process."""
    uraw = np.asarray(r.user_ids.raw_ids)[r.users]
    iraw = np.asarray(r.item_ids.raw_ids)[r.items]
    ts = r.timestamps if r.timestamps is not None else np.zeros(len(r), dtype=np.int64)
    with open(path, "w") as f:
        for row in zip(uraw.tolist(), iraw.tolist(), r.values.tolist(), ts.tolist(), strict=True):
            f.write(f"{row[0]}\t{row[1]}\t{row[2]:g}\t{row[3]}\n")


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


# ---------------------------------------------------------------------------- in-process peers
def popularity_scores(train: Ratings, users: np.ndarray) -> np.ndarray:
    counts = train.item_counts().astype(np.float32)
    return np.broadcast_to(counts, (len(users), train.n_items)).copy()


def ease_weights(x: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE (Steck 2019): ``B = I - P diag(1/diag P)``, ``P = (XᵀX + λI)⁻¹``, zero diagonal."""
    g = (x.T @ x).toarray().astype(np.float64)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32)


def implicit_model(kind: str, params: dict[str, Any]) -> Any:
    import implicit

    if kind == "implicit-als":
        return implicit.als.AlternatingLeastSquares(**params)
    return implicit.bpr.BayesianPersonalizedRanking(**params)


def implicit_factors(model: Any) -> tuple[np.ndarray, np.ndarray]:
    uf, itf = model.user_factors, model.item_factors
    if hasattr(uf, "to_numpy"):  # GPU factors
        uf, itf = uf.to_numpy(), itf.to_numpy()
    return np.asarray(uf), np.asarray(itf)


def implicit_effective_params(model: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The constructor's defaults overridden by ``params`` (hyper-parameters only)."""
    import inspect

    skip = {"self", "dtype", "num_threads", "random_state", "use_native", "use_cg",
            "calculate_training_loss", "verify_negative_samples", "use_gpu"}
    sig = inspect.signature(type(model).__init__).parameters
    out = {k: p.default for k, p in sig.items() if k not in skip and p.default is not p.empty}
    return {**out, **params}


def fit_score_inprocess(kind: str, params: dict[str, Any], train: Ratings,
                        users: np.ndarray) -> tuple[np.ndarray, float, dict[str, Any]]:
    """Fit an in-process peer on ``train`` and score ``users``: ``(scores, fit_seconds, params)``."""
    if kind == "popularity":
        t0 = time.perf_counter()
        scores = popularity_scores(train, users)
        return scores, time.perf_counter() - t0, {}
    x = interaction_csr(train)
    if kind == "ease-baseline":
        t0 = time.perf_counter()
        b = ease_weights(x, float(params["lam"]))
        fit_s = time.perf_counter() - t0
        return np.asarray(x[users] @ b), fit_s, dict(params)
    model = implicit_model(kind, params)
    t0 = time.perf_counter()
    with threadpool_limits(1, "blas"):  # implicit's own advice: its threads, not BLAS's
        model.fit(x, show_progress=False)
    fit_s = time.perf_counter() - t0
    uf, itf = implicit_factors(model)
    return uf[users] @ itf.T, fit_s, implicit_effective_params(model, params)


# ---------------------------------------------------------------------------- subprocess peers
def fit_score_subprocess(kind: str, params_list: list[dict[str, Any]], train: Ratings,
                         users: np.ndarray, tmp: Path) -> list[tuple[np.ndarray, float, dict]]:
    """Run ``params_list`` of a peers'-venv ranker in one subprocess; per run ``(scores
    [users, n_items] aligned with our item indices, fit_seconds, effective params)``."""
    train_path = tmp / "train.tsv"
    write_tsv(train, train_path)
    runs = [{"params": p, "out": str(tmp / f"{kind}-{j}.npy")} for j, p in enumerate(params_list)]
    job = {
        "task": "rank", "peer": kind, "train": str(train_path), "runs": runs,
        "users": [int(u) for u in np.asarray(train.user_ids.raw_ids)[users]],
        "items": [int(i) for i in np.asarray(train.item_ids.raw_ids)],
    }
    result = run_peer(job, timeout=3600)
    out = []
    for run in result["runs"]:
        scores = np.load(run["out"])
        os.unlink(run["out"])
        info = {k: v for k, v in run.items() if k not in ("out",)}
        out.append((scores, float(run["fit_seconds"]), {**info, "library_version":
                                                          result.get("library_version")}))
    return out


def fit_score_peer(kind: str, params_list: list[dict[str, Any]], train: Ratings,
                   users: np.ndarray, tmp: Path) -> list[tuple[np.ndarray, float, dict]]:
    if kind in SUBPROCESS_PEERS:
        return fit_score_subprocess(kind, params_list, train, users, tmp)
    return [fit_score_inprocess(kind, p, train, users) for p in params_list]


# ---------------------------------------------------------------------------- our rankers
def registered_rankers() -> tuple[list[str], str]:
    """Names of the rankers in `recsys.models.MODELS` and the default ranker's name."""
    import recsys.models as models

    names = [n for n, (cls, _) in models.MODELS.items() if getattr(cls, "task", "") == "ranking"]
    default = getattr(models, "DEFAULT_RANKER", None) or "ease"
    return names, default


def fit_ranker(name: str, train: Ratings, config: dict | None = None) -> tuple[Any, float, dict]:
    from recsys.models import build_model

    model = build_model(name, train.n_users, train.n_items, train.rating_scale, config or {})
    t0 = time.perf_counter()
    summary = model.fit(train, progress=False)
    fit_s = time.perf_counter() - t0
    return model, fit_s, summary if isinstance(summary, dict) else {}


@torch.no_grad()
def ranker_scores(model: Any, users: np.ndarray, batch: int = 1024) -> np.ndarray:
    model.eval()
    parts = [model.score_all(torch.from_numpy(users[s:s + batch]).to(model.device)).float().cpu()
             for s in range(0, len(users), batch)]
    return torch.cat(parts).numpy()


# ---------------------------------------------------------------------------- one split
def run_split(name: str, train: Ratings, test: Ratings, *, temporal: bool, rankers: list[str],
              peers: list[str], grids: dict[str, dict[str, list]], use_grid: bool,
              log: Callable[[str], None], keep_models: dict | None = None) -> dict:
    users, _ = eval_users(test)
    out: dict[str, Any] = {"split": name, "n_train": len(train), "n_test": len(test),
                           "n_users_evaluated": len(users), "results": {}, "validation": {}}
    res = out["results"]

    for rname in rankers:
        label = f"ours:{rname}"
        try:
            model, fit_s, summary = fit_ranker(rname, train)
            m = rank_metrics(ranker_scores(model, users), users, train, test)
            check = evaluate_ranking(model, train, test, k=K, relevance_threshold=THRESHOLD)
            m["evaluate_ranking_ndcg"] = check["ndcg"]
            res[label] = {**m, "fit_seconds": fit_s, "params": model.config_dict()
                          if _has_config(model) else {}, "fit_summary": json_safe(summary)}
            if keep_models is not None:
                keep_models[rname] = model
        except Exception as exc:  # a ranker still being written must not stop the run
            res[label] = {"error": f"{type(exc).__name__}: {exc}"}
        log(_line(name, label, res[label]))

    with tempfile.TemporaryDirectory(prefix="ranking_vs_peers_") as tmpdir:
        tmp = Path(tmpdir)
        scores, fit_s, _ = fit_score_inprocess("popularity", {}, train, users)
        res["popularity"] = {**rank_metrics(scores, users, train, test), "fit_seconds": fit_s,
                             "params": {"score": "training interaction count"}}
        log(_line(name, "popularity", res["popularity"]))

        val_fit = val = None
        if use_grid:
            val_fit, val = per_user_holdout(train, temporal=temporal)
            val_users, _ = eval_users(val)
            out["validation_slice"] = {
                "rule": ("per user, latest 20% of training ratings (users with >= 5)" if temporal
                         else "per user, 20% of training ratings at random, seed 0 (users with >= 5)"),
                "n_fit": len(val_fit), "n_validation": len(val),
                "n_users_evaluated": len(val_users)}
        for kind in peers:
            configs: list[tuple[str, dict[str, Any]]] = [("defaults", PEER_DEFAULTS[kind])]
            if kind in ANCHORS and ANCHORS[kind] != PEER_DEFAULTS[kind]:
                configs.append(("anchor", ANCHORS[kind]))
            try:
                if use_grid:
                    points = grid_points(grids[kind])
                    t0 = time.perf_counter()
                    fitted = fit_score_peer(kind, points, val_fit, val_users, tmp)
                    trials = []
                    for p, (sc, fs, _) in zip(points, fitted, strict=True):
                        vm = rank_metrics(sc, val_users, val_fit, val)
                        trials.append({"params": p, "val_ndcg": vm["ndcg"], "fit_seconds": fs})
                    best = max(trials, key=lambda t: t["val_ndcg"])
                    out["validation"][kind] = {"trials": trials, "chosen": best["params"],
                                               "seconds": time.perf_counter() - t0}
                    configs.append(("grid", best["params"]))
                fitted = fit_score_peer(kind, [c[1] for c in configs], train, users, tmp)
                for (tag, _), (sc, fs, info) in zip(configs, fitted, strict=True):
                    label = f"{kind} ({tag})"
                    params = info.get("params", info) if kind in SUBPROCESS_PEERS else info
                    res[label] = {**rank_metrics(sc, users, train, test), "fit_seconds": fs,
                                  "params": json_safe(params)}
                    if kind in SUBPROCESS_PEERS:
                        res[label]["library_version"] = info.get("library_version")
                    log(_line(name, label, res[label]))
            except (PeerError, Exception) as exc:  # noqa: BLE001 - record and go on
                res[f"{kind} (error)"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                log(f"[{name}] {kind}: ERROR {exc}"[:500])
    return out


def _has_config(model: Any) -> bool:
    try:
        model.config_dict()
    except Exception:  # noqa: BLE001
        return False
    return True


def _line(split: str, label: str, r: dict) -> str:
    if "error" in r:
        return f"[{split}] {label:<34} ERROR {r['error'][:300]}"
    return (f"[{split}] {label:<34} NDCG {r['ndcg']:.4f}  P {r['precision']:.4f}  "
            f"R {r['recall']:.4f}  MAP {r['map']:.4f}  cov {r['coverage']:.3f}  "
            f"fit {r['fit_seconds']:.2f}s")


def mean_over(splits: list[dict]) -> dict[str, dict]:
    labels: dict[str, None] = {}
    for s in splits:
        labels.update(dict.fromkeys(s["results"]))
    out = {}
    for label in labels:
        rows = [s["results"].get(label) for s in splits]
        if any(r is None or "error" in r for r in rows):
            continue
        out[label] = {m: float(np.mean([r[m] for r in rows])) for m in (*METRICS, "fit_seconds")}
        out[label]["n_splits"] = len(rows)
    return out


def print_table(title: str, table: dict[str, dict], default: str) -> None:
    print(f"\n{title}")
    print("| model | NDCG@10 | P@10 | R@10 | MAP@10 | coverage | fit s |")
    print("|---|---|---|---|---|---|---|")
    for label, r in sorted(table.items(), key=lambda kv: -kv[1]["ndcg"]):
        mark = " (default)" if label == f"ours:{default}" else ""
        print(f"| {label}{mark} | {r['ndcg']:.4f} | {r['precision']:.4f} | {r['recall']:.4f} | "
              f"{r['map']:.4f} | {r['coverage']:.3f} | {r['fit_seconds']:.2f} |")


def verdict(table: dict[str, dict], default: str) -> dict:
    mine = table.get(f"ours:{default}")
    peers = {k: v["ndcg"] for k, v in table.items() if not k.startswith("ours:")}
    if mine is None or not peers:
        return {"default": default, "measured": False}
    best = max(peers, key=peers.__getitem__)
    return {"default": default, "measured": True, "default_ndcg": mine["ndcg"],
            "best_peer": best, "best_peer_ndcg": peers[best],
            "beats_every_peer": bool(mine["ndcg"] > peers[best]),
            "meets_0.385": bool(mine["ndcg"] >= 0.385)}


# ---------------------------------------------------------------------------- latency
def recommend_latency(models: dict[str, Any], train: Ratings, n: int, seed: int = 0) -> dict:
    """Per ranker: seconds of score_all([u]) + masking u's training items + top 10, one
    thread, ``n`` random known users (after 20 warm-up calls)."""
    by_user = train.by_user
    known = np.flatnonzero(train.user_counts() > 0)
    rng = np.random.default_rng(seed)
    sample = rng.choice(known, size=n, replace=True)
    out = {}
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1), torch.no_grad():
            for name, model in models.items():
                model.eval()
                times = []
                for j, u in enumerate(np.concatenate([sample[:20], sample])):
                    t0 = time.perf_counter()
                    s = model.score_all(torch.tensor([int(u)], device=model.device))[0]
                    seen = torch.from_numpy(by_user.columns[by_user.row(int(u))])
                    s = s.index_fill(0, seen.to(s.device), -math.inf)
                    top = torch.topk(s, K).indices.cpu()
                    dt = time.perf_counter() - t0
                    if j >= 20:
                        times.append(dt)
                    del top
                t = np.array(times) * 1e3
                out[name] = {"p50_ms": float(np.percentile(t, 50)),
                             "p99_ms": float(np.percentile(t, 99)),
                             "mean_ms": float(t.mean()), "n": len(t)}
                print(f"latency {name:<10} p50 {out[name]['p50_ms']:.3f} ms  "
                      f"p99 {out[name]['p99_ms']:.3f} ms", flush=True)
    finally:
        torch.set_num_threads(saved)
    return out


# ---------------------------------------------------------------------------- cold start
def cold_start(train: Ratings, test: Ratings, default: str, rankers: list[str],
               als_params: dict[str, Any], *, share: float = 0.2, reveal=(1, 3, 5),
               seed: int = 0) -> dict:
    from recsys.models.base import OnlineLearner

    _, n_rel = eval_users(test)
    counts = train.user_counts()
    eligible = np.flatnonzero((counts > max(reveal)) & (n_rel > 0))
    cold, rank = reveal_order(train, eligible, share, seed)
    is_cold = np.zeros(train.n_users, dtype=bool)
    is_cold[cold] = True
    base = train.subset(rank < 0)
    mask = train.subset(is_cold[train.users])
    ctest = test.subset(is_cold[test.users])
    out: dict[str, Any] = {
        "n_cold_users": len(cold), "eligible": int(len(eligible)), "share": share,
        "rule": (f"{share:.0%} of u1 users with > {max(reveal)} training ratings and a relevant "
                 "test item are held out of training; k of their training ratings (random) are "
                 "revealed; NDCG@10 on their u1.test items, all their u1.base items masked"),
        "results": {},
    }
    x_base = interaction_csr(base)
    b_ease = ease_weights(x_base, 500.0)
    als = implicit_model("implicit-als", als_params)
    with threadpool_limits(1, "blas"):
        als.fit(x_base, show_progress=False)
    fitted = {}
    for name in dict.fromkeys([default, *rankers]):
        try:
            fitted[name] = fit_ranker(name, base)[0]
        except Exception as exc:  # noqa: BLE001
            out["results"][f"ours:{name}"] = {"error": f"{type(exc).__name__}: {exc}"}
    for k in reveal:
        rows = np.flatnonzero(is_cold[train.users] & (rank < k))
        revealed = train.subset(rows)
        seen = base.append(revealed)
        res: dict[str, Any] = {}
        res["popularity"] = rank_metrics(popularity_scores(base, cold), cold, mask, ctest)["ndcg"]
        x_seen = interaction_csr(seen)
        res["ease-baseline (lambda 500, fold-in = the user's row)"] = rank_metrics(
            np.asarray(x_seen[cold] @ b_ease), cold, mask, ctest)["ndcg"]
        _, itf = implicit_factors(als)
        uf = np.stack([np.asarray(als.recalculate_user(int(u), x_seen[int(u)])).ravel()
                       for u in cold])
        res["implicit-als fold-in (recalculate_user)"] = rank_metrics(
            uf @ itf.T, cold, mask, ctest)["ndcg"]
        for name, model in fitted.items():
            label = f"ours:{name}"
            try:
                m = copy.deepcopy(model)
                if isinstance(m, OnlineLearner):
                    m.start_online(base)
                    m.learn(seen, np.arange(len(base), len(seen), dtype=np.int64))
                    how = "learn"
                else:
                    m = fit_ranker(name, seen)[0]
                    how = "refit"
                res[f"{label} ({how})"] = rank_metrics(ranker_scores(m, cold), cold, mask,
                                                       ctest)["ndcg"]
            except Exception as exc:  # noqa: BLE001
                res[label] = f"error: {type(exc).__name__}: {exc}"
        out["results"][f"revealed={k}"] = res
        print(f"cold start, {k} revealed: " + ", ".join(
            f"{lab} {v:.4f}" if isinstance(v, float) else f"{lab} {v}" for lab, v in res.items()),
            flush=True)
    out["implicit_als_params"] = als_params
    return out


# ---------------------------------------------------------------------------- main
def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import implicit

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
            "implicit": implicit.__version__, "gpu": torch.cuda.is_available()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default="u1,u2,u3,u4,u5,temporal",
                        help="comma list of u1..u5 and temporal")
    parser.add_argument("--models", default=None,
                        help="comma list of our rankers (default: every registered ranker)")
    parser.add_argument("--peers", default="implicit-als,implicit-bpr,cornac-bpr,"
                        "lenskit-implicitmf,ease-baseline")
    parser.add_argument("--no-grid", action="store_true", help="peers at defaults/anchors only")
    parser.add_argument("--quick", action="store_true", help="a smaller validation grid")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--no-cold", action="store_true")
    parser.add_argument("--latency-users", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS / "ranking_vs_peers.json")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    all_rankers, default = registered_rankers()
    rankers = all_rankers if args.models is None else [m for m in args.models.split(",") if m]
    if default not in rankers and default in all_rankers:
        rankers = [default, *rankers]
    peers = [p for p in args.peers.split(",") if p]
    if any(p in SUBPROCESS_PEERS for p in peers) and not peers_available():
        print("peers' venv missing: cornac and LensKit are skipped", file=sys.stderr)
        peers = [p for p in peers if p not in SUBPROCESS_PEERS]
    grids = QUICK_GRIDS if args.quick else GRIDS
    splits = [s for s in args.splits.split(",") if s]
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "ranking_vs_peers",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "data": str(data_home() / "ml-100k"),
        "protocol": {"k": K, "relevance_threshold": THRESHOLD,
                     "masked": "each user's training items",
                     "users": "users with >= 1 relevant test item",
                     "metric_code": "rank_metrics() over recsys.evaluate's metric functions, "
                                    "one for every model"},
        "temporal_split": "per user, the latest 20% of ratings by timestamp (temporal_split 0.2)",
        "default_ranker": default, "rankers": rankers,
        "missing_rankers": [r for r in ("ease", "popular", "als", "bpr", "rank-mf")
                            if r not in all_rankers],
        "peers": peers, "grids": grids if not args.no_grid else {}, "anchors": ANCHORS,
        "peer_defaults": PEER_DEFAULTS, "splits": [],
    }
    print(f"rankers {rankers} (default {default}); peers {peers}; splits {splits}", flush=True)
    u1_models: dict[str, Any] = {}
    for s in splits:
        if s == "temporal":
            tt = temporal_split(load_dataset("ml-100k"), 0.2)
            train, test = tt.train, tt.test
        else:
            train, test = load_split("ml-100k", s)
        t0 = time.perf_counter()
        rep = run_split(s, train, test, temporal=s == "temporal", rankers=rankers, peers=peers,
                        grids=grids, use_grid=not args.no_grid,
                        log=lambda line: print(line, flush=True),
                        keep_models=u1_models if s == "u1" else None)
        rep["seconds"] = time.perf_counter() - t0
        report["splits"].append(rep)
        write_json(args.out, json_safe(report))

    folds = [r for r in report["splits"] if r["split"] in FOLDS]
    summary: dict[str, Any] = {}
    if folds:
        table = mean_over(folds)
        summary["u_folds_mean"] = {"folds": [r["split"] for r in folds], "table": table,
                                   "verdict": verdict(table, default)}
        print_table(f"ML-100K {','.join(r['split'] for r in folds)} (mean), k={K}", table, default)
    for r in report["splits"]:
        if r["split"] == "temporal":
            table = mean_over([r])
            summary["temporal"] = {"table": table, "verdict": verdict(table, default)}
            print_table("ML-100K per-user temporal split (latest 20%)", table, default)
    report["summary"] = summary
    write_json(args.out, json_safe(report))

    if not args.no_latency and u1_models:
        tr, _ = load_split("ml-100k", "u1")
        report["recommend_latency_u1"] = {
            "what": "score_all([u]) + mask the user's training items + top 10, CPU, 1 thread",
            "results": recommend_latency(u1_models, tr, args.latency_users)}
        write_json(args.out, json_safe(report))
    if not args.no_cold:
        tr, te = load_split("ml-100k", "u1")
        u1 = next((r for r in report["splits"] if r["split"] == "u1"), None)
        als_params = (u1 or {}).get("validation", {}).get("implicit-als", {}).get("chosen", {})
        report["cold_start_u1"] = cold_start(tr, te, default, rankers, als_params)
        write_json(args.out, json_safe(report))
    report["total_seconds"] = time.perf_counter() - started
    write_json(args.out, json_safe(report))
    print(f"\nwrote {args.out} in {report['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
