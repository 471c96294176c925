"""Ranking models at scale: fit time and peak memory of each ranker on a synthetic
interaction set (default 10^7 interactions, 60,000 items, Zipf-skewed users and items,
seeded), and the item-item model's limit.

The interactions are `recsys.datasets.synthetic_ratings(n, users, items, user_skew,
item_skew, seed)` (1..5 ratings: explicit-style values, so the rankers' weighting rules
apply; repeated (user, item) pairs are kept as the generator makes them). They are
generated once, saved as ``.npz``, and each model is fitted in its own subprocess, so that
its peak resident memory (``ru_maxrss``) is its own: the report gives the peak, the
resident memory after loading the data, and their difference (what the fit added).
A model that does not finish within ``--timeout`` seconds is reported as such.

EASE: the dense model at 60k items must stop at its memory guard (``max_items``) with a
clear error, and so does the pruned one (``top_k``: it prunes the stored weights, the fit
still inverts the dense Gram matrix); both errors are recorded, with the memory the fit
would need (``recsys.models.ease.model.fit_memory_bytes``). EASE is then measured on the
same number of interactions over smaller catalogues (``--ease-items``) to show where its
limit lies on this machine.

    RECSYS_DATA=/work/shared/data .venv/bin/python benchmarks/ranking_scale.py
    ... --n 1000000 --items 20000          # smaller
    ... --models als,bpr --rankmf-epochs 1 # a subset

Writes ``benchmarks/results/ranking_scale.json`` (after every model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))
from results_file import write_json  # noqa: E402


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------------------- worker
def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Fit one model on the saved interactions, in this (fresh) process."""
    import torch

    from recsys.datasets.synthetic import load_ratings_npz

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    t0 = time.perf_counter()
    data = load_ratings_npz(job["npz"])
    out: dict[str, Any] = {"load_seconds": time.perf_counter() - t0,
                           "rss_after_load_bytes": rss_bytes(),
                           "peak_after_load_bytes": peak_rss_bytes()}
    model_name = job["model"]
    config = job.get("config") or {}
    try:
        if model_name == "implicit-als-direct":
            import implicit
            import scipy.sparse as sp
            from threadpoolctl import threadpool_limits

            x = sp.csr_matrix((np.ones(len(data), np.float32), (data.users, data.items)),
                              shape=(data.n_users, data.n_items))
            x.data[:] = 1.0
            model = implicit.als.AlternatingLeastSquares(**config)
            t0 = time.perf_counter()
            with threadpool_limits(1, "blas"):
                model.fit(x, show_progress=False)
            out["fit_seconds"] = time.perf_counter() - t0
        else:
            from recsys.models import build_model

            model = build_model(model_name, data.n_users, data.n_items, data.rating_scale, config)
            t0 = time.perf_counter()
            summary = model.fit(data, progress=False)
            out["fit_seconds"] = time.perf_counter() - t0
            out["fit_summary"] = {k: v for k, v in (summary or {}).items()
                                  if isinstance(v, int | float | str | bool)}
            out["params"] = model.config_dict()
            users = np.random.default_rng(0).choice(data.n_users, size=1000)
            t0 = time.perf_counter()
            with torch.no_grad():
                for s in range(0, 1000, 100):
                    model.score_all(torch.from_numpy(users[s:s + 100]))
            out["score_1000_users_seconds"] = time.perf_counter() - t0
    except (ValueError, MemoryError, RuntimeError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["fit_added_bytes"] = out["peak_rss_bytes"] - out["rss_after_load_bytes"]
    return out


def run_worker(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout: not finished within {timeout:.0f} s (killed)",
                "wall_seconds": time.perf_counter() - t0}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"error": f"worker exit status {proc.returncode} (killed for memory?): "
                           f"{proc.stderr.strip()[-1500:]}"}
    result["wall_seconds"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------- main
def make_data(n: int, users: int, items: int, seed: int, folder: Path) -> tuple[Path, dict]:
    from recsys.datasets import synthetic_ratings
    from recsys.datasets.synthetic import save_ratings_npz

    t0 = time.perf_counter()
    data = synthetic_ratings(n, users, items, user_skew=1.0, item_skew=1.0, seed=seed,
                             integer_ratings=True)
    info = {"n_interactions": len(data), "n_users": data.n_users, "n_items": data.n_items,
            "users_with_interactions": int((data.user_counts() > 0).sum()),
            "items_with_interactions": int((data.item_counts() > 0).sum()),
            "generate_seconds": time.perf_counter() - t0,
            "generator": f"synthetic_ratings({n}, {users}, {items}, user_skew=1.0, "
                         f"item_skew=1.0, seed={seed}, integer_ratings=True)"}
    path = folder / f"scale_{n}_{users}_{items}_{seed}.npz"
    save_ratings_npz(data, path)
    return path, info


def fmt_bytes(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=10_000_000, help="interactions")
    parser.add_argument("--items", type=int, default=60_000)
    parser.add_argument("--users", type=int, default=None, help="default: n // 50")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="popular,als,bpr,rank-mf,ease",
                        help="our rankers (ease: the guard at --items, then --ease-items)")
    parser.add_argument("--ease-items", default="5000,10000",
                        help="smaller catalogues EASE is measured on (same --n)")
    parser.add_argument("--ease-top-k", type=int, default=200)
    parser.add_argument("--rankmf-epochs", type=int, default=1,
                        help="rank-mf epochs at scale (its fit time is per epoch x epochs)")
    parser.add_argument("--no-implicit-direct", action="store_true",
                        help="skip implicit's ALS called directly (the reference)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument("--out", type=Path, default=RESULTS / "ranking_scale.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from recsys.models.ease.model import EASEConfig, fit_memory_bytes

    users = args.users or max(1, args.n // 50)
    models = [m for m in args.models.split(",") if m]
    report: dict[str, Any] = {
        "benchmark": "ranking_scale",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                    "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "memory_measure": "ru_maxrss of a fresh subprocess per model (peak resident set); "
                          "fit_added = peak - resident after loading the data",
        "timeout_seconds": args.timeout, "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="ranking_scale_") as tmpdir:
        folder = Path(tmpdir)
        path, info = make_data(args.n, users, args.items, args.seed, folder)
        report["data"] = info
        print(f"data: {info}", flush=True)
        jobs: list[tuple[str, dict[str, Any], Path, dict]] = []
        for m in models:
            if m == "ease":
                jobs.append(("ease (dense, defaults)", {"model": "ease", "config": {}}, path, info))
                jobs.append((f"ease (top_k={args.ease_top_k})",
                             {"model": "ease", "config": {"top_k": args.ease_top_k}}, path, info))
            elif m == "rank-mf":
                jobs.append((f"rank-mf ({args.rankmf_epochs} epoch(s))",
                             {"model": "rank-mf", "config": {"epochs": args.rankmf_epochs}},
                             path, info))
            else:
                jobs.append((m, {"model": m, "config": {}}, path, info))
        if not args.no_implicit_direct:
            jobs.append(("implicit ALS direct (factors 64, defaults otherwise)",
                         {"model": "implicit-als-direct", "config": {"factors": 64}}, path, info))
        ease_items = [int(x) for x in args.ease_items.split(",") if x] if "ease" in models else []
        for n_items in ease_items:
            p2, info2 = make_data(args.n, users, n_items, args.seed, folder)
            jobs.append((f"ease (dense, defaults) at {n_items} items",
                         {"model": "ease", "config": {}}, p2, info2))
        report["ease_limit"] = {
            "max_items_default": EASEConfig().max_items,
            "fit_memory_estimate_bytes_at_items": fit_memory_bytes(args.items),
            "rule": "the fit holds three dense n_items^2 float64 matrices (Gram, LU workspace, "
                    "inverse): 24 * n_items^2 bytes; the dense model stores n_items^2 float32",
        }
        for label, job, p, inf in jobs:
            job = {**job, "npz": str(p)}
            print(f"{label}: running ...", flush=True)
            r = run_worker(job, args.timeout)
            r.update(label=label, model=job["model"], config=job["config"],
                     n_interactions=inf["n_interactions"], n_items=inf["n_items"])
            report["results"].append(r)
            if "error" in r:
                print(f"{label}: ERROR {r['error'][:400]}", flush=True)
            else:
                print(f"{label}: fit {r['fit_seconds']:.1f} s, peak {fmt_bytes(r['peak_rss_bytes'])}"
                      f" (fit added {fmt_bytes(r['fit_added_bytes'])})", flush=True)
            write_json(args.out, report)

    print("\n| model | interactions | items | fit s | peak RSS | fit added | note |")
    print("|---|---|---|---|---|---|---|")
    for r in report["results"]:
        fit = f"{r['fit_seconds']:.1f}" if "fit_seconds" in r else "-"
        note = r.get("error", "")[:160]
        print(f"| {r['label']} | {r['n_interactions']:,} | {r['n_items']:,} | {fit} | "
              f"{fmt_bytes(r.get('peak_rss_bytes'))} | {fmt_bytes(r.get('fit_added_bytes'))} | "
              f"{note} |")
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
