"""Size, cost and accuracy of MF's default (compact) gradient-rollback log (issue 22).

Two parts, both at the default configs (`MFConfig()`, `TrainConfig(patience=None)`: D=128 in
4 blocks, 32 epochs of the compiled SGD kernel, one thread):

- ``u1``: on MovieLens-100K u1, the compact log against the exact log of the same training:
  relative error of the reconstructed updates Δ_z (factor and bias parts, every example) and
  of the rollback effects of ``--pairs`` test predictions (all their candidates): relative
  error, Spearman per prediction, same top-1.
- ``scale``: on ``--n`` synthetic ratings (`recsys.datasets.synthetic_ratings`, Zipf skew 1,
  ``--users`` x ``--items``, seed 0), fits without and with the log, alternating, each in a
  fresh process: wall and CPU seconds of `Trainer.fit`, peak resident memory of the process
  and its resident memory before the fit, and the bytes of the saved log inside an artefact
  (``rollback.safetensors``) per training rating.

Runs against whichever ``recsys`` is on the path, so the same script measures the code before
a change (``--label before``, with an older checkout first on ``PYTHONPATH``) and after; each
run updates its label's entry of ``benchmarks/results/rollback_log_size.json``.

    RECSYS_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/rollback_log_size.py [--part u1|scale|both]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "rollback_log_size.json"


def _fit(train, mode: str | None, epochs: int | None = None):
    """One default fit (no early stopping); ``mode`` None: no log. Returns (model, log, wall s, CPU s)."""
    from recsys.explain.rollback import RollbackCallback
    from recsys.models.mf import MatrixFactorization, MFConfig
    from recsys.train import TrainConfig, Trainer

    model = MatrixFactorization(train.n_users, train.n_items, train.rating_scale, MFConfig())
    callbacks = [] if mode is None else [RollbackCallback(mode=mode)]
    config = TrainConfig(patience=None, progress=False, threads=1, **({} if epochs is None else {"epochs": epochs}))
    t0, c0 = time.perf_counter(), time.process_time()
    Trainer(config, callbacks=callbacks).fit(model, train)
    return model, (callbacks[0].log if callbacks else None), time.perf_counter() - t0, time.process_time() - c0


def quality(n_pairs: int) -> dict:
    """Part ``u1``: the compact log against the exact log of the same training."""
    from rollback_faithfulness import compare_logs

    from recsys.datasets import load_split

    train, test = load_split("ml-100k", "u1")
    model, exact, _, _ = _fit(train, "exact")
    _, compact, _, _ = _fit(train, "compact")
    compared = compare_logs(model, train, test, exact, compact, n_pairs, chunk=4096)
    with tempfile.TemporaryDirectory() as tmp:
        from recsys.artefact import save_artefact

        save_artefact(Path(tmp) / "m", model, train, rollback=compact)
        saved = (Path(tmp) / "m" / "rollback.safetensors").stat().st_size
    return {"dataset": "ml-100k u1", "n_train": len(train), **compared,
            "compact_saved_bytes_per_rating": saved / len(train),
            "compact_memory_bytes_per_rating": compact.nbytes / len(train),
            "exact_memory_bytes_per_rating": exact.nbytes / len(train)}


def _synthetic(n: int, users: int, items: int):
    """``n`` synthetic ratings, cached as .npz under `cache_home()` (generated once)."""
    from recsys.datasets import cache_home, load_ratings_npz, save_ratings_npz, synthetic_ratings

    path = cache_home() / "synthetic" / f"zipf-{n}-{users}x{items}-s0.npz"
    if path.is_file():
        return load_ratings_npz(path)
    ratings = synthetic_ratings(n, users, items, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_ratings_npz(ratings, path)
    return ratings


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(n: int, users: int, items: int, mode: str, epochs: int | None) -> dict:
    """One fit in this (fresh) process; the figures as a dict."""
    train = _synthetic(n, users, items)
    before = _rss_bytes()
    model, log, wall, cpu = _fit(train, None if mode == "plain" else mode, epochs)
    out = {"mode": mode, "wall_seconds": wall, "cpu_seconds": cpu, "rss_before_fit_bytes": before,
           "peak_rss_after_fit_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if log is not None:
        from recsys.artefact import save_artefact

        with tempfile.TemporaryDirectory(dir=os.environ.get("RECSYS_BENCH_TMP")) as tmp:
            path = save_artefact(Path(tmp) / "m", model, train, rollback=log)
            sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
        out.update(log_memory_bytes=log.nbytes, saved_bytes=sizes,
                   log_saved_bytes_per_rating=sizes["rollback.safetensors"] / len(train),
                   log_memory_bytes_per_rating=log.nbytes / len(train),
                   artefact_bytes=sum(sizes.values()), knots=getattr(log, "knot_passes", None))
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # saving included
    return out


def scale(n: int, users: int, items: int, reps: int, epochs: int | None) -> dict:
    """Part ``scale``: plain and logged fits alternating, each in a fresh process."""
    _synthetic(n, users, items)  # generate once, outside the timed children
    runs = []
    for rep in range(reps):
        for mode in (("plain", "compact") if rep % 2 == 0 else ("compact", "plain")):
            cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--users", str(users),
                   "--items", str(items)] + ([] if epochs is None else ["--epochs", str(epochs)])
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"  {mode:<8} {res['wall_seconds']:7.1f} s wall {res['cpu_seconds']:7.1f} s CPU, "
                  f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB"
                  + (f" ({res['peak_rss_after_fit_bytes'] / 2**30:.2f} GiB after the fit)" if "peak_rss_after_fit_bytes" in res else "")
                  + (f", log {res['log_saved_bytes_per_rating']:.1f} B/rating saved" if mode != "plain" else ""),
                  flush=True)
            runs.append(res)
    med = {m: {k: float(np.median([r[k] for r in runs if r["mode"] == m]))
               for k in ("wall_seconds", "cpu_seconds", "peak_rss_bytes", "rss_before_fit_bytes")
               + (("peak_rss_after_fit_bytes",) if all("peak_rss_after_fit_bytes" in r for r in runs) else ())}
           for m in ("plain", "compact")}
    logged = [r for r in runs if r["mode"] == "compact"][-1]
    return {"n_ratings": n, "n_users": users, "n_items": items, "epochs": epochs or "TrainConfig default",
            "generator": "recsys.datasets.synthetic_ratings(seed=0), Zipf skew 1.0", "reps": reps, "runs": runs,
            "median": med, "overhead_ratio_wall": med["compact"]["wall_seconds"] / med["plain"]["wall_seconds"],
            "overhead_ratio_cpu": med["compact"]["cpu_seconds"] / med["plain"]["cpu_seconds"],
            "extra_peak_rss_bytes": med["compact"]["peak_rss_bytes"] - med["plain"]["peak_rss_bytes"],
            "extra_peak_rss_training_bytes": (med["compact"]["peak_rss_after_fit_bytes"]
                                              - med["plain"]["peak_rss_after_fit_bytes"]
                                              if "peak_rss_after_fit_bytes" in med["plain"] else None),
            "log_saved_bytes_per_rating": logged["log_saved_bytes_per_rating"],
            "log_memory_bytes_per_rating": logged["log_memory_bytes_per_rating"],
            "artefact_bytes": logged["artefact_bytes"], "saved_bytes": logged["saved_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("u1", "scale", "both"), default="both")
    parser.add_argument("--label", default="after", help="results entry to write (e.g. before / after)")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=40_000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's (32)")
    parser.add_argument("--child", choices=("plain", "compact", "exact"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.n, args.users, args.items, args.child, args.epochs)))
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"benchmark": "rollback_log_size"}
    entry = results.setdefault(args.label, {})
    import recsys

    entry["recsys_path"] = str(Path(recsys.__file__).parent)
    entry["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "note": "2 shared cores, other jobs running: timings noisy; compare plain vs logged "
                                "within one run"}
    if args.part in ("u1", "both"):
        entry["u1"] = quality(args.pairs)
        q = entry["u1"]
        print(f"u1: Δ rel. error factors {q['delta_relative_error']['factors']:.4f} biases "
              f"{q['delta_relative_error']['biases']:.4f}; effects rel. error {q['effects']['relative_error']:.4f}, "
              f"Spearman {q['effects']['spearman_all']:.4f}, same top-1 {q['effects']['same_top1']:.2f}; "
              f"saved {q['compact_saved_bytes_per_rating']:.1f} B/rating", flush=True)
    if args.part in ("scale", "both"):
        entry["scale"] = scale(args.n, args.users, args.items, args.reps, args.epochs)
        s = entry["scale"]
        print(f"scale {s['n_ratings']:,}: log {s['log_saved_bytes_per_rating']:.1f} B/rating saved "
              f"({s['log_memory_bytes_per_rating']:.1f} in memory), overhead {s['overhead_ratio_wall']:.3f}x wall "
              f"{s['overhead_ratio_cpu']:.3f}x CPU, peak RSS plain "
              f"{s['median']['plain']['peak_rss_bytes'] / 2**30:.2f} GiB, logged "
              f"{s['median']['compact']['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    latest = json.loads(RESULTS.read_text()) if RESULTS.is_file() else results  # other labels may have run meanwhile
    latest[args.label] = entry
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(latest, indent=2))


if __name__ == "__main__":
    main()
