"""Covariance-noise large-batch training, tested on MovieLens-100K u1 (issue: shared optimizers).

The claim under test (Wen, Luk, Gazeau, Zhang, Chan, Ba, arXiv 1902.08234): a large batch B_L
plus Gaussian noise with the structure of the gradient covariance, scaled to restore the
gradient noise of a small batch B_S, generalises like B_S at B_L's cost per epoch.

Protocol (all on u1: the model is fitted on u1.base minus a 5% validation slice, seed 0; the
validation slice chooses every learning rate and noise scale; u1.test is only reported):

1. Noise check: at the weights after two small-batch epochs, the real spread of B_S gradients
   drawn as sub-batches of one B_L batch, against draws of the injected noise (squared norms,
   per-coordinate variance correlation).
2. Small batch B_S = 256: learning rate tuned on validation (seed 0).
3. Each large batch: the linearly scaled lr (``lr_S · B_L / B_S``) and its own validation-best
   lr (seed 0); each plain and with isotropic, diagonal and full noise at ``--noise-scale``.
4. Every regime with ``--seeds`` seeds and the same epochs: test RMSE mean ± sd, the
   large-vs-small gap, the share of it each noise closes, seconds per epoch (training only).
5. The default noise scale: diag noise at scales ``--scales`` on validation, beside plain.
6. Large batches as a speed lever: training seconds until the test RMSE reaches the small
   batch's final test RMSE, per batch (scaled lr).

MF: every regime steps on one path, `recsys.optim.noise.CovNoiseSGD` through autograd
(per-example gradients from the gathered rows); the plain ones with noise scale 0 (the same
step, the same per-example capture, no noise drawn), so seconds and training MSE compare the
noise, not step paths (``--plain-path closed-form``: plain runs on the closed-form minibatch SGD,
the production path, as the first study did). REC: Adam (its default) plain, and Adam fed the large batch's gradient plus
noise estimated from its B_S sub-batches (`recsys.optim.noise.SubBatchNoise`): REC's memoised
chains have no per-rating gradients to take.

    RECSYS_DATA=../shared/data python benchmarks/optim_noise.py --model mf [--quick]
    RECSYS_DATA=../shared/data python benchmarks/optim_noise.py --model rec [--quick]

``--cache FILE`` keeps every finished run (keyed by its settings and a hash of the ``recsys``
sources), so a protocol can be run in stages and a lr search's seed-0 run doubles as the
regime's seed-0 run; the REC command of ``docs/optimizers.md`` is the one that wrote
``results/optim_noise_rec.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from results_file import write_json  # this folder is on the path when run as a script

from recsys.datasets import load_split
from recsys.errors import TrainingDivergedError
from recsys.evaluate import evaluate_ratings
from recsys.models import EvidenceChainModel, build_model
from recsys.splits import validation_slice
from recsys.train import Callback, TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"
STRUCTURES = ("isotropic", "diag", "full")
#: a large-vs-small test RMSE difference below this is no gap (seed spread is ~0.0003-0.001)
GAP_FLOOR = 0.0005
#: "reaches the small batch's test RMSE": within this of it
REACH_TOLERANCE = 1e-4
#: REC config overrides (``--rec-config``)
REC_CONFIG: dict = {}
#: finished runs by configuration (``--cache``): a run is never repeated, so a lr search's seed-0
#: run is also the regime's seed-0 run, and an interrupted protocol resumes where it stopped
CACHE: dict = {"path": None, "runs": {}}


def _save_cache() -> None:
    """Write the cache beside itself, then move it into place: a run killed mid-write keeps
    the previous cache whole instead of truncating hours of finished runs."""
    write_json(CACHE["path"], CACHE["runs"], indent=None)


def code_version() -> str:
    """SHA-1 (12 digits) of the imported ``recsys`` package's Python sources: part of every
    cache key, so that a run of an older model or trainer is never reused."""
    import hashlib

    import recsys

    h = hashlib.sha1()
    for f in sorted(Path(recsys.__file__).parent.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


CODE_VERSION = code_version()
#: MF's plain runs: ``same`` (the noisy runs' path, noise scale 0) or ``closed-form``
PLAIN_PATH = {"path": "same"}


class TestCurve(Callback):
    """Test RMSE and cumulative training seconds after every epoch (the test evaluation's own
    time is excluded)."""

    def __init__(self, model, test) -> None:
        self.model, self.test = model, test
        self.points: list[tuple[float, float]] = []
        self.train_seconds = 0.0
        self._t0 = 0.0

    def on_train_begin(self, trainer, model, train) -> None:
        self._t0 = time.perf_counter()

    def on_epoch_end(self, record) -> None:
        self.train_seconds += time.perf_counter() - self._t0
        self.points.append((self.train_seconds, evaluate_ratings(self.model, self.test)["rmse"]))
        self._t0 = time.perf_counter()


def train_config(model_name: str, *, batch: int, lr: float, epochs: int, seed: int,
                 noise: tuple[str, float] | None) -> TrainConfig:
    base = dict(EvidenceChainModel.training_defaults) if model_name == "rec" else {"optimizer": "sgd"}
    base.update(batch_size=batch, learning_rate=lr, epochs=epochs, seed=seed, patience=None,
                progress=False, lr_decay=1.0 if model_name == "mf" else base.get("lr_decay", 1.0))
    if noise is None and model_name == "mf" and PLAIN_PATH["path"] == "same":
        noise = ("diag", 0.0)  # the noisy runs' step and capture, no noise
    if noise is not None:
        structure, scale = noise
        base.update(optimizer="cov-noise", noise={"structure": structure, "scale": scale, "batch": 256})
        if model_name != "mf":
            base["noise"].update(base="adam", estimator="sub-batch")
    return TrainConfig(**base)


def run(model_name: str, data, *, batch: int, lr: float, epochs: int, seed: int,
        noise: tuple[str, float] | None = None) -> dict:
    key = json.dumps([CODE_VERSION, PLAIN_PATH["path"], model_name, REC_CONFIG if model_name == "rec" else None, batch,
                      float(f"{lr:.10g}"), epochs, seed, None if noise is None else [noise[0], float(noise[1])]],
                     sort_keys=True)
    if key in CACHE["runs"]:
        return CACHE["runs"][key]
    out = _run(model_name, data, batch=batch, lr=lr, epochs=epochs, seed=seed, noise=noise)
    if CACHE["path"] is not None:
        CACHE["runs"][key] = out
        _save_cache()
    return out


def _run(model_name: str, data, *, batch: int, lr: float, epochs: int, seed: int,
         noise: tuple[str, float] | None = None) -> dict:
    fit, val, test = data
    model = build_model(model_name, fit.n_users, fit.n_items, fit.rating_scale,
                        {**REC_CONFIG, "seed": seed} if model_name == "rec" else {})
    curve = TestCurve(model, test)
    cfg = train_config(model_name, batch=batch, lr=lr, epochs=epochs, seed=seed, noise=noise)
    out = {"batch": batch, "lr": lr, "seed": seed, "noise": None if noise is None else noise[0],
           "noise_scale": None if noise is None else noise[1]}
    try:
        res = Trainer(cfg, callbacks=[curve]).fit(model, fit, val)
    except TrainingDivergedError as e:
        return {**out, "diverged": str(e).split(";")[0]}
    last = res.history[-1]
    return {**out, "diverged": False, "validation_rmse": last.validation_rmse,
            "train_mse": last.train_mse, "test_rmse": curve.points[-1][1],
            "seconds_per_epoch": curve.train_seconds / len(res.history),
            "curve": [[round(s, 3), round(r, 5)] for s, r in curve.points],
            "validation_curve": [round(h.validation_rmse, 5) for h in res.history],
            "step_kind": res.step_kind}


def best_lr(model_name: str, data, batch: int, lrs: list[float], epochs: int) -> tuple[float, list[dict]]:
    if len(lrs) == 1:  # nothing to choose
        return lrs[0], []
    rows = [run(model_name, data, batch=batch, lr=lr, epochs=epochs, seed=0) for lr in lrs]
    for r in rows:
        print(f"  tune B={batch} lr={r['lr']:g}: val {r.get('validation_rmse', 'diverged')}", flush=True)
    ok = [r for r in rows if not r["diverged"]]
    if not ok:
        raise SystemExit(f"every learning rate diverged for batch {batch}: {lrs}")
    best = min(ok, key=lambda r: r["validation_rmse"])["lr"]
    if best == max(lrs) and len(lrs) > 1:
        print(f"  note: the best lr for B={batch} is the grid's largest ({best:g})", flush=True)
    return best, rows


def noise_check(model_name: str, data, small: int, large: int, small_lr: float, seed: int = 0) -> dict:
    """The injected noise against the real spread of B_S sub-batch gradients of a B_L batch."""
    key = json.dumps(["check", CODE_VERSION, model_name, REC_CONFIG if model_name == "rec" else None, small, large,
                      float(f"{small_lr:.10g}"), seed], sort_keys=True)
    if key not in CACHE["runs"]:
        CACHE["runs"][key] = _noise_check(model_name, data, small, large, small_lr, seed)
        if CACHE["path"] is not None:
            _save_cache()
    return CACHE["runs"][key]


def _noise_check(model_name: str, data, small: int, large: int, small_lr: float, seed: int = 0) -> dict:
    from recsys.optim.noise import CovNoiseSGD

    fit, val, _ = data
    model = build_model(model_name, fit.n_users, fit.n_items, fit.rating_scale,
                        {**REC_CONFIG, "seed": seed} if model_name == "rec" else {})
    Trainer(train_config(model_name, batch=small, lr=small_lr, epochs=2, seed=seed, noise=None)).fit(model, fit)
    model.train()
    u, i, r = fit.tensors("cpu")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(u), generator=gen)[:large]
    params = [p for p in model.parameters() if p.requires_grad]
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            m.sparse = False

    def flat_grad(batch_idx: torch.Tensor) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        model.loss(u[batch_idx], i[batch_idx], r[batch_idx]).backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])

    # fixed chains for the check (REC): the same sampling stream for every pass
    state = model.sampling_state()
    subs = []
    for s in range(0, large, small):
        if state is not None:
            model.set_sampling_state(state)
        subs.append(flat_grad(idx[s:s + small]))
    # the B_L gradient as the mean of its sub-batches' (equal for MF; for REC each sub-batch
    # excludes only its own targets from the chains, as in the noisy training step)
    g_large = torch.stack(subs).mean(0)
    real = torch.stack(subs) - g_large  # [m, P] deviations of B_S gradients from the B_L gradient
    draws = {}
    for structure in STRUCTURES:
        if model_name == "mf":
            opt = CovNoiseSGD(params, 1.0, noise_batch=small, structure=structure, model=model, seed=1)
            samples = []
            for _ in range(real.shape[0]):
                model.zero_grad(set_to_none=True)
                model.loss(u[idx], i[idx], r[idx]).backward()
                drawn = opt.draw_noise()  # one draw per parameter, no step
                noise = []
                for p in params:
                    n = drawn.get(p)
                    if isinstance(n, tuple):
                        noise.append(torch.zeros_like(p).index_add_(0, n[0], n[1]).reshape(-1))
                    elif n is not None:
                        noise.append(n.reshape(-1))
                    else:
                        noise.append(torch.zeros(p.numel()))
                samples.append(torch.cat(noise))
            opt.remove_hooks()
        else:
            from recsys.optim.noise import SubBatchNoise

            # the noise is a function of the recorded sub-batch gradients: record them once
            # (the B_L gradient plus each deviation) and draw from them repeatedly
            source = SubBatchNoise(params, noise_batch=small, structure=structure, seed=1)
            samples = []
            for _ in range(real.shape[0]):
                for d in real:
                    source.record_gradient(g_large + d, small)
                source.apply()
                samples.append(torch.cat([p.grad.reshape(-1) for p in params]) - g_large)
        draws[structure] = torch.stack(samples)
    # a B_S sub-batch of a fixed B_L batch deviates from its mean with covariance
    # (1/B_S - 1/B_L) C: exactly the covariance the injected noise targets
    real_sq = float(real.square().sum(1).mean())
    real_var = real.square().mean(0)
    out = {"at": f"after 2 epochs at B={small}", "small_batch": small, "large_batch": large,
           "sub_batches": real.shape[0], "real_sq_norm": real_sq, "structures": {}}
    touched = real_var > 0
    for structure, d in draws.items():
        var = d.square().mean(0)
        corr = float(np.corrcoef(var[touched].numpy(), real_var[touched].numpy())[0, 1])
        out["structures"][structure] = {"sq_norm": float(d.square().sum(1).mean()),
                                        "variance_correlation": corr}
    return out


def _init_worker(rec_config: dict) -> None:
    torch.set_num_threads(1)
    REC_CONFIG.update(rec_config)


def _task(task: tuple[str, dict]):
    kind, kwargs = task
    return noise_check(**kwargs) if kind == "check" else run(**kwargs)


def run_all(tasks: list[tuple[str, dict]], jobs: int) -> list:
    """Run ``("run"|"check", kwargs)`` tasks, in ``jobs`` processes (one thread each) when > 1."""
    if jobs <= 1:
        return [_task(t) for t in tasks]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs, initializer=_init_worker, initargs=(dict(REC_CONFIG),)) as pool:
        return pool.map(_task, tasks, chunksize=1)


def summarise(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r["diverged"]]
    if not ok:
        return {"diverged": len(rows)}
    test = np.array([r["test_rmse"] for r in ok])
    return {"test_rmse_mean": float(test.mean()), "test_rmse_sd": float(test.std(ddof=1)) if len(test) > 1 else 0.0,
            "validation_rmse_mean": float(np.mean([r["validation_rmse"] for r in ok])),
            "train_mse_mean": float(np.mean([r["train_mse"] for r in ok])),
            "seconds_per_epoch": float(np.median([r["seconds_per_epoch"] for r in ok])),
            "diverged": len(rows) - len(ok), "n": len(rows)}


def time_to(rows: list[dict], target: float) -> float | None:
    """Median over seeds of the training seconds until the test RMSE first reaches ``target``."""
    times = []
    for r in rows:
        hit = next((s for s, rmse in r.get("curve", []) if rmse <= target + REACH_TOLERANCE), None)
        times.append(math.inf if hit is None else hit)
    med = float(np.median(times))
    return None if math.isinf(med) else med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mf", "rec"), default="mf")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: 40 (mf), 12 (rec)")
    parser.add_argument("--large", default="4096,16384")
    parser.add_argument("--noise-scale", type=float, default=1.0)
    parser.add_argument("--scales", default="0.25,0.5,1.0")
    parser.add_argument("--small-lrs", default=None, help="the small batch's lr grid (comma-separated)")
    parser.add_argument("--no-own-lr", action="store_true",
                        help="large batches only at the scaled lr (no lr search of their own)")
    parser.add_argument("--no-scale-sweep", action="store_true", help="skip the noise-scale sweep")
    parser.add_argument("--sweep-lrs", default="scaled",
                        help="the sweep's lrs at the first large batch: scaled and/or own (its own best, if it differs)")
    parser.add_argument("--scales-only", action="store_true",
                        help="only the noise-scale sweep (--scales, --seeds) at the first large batch and "
                             "the small batch's validation-tuned lr read from the last full result")
    parser.add_argument("--rec-config", default="{}",
                        help='REC config overrides as JSON, e.g. \'{"fanouts": [8, 4]}\' (cheaper chains)')
    parser.add_argument("--structures", default=",".join(STRUCTURES),
                        help="noise structures to test, the first with every seed")
    parser.add_argument("--minor-seeds", type=int, default=None,
                        help="seeds for the structures after the first (default: all)")
    parser.add_argument("--minor-seeds-min-batch", type=int, default=0,
                        help="--minor-seeds applies only to large batches of at least this size")
    parser.add_argument("--own-lr-structures", default=None,
                        help="noise structures run at a large batch's own validation-best lr where it differs "
                             "from the scaled lr (default: --structures)")
    parser.add_argument("--cache", default=None,
                        help="JSON file of finished runs, read and extended (resume, and reuse of tuning runs)")
    parser.add_argument("--note", default="", help="what this run cut from the protocol, written to the result")
    parser.add_argument("--jobs", type=int, default=1,
                        help="> 1: run the fixed-lr protocol (with --no-own-lr) in this many processes")
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script")
    parser.add_argument("--plain-path", choices=("same", "closed-form"), default="same",
                        help="MF's plain runs: the noisy runs' autograd step at noise 0 (default) or closed-form SGD")
    parser.add_argument("--out", default=None, help="results file name (default optim_noise_<model>.json)")
    args = parser.parse_args()
    PLAIN_PATH["path"] = args.plain_path
    structures = tuple(args.structures.split(","))
    if args.minor_seeds is None:
        args.minor_seeds = args.seeds
    if args.jobs > 1 and not args.no_own_lr:
        parser.error("--jobs needs --no-own-lr (the lr searches are sequential)")
    torch.set_num_threads(1)
    REC_CONFIG.update(json.loads(args.rec_config))
    if args.cache:
        CACHE["path"] = Path(args.cache)
        if CACHE["path"].is_file():
            CACHE["runs"] = json.loads(CACHE["path"].read_text())
    own_structures = structures if args.own_lr_structures is None else tuple(
        x for x in args.own_lr_structures.split(",") if x)
    mf = args.model == "mf"
    epochs = args.epochs or (40 if mf else 12)
    seeds = list(range(args.seeds))
    large = [int(b) for b in args.large.split(",")]
    small = 256
    small_lrs = [1.0, 2.0, 4.0, 8.0] if mf else [1e-3, 2e-3, 4e-3]
    if args.small_lrs:
        small_lrs = [float(x) for x in args.small_lrs.split(",")]
    if args.quick:
        epochs, seeds, large, small_lrs = 2, [0], [4096], small_lrs[1:2]
    train, test = load_split("ml-100k", "u1")
    fit, val = validation_slice(train, 0.05, seed=0)
    data = (fit, val, test)
    started = time.time()

    if args.scales_only:
        previous = json.loads((RESULTS / f"optim_noise_{args.model}.json").read_text())
        b = large[0]
        lr = previous["regimes"][f"B={b}, {'linear' if mf else 'sqrt'} lr"]["lr"]
        rows = []
        for scale in [0.0] + [float(x) for x in args.scales.split(",")]:
            runs = [run(args.model, data, batch=b, lr=lr, epochs=epochs, seed=s,
                        noise=None if scale == 0 else ("diag", scale)) for s in seeds]
            rows.append({"noise_scale": scale, **summarise(runs)})
            print("   ", json.dumps(rows[-1]), flush=True)
        path = RESULTS / f"optim_noise_{args.model}_scales.json"
        path.write_text(json.dumps({"benchmark": "optim_noise noise-scale sweep", "model": args.model, "batch": b,
                                    "lr": lr, "epochs": epochs, "seeds": seeds, "structure": "diag",
                                    "rows": rows}, indent=1))
        print("wrote", path)
        return
    print(f"[{args.model}] tuning the small batch's learning rate", flush=True)
    lr_s, tune_small = best_lr(args.model, data, small, small_lrs, epochs)
    rule = "linear" if mf else "sqrt"
    regimes: dict[str, dict] = {}
    tuning = {"small": tune_small}
    if args.jobs > 1:  # every run of the fixed-lr protocol at once, in a process pool
        tasks = [("check", dict(model_name=args.model, data=data, small=small, large=max(large), small_lr=lr_s))]
        plan = [(f"B={small}", small, lr_s, None, seeds)]
        for b in large:
            scaled = lr_s * (b / small if rule == "linear" else math.sqrt(b / small))
            plan.append((f"B={b}, {rule} lr", b, scaled, None, seeds))
            regimes[f"B={b}, own best lr"] = {"same_as": f"B={b}, {rule} lr", "note": "not searched (--no-own-lr)"}
            for k, noise in enumerate(structures):
                plan.append((f"B={b}, {rule} lr + {noise} noise", b, scaled, noise,
                             seeds if k == 0 else seeds[:args.minor_seeds]))
        for _key, b, lr, noise, seed_list in plan:
            tasks += [("run", dict(model_name=args.model, data=data, batch=b, lr=lr, epochs=epochs, seed=sd,
                                   noise=None if noise is None else (noise, args.noise_scale))) for sd in seed_list]
        print(f"[{args.model}] {len(tasks)} tasks in {args.jobs} processes", flush=True)
        results = run_all(tasks, args.jobs)
        check, runs = results[0], iter(results[1:])
        for key, b, lr, noise, seed_list in plan:
            regimes[key] = {"batch": b, "lr": lr, "noise": noise, "runs": [next(runs) for _ in seed_list]}
            print(f"[{args.model}] {key}:", json.dumps(summarise(regimes[key]["runs"])), flush=True)
        print(json.dumps(check), flush=True)
        large_loop = []
    else:
        print(f"[{args.model}] noise check", flush=True)
        check = noise_check(args.model, data, small, max(large), lr_s)
        print(json.dumps(check), flush=True)
        regimes[f"B={small}"] = {"batch": small, "lr": lr_s, "noise": None,
                                 "runs": [run(args.model, data, batch=small, lr=lr_s, epochs=epochs, seed=s)
                                          for s in seeds]}
        large_loop = large
    for b in large_loop:
        scaled = lr_s * (b / small if rule == "linear" else math.sqrt(b / small))
        if args.quick or args.no_own_lr:
            lr_own = scaled
        else:
            lr_own, tuning[f"B={b}"] = best_lr(args.model, data, b, [scaled / 4, scaled / 2, scaled, scaled * 2],
                                               epochs)
        for label, lr in ((f"{rule} lr", scaled), ("own best lr", lr_own)):
            if label == "own best lr" and lr == scaled:
                regimes[f"B={b}, own best lr"] = {"same_as": f"B={b}, {rule} lr"}
                continue
            todo = structures if label == f"{rule} lr" else own_structures
            for noise in (None, *todo):
                key = f"B={b}, {label}" + (f" + {noise} noise" if noise else "")
                minor = noise not in (None, structures[0]) and b >= args.minor_seeds_min_batch
                seed_list = seeds[:args.minor_seeds] if minor else seeds
                if not seed_list:
                    continue
                print(f"[{args.model}] {key} (lr {lr:g})", flush=True)
                runs = [run(args.model, data, batch=b, lr=lr, epochs=epochs, seed=s,
                            noise=None if noise is None else (noise, args.noise_scale)) for s in seed_list]
                regimes[key] = {"batch": b, "lr": lr, "noise": noise, "runs": runs}
                print("   ", json.dumps(summarise(runs)), flush=True)
    for v in regimes.values():
        if "runs" in v:
            v["summary"] = summarise(v["runs"])

    small_test = regimes[f"B={small}"]["summary"]["test_rmse_mean"]
    gaps = {}
    for key, v in regimes.items():
        if "runs" not in v or v["noise"] is not None or v["batch"] == small:
            continue
        plain = v["summary"].get("test_rmse_mean")
        if plain is None:
            continue
        gap = plain - small_test
        closed = {}
        for noise in structures:
            nv = regimes.get(f"{key} + {noise} noise", {}).get("summary", {})
            if "test_rmse_mean" in nv:
                closed[noise] = {"test_rmse_mean": nv["test_rmse_mean"],
                                 # only where there is a gap (the large batch worse) to close
                                 "share_of_gap_closed": (plain - nv["test_rmse_mean"]) / gap if gap > GAP_FLOOR else None,
                                 "change_vs_plain": nv["test_rmse_mean"] - plain}
            elif nv:
                closed[noise] = {"diverged": nv.get("diverged")}
        gaps[key] = {"gap_vs_small": gap, "noise": closed}

    print(f"[{args.model}] default noise scale on validation", flush=True)
    scale_rows = []
    b_default = large[0]
    sweep_lrs = {}
    for kind in args.sweep_lrs.split(","):
        v = regimes.get(f"B={b_default}, {rule} lr" if kind == "scaled" else f"B={b_default}, own best lr", {})
        if "lr" in v and v["lr"] not in sweep_lrs.values():
            sweep_lrs[kind] = v["lr"]
    for kind, lr_default in sweep_lrs.items():
        for scale in [] if args.no_scale_sweep else [0.0] + [float(x) for x in args.scales.split(",")]:
            rows = [run(args.model, data, batch=b_default, lr=lr_default, epochs=epochs, seed=s,
                        noise=None if scale == 0 else ("diag", scale)) for s in seeds[:2]]
            scale_rows.append({"batch": b_default, "lr": lr_default, "lr_kind": kind, "noise_scale": scale,
                               **summarise(rows)})
            print("   ", json.dumps(scale_rows[-1]), flush=True)

    speed = {}
    for key, v in regimes.items():
        if "runs" not in v or v["noise"] is not None:
            continue
        speed[key] = {"batch": v["batch"], "lr": v["lr"],
                      "seconds_to_small_batch_test_rmse": time_to(v["runs"], small_test),
                      "seconds_per_epoch": v["summary"].get("seconds_per_epoch")}
    # the largest batch that reaches the small batch's test RMSE (its faster lr if both do)
    reaching = [(-v["batch"], v["seconds_to_small_batch_test_rmse"], k) for k, v in speed.items()
                if v["seconds_to_small_batch_test_rmse"] is not None]
    lever = min(reaching)[2] if reaching else None
    small_s = speed[f"B={small}"]["seconds_to_small_batch_test_rmse"]
    speed_lever = None if lever is None else {
        "regime": lever, "seconds": speed[lever]["seconds_to_small_batch_test_rmse"], "small_batch_seconds": small_s,
        "speedup": small_s / speed[lever]["seconds_to_small_batch_test_rmse"] if small_s else None}

    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "optim_noise", "model": args.model, "dataset": "ml-100k u1 (5% validation slice, seed 0)",
           "epochs": epochs, "seeds": seeds, "small_batch": small, "large_batches": large,
           "rec_config": REC_CONFIG if not mf else None, "code_version": CODE_VERSION,
           "lr_rule": rule, "noise_scale": args.noise_scale, "quick": args.quick,
           "structures": structures, "seeds_per_structure": {n: (len(seeds) if k == 0 else args.minor_seeds)
                                                              for k, n in enumerate(structures)},
           "minor_seeds_min_batch": args.minor_seeds_min_batch,
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu"},
           "wall_seconds": time.time() - started, "noise_check": check, "tuning": tuning,
           "regimes": regimes, "gaps": gaps, "noise_scale_on_validation": scale_rows,
           "speed": speed, "speed_lever": speed_lever,
           "own_lr_structures": own_structures, "note": args.note}
    out["plain_path"] = args.plain_path if mf else None
    path = RESULTS / (args.out or f"optim_noise_{args.model}{'_quick' if args.quick else ''}.json")
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({"small": regimes[f"B={small}"]["summary"], "gaps": gaps, "speed": speed,
                      "speed_lever": speed_lever}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
