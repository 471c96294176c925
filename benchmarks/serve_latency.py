"""Latency, ingestion rate and server CPU per request of ``recsys serve``, beside a bare
FastAPI + SQLite app doing the same work (`bare_app.py`), measured open loop in one run.

Servers. ``recsys serve --model M --db D --port P`` is launched as a user would, with its
defaults (its default number of uvicorn workers, the count found recorded; no access log,
its default; its output written to a file), on
a MovieLens-100K u1 model trained with ``recsys train`` defaults (an MF rating model with
the default ranker beside it); then the bare app (``uvicorn bare_app:app --workers N``) with
the same number of workers, on the same artefact, without an access log (the floor). Both
servers run side by side (an idle one costs the other nothing measurable: an idle recsys
server polls its store for about 1 ms of CPU a second) and every phase is measured on one
and then at once on the other, the first alternating between ``--rounds`` rounds (default
2): each ratio pairs measurements seconds apart, not a whole run apart, as the machine's
speed drifts (a bare-app phase measured minutes apart moved by 30-40%). Every round's reads
come first, on the model as loaded, then every round's ingestion (a round's ingestion adds
about 1.3 million ratings to u1's 80,000: reads after it measure another model). Results hold
every round (``rounds``) and, per phase, each round's ratio and their median.

Load. Reads are sent open loop: request ``k`` is scheduled at ``t0 + k/rate`` and its
latency counted from that *scheduled* time, so a server that falls behind cannot hide its
queue (closed-loop tools stop sending while the server is slow). The load comes from
``--generators`` processes (default 2; request ``k`` goes to process ``k mod G``), each an
asyncio loop (uvloop when installed) over ``--connections`` keep-alive HTTP/1.1 connections
written with raw sockets and pre-encoded requests (a client library costs more CPU per
request than the server being measured). Waiting for a free connection counts in the
latency. Each phase records the offered and achieved rate, the generators' send lag (how
late the generator queued a request for sending after its scheduled time: when it is large
the generator, not the server, is the bottleneck), p50/p90/p99/max latency, statuses, and the CPU the server processes
(uvicorn's supervisor and every worker: ``utime + stime`` of ``/proc/<pid>/stat``, before
and after the phase) and the generators used, per request.

Phases (users and items drawn uniformly from the whole catalogue):
``GET /v1/predict?explain=5`` at 250, 500 and 1000 requests/s;
``GET /v1/users/{u}/recommendations?k=10&explain=3`` at 500 requests/s;
``POST /v1/ratings`` with 1, 100 and 1000 ratings per POST from ``--clients`` (default 4)
concurrent closed-loop clients, ratings/s with every reply coming after the durable commit.
After each ingestion phase the benchmark checks that the ratings were *applied*: every user
the phase rated is asked for (``GET /v1/users/{u}``, several times over fresh connections so
every worker is asked) until its ``n_live_ratings`` equals what was sent (recsys only: the bare
app keeps its live ratings per worker), and records how long that took.

``--ratings 1e7`` builds (or reuses, from the recsys cache folder) a synthetic set of that
many distinct (user, item) ratings (`recsys.datasets.synthetic_ratings`, Zipf-skewed users
and items, integer 1..5 ratings; 200,000 users x 10,000 items by default: EASE, the default
ranker, holds items² weights), trains it with ``recsys train --ratings FILE`` defaults (about
10 minutes on 2 cores, once), and runs the same phases on it.

    RECSYS_DATA=../shared/data .venv/bin/python benchmarks/serve_latency.py
    ... --seconds 3 --only recsys            # a short smoke run, no bare app
    ... --ratings 1e7                        # the 10^7-rating model

Writes ``benchmarks/results/serve_latency.json`` (``serve_latency_1e7.json`` with
``--ratings 1e7``; ``--out`` to choose), with the machine's CPU count and the load average at
the start (the figures are only as quiet as the machine was).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_file import write_json

RESULTS = Path(__file__).parent / "results"
HERE = Path(__file__).parent
KEY = "bench-key"
PREDICT_RATES = (250, 500, 1000)
RECOMMEND_RATE = 500
INGEST_BATCHES = (1, 100, 1000)


# ---------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid: int) -> int:
    """``utime + stime`` of one process (all its threads), in clock ticks; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(fields[11]) + int(fields[12])


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (uvicorn's supervisor, its workers, their helpers)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    out, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, p in parent.items() if p in frontier]
        out += frontier
    return out


class Server:
    """A server process tree: start, wait for ``/ready``, CPU of the tree, stop."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.port, self.log = name, port, log
        with open(log, "ab") as out:  # the server's own output (access log and all) goes to a file
            self.proc = subprocess.Popen(command, env={**os.environ, **env}, cwd=str(HERE.parent),
                                         start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        self.started = time.perf_counter()
        self.ready_seconds = self._wait_ready()
        self.pids = descendants(self.proc.pid)
        self.settled_seconds = self._wait_settled()
        #: processes that serve requests: those with a listening or accepted socket's worker
        #: role are not visible from /proc cheaply, so: the leaves of the tree (with one
        #: worker, the server process itself)
        self.workers = self._count_workers()

    def _wait_ready(self, timeout: float = 900) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise SystemExit(f"{self.name} exited with status {self.proc.returncode} before it was ready:\n{tail}")
            try:
                status, _ = http_get("127.0.0.1", self.port, "/ready", timeout=2)
                if status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{self.name} was not ready within {timeout:.0f} s")

    def _wait_settled(self, idle_share: float = 0.1, timeout: float = 900) -> float:
        """Seconds from the start until the server tree used under ``idle_share`` of a core
        over a second: ``/ready`` answers as soon as one worker is up (a worker still loading
        accepts no connection), so this waits for the others to finish loading too."""
        deadline = time.perf_counter() + timeout
        before = self.cpu_seconds()
        while time.perf_counter() < deadline:
            time.sleep(1.0)
            now = self.cpu_seconds()
            if now - before < idle_share:
                break
            before = now
        return time.perf_counter() - self.started

    def _count_workers(self) -> int:
        """uvicorn's worker processes: python children of the supervisor that are not
        multiprocessing's resource tracker (one worker: the supervisor itself serves)."""
        kids = []
        for pid in self.pids[1:]:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except FileNotFoundError:
                continue
            if "resource_tracker" not in cmd and "semaphore_tracker" not in cmd:
                kids.append(pid)
        return max(1, len(kids))

    def cpu_seconds(self) -> float:
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[int, float]:
        """CPU seconds so far of each process of the tree (supervisor, workers)."""
        self.pids = descendants(self.proc.pid) if self.proc.poll() is None else self.pids
        tick = os.sysconf("SC_CLK_TCK")
        return {p: cpu_ticks(p) / tick for p in self.pids}

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except FileNotFoundError:
                continue
        return total / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.pids[1:]:  # a worker the supervisor left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_recsys(model: Path, db: Path, extra: tuple[str, ...] = ()) -> Server:
    """``recsys serve`` with its defaults, as a user starts it (its output written to ``db``'s
    folder; ``extra``: more flags, e.g. for a profile)."""
    port = free_port()
    return Server("recsys serve", [sys.executable, "-m", "recsys.cli", "serve", "--model", str(model), "--db", str(db),
                                   "--port", str(port), *extra], {"RECSYS_API_KEY": KEY}, port,
                  db.with_name("recsys-serve.log"))


def start_bare(model: Path, db: Path, workers: int) -> Server:
    port = free_port()
    return Server("bare app", [sys.executable, "-m", "uvicorn", "bare_app:app", "--app-dir", str(HERE),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                               "--log-level", "warning", "--no-access-log"],
                  {"BARE_MODEL": str(model), "BARE_DB": str(db)}, port, db.with_name("bare-app.log"))


# ---------------------------------------------------------------------------- HTTP
def http_get(host: str, port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    """One GET over a fresh connection (set-up and checks, not the measured load)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head[9:12]), body


def get_request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


def post_request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response (Content-Length or chunked body); returns its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(length)
    return status


# ---------------------------------------------------------------------------- open loop
def _install_fast_loop() -> None:
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


async def _open_loop_share(port: int, requests: list[bytes], rate: float, t0: float, share: int, of: int,
                           connections: int, deadline: float) -> dict:
    """Send requests ``k ≡ share (mod of)`` at ``t0 + k/rate``; latencies (ms) from the
    scheduled times, send lags (ms), statuses."""
    mine = np.arange(share, len(requests), of)
    latency = np.full(len(mine), np.nan)
    lag = np.full(len(mine), np.nan)
    statuses: dict[int, int] = {}
    errors = 0
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]

    async def connection(c: int) -> None:
        nonlocal errors
        reader, writer = conns[c]
        while (j := await queue.get()) is not None:
            k = int(mine[j])
            scheduled = t0 + k / rate
            try:
                writer.write(requests[k])
                status = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError):  # closed by the server: counted, reopened
                errors += 1
                status = 0
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            latency[j] = (time.perf_counter() - scheduled) * 1e3
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    async def schedule() -> None:
        for j, k in enumerate(mine.tolist()):
            delay = t0 + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag[j] = (time.perf_counter() - t0 - k / rate) * 1e3  # the generator's own lateness
            queue.put_nowait(j)
        for _ in range(connections):
            queue.put_nowait(None)

    cpu_start = cpu_ticks(os.getpid())
    tasks = [asyncio.create_task(connection(c)) for c in range(connections)]
    try:
        await asyncio.wait_for(asyncio.gather(schedule(), *tasks), timeout=max(1.0, deadline - time.perf_counter()))
    except TimeoutError:
        for t in tasks:
            t.cancel()
    cpu = (cpu_ticks(os.getpid()) - cpu_start) / os.sysconf("SC_CLK_TCK")
    return {"latency": latency, "lag": lag, "statuses": statuses, "errors": errors, "cpu": cpu}


def _generator_process(port: int, requests: list[bytes], rate: float, t0: float, share: int, of: int,
                       connections: int, deadline: float, nice: int, cpus: list[int] | None, out: mp.Queue) -> None:
    if nice:
        os.nice(nice)
    if cpus:
        os.sched_setaffinity(0, cpus)
    _install_fast_loop()
    result = asyncio.run(_open_loop_share(port, requests, rate, t0, share, of, connections, deadline))
    out.put((share, result, result.pop("cpu")))


def cpu_split(server: Server, before: dict[int, float]) -> list[float]:
    """CPU seconds each process of the server used since ``before`` (`Server.cpu_by_process`),
    largest first: how the clients' connections landed on the workers (all on one worker
    leaves the other core to the follower) shows in it."""
    now = server.cpu_by_process()
    return sorted((round(now[p] - before.get(p, 0.0), 3) for p in now), reverse=True)


def open_loop(server: Server, paths: list[str], rate: float, seconds: float, *, generators: int,
              connections: int, nice: int = 0, cpus: list[int] | None = None, grace: float = 30.0) -> dict:
    """One open-loop phase: ``rate · seconds`` GETs of ``paths`` (cycled), spread over
    ``generators`` processes; the server's CPU per request over the phase."""
    n = int(rate * seconds)
    requests = [get_request(paths[k % len(paths)]) for k in range(n)]
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    t0 = time.perf_counter() + 0.5 + 0.05 * generators
    deadline = t0 + seconds + grace
    cpu_before = server.cpu_by_process()
    procs = [ctx.Process(target=_generator_process,
                         args=(server.port, requests, rate, t0, g, generators, connections, deadline, nice, cpus, out))
             for g in range(generators)]
    for p in procs:
        p.start()
    parts = sorted((out.get() for _ in procs), key=lambda x: x[0])
    for p in procs:
        p.join()
    by_process = cpu_split(server, cpu_before)
    server_cpu = sum(by_process)
    latency = np.concatenate([r["latency"] for _, r, _ in parts])
    lag = np.concatenate([r["lag"] for _, r, _ in parts])
    statuses: dict[str, int] = {}
    for _, r, _ in parts:
        for s, c in r["statuses"].items():
            statuses[str(s)] = statuses.get(str(s), 0) + c
    done = latency[~np.isnan(latency)]
    # the last reply's time: t0 + the largest (scheduled offset + latency)
    k = np.concatenate([np.arange(g, n, generators) for g in range(generators)])
    finish = np.nanmax(k / rate + latency / 1e3) if len(done) else seconds
    unfinished = n - len(done)
    # a request never answered counts with the whole deadline as its latency (a lower bound)
    full = np.where(np.isnan(latency), (deadline - t0 - k / rate) * 1e3, latency)
    ok = sum(c for s, c in statuses.items() if s.startswith("2"))
    return {"offered_rps": rate, "seconds": seconds, "requests": n, "answered": int(len(done)),
            "unfinished": int(unfinished), "ok": ok, "statuses": statuses,
            "connection_errors": int(sum(r["errors"] for _, r, _ in parts)),
            "achieved_rps": float(len(done) / max(seconds, finish)),
            "p50_ms": float(np.percentile(full, 50)), "p90_ms": float(np.percentile(full, 90)),
            "p99_ms": float(np.percentile(full, 99)), "max_ms": float(full.max()),
            "send_lag_p50_ms": float(np.nanpercentile(lag, 50)) if np.isfinite(lag).any() else None,
            "send_lag_p99_ms": float(np.nanpercentile(lag, 99)) if np.isfinite(lag).any() else None,
            "server_cpu_seconds": server_cpu, "server_cpu_seconds_by_process": by_process,
            "server_cores_busy": server_cpu / max(seconds, finish),
            "server_cpu_us_per_request": server_cpu / max(1, len(done)) * 1e6,
            "generator_cpu_us_per_request": sum(c for _, _, c in parts) / max(1, len(done)) * 1e6,
            "generators": generators, "connections_per_generator": connections}


# ---------------------------------------------------------------------------- ingestion
async def _ingest_clients(port: int, bodies: list[bytes], clients: int, seconds: float) -> tuple[list[int], list]:
    """Closed loop: each client posts the next body as soon as its previous reply came."""
    sent_idx: list[int] = []
    latencies: list[float] = []
    failures: list[str] = []
    next_body = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal next_body
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop and not failures:
            b = next_body % len(bodies)
            next_body += 1
            start = time.perf_counter()
            writer.write(bodies[b])
            status = await read_response(reader)
            if status != 200:
                failures.append(f"status {status}")
                break
            latencies.append(time.perf_counter() - start)
            sent_idx.append(b)
        writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    if failures:
        raise SystemExit(f"ingestion failed: {failures[0]}")
    return sent_idx, latencies


def ingest(server: Server, batch: int, clients: int, seconds: float, users: list[str], items: list[str],
           rng: np.random.Generator, *, check_applied: bool) -> dict:
    """POST batches of ``batch`` ratings by random users (a pool of ≤200, spread over the
    catalogue) on random items for ``seconds``; ratings/s, POST latency, server CPU, and
    whether every rating was applied (each user's ``n_live_ratings`` grew by what was sent)."""
    pool = rng.choice(len(users), size=min(200, len(users)), replace=False)
    n_bodies = max(8, min(4000, 400_000 // batch))
    bodies, per_body = [], []
    for _ in range(n_bodies):
        us = pool[rng.integers(len(pool), size=batch)]
        its = rng.integers(len(items), size=batch)
        vals = rng.integers(1, 6, size=batch)
        doc = {"ratings": [{"user": users[u], "item": items[i], "rating": float(v)}
                           for u, i, v in zip(us.tolist(), its.tolist(), vals.tolist(), strict=True)]}
        bodies.append(post_request("/v1/ratings", json.dumps(doc, separators=(",", ":")).encode()))
        per_body.append(np.bincount(np.searchsorted(np.sort(pool), us), minlength=len(pool)))
    before = live_counts(server, [users[u] for u in np.sort(pool)]) if check_applied else None
    cpu_before = server.cpu_by_process()
    start = time.perf_counter()
    _install_fast_loop()
    sent_idx, lat = asyncio.run(_ingest_clients(server.port, bodies, clients, seconds))
    elapsed = time.perf_counter() - start
    by_process = cpu_split(server, cpu_before)
    server_cpu = sum(by_process)
    n = len(sent_idx) * batch
    out = {"batch": batch, "clients": clients, "posts": len(sent_idx), "ratings": n, "seconds": elapsed,
           "ratings_per_second": n / elapsed, "posts_per_second": len(sent_idx) / elapsed,
           "post_p50_ms": float(np.percentile(lat, 50) * 1e3), "post_p99_ms": float(np.percentile(lat, 99) * 1e3),
           "server_cpu_us_per_post": server_cpu / max(1, len(sent_idx)) * 1e6,
           "server_cpu_us_per_rating": server_cpu / max(1, n) * 1e6, "server_cores_busy": server_cpu / elapsed,
           "server_cpu_seconds_by_process": by_process}
    if check_applied:
        expected = before + sum(per_body[b] for b in sent_idx)
        out.update(applied_check(server, [users[u] for u in np.sort(pool)], expected))
    return out


def live_counts(server: Server, users: list[str]) -> np.ndarray:
    counts = []
    for u in users:
        status, body = http_get("127.0.0.1", server.port, f"/v1/users/{u}")
        counts.append(json.loads(body)["n_live_ratings"] if status == 200 else 0)
    return np.asarray(counts)


def applied_check(server: Server, users: list[str], expected: np.ndarray, timeout: float = 30.0,
                  rounds: int = 4) -> dict:
    """Ask for every user over fresh connections (so each worker is asked, ``rounds`` times)
    until all agree with ``expected``; how long that took and what was missing."""
    start = time.perf_counter()
    missing = None
    while time.perf_counter() - start < timeout:
        missing = max(int((expected - live_counts(server, users)).clip(min=0).sum()) for _ in range(rounds))
        if missing == 0:
            return {"applied": True, "applied_after_s": time.perf_counter() - start}
        time.sleep(0.2)
    return {"applied": False, "missing_after_timeout": missing}


# ---------------------------------------------------------------------------- models
def train_u1(folder: Path) -> Path:
    model = folder / "mf-u1"
    subprocess.run([sys.executable, "-m", "recsys.cli", "train", "--dataset", "ml-100k", "--split", "u1",
                    "--out", str(model), "--quiet"], check=True, cwd=str(HERE.parent), stdout=subprocess.DEVNULL)
    return model


def synthetic_model(n_ratings: int, n_users: int, n_items: int) -> Path:
    """A ``recsys train`` default model on ``n_ratings`` synthetic ratings, cached in the
    recsys cache folder (data file and artefact; rebuilt when missing)."""
    from recsys.datasets import cache_home, synthetic_ratings

    folder = cache_home() / "serve_latency"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"synthetic-unique-{n_ratings}-{n_users}x{n_items}-s0"
    data, model = folder / f"{stem}.parquet", folder / f"{stem}-model"
    if not data.exists():
        import pandas as pd

        # the generator repeats (user, item) pairs, which training keeps once: draw 3x as many
        # and keep the first n_ratings distinct pairs, so the model holds n_ratings ratings
        r = synthetic_ratings(3 * n_ratings, n_users, n_items, integer_ratings=True, seed=0)
        first = np.sort(np.unique(r.users * n_items + r.items, return_index=True)[1])
        if len(first) < n_ratings:
            raise SystemExit(f"only {len(first):,} distinct pairs among {3 * n_ratings:,} synthetic ratings; "
                             f"raise --synthetic-users or --synthetic-items")
        keep = first[:n_ratings]
        frame = pd.DataFrame({"user": r.user_ids.raw_ids[r.users[keep]], "item": r.item_ids.raw_ids[r.items[keep]],
                              "rating": r.values[keep]})
        del r
        frame.to_parquet(data.with_suffix(".tmp"), index=False)
        data.with_suffix(".tmp").replace(data)
    if not (model / "model.json").exists():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "recsys.cli", "train", "--ratings", str(data),
                        "--out", str(model), "--quiet"], check=True, cwd=str(HERE.parent))
        print(f"trained {model} in {time.perf_counter() - started:.0f} s", flush=True)
    return model


# ---------------------------------------------------------------------------- run
def read_paths(users: list[str], items: list[str]) -> tuple[list[str], list[str]]:
    """The explained predictions and recommendations every server is asked for (seeded)."""
    rng = np.random.default_rng(0)
    predict_paths = [f"/v1/predict?user={users[rng.integers(len(users))]}&item={items[rng.integers(len(items))]}"
                     f"&explain=5" for _ in range(20_000)]
    rec_paths = [f"/v1/users/{users[rng.integers(len(users))]}/recommendations?k=10&explain=3"
                 for _ in range(10_000)]
    return predict_paths, rec_paths


def load_options(args: argparse.Namespace) -> dict:
    return {"generators": args.generators, "connections": args.connections, "nice": args.generator_nice,
            "cpus": args.generator_cpus}


def warm_up(server: Server, users: list[str], items: list[str], args: argparse.Namespace) -> dict:
    """A sample answer, then ``--warmup`` seconds of each read route; what the server is."""
    predict_paths, rec_paths = read_paths(users, items)
    status, body = http_get("127.0.0.1", server.port, predict_paths[0])
    sample = json.loads(body) if status == 200 else {"status": status, "body": body[:300].decode(errors="replace")}
    warm_started = time.perf_counter()
    open_loop(server, predict_paths[::-1], 100, args.warmup, **load_options(args))
    open_loop(server, rec_paths[::-1], 50, args.warmup, **load_options(args))
    return {"workers": server.workers, "ready_seconds": server.ready_seconds,
            "all_workers_loaded_seconds": server.settled_seconds,
            "warmup_seconds": time.perf_counter() - warm_started,
            "explanation_present": sample.get("explanation") is not None,
            "explanation_method": sample.get("explanation_method")}


def phases(args: argparse.Namespace) -> list[tuple[str, float]]:
    """Every measured phase in order: ``(kind, rate or ratings per POST)``."""
    out = [("predict", rate) for rate in args.predict_rates] + [("recommend", args.recommend_rate)]
    return out + [("ingest", batch) for batch in (args.batches if args.ingest_seconds > 0 else ())]


def run_phase(server: Server, kind: str, value: float, round_no: int, users: list[str], items: list[str],
              args: argparse.Namespace, *, check_applied: bool) -> dict:
    """One phase on one server; the ingestion bodies depend only on the round and the batch,
    so the two servers of a round are sent the same ratings."""
    predict_paths, rec_paths = read_paths(users, items)
    if kind == "ingest":
        rng = np.random.default_rng([round_no, int(value)])
        r = ingest(server, int(value), args.clients, args.ingest_seconds, users, items, rng,
                   check_applied=check_applied)
        print(f"  {server.name:<13} ingest {int(value):>4}/POST x{r['clients']}: {r['ratings_per_second']:>9,.0f} "
              f"ratings/s  POST p99 {r['post_p99_ms']:6.1f} ms  cpu {r['server_cpu_us_per_rating']:7.1f} us/rating"
              + (f"  applied {r.get('applied')}" if check_applied else "")
              + f"  cpu s by process {r['server_cpu_seconds_by_process']}", flush=True)
        return r
    paths = predict_paths if kind == "predict" else rec_paths
    r = open_loop(server, paths, value, args.seconds, **load_options(args))
    report(server.name, f"{'predict explain=5' if kind == 'predict' else 'recommend k10 e3'} @{value:g}", r)
    return r


def empty_round() -> dict:
    return {"predict_explain": [], "recommend_k10_explain3": None, "ingest": []}


def record(into: dict, kind: str, r: dict) -> None:
    if kind == "predict":
        into["predict_explain"].append(r)
    elif kind == "recommend":
        into["recommend_k10_explain3"] = r
    else:
        into["ingest"].append(r)


def round_ratios(ours: dict, bare: dict) -> dict:
    """recsys over bare, phase by phase, within one round."""
    return {"predict_explain_cpu_per_request": [ratio(a["server_cpu_us_per_request"], b["server_cpu_us_per_request"])
                                                for a, b in zip(ours["predict_explain"], bare["predict_explain"],
                                                                strict=True)],
            "recommend_cpu_per_request": ratio(ours["recommend_k10_explain3"]["server_cpu_us_per_request"],
                                               bare["recommend_k10_explain3"]["server_cpu_us_per_request"])
            if ours["recommend_k10_explain3"] and bare["recommend_k10_explain3"] else None,
            "ingest_rate_bare_over_recsys": [ratio(b["ratings_per_second"], a["ratings_per_second"])
                                             for a, b in zip(ours["ingest"], bare["ingest"], strict=True)]}


def median_ratios(per_round: list[dict]) -> dict:
    """Each ratio's median over the rounds (the mean of the two middle ones for an even count)."""
    def med(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    first = per_round[0]
    return {"predict_explain_cpu_per_request": [med([r["predict_explain_cpu_per_request"][k] for r in per_round])
                                                for k in range(len(first["predict_explain_cpu_per_request"]))],
            "recommend_cpu_per_request": med([r["recommend_cpu_per_request"] for r in per_round]),
            "ingest_rate_bare_over_recsys": [med([r["ingest_rate_bare_over_recsys"][k] for r in per_round])
                                             for k in range(len(first["ingest_rate_bare_over_recsys"]))]}


def report(name: str, what: str, r: dict) -> None:
    print(f"  {name:<13} {what:<24} achieved {r['achieved_rps']:6.0f} rps  p50 {r['p50_ms']:7.1f}  "
          f"p99 {r['p99_ms']:8.1f}  max {r['max_ms']:8.1f} ms  cpu {r['server_cpu_us_per_request']:6.0f} us/req  "
          f"({r['server_cores_busy']:.2f} cores; generators {r['generator_cpu_us_per_request']:.0f} us/req, "
          f"send lag p99 {r['send_lag_p99_ms'] or 0:.1f} ms)  statuses {r['statuses']}", flush=True)


def ratio(ours: float | None, bare: float | None) -> float | None:
    return None if not ours or not bare else ours / bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="artefact folder (default: train MF on ml-100k u1 with defaults)")
    parser.add_argument("--ratings", type=float, help="a synthetic model of this many ratings instead (e.g. 1e7)")
    parser.add_argument("--synthetic-users", type=int, default=200_000)
    parser.add_argument("--synthetic-items", type=int, default=10_000,
                        help="catalogue of the synthetic model (EASE, the default ranker, holds items² weights)")
    parser.add_argument("--only", choices=("both", "recsys", "bare"), default="both")
    parser.add_argument("--workers", type=int, help="bare app workers (default: as many as recsys serve runs)")
    parser.add_argument("--seconds", type=float, default=10, help="seconds per read phase")
    parser.add_argument("--ingest-seconds", type=float, default=5)
    parser.add_argument("--warmup", type=float, default=3, help="seconds of warm-up load per read route")
    parser.add_argument("--predict-rates", type=lambda s: [float(x) for x in s.split(",")],
                        default=list(PREDICT_RATES))
    parser.add_argument("--recommend-rate", type=float, default=RECOMMEND_RATE)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=list(INGEST_BATCHES))
    parser.add_argument("--clients", type=int, default=4, help="concurrent ingestion clients")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections per generator")
    parser.add_argument("--generator-nice", type=int, default=0, help="niceness of the generator processes")
    parser.add_argument("--generator-cpus", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="pin the generator processes to these CPUs (e.g. 0); default: unpinned")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of every phase; each phase runs on both servers back to back, the first "
                             "server alternating between rounds")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (model, stores, server logs)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="recsys-serve-bench-"))
    if args.ratings:
        model = synthetic_model(int(args.ratings), args.synthetic_users, args.synthetic_items)
    else:
        model = args.model or train_u1(work)
    ids = json.loads((model / "ids.json").read_text())
    users, items = [str(u) for u in ids["users"]], [str(i) for i in ids["items"]]
    out_path = args.out or RESULTS / ("serve_latency.json" if not args.ratings else
                                      f"serve_latency_{args.ratings:.0e}".replace("+0", "") + ".json")
    result: dict = {"benchmark": "serve_latency", "when": datetime.datetime.now(datetime.UTC).isoformat(),
                    "command": " ".join(sys.argv), "model": str(model),
                    "model_ratings": int(args.ratings) if args.ratings else "ml-100k u1 training fold",
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "load_average_at_start": os.getloadavg(), "device": "cpu"},
                    "load": {"open_loop": True, "latency_from": "scheduled send time",
                             "generators": args.generators, "connections_per_generator": args.connections,
                             "generator_nice": args.generator_nice, "generator_cpus": args.generator_cpus,
                             "ingest_clients": args.clients}}
    servers: dict[str, Server] = {}
    try:
        if args.only in ("both", "recsys"):
            print(f"recsys serve on {model}", flush=True)
            servers["recsys"] = start_recsys(model, work / "recsys.sqlite3")
            print(f"  ready in {servers['recsys'].ready_seconds:.1f} s, all workers loaded in "
                  f"{servers['recsys'].settled_seconds:.1f} s, {servers['recsys'].workers} worker(s)", flush=True)
        if args.only in ("both", "bare"):
            workers = args.workers or (servers["recsys"].workers if "recsys" in servers else os.cpu_count() or 1)
            print(f"bare app, {workers} worker(s)", flush=True)
            servers["bare"] = start_bare(model, work / "bare.sqlite3", workers)
        for name, server in servers.items():
            result[name] = warm_up(server, users, items, args)
        names = list(servers)
        result["rounds"] = [{name: empty_round() for name in names} for _ in range(args.rounds)]
        # every round's reads first, on the model as loaded; then every round's ingestion (which
        # grows the model: reads after it would measure another model than the first round's)
        for group in ("reads", "ingest"):
            for round_no in range(args.rounds):
                order = names if round_no % 2 == 0 else names[::-1]  # who goes first alternates
                print(f"{group}, round {round_no + 1} of {args.rounds} ({' then '.join(order)} in each phase)",
                      flush=True)
                for kind, value in phases(args):
                    if (kind == "ingest") != (group == "ingest"):
                        continue
                    for name in order:
                        record(result["rounds"][round_no][name], kind,
                               run_phase(servers[name], kind, value, round_no, users, items, args,
                                         check_applied=name == "recsys"))
        for name, server in servers.items():
            result[name]["rss_mib"] = server.rss_mib()
    finally:
        for server in servers.values():
            server.stop()
    if "recsys" in servers and "bare" in servers:
        per_round = [round_ratios(r["recsys"], r["bare"]) for r in result["rounds"]]
        result["ratios_recsys_over_bare"] = {"per_round": per_round, "median": median_ratios(per_round)}
        for k, r in enumerate(per_round):
            print(f"round {k + 1}: recsys / bare server CPU per predict+explain request:",
                  ", ".join(f"{x:.2f}" for x in r["predict_explain_cpu_per_request"] if x is not None),
                  "; bare / recsys ingestion rate:",
                  ", ".join(f"{x:.2f}" for x in r["ingest_rate_bare_over_recsys"] if x is not None))
    write_json(out_path, result)
    print(f"wrote {out_path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
