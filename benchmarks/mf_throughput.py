"""Training throughput of biased MF (rating updates per second over whole epochs) on synthetic
Zipf-skewed ratings, beside cornac and Surprise measured in the same run.

Every figure is whole epochs through `Trainer.fit` (reshuffle, gather, update), after a
warm-up that loads the compiled kernels. Paths measured:

- ``kernel``: per-example SGD, compiled (the CPU default: one thread, deterministic), with 1
  and 2 factor blocks; and ``hogwild``: the same updates with the examples split across two
  threads updating shared rows without locks;
- ``closed-form``: minibatch SGD as tensor ops (gather, closed-form gradient, index_add_),
  the path that also runs on CUDA;
- ``autograd-sparse`` / ``autograd-dense``: `model.loss` + backward + ``torch.optim.SGD``
  with sparse embedding gradients / dense ones (dense is measured on a 10^6 subset: a whole
  table pass per step makes it too slow for the full set).

    RECSYS_DATA=../shared/data python benchmarks/mf_throughput.py [--n 10000000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recsys.datasets import cache_home, load_ratings_npz, save_ratings_npz, synthetic_ratings
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.ratings import Ratings
from recsys.train import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from peers.client import peers_available, run_peer  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def synthetic(n: int, n_users: int, n_items: int, seed: int = 0) -> tuple[Ratings, Path]:
    """``n`` ratings with *unique* (user, item) pairs, so that every library trains on the same
    set (cornac drops repeated pairs); generated once and cached in `cache_home()` as .npz.
    Skewed popularity makes raw draws repeat pairs, so more are drawn and the first
    occurrence of each pair is kept, in generation order."""
    path = cache_home() / "synthetic" / f"zipf-unique-{n}-{n_users}x{n_items}-s{seed}.npz"
    if path.is_file():
        return load_ratings_npz(path), path
    raw = synthetic_ratings(int(n * 2.5), n_users, n_items, seed=seed)
    key = raw.users * np.int64(n_items) + raw.items
    _, first = np.unique(key, return_index=True)
    if len(first) < n:
        raise SystemExit(f"only {len(first):,} unique pairs among {len(raw):,} draws; lower --n or raise --users")
    ratings = raw.subset(np.sort(first)[:n])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_ratings_npz(ratings, path)
    return ratings, path


def measure(ratings: Ratings, *, epochs: int, device: str, n_blocks: int, batch_size: int,
            optimizer: str = "sgd", dense: bool = False, lr: float = 0.005, hogwild: bool = False) -> dict:
    model = MatrixFactorization(ratings.n_users, ratings.n_items, ratings.rating_scale,
                                MFConfig(embedding_size=64, n_blocks=n_blocks, reg=0.05))
    factory = None
    if dense:
        for m in (model.user_factors, model.item_factors, model.user_bias, model.item_bias):
            m.sparse = False
        factory = lambda mdl: torch.optim.SGD(mdl.parameters(), lr=lr)  # noqa: E731
    trainer = Trainer(TrainConfig(epochs=epochs, learning_rate=lr, lr_decay=1.0, batch_size=batch_size,
                                  optimizer=optimizer, device=device, hogwild=hogwild, progress=False),
                      optimizer_factory=factory)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    res = trainer.fit(model, ratings)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = sum(r.seconds for r in res.history)
    return {"step_kind": res.step_kind, "device": device, "n_blocks": n_blocks, "batch_size": batch_size,
            "dense_gradients": dense, "hogwild": hogwild, "n_ratings": len(ratings), "epochs": epochs,
            "epoch_seconds": seconds / epochs, "ratings_per_second": len(ratings) * epochs / seconds,
            "final_train_mse": res.history[-1].train_mse}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=40_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    ratings, npz = synthetic(args.n, args.users, args.items)
    print(f"data: {ratings.describe()} ({time.perf_counter() - t0:.1f} s to generate or load)", flush=True)

    warm = ratings.subset(np.arange(min(len(ratings), 100_000)))
    for nb, hogwild in ((1, False), (2, False), (1, True)):  # load the compiled kernels before timing
        measure(warm, epochs=1, device="cpu", n_blocks=nb, batch_size=1, hogwild=hogwild)

    runs = []

    def record(label: str, **kw) -> None:
        data = kw.pop("data", ratings)
        res = {"label": label, **measure(data, **kw)}
        runs.append(res)
        print(f"{label:<34} {res['ratings_per_second'] / 1e6:7.2f} M ratings/s "
              f"({res['epoch_seconds']:.2f} s/epoch on {res['n_ratings']:,})", flush=True)

    record("ours kernel, 1 block", epochs=args.epochs, device="cpu", n_blocks=1, batch_size=1)
    record("ours kernel, 2 blocks", epochs=args.epochs, device="cpu", n_blocks=2, batch_size=1)
    record("ours kernel hogwild (2 threads)", epochs=args.epochs, device="cpu", n_blocks=1, batch_size=1,
           hogwild=True)
    record("ours closed-form, batch 8192", epochs=1, device="cpu", n_blocks=1, batch_size=8192, lr=5.0)
    record("ours autograd sparse, batch 8192", epochs=1, device="cpu", n_blocks=1, batch_size=8192, lr=5.0)
    sub = ratings.subset(np.arange(min(len(ratings), 1_000_000)))
    record("ours autograd dense, batch 8192", data=sub, epochs=1, device="cpu", n_blocks=1,
           batch_size=8192, dense=True, lr=5.0)
    if torch.cuda.is_available():
        for bs in (65_536, 1 << 20):
            record(f"ours closed-form cuda, batch {bs}", epochs=args.epochs, device="cuda", n_blocks=1,
                   batch_size=bs, lr=5.0)

    peers = []
    if not args.no_peers and peers_available():
        for peer, params in (("cornac-mf", {"num_threads": 1}), ("cornac-mf", {"num_threads": 2}),
                             ("surprise-svd", {})):
            job = {"task": "throughput", "peer": peer, "npz": str(npz), "factors": 64,
                   "epochs": args.epochs, "params": params}
            try:
                res = run_peer(job)
            except RuntimeError as exc:
                print(f"{peer}: failed ({exc})", flush=True)
                continue
            peers.append(res)
            label = f"{peer} {params}" if params else peer
            print(f"{label:<34} {res['ratings_per_second'] / 1e6:7.2f} M ratings/s (on {res['n_ratings']:,})", flush=True)
    best_ours = max(r["ratings_per_second"] for r in runs if r["device"] == "cpu")
    best_peer = max((p["ratings_per_second"] for p in peers), default=None)
    out = {
        "benchmark": "mf_throughput",
        "data": {"n_ratings": len(ratings), "n_users": ratings.n_users, "n_items": ratings.n_items,
                 "generator": "recsys.datasets.synthetic_ratings(seed=0), Zipf skew 1.0"},
        "embedding_size": 64,
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "ours": runs,
        "peers": peers,
        "best_ours_cpu_ratings_per_second": best_ours,
        "best_peer_ratings_per_second": best_peer,
        "ratio_best_ours_to_best_peer": best_ours / best_peer if best_peer else None,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mf_throughput.json").write_text(json.dumps(out, indent=2))
    if best_peer:
        print(f"best ours / best peer: {best_ours / best_peer:.2f}x")


if __name__ == "__main__":
    main()
