"""CPU cost of the service's read path in-process (no HTTP): `Recommender.predict` with
``explain=5`` and `Recommender.recommend` with ``k=10, explain=3``, per call, on the
MovieLens-100K u1 model ``recsys train`` fits by default and (``--ratings 1e7``) on the
synthetic 10^7-rating model `serve_latency.py` builds.

Random users and items over the whole catalogue (the same draws as `serve_latency.py`'s
load). Per route: the first call after loading (caches cold: what the first request after a
start or a reload pays), then the CPU time per call (``time.process_time``: less sensitive to
other processes on a shared machine than wall time) as the best of ``--rounds`` passes over
the draws, and the p50/p99 wall time of single calls. What the HTTP layer adds comes on top
(`serve_latency.py` measures the whole server).

    RECSYS_DATA=../shared/data .venv/bin/python benchmarks/serve_read_path.py [--ratings 1e7]

Writes ``benchmarks/results/serve_read_path.json`` (one entry per model, kept across runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_file import write_json
from serve_latency import synthetic_model, train_u1

from recsys.recommender import Recommender

RESULTS = Path(__file__).parent / "results"


def per_call(fn, args: list, rounds: int) -> dict:
    """First call, best-of-``rounds`` CPU µs per call, and single-call wall p50/p99 (µs)."""
    t = time.perf_counter()
    fn(args[0])
    first = (time.perf_counter() - t) * 1e3
    for a in args[:50]:
        fn(a)
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for a in args:
            fn(a)
        best = min(best, (time.process_time() - t) / len(args) * 1e6)
    wall = []
    for a in args:
        t = time.perf_counter()
        fn(a)
        wall.append((time.perf_counter() - t) * 1e6)
    return {"first_call_ms": first, "cpu_us_per_call": best, "wall_p50_us": float(np.percentile(wall, 50)),
            "wall_p99_us": float(np.percentile(wall, 99)), "calls": len(args)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="artefact folder (default: train MF on ml-100k u1 with defaults)")
    parser.add_argument("--ratings", type=float, help="the synthetic model of this many ratings instead (e.g. 1e7)")
    parser.add_argument("--synthetic-users", type=int, default=200_000)
    parser.add_argument("--synthetic-items", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=1000, help="predict calls per pass (recommend: a third)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.ratings:
        model = synthetic_model(int(args.ratings), args.synthetic_users, args.synthetic_items)
        name = f"synthetic {int(args.ratings):,} ratings"
    else:
        model = args.model or train_u1(Path(tempfile.mkdtemp(prefix="recsys-read-path-")))
        name = "ml-100k u1" if args.model is None else str(args.model)
    started = time.perf_counter()
    rec = Recommender.load(model)
    load_s = time.perf_counter() - started
    ids = json.loads((model / "ids.json").read_text())
    users, items = [str(u) for u in ids["users"]], [str(i) for i in ids["items"]]
    rng = np.random.default_rng(0)
    pairs = [(users[rng.integers(len(users))], items[rng.integers(len(items))]) for _ in range(args.calls)]
    who = [users[rng.integers(len(users))] for _ in range(max(1, args.calls // 3))]
    out = {
        "load_seconds": load_s,
        "predict_explain5": per_call(lambda p: rec.predict(p[0], p[1], explain=5), pairs, args.rounds),
        "predict": per_call(lambda p: rec.predict(p[0], p[1]), pairs, args.rounds),
        "recommend_k10_explain3": per_call(lambda u: rec.recommend(u, 10, explain=3), who, args.rounds),
        "recommend_k10": per_call(lambda u: rec.recommend(u, 10), who, args.rounds),
    }
    for route, r in out.items():
        if isinstance(r, dict):
            print(f"{name}: {route:<24} first {r['first_call_ms']:8.1f} ms  cpu {r['cpu_us_per_call']:8.0f} us/call  "
                  f"wall p50 {r['wall_p50_us']:7.0f}  p99 {r['wall_p99_us']:8.0f} us", flush=True)
    path = RESULTS / "serve_read_path.json"
    results = json.loads(path.read_text()) if path.exists() else {"benchmark": "serve_read_path", "runs": {}}
    results["runs"][name] = {"when": datetime.datetime.now(datetime.UTC).isoformat(), "model": str(model),
                             "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                         "load_average_at_start": os.getloadavg(),
                                         "omp_threads": os.environ.get("OMP_NUM_THREADS")},
                             "command": " ".join(sys.argv), **out}
    write_json(path, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
