"""Curvature optimizers against SGD and Adam on MF, MovieLens-100K u1 (issue: shared optimizers).

``--part speed``: epochs and training seconds until the validation RMSE reaches ``--target``
(0.93) for SGD, Adam, K-FAC, EKFAC, TKFAC and TEKFAC, each with and without SALR, at batch
``--batch`` (256). Every optimizer gets a learning-rate grid (seed 0, constant lr) and reports
its fastest lr (fewest epochs, then fewest seconds); seconds per step are measured in the same
run, so the step-cost ratios to Adam are comparable. A run stops at the target or after
``--max-epochs``. Everything but the schedule is the optimizer's default on MF
(`MatrixFactorization.optimizer_defaults`, e.g. the K-FAC family's damping); ``--only``
reruns some optimizers and merges them into the last results file.

``--checks-per-epoch 4`` validates four times per epoch and ranks by the first quarter-epoch
at the target (integer epochs cannot separate optimizers that both need "2"); with ``--lrs``
every optimizer gets the same, finer grid and ``--out`` keeps the results apart:

    python benchmarks/optim_curvature.py --part speed --only adam,kfac,ekfac,tkfac,tekfac --no-salr \
        --checks-per-epoch 4 --lrs 0.003,0.005,0.01,0.02,0.03 --max-epochs 3 --out optim_curvature_speed_fine.json

``--part steps``: milliseconds per step of every optimizer (± SALR) at the same batch, in
interleaved rounds on one thread (the step-cost ratio to Adam; a busy machine slows all alike),
each with its defaults on MF (K-FAC and TKFAC: factors every 10 steps, ``stats_freq``).

``--part defaults``: every optimizer with its defaults (`MatrixFactorization.optimizer_defaults`,
what ``recsys train --optimizer NAME`` uses) trained once on u1.base minus the 5% validation
slice: its validation RMSE and its u1.test RMSE, and the test gap to the best optimizer
(target: every one within 0.01 of the best). (Trained on 95% of u1.base, so every test RMSE
is a little above a whole-fold fit's; the comparison between optimizers is like for like.)

The validation slice is 5% of u1.base (seed 0); u1.test is only read by ``--part defaults``.

    RECSYS_DATA=../shared/data python benchmarks/optim_curvature.py --part speed|steps|defaults [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from recsys.datasets import load_split
from recsys.errors import TrainingDivergedError
from recsys.evaluate import evaluate_ratings
from recsys.models import MatrixFactorization, build_model
from recsys.splits import validation_slice
from recsys.train import AutogradStepper, Callback, TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"
OPTIMIZERS = ("sgd", "adam", "kfac", "ekfac", "tkfac", "tekfac")
#: learning-rate grids at batch 256 (mean loss): SGD's rate is per batch-mean gradient
GRIDS = {"sgd": [2.0, 4.0, 8.0], "adam": [0.003, 0.01, 0.03],
         **{k: [0.003, 0.01, 0.03] for k in ("kfac", "ekfac", "tkfac", "tekfac")}}


@torch.no_grad()
def validation_rmse(model, validation) -> float:
    """The RMSE `Trainer.fit` validates with (float32, clipped predictions); leaves the model
    in eval mode."""
    model.eval()
    u, i, r = validation.tensors(model.device)
    return float(torch.sqrt(torch.mean((model.predict(u, i) - r) ** 2)))


class StopAt(Callback):
    """Stops training once the validation RMSE reaches ``target``; counts steps. With
    ``checks > 1`` it also validates ``checks`` times per epoch (after every ``1/checks`` of
    the epoch's steps) and records the first fraction of an epoch at which the target was
    reached (``reached_fraction``) and the training seconds until then (validation time
    excluded); training stops at the end of that epoch."""

    def __init__(self, target: float, val=None, steps_per_epoch: int = 1, checks: int = 1) -> None:
        self.target = target
        self.steps = 0
        self.reached_epoch: int | None = None
        self.reached_seconds: float | None = None
        self.reached_fraction: float | None = None
        self.fraction_seconds: float | None = None
        self.curve: list[tuple[float, float]] = []
        self._seconds = 0.0
        self._val, self._per_epoch, self._checks = val, steps_per_epoch, checks
        self._model = None
        self._clock = 0.0
        self._paused = 0.0

    def on_train_begin(self, trainer, model, train) -> None:
        self._model = model
        self._clock = time.perf_counter()

    def on_batch_end(self, example_ids, loss) -> None:
        self.steps += 1
        if self._checks <= 1 or self._val is None or self.reached_fraction is not None:
            return
        within = self.steps % self._per_epoch
        marks = {round(k * self._per_epoch / self._checks) for k in range(1, self._checks)}
        if within not in marks:
            return
        t0 = time.perf_counter()
        rmse = validation_rmse(self._model, self._val)
        self._model.train()
        epoch = self.steps / self._per_epoch
        self.curve.append((round(epoch, 3), round(rmse, 5)))
        if rmse <= self.target:
            self.reached_fraction = epoch
            self.fraction_seconds = t0 - self._clock - self._paused
        self._paused += time.perf_counter() - t0

    def on_epoch_end(self, record) -> bool:
        self._seconds += record.seconds
        if self._checks > 1 and record.validation_rmse is not None:
            self.curve.append((float(record.epoch), round(record.validation_rmse, 5)))
            if self.reached_fraction is None and record.validation_rmse <= self.target:
                self.reached_fraction = float(record.epoch)
                self.fraction_seconds = self._seconds
        if record.validation_rmse is not None and record.validation_rmse <= self.target:
            self.reached_epoch, self.reached_seconds = record.epoch, self._seconds
            return True
        return self.reached_fraction is not None


def speed_run(fit, val, optimizer: str, lr: float, salr: bool, batch: int, target: float,
              max_epochs: int, checks: int = 1) -> dict:
    model = build_model("mf", fit.n_users, fit.n_items, fit.rating_scale, {})
    stop = StopAt(target, val, -(-len(fit) // batch), checks)
    # the optimizer's own defaults on MF (e.g. the K-FAC family's damping) under this schedule
    cfg = TrainConfig.for_model(MatrixFactorization, optimizer=optimizer, learning_rate=lr, batch_size=batch,
                                epochs=max_epochs, lr_decay=1.0, patience=None, salr=salr, progress=False, seed=0)
    out = {"optimizer": optimizer, "salr": salr, "lr": lr}
    try:
        res = Trainer(cfg, callbacks=[stop]).fit(model, fit, val)
    except TrainingDivergedError as e:
        return {**out, "diverged": str(e).split(";")[0]}
    train_seconds = sum(h.seconds for h in res.history)
    return {**out, "diverged": False, "step_kind": res.step_kind,
            "epochs_to_target": stop.reached_epoch, "seconds_to_target": stop.reached_seconds,
            "validation_curve": [round(h.validation_rmse, 5) for h in res.history],
            "best_validation_rmse": min(h.validation_rmse for h in res.history),
            "ms_per_step": 1000 * train_seconds / max(stop.steps, 1), "epochs_run": len(res.history),
            **({"checks_per_epoch": checks, "fraction_to_target": stop.reached_fraction,
                "seconds_to_fraction": stop.fraction_seconds, "fine_curve": stop.curve} if checks > 1 else {})}


def part_speed(args, fit, val) -> dict:
    rows = []
    names = args.only.split(",") if args.only else OPTIMIZERS
    path = RESULTS / (args.out or "optim_curvature_speed.json")
    if args.only and path.exists():  # refresh some optimizers' rows of the last full run
        rows = [r for r in json.loads(path.read_text())["rows"] if r["optimizer"] not in names]
    for optimizer in names:
        for salr in (False,) if args.no_salr else (False, True):
            grid = ([float(x) for x in args.lrs.split(",")] if args.lrs
                    else GRIDS[optimizer][1:2] if args.quick else GRIDS[optimizer])
            for lr in grid:
                row = speed_run(fit, val, optimizer, lr, salr, args.batch, args.target, args.max_epochs,
                                args.checks_per_epoch)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "validation_curve"}), flush=True)
    best = {}
    for optimizer in OPTIMIZERS:
        for salr in (False, True):
            ran = [r for r in rows if r["optimizer"] == optimizer and r["salr"] == salr]
            if not ran:
                continue
            mine = [r for r in ran if not r["diverged"]]
            reached = [r for r in mine if r["epochs_to_target"] is not None]
            key = optimizer + (" + SALR" if salr else "")
            fine = [r for r in mine if r.get("fraction_to_target") is not None]
            if fine:  # fastest at the finer resolution
                b = min(fine, key=lambda r: (r["fraction_to_target"], r["seconds_to_fraction"]))
            elif reached:
                b = min(reached, key=lambda r: (r["epochs_to_target"], r["seconds_to_target"]))
            elif mine:
                b = min(mine, key=lambda r: r["best_validation_rmse"])
            else:
                best[key] = {"diverged": True}
                continue
            best[key] = {k: b[k] for k in ("lr", "epochs_to_target", "seconds_to_target", "ms_per_step",
                                           "best_validation_rmse", "step_kind", "fraction_to_target",
                                           "seconds_to_fraction") if k in b}
    adam_ms = best.get("adam", {}).get("ms_per_step")
    for v in best.values():
        if adam_ms and "ms_per_step" in v:
            v["step_cost_vs_adam"] = v["ms_per_step"] / adam_ms
    return {"rows": rows, "best": best}


def part_steps(args, fit) -> dict:
    """Milliseconds per training step (forward, backward, preconditioner, optimizer) of each
    optimizer through the Trainer's autograd path, measured in interleaved rounds so that a
    busy machine slows them alike; the median round per optimizer."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(fit), (args.batch,), generator=gen).numpy() for _ in range(args.step_count)]
    setups = {}
    for optimizer in OPTIMIZERS:
        for salr in (False, True):
            model = build_model("mf", fit.n_users, fit.n_items, fit.rating_scale, {})
            model.prepare(fit)
            cfg = TrainConfig.for_model(MatrixFactorization, optimizer=optimizer, batch_size=args.batch,
                                        learning_rate=1e-4, salr=salr, progress=False)
            setups[optimizer + (" + SALR" if salr else "")] = (AutogradStepper(model, fit, cfg),)

    def one_round(stepper) -> float:
        t0 = time.perf_counter()
        for b in batches:  # the step `Trainer.fit` takes on the autograd path
            stepper.step(b, 1e-4)
        return 1000 * (time.perf_counter() - t0) / len(batches)

    times: dict[str, list[float]] = {k: [] for k in setups}
    for _ in range(args.rounds):
        for key, setup in setups.items():
            times[key].append(one_round(*setup))
    out = {k: {"ms_per_step": float(np.median(v)), "rounds": [round(x, 3) for x in v]} for k, v in times.items()}
    adam = out["adam"]["ms_per_step"]
    for v in out.values():
        v["vs_adam"] = v["ms_per_step"] / adam
    for key, v in out.items():
        print(f"{key:16s} {v['ms_per_step']:7.2f} ms/step  {v['vs_adam']:.2f}x Adam", flush=True)
    return {"batch": args.batch, "steps_per_round": args.step_count, "best": out}


def part_defaults(args, test, fit, val) -> dict:
    rows = {}
    names = args.only.split(",") if args.only else (*OPTIMIZERS, "adagrad", "sparse-adam", "cov-noise")
    path = RESULTS / "optim_curvature_defaults.json"
    if args.only and path.exists():  # refresh some rows of the last full run
        rows = json.loads(path.read_text())["rows"]
    for optimizer in names:
        cfg = TrainConfig.for_model(MatrixFactorization, optimizer=optimizer, progress=False, patience=None)
        if args.quick:
            cfg = replace(cfg, epochs=2)
        out = {"train_config": {**{k: getattr(cfg, k) for k in ("batch_size", "learning_rate", "epochs", "lr_decay")},
                                "noise_scale": cfg.noise.scale, "damping": cfg.kfac.damping,
                                "stats_freq": cfg.kfac.stats_freq}}
        model = build_model("mf", fit.n_users, fit.n_items, fit.rating_scale, {})
        try:
            res = Trainer(cfg).fit(model, fit)
        except TrainingDivergedError as e:
            out.update(validation_rmse=None, test_rmse=None, diverged=str(e).split(";")[0])
        else:
            out.update(validation_rmse=evaluate_ratings(model, val)["rmse"], test_rmse=evaluate_ratings(model, test)["rmse"],
                       fit_seconds=res.fit_seconds, step_kind=res.step_kind)
        rows[optimizer] = out
        print(optimizer, json.dumps(out), flush=True)
    scored = {k: v["test_rmse"] for k, v in rows.items() if v.get("test_rmse") is not None}
    best = min(scored.values())
    for v in rows.values():
        v["gap_to_best"] = None if v.get("test_rmse") is None else v["test_rmse"] - best
        v["within_0.01"] = v["gap_to_best"] is not None and v["gap_to_best"] <= 0.01
    return {"rows": rows, "best_test_rmse": best, "best": min(scored, key=scored.get)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("speed", "steps", "defaults"), default="speed")
    parser.add_argument("--rounds", type=int, default=7, help="--part steps: interleaved rounds")
    parser.add_argument("--step-count", type=int, default=40, help="--part steps: steps per round")
    parser.add_argument("--target", type=float, default=0.93)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--only", default="", help="--part defaults / speed: only these optimizers "
                                                   "(comma-separated), merged into the last results file")
    parser.add_argument("--checks-per-epoch", type=int, default=1,
                        help="--part speed: validate this many times per epoch and report the first "
                             "fraction of an epoch at which the target is reached")
    parser.add_argument("--no-salr", action="store_true", help="--part speed: without the SALR rows")
    parser.add_argument("--lrs", default="", help="--part speed: this learning-rate grid (comma-separated) "
                                                  "for every optimizer run, instead of GRIDS")
    parser.add_argument("--out", default="", help="results file name (default optim_curvature_PART.json)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.max_epochs = 2
    train, test = load_split("ml-100k", "u1")
    fit, val = validation_slice(train, 0.05, seed=0)
    started = time.time()
    if args.part == "speed":
        result = part_speed(args, fit, val)
    elif args.part == "steps":
        result = part_steps(args, fit)
    else:
        result = part_defaults(args, test, fit, val)
    out = {"benchmark": f"optim_curvature_{args.part}", "dataset": "ml-100k u1 (5% validation slice, seed 0)",
           "target_validation_rmse": args.target, "batch": args.batch, "max_epochs": args.max_epochs,
           "quick": args.quick, "wall_seconds": time.time() - started,
           "machine": {"platform": platform.platform(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "device": "cpu"}, **result}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (args.out or f"optim_curvature_{args.part}{'_quick' if args.quick else ''}.json")
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(result.get("best"), indent=1))
    print("wrote", path, f"({np.round(time.time() - started)} s)")


if __name__ == "__main__":
    main()
