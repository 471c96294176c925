"""Latency and ingestion rate of the REST service, measured open loop.

Starts `recsys serve` (one uvicorn worker) on a MovieLens-100K model in its own process, then
sends requests at fixed scheduled times (request k at t0 + k/rate) from this process and
counts each latency from its *scheduled* time, so a slow server cannot hide its queue
(closed-loop tools stop sending while the server is slow). Routes measured:

- ``GET /v1/predict?explain=5`` at ``--rate`` requests/s (default 500);
- ``GET /v1/users/{u}/recommendations?k=10&explain=3`` at ``--rate``;
- ``POST /v1/ratings`` in batches of 100 and 1000 from 4 concurrent clients (durable: each
  reply comes after the SQLite commit), ratings/s.

    RECSYS_DATA=../shared/data python benchmarks/serve_latency.py [--model DIR] [--rate 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

RESULTS = Path(__file__).parent / "results"
KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, db: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "RECSYS_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", "serve", "--model", str(model), "--db", str(db),
                             "--port", str(port), "--quiet"], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start")


class Connection:
    """A bare HTTP/1.1 keep-alive connection: a load generator in Python must spend far less
    time per request than the server, and a full client library does not."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def get(self, path: str) -> int:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status


async def open_loop(url: str, paths: list[str], rate: float, seconds: float, connections: int = 64) -> dict:
    """Send GET ``paths[k % len]`` at t0 + k/rate over a pool of keep-alive connections;
    latency from the scheduled time (ms), so time spent waiting for a free connection counts."""
    host, port = url.removeprefix("http://").split(":")
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await Connection.open(host, int(port)))
    n = int(rate * seconds)
    latencies = np.full(n, np.nan)
    statuses: dict[int, int] = {}
    t0 = time.perf_counter() + 0.2

    async def one(k: int) -> None:
        scheduled = t0 + k / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        conn = await pool.get()
        try:
            status = await conn.get(paths[k % len(paths)])
        finally:
            pool.put_nowait(conn)
        latencies[k] = (time.perf_counter() - scheduled) * 1e3
        statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(one(k) for k in range(n)))
    while not pool.empty():
        pool.get_nowait().writer.close()
    done = latencies[~np.isnan(latencies)]
    return {"offered_rps": rate, "requests": n, "connections": connections, "statuses": statuses,
            "p50_ms": float(np.percentile(done, 50)), "p90_ms": float(np.percentile(done, 90)),
            "p99_ms": float(np.percentile(done, 99)), "max_ms": float(done.max())}


async def ingest(url: str, batch: int, clients: int, seconds: float, users: list[str], items: list[str]) -> dict:
    rng = np.random.default_rng(batch)
    sent = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        async def worker(w: int) -> None:
            nonlocal sent
            while time.perf_counter() < stop:
                body = {"ratings": [{"user": users[rng.integers(len(users))], "item": items[rng.integers(len(items))],
                                     "rating": int(rng.integers(1, 6))} for _ in range(batch)]}
                res = await client.post("/v1/ratings", json=body)
                if res.status_code != 200:
                    raise SystemExit(f"ingestion failed: {res.status_code} {res.text[:200]}")
                sent += batch

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        elapsed = time.perf_counter() - start
    return {"batch": batch, "clients": clients, "ratings": sent, "seconds": elapsed, "ratings_per_second": sent / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="artefact directory (default: train MF on ml-100k u1)")
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recsys-serve-bench-"))
    model = args.model
    if model is None:
        model = work / "mf-u1"
        subprocess.run([sys.executable, "-m", "recsys.cli", "train", "--dataset", "ml-100k", "--split", "u1",
                        "--rollback", "--out", str(model), "--quiet"], check=True)
    meta = json.loads((model / "ids.json").read_text())
    users, items = meta["users"], meta["items"]
    proc, url = start_server(model, work / "ratings.db")
    try:
        rng = np.random.default_rng(0)
        predict_paths = [f"/v1/predict?user={users[rng.integers(len(users))]}&item={items[rng.integers(len(items))]}"
                         f"&explain=5" for _ in range(2000)]
        rec_paths = [f"/v1/users/{users[rng.integers(len(users))]}/recommendations?k=10&explain=3" for _ in range(500)]
        asyncio.run(open_loop(url, predict_paths, 100, 2))  # warm-up
        explained = httpx.get(url + predict_paths[0]).json()
        results = {
            "predict_explain": asyncio.run(open_loop(url, predict_paths, args.rate, args.seconds)),
            "recommend_k10_explain": asyncio.run(open_loop(url, rec_paths, args.rate, args.seconds)),
            "ingest": [asyncio.run(ingest(url, b, 4, 5, users, items)) for b in (1, 100, 1000)],
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    out = {"benchmark": "serve_latency", "model": str(model), "workers": 1,
           "explanations_present": explained.get("explanation") is not None,
           "explanation_method": explained.get("explanation_method"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, **results}
    for name in ("predict_explain", "recommend_k10_explain"):
        r = results[name]
        print(f"{name:<24} {r['offered_rps']:.0f} rps: p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
              f"statuses {r['statuses']}")
    for r in results["ingest"]:
        print(f"ingest batch {r['batch']:>5} x {r['clients']} clients: {r['ratings_per_second']:,.0f} ratings/s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_latency.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
