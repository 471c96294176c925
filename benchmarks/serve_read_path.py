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

``--asgi``: then the same requests through the service's ASGI app in this process (``GET
/v1/predict?user=&item=&explain=5`` and ``/v1/users/{u}/recommendations?k=10&explain=3`` as
raw ASGI messages, lifespan run, no sockets: what the app costs on top of the model), with
its fast path for plain reads (`api.fast_reads`) and without it (every request through
FastAPI's routing and parameter solving), alternated round by round on the one loaded app:
CPU per request, best and median of ``--rounds`` rounds each.

    RECSYS_DATA=../shared/data .venv/bin/python benchmarks/serve_read_path.py [--ratings 1e7] [--asgi]

Writes ``benchmarks/results/serve_read_path.json`` (one entry per model, kept across runs).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

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


class InProcess:
    """The service's ASGI app driven in this process: lifespan started, then GETs sent as
    raw ASGI messages (the scope uvicorn would build), each answer checked to be a 200."""

    def __init__(self, model: Path, db: Path) -> None:
        from api.app import Settings, create_app

        self.app = create_app(Settings(model=model, db=db))
        self.loop = asyncio.new_event_loop()
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = self.loop.create_task(self.app(scope, self._to_app.get, self._from_app.put))
        self.loop.run_until_complete(self._to_app.put({"type": "lifespan.startup"}))
        started = self.loop.run_until_complete(self._from_app.get())
        if started["type"] != "lifespan.startup.complete":
            raise SystemExit(f"the app did not start: {started}")

    async def _get(self, path: str, query: bytes) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path, "raw_path": quote(path).encode(), "query_string": query,
                 "root_path": "", "headers": [(b"host", b"bench")], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80), "state": {}}
        status = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await self.app(scope, receive, send)
        if status != [200]:
            raise SystemExit(f"GET {path}?{query.decode()} answered {status}")

    def run(self, requests: list[tuple[str, bytes]]) -> float:
        """CPU µs per request (``process_time``) of sending ``requests`` one after another."""
        async def all_of_them() -> None:
            for path, query in requests:
                await self._get(path, query)

        start = time.process_time()
        self.loop.run_until_complete(all_of_them())
        return (time.process_time() - start) / len(requests) * 1e6

    def close(self) -> None:
        self.loop.run_until_complete(self._to_app.put({"type": "lifespan.shutdown"}))
        self.loop.run_until_complete(self._from_app.get())
        self.loop.run_until_complete(self._lifespan)
        self.loop.close()


def through_asgi(model: Path, pairs: list[tuple[str, str]], who: list[str], rounds: int) -> dict:
    """CPU per request through the app with its fast path for plain reads and without,
    alternated round by round (module docstring)."""
    served = InProcess(model, Path(tempfile.mkdtemp(prefix="recsys-read-path-db-")) / "ratings.sqlite3")
    routes = {"predict_explain5": [("/v1/predict", f"user={quote(u)}&item={quote(i)}&explain=5".encode())
                                   for u, i in pairs],
              "recommend_k10_explain3": [(f"/v1/users/{u}/recommendations", b"k=10&explain=3") for u in who]}
    fast = served.app.state.fast_reads
    out: dict = {}
    for name, requests in routes.items():
        for enabled in (False, True):  # a pass each first: caches filled alike
            fast.enabled = enabled
            served.run(requests)
        runs: dict[str, list[float]] = {"fastapi": [], "fast_path": []}
        for _ in range(rounds):
            for mode, enabled in (("fastapi", False), ("fast_path", True)):
                fast.enabled = enabled
                runs[mode].append(served.run(requests))
        out[name] = {mode: {"cpu_us_per_request_best": min(v), "cpu_us_per_request_median": float(np.median(v)),
                            "rounds": v} for mode, v in runs.items()}
        out[name]["requests"] = len(requests)
    served.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="artefact folder (default: train MF on ml-100k u1 with defaults)")
    parser.add_argument("--ratings", type=float, help="the synthetic model of this many ratings instead (e.g. 1e7)")
    parser.add_argument("--synthetic-users", type=int, default=200_000)
    parser.add_argument("--synthetic-items", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=1000, help="predict calls per pass (recommend: a third)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--asgi", action="store_true",
                        help="then through the service's ASGI app, with its fast path for plain reads and without")
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
    if args.asgi:
        del rec  # the app loads its own copy
        gc.collect()
        out["through_asgi"] = through_asgi(model, pairs, who, max(args.rounds, 3))
        for route, r in out["through_asgi"].items():
            print(f"{name}: ASGI {route:<24} " + "  ".join(
                f"{mode} {r[mode]['cpu_us_per_request_best']:6.0f} (median {r[mode]['cpu_us_per_request_median']:6.0f})"
                for mode in ("fastapi", "fast_path")) + " us CPU/request", flush=True)
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
