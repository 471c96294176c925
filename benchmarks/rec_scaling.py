"""Does REC's convergence slow down with data size? Steps to a fixed training RMSE on
synthetic ratings of 10^5, 10^6 and 10^7 ratings (`recsys.datasets.synthetic_ratings`, users
and items growing with the size, cached in `recsys.datasets.cache_home`).

The paper claims that, with a fixed pool of parameters and sampled evidence, the number of
steps to a given fit does not grow with the number of ratings. Each size trains a fresh
default REC with Adam (batch ``--batch-size``) and, every ``--eval-every`` steps, measures
the RMSE of a fixed sample of 4096 training ratings (each predicted from chains that exclude
it, eval mode). Every size runs ``--max-steps`` steps (``--stop-at-target`` stops at the target
instead), so that the curves show where each size is heading, not only when it crosses.

The target. The generator (`recsys.datasets.synthetic_ratings`, rank 16, noise 0.5, clipped
to 1..5) draws every size from the same distributions, with 100 ratings per user and 60 per
item on average, so the best attainable RMSE is its clipped noise at every size; only the
realised probe differs a little (a few heavy users and items dominate at 10^5). From the
generator's own parameters (recomputed here from its seed) the script computes, on the probe,
the Bayes floor: the RMSE of E[r | the user's and item's factors and biases]. The target of
each size is that floor plus ``--excess`` (an equal distance from the attainable optimum);
steps to floor + each of ``--excesses`` and to the fixed ``--target`` RMSE are reported too.
``--replot`` recomputes all of that and the figure from the stored curves.

``--held-out``: the 4096 probe ratings are removed from the training ratings (and so from the
graph), so the curve is a held-out RMSE, which no size can lower by fitting the probe itself
(at 10^5, 3,000 steps of 1,024 are 30 passes over the probe's own ratings; at 10^7, 0.3).
Written to ``rec_scaling_held_out.json`` / ``.png``.

``--model mf``: the same protocol for biased MF (`recsys.models.mf`, its defaults; Adam
through `recsys.optim.factory`), whose parameters grow with the users and items: the
reference the paper's claim is made against. Files get an ``_mf`` suffix.

    python benchmarks/rec_scaling.py [--sizes 100000,1000000,10000000] [--max-steps 3000] [--held-out]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from results_file import write_json  # this folder is on the path when run as a script

from recsys.datasets import cache_home, load_ratings_npz, save_ratings_npz, synthetic_ratings
from recsys.models import build_model
from recsys.optim.factory import build_optimizer

RESULTS = Path(__file__).parent / "results"


def dataset(n: int, seed: int):
    n_users, n_items = max(100, n // 100), max(100, n // 60)
    path = cache_home() / f"rec_scaling_{n}_{n_users}_{n_items}_{seed}.npz"
    if path.is_file():
        return load_ratings_npz(path)
    r = synthetic_ratings(n, n_users, n_items, seed=seed)
    save_ratings_npz(r, path)
    return r


def generator_levels(data, seed: int, idx: np.ndarray, rank: int = 16, noise: float = 0.5) -> dict:
    """Bayes floor of ratings ``idx`` of a `synthetic_ratings` set (RMSE of the conditional
    mean given the true factors and biases), from its parameters redrawn as the generator
    draws them (``default_rng([seed, 0])``: p, q, user and item biases; its defaults rank 16,
    noise 0.5). ``bayes_realised`` is that predictor's RMSE against the stored ratings (a check
    that the parameters match). ``bias_only``: RMSE of E[r | biases] with the dot product taken
    as zero-mean, for reference only: on skewed data a user's mean dot product with the few
    heavy items is not zero, so a fitted baseline can beat it."""
    lo, hi = data.rating_scale
    g = np.random.default_rng([seed, 0])
    sc = np.float32(1.0 / rank**0.25)
    p = g.standard_normal((data.n_users, rank), dtype=np.float32) * sc
    q = g.standard_normal((data.n_items, rank), dtype=np.float32) * sc
    bu = g.normal(0.0, 0.5, data.n_users).astype(np.float32)
    bi = g.normal(0.0, 0.5, data.n_items).astype(np.float32)
    mid, quarter = (lo + hi) / 2, (hi - lo) / 4
    u, i, v = data.users[idx], data.items[idx], data.values[idx].astype(np.float64)
    x, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()

    def clipped(m: np.ndarray, sd: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        y = np.clip(m[:, None] + np.reshape(sd, (-1, 1)) * x[None, :], lo, hi)
        mu = y @ w
        return mu, (y**2) @ w - mu**2

    bias = mid + quarter * (bu[u] + bi[i]).astype(np.float64)
    mu, var = clipped(bias + quarter * (p[u] * q[i]).sum(1).astype(np.float64), noise)
    # factors unknown: the dot product is ~N(0, |p_u|^2 |q_i|^2 / rank) given the norms, whose
    # mean over pairs is used (the bias-only predictor knows the biases, not the factors)
    dot_var = float(((p[u] ** 2).sum(1) * (q[i] ** 2).sum(1)).mean()) / rank
    mb, _ = clipped(bias, np.sqrt(noise**2 + quarter**2 * dot_var))
    return {"bayes_floor": float(np.sqrt(var.mean())), "bayes_realised": float(np.sqrt(np.mean((v - mu) ** 2))),
            "bias_only": float(np.sqrt(np.mean((v - mb) ** 2)))}


def first_at(curve: list, target: float) -> int | None:
    return next((s for s, e in curve if e <= target), None)


def analyse(run: dict, args) -> None:
    """Targets and steps to them, from a run's curve and generator levels (in place)."""
    floor = run["generator_levels"]["bayes_floor"]
    run["target_rmse"] = floor + args.excess
    run["steps_to_target"] = first_at(run["curve"], run["target_rmse"])
    run["steps_to_floor_plus"] = {f"{x:g}": first_at(run["curve"], floor + x) for x in args.excesses}
    run["steps_to_fixed_target"] = first_at(run["curve"], args.target)
    run["final_rmse_mean_last5"] = float(np.mean([e for _, e in run["curve"][-5:]]))
    run["final_excess_over_floor"] = run["final_rmse_mean_last5"] - floor
    # still falling or flat: mean of the points 1000-1200 steps before the end minus the last 5
    last = run["curve"][-1][0]
    before = [e for s, e in run["curve"] if last - 1200 < s <= last - 1000 + 1e-9]
    run["drop_over_last_1000_steps"] = float(np.mean(before) - run["final_rmse_mean_last5"]) if before else None


def results_stem(args) -> str:
    """The results' file name without suffix: ``rec_scaling[_held_out][_mf]``."""
    return "rec_scaling" + ("_held_out" if args.held_out else "") + ("_mf" if args.model == "mf" else "")


def write(runs: list[dict], args) -> None:
    out = {"benchmark": "rec_scaling", "model": args.model,
           "target": f"per size: Bayes floor (generator_levels) + {args.excess}",
           "probe": "held out (not trained on)" if args.held_out else "training ratings",
           "excess": args.excess, "fixed_target_rmse": args.target, "batch_size": args.batch_size, "lr": args.lr,
           "eval_every": args.eval_every, "max_steps": args.max_steps, "threads": args.threads, "runs": runs}
    stem = results_stem(args)
    write_json(RESULTS / f"{stem}.json", out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, run in enumerate(runs):
        s, e = zip(*run["curve"], strict=True)
        ax.plot(s, e, color=f"C{k}", label=f"{run['ratings']:.0e} ratings ({run['seconds_per_step'] * 1e3:.0f} ms/step)")
        ax.axhline(run["target_rmse"], color=f"C{k}", ls="--", lw=0.8)
        ax.axhline(run["generator_levels"]["bayes_floor"], color=f"C{k}", ls=":", lw=0.8)
    ax.set_xlabel(f"training steps (Adam, batch {args.batch_size}, lr {args.lr:g})")
    ax.set_ylabel(f"RMSE on 4096 {'held-out' if args.held_out else 'training'} ratings")
    ax.set_title(f"{args.model.upper()} convergence vs data size (synthetic)\ndashed: Bayes floor + {args.excess:g} (target); "
                 "dotted: Bayes floor", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--target", type=float, default=0.75, help="a fixed RMSE, reported beside the per-size one")
    parser.add_argument("--excess", type=float, default=0.3, help="per-size target: Bayes floor + this")
    parser.add_argument("--excesses", default="0.4,0.35,0.3,0.25", help="further levels above the floor reported")
    parser.add_argument("--replot", action="store_true", help="recompute targets and the figure from the stored runs")
    parser.add_argument("--stop-at-target", action="store_true")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--max-seconds", type=float, default=1800, help="per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--held-out", action="store_true", help="probe ratings removed from training (see above)")
    parser.add_argument("--model", choices=("rec", "mf"), default="rec")
    args = parser.parse_args()
    args.excesses = [float(x) for x in args.excesses.split(",")]
    if args.replot:
        stored = json.loads((RESULTS / f"{results_stem(args)}.json").read_text())
        for key in ("batch_size", "lr", "eval_every", "max_steps", "threads"):
            setattr(args, key, stored[key])
        for run in stored["runs"]:
            analyse(run, args)
        write(stored["runs"], args)
        return
    torch.set_num_threads(args.threads)
    runs = []
    for n in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        data = dataset(n, args.seed)
        load_s = time.perf_counter() - t0
        rng = np.random.default_rng(args.seed)
        probe = rng.choice(len(data), size=4096, replace=False)
        train = data
        if args.held_out:  # every rating of a probe pair leaves (the generator can repeat a pair)
            keys = data.users.astype(np.int64) * data.n_items + data.items
            train = data.subset(~np.isin(keys, keys[probe]))
        model = build_model(args.model, data.n_users, data.n_items, data.rating_scale, {"seed": args.seed})
        t0 = time.perf_counter()
        model.prepare(train)
        bind_s = time.perf_counter() - t0
        pu, pi = torch.from_numpy(data.users[probe]), torch.from_numpy(data.items[probe])
        pv = torch.from_numpy(data.values[probe])
        levels = generator_levels(data, args.seed, probe)
        target = levels["bayes_floor"] + args.excess
        opt = (torch.optim.Adam(model.parameters(), lr=args.lr) if args.model == "rec"
               else build_optimizer("adam", model, args.lr))
        u_all, i_all, v_all = train.tensors()
        curve, reached, step, eval_s = [], None, 0, 0.0
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed)

        def evaluate(step: int, model=model, pu=pu, pi=pi, pv=pv, curve=curve) -> float:
            nonlocal eval_s
            t = time.perf_counter()
            model.eval()
            err = float(torch.sqrt(((model.predict(pu, pi) - pv) ** 2).mean()))
            curve.append((step, err))
            eval_s += time.perf_counter() - t
            return err

        while step < args.max_steps and time.perf_counter() - start < args.max_seconds:
            if step % args.eval_every == 0:
                if evaluate(step) <= target and reached is None:
                    reached = step
                    if args.stop_at_target:
                        break
            model.train()
            idx = torch.randint(len(train), (args.batch_size,), generator=gen)
            opt.zero_grad(set_to_none=True)
            model.loss(u_all[idx], i_all[idx], v_all[idx]).backward()
            opt.step()
            step += 1
        if curve[-1][0] != step and evaluate(step) <= target and reached is None:
            reached = step
        train_s = time.perf_counter() - start - eval_s
        run = {"ratings": n, "users": data.n_users, "items": data.n_items, "generator_levels": levels,
               "steps_run": step, "train_seconds": train_s, "eval_seconds": eval_s,
               "seconds_per_step": train_s / max(step, 1), "load_seconds": load_s, "bind_seconds": bind_s,
               "curve": curve}
        analyse(run, args)
        runs.append(run)
        print(f"{n:>10,} ratings: Bayes floor {levels['bayes_floor']:.4f}; steps to RMSE {target:.4f}: "
              f"{run['steps_to_target']}, to {args.target}: {run['steps_to_fixed_target']} (ran {step} steps, "
              f"{run['seconds_per_step'] * 1e3:.0f} ms/step, bind {bind_s:.1f} s); last RMSE {curve[-1][1]:.4f}",
              flush=True)
    write(runs, args)


if __name__ == "__main__":
    main()
