"""Does REC's convergence slow down with data size? Steps to a fixed training RMSE on
synthetic ratings of 10^5, 10^6 and 10^7 ratings (`recsys.datasets.synthetic_ratings`, users
and items growing with the size, cached in `recsys.datasets.cache_home`).

The paper claims that, with a fixed pool of parameters and sampled evidence, the number of
steps to a given fit does not grow with the number of ratings. Each size trains a fresh
default REC with Adam (batch ``--batch-size``) and, every ``--eval-every`` steps, measures
the RMSE of a fixed sample of 4096 training ratings (each predicted from chains that exclude
it, eval mode); it stops at ``--target`` or after ``--max-steps``. Writes
``benchmarks/results/rec_scaling.json`` and ``rec_scaling.png``.

    python benchmarks/rec_scaling.py [--sizes 100000,1000000,10000000] [--target 0.75]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from recsys.datasets import cache_home, load_ratings_npz, save_ratings_npz, synthetic_ratings
from recsys.models import build_model

RESULTS = Path(__file__).parent / "results"


def dataset(n: int, seed: int):
    n_users, n_items = max(100, n // 100), max(100, n // 60)
    path = cache_home() / f"rec_scaling_{n}_{n_users}_{n_items}_{seed}.npz"
    if path.is_file():
        return load_ratings_npz(path)
    r = synthetic_ratings(n, n_users, n_items, seed=seed)
    save_ratings_npz(r, path)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--target", type=float, default=0.75)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--max-seconds", type=float, default=900, help="per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for n in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        data = dataset(n, args.seed)
        load_s = time.perf_counter() - t0
        model = build_model("rec", data.n_users, data.n_items, data.rating_scale, {"seed": args.seed})
        t0 = time.perf_counter()
        model.prepare(data)
        bind_s = time.perf_counter() - t0
        rng = np.random.default_rng(args.seed)
        probe = rng.choice(len(data), size=4096, replace=False)
        pu, pi = torch.from_numpy(data.users[probe]), torch.from_numpy(data.items[probe])
        pv = torch.from_numpy(data.values[probe])
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        u_all, i_all, v_all = data.tensors()
        curve, reached, step = [], None, 0
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed)
        while step < args.max_steps and time.perf_counter() - start < args.max_seconds:
            if step % args.eval_every == 0:
                model.eval()
                err = float(torch.sqrt(((model.predict(pu, pi) - pv) ** 2).mean()))
                curve.append((step, err))
                if err <= args.target:
                    reached = step
                    break
            model.train()
            idx = torch.randint(len(data), (args.batch_size,), generator=gen)
            opt.zero_grad(set_to_none=True)
            model.loss(u_all[idx], i_all[idx], v_all[idx]).backward()
            opt.step()
            step += 1
        train_s = time.perf_counter() - start
        run = {"ratings": n, "users": data.n_users, "items": data.n_items, "steps_to_target": reached,
               "steps_run": step, "train_seconds": train_s, "seconds_per_step": train_s / max(step, 1),
               "load_seconds": load_s, "bind_seconds": bind_s, "curve": curve}
        runs.append(run)
        print(f"{n:>10,} ratings: steps to RMSE {args.target}: {reached} (ran {step} steps, "
              f"{run['seconds_per_step'] * 1e3:.0f} ms/step, bind {bind_s:.1f} s); last RMSE {curve[-1][1]:.4f}",
              flush=True)
    out = {"benchmark": "rec_scaling", "target_rmse": args.target, "batch_size": args.batch_size, "lr": args.lr,
           "eval_every": args.eval_every, "max_steps": args.max_steps, "threads": args.threads, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rec_scaling.json").write_text(json.dumps(out, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        s, e = zip(*run["curve"], strict=True)
        ax.plot(s, e, label=f"{run['ratings']:.0e} ratings")
    ax.axhline(args.target, color="grey", ls="--", lw=1)
    ax.set_xlabel(f"training steps (batch {args.batch_size})")
    ax.set_ylabel("RMSE on 4096 training ratings")
    ax.set_title("REC convergence vs data size (synthetic)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "rec_scaling.png", dpi=120)


if __name__ == "__main__":
    main()
