"""Online insertion into REC's live ratings at scale: the latency of `add_ratings` (one rating
at a time, no training step) on synthetic data of 10^5, 10^6 and 10^7 ratings, beside what a
rebuild of the live graph costs in the same run (the way insertions worked before
`EvidenceGraph.insert`: every insertion re-sorted all 2n edges).

Four kinds of insertion, ``--trials`` each, timed one call at a time: a new rating of an
existing user on an existing item, a replaced rating, the first rating of a new user, the
first rating of a new item. Also checks, at every size, that the prediction of the touched
pair moves and that the grown graph equals a graph built from scratch on the same ratings.
Writes ``benchmarks/results/rec_insert.json``.

    python benchmarks/rec_insert.py [--sizes 100000,1000000,10000000] [--trials 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from rec_scaling import dataset  # the same synthetic sets and cache as the scaling benchmark

from recsys.models import build_model
from recsys.models.rec.chains import EvidenceGraph

RESULTS = Path(__file__).parent / "results"
KINDS = ("new rating", "replaced rating", "new user", "new item")


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "n": len(ms)}


def predict_raw(model, user: object, item: object) -> float | None:
    """The model's prediction for raw ids, None when either is not known yet."""
    u, i = model.ratings.user_ids.get(user), model.ratings.item_ids.get(item)
    if u is None or i is None:
        return None
    return float(model.predict(torch.tensor([u]), torch.tensor([i]))[0])


def run_size(n: int, trials: int, seed: int) -> dict:
    ratings = dataset(n, seed)
    model = build_model("rec", ratings.n_users, ratings.n_items, ratings.rating_scale, {})
    t0 = time.perf_counter()
    model.prepare(ratings)
    bind_seconds = time.perf_counter() - t0
    model.eval()
    rng = np.random.default_rng(seed)
    users, items = ratings.user_ids.raw_ids, ratings.item_ids.raw_ids
    rated = set(zip(ratings.users[:10000].tolist(), ratings.items[:10000].tolist(), strict=True))
    out: dict = {"ratings": n, "users": ratings.n_users, "items": ratings.n_items,
                 "prepare_seconds": bind_seconds}
    moved = compared = 0
    for kind in KINDS:
        seconds = []
        for t in range(trials):
            if kind == "new rating":
                while True:
                    u, i = int(rng.integers(ratings.n_users)), int(rng.integers(ratings.n_items))
                    if (u, i) not in rated:
                        break
                rated.add((u, i))
                user, item = users[u], items[i]
            elif kind == "replaced rating":
                k = int(rng.integers(min(len(ratings), 10000)))
                user, item = users[ratings.users[k]], items[ratings.items[k]]
            elif kind == "new user":
                user, item = f"bench-user-{t}", items[int(rng.integers(ratings.n_items))]
            else:
                user, item = users[int(rng.integers(ratings.n_users))], f"bench-item-{t}"
            value = float(rng.integers(1, 6))
            before = predict_raw(model, user, item)
            t0 = time.perf_counter()
            model.add_ratings([user], [item], [value])
            seconds.append(time.perf_counter() - t0)
            if before is not None:
                compared += 1
                moved += predict_raw(model, user, item) != before
        out[kind] = percentiles(seconds)
        print(f"  {n:>11,} ratings  {kind:<16} add_ratings p50 {out[kind]['p50_ms']:8.2f} ms  "
              f"p99 {out[kind]['p99_ms']:8.2f} ms", flush=True)
    out["predictions_moved"] = f"{moved} of {compared}"
    # what every insertion cost before: re-sorting the whole graph
    live = model.ratings
    rebuild = []
    for _ in range(3):
        t0 = time.perf_counter()
        ref = EvidenceGraph.build(live, model.prototype_users.cpu().numpy(), model.prototype_items.cpu().numpy(),
                                  seed=model.config.seed)
        rebuild.append(time.perf_counter() - t0)
    graph = model.live()[0]
    out["graph_equals_rebuild"] = all(torch.equal(getattr(graph, f), getattr(ref, f))
                                      for f in ("indptr", "neighbours", "values", "examples", "n_proto", "proto_slot"))
    out["rebuild_seconds"] = float(np.median(rebuild))
    p50 = np.median([out[k]["p50_ms"] for k in KINDS])
    out["rebuild_over_insert_p50"] = float(out["rebuild_seconds"] * 1e3 / p50)
    print(f"  {n:>11,} ratings  rebuild {out['rebuild_seconds'] * 1e3:8.1f} ms  "
          f"({out['rebuild_over_insert_p50']:.0f}x an insertion's p50); grown graph equals a rebuild: "
          f"{out['graph_equals_rebuild']}; predictions moved {out['predictions_moved']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "rec_insert.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [run_size(int(s), args.trials, args.seed) for s in args.sizes.split(",")]
    report = {"benchmark": "rec_insert", "trials": args.trials, "runs": runs,
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": args.threads, "device": "cpu"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
