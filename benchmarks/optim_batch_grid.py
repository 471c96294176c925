"""Every optimizer at every batch size, as a user meets it (issue 23), on MovieLens-100K u1.

Each cell is what ``recsys evaluate --dataset ml-100k --split u1 --model M --optimizer O
--batch-size B --json`` runs with no other flag: `TrainConfig.for_model` with the optimizer's
reference schedule scaled to ``B`` by its own rule (`recsys.optim.scaling`), trained on the
whole of u1.base, u1.test reported. The reference cell is the model's default (``recsys
evaluate --model M``, no optimizer or batch flag).

Per cell: test RMSE, its gap to the default's, whether it is within ``--tolerance`` (0.01),
whether training diverged, wall seconds (training plus the final evaluation) and training
seconds, the schedule the scaling chose, and the test RMSE after every epoch with the training
seconds spent until then (the per-epoch evaluation is not counted), from which the training
seconds until the cell first reaches the default's test RMSE. ``soonest``: the cell that gets
there in the fewest training seconds.

MF: 8 optimizers x batches 256, 4,096, 16,384. REC (``--models rec``): batches 256 and 4,096
for ``--rec-optimizers`` (default adam, REC's own, cov-noise and kfac; REC declares a
reference for every other optimizer of the grid in `EvidenceChainModel.optimizer_defaults`,
``sgd`` and ``adagrad`` included: ``docs/optimizers.md``).
The machine is shared: seconds are noisy; every cell of one run shares the same load.

    RECSYS_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/optim_batch_grid.py [--models mf,rec]

On a shared machine the slow REC cells can run as parts in parallel processes and be joined:
``--models rec --part default --out part_a.json``, ``--models rec --part cells --rec-optimizers
adam --batches 256 --out part_b.json``, ..., then ``--merge part_a.json part_b.json ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from results_file import write_json  # this folder is on the path when run as a script

from recsys.datasets import load_split
from recsys.errors import TrainingDivergedError
from recsys.evaluate import evaluate_ratings
from recsys.models import MODELS, build_model
from recsys.train import Callback, TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"
MF_OPTIMIZERS = ("sgd", "adam", "adagrad", "kfac", "ekfac", "tkfac", "tekfac", "cov-noise")
BATCHES = {"mf": (256, 4096, 16384), "rec": (256, 4096)}


class TestCurve(Callback):
    """After every epoch: the test RMSE and the training seconds so far (evaluation excluded).
    ``on_point``: called with the curve after every new point (to save a running cell's
    progress, so that a cell stopped before its end leaves its curve)."""

    def __init__(self, model, test, every: int = 1, on_point=None) -> None:
        self.model, self.test, self.every, self.on_point = model, test, every, on_point
        self.curve: list[dict] = []
        self.train_seconds = 0.0

    def on_epoch_end(self, record) -> None:
        self.train_seconds += record.seconds
        if record.epoch % self.every == 0:
            rmse = float(evaluate_ratings(self.model, self.test)["rmse"])
            self.curve.append({"epoch": record.epoch, "train_seconds": self.train_seconds, "test_rmse": rmse,
                               "train_mse": record.train_mse})
            if self.on_point is not None:
                self.on_point(self.curve)


def run_cell(model_name: str, train, test, optimizer: str | None, batch: int | None, every: int,
             on_point=None) -> dict:
    """One cell: the config the command line builds for these flags, trained and tested.
    ``on_point(curve)``: see `TestCurve`."""
    model_cls = MODELS[model_name][0]
    over: dict = {"patience": None, "progress": False}
    if optimizer is not None:
        over["optimizer"] = optimizer
    if batch is not None:
        over["batch_size"] = batch
    config = TrainConfig.for_model(model_cls, examples=len(train), **over)
    model = build_model(model_name, train.n_users, train.n_items, train.rating_scale, {"seed": 0})
    curve = TestCurve(model, test, every, on_point)
    out = {"model": model_name, "optimizer": config.optimizer, "batch_size": config.batch_size,
           "learning_rate": config.learning_rate, "epochs": config.epochs, "lr_decay": config.lr_decay,
           "damping": config.kfac.damping if config.optimizer in ("kfac", "ekfac", "tkfac", "tekfac") else None,
           "stats_freq": config.kfac.stats_freq if config.optimizer in ("kfac", "tkfac") else None,
           "lr_scales": config.lr_scales, "optimizer_options": config.optimizer_options,
           "scaling": None if config.scaling is None else asdict(config.scaling)}
    t0 = time.perf_counter()
    try:
        result = Trainer(config, callbacks=[curve]).fit(model, train)
    except TrainingDivergedError as exc:
        return {**out, "diverged": True, "error": str(exc), "test_rmse": None,
                "wall_seconds": time.perf_counter() - t0, "curve": curve.curve}
    t1 = time.perf_counter()
    rmse = float(evaluate_ratings(model, test)["rmse"])
    eval_seconds = time.perf_counter() - t1
    # wall: training (the epochs' own seconds, not the per-epoch test curve) plus the final test
    return {**out, "diverged": not math.isfinite(rmse), "test_rmse": rmse, "train_seconds": curve.train_seconds,
            "wall_seconds": curve.train_seconds + eval_seconds, "step_kind": result.step_kind,
            "curve": curve.curve}


def seconds_to(curve: list[dict], target: float) -> float | None:
    """Training seconds until the test RMSE first reaches ``target`` (None: never)."""
    return next((p["train_seconds"] for p in curve if p["test_rmse"] <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mf", help="mf, rec or mf,rec")
    ap.add_argument("--optimizers", default=",".join(MF_OPTIMIZERS), help="MF's optimizers")
    ap.add_argument("--rec-optimizers", default="adam,cov-noise,kfac")
    ap.add_argument("--batches", help="override the batch sizes (comma-separated)")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--rec-every", type=int, default=3, help="REC: evaluate the test curve every N epochs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="optim_batch_grid.json")
    ap.add_argument("--part", choices=("default", "cells"), default=None,
                    help="run only the default or only the cells (one --models): parts run in parallel "
                         "processes write their own --out, and --merge joins them")
    ap.add_argument("--merge", nargs="+", metavar="FILE",
                    help="join part files (in benchmarks/results) into --out, recomputing gaps and the soonest")
    args = ap.parse_args()
    if args.merge:
        merge(args)
        return
    torch.set_num_threads(args.threads)
    train, test = load_split("ml-100k", "u1")
    out_path = RESULTS / args.out
    results: dict = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.update({"dataset": "ml-100k", "split": "u1", "tolerance": args.tolerance, "threads": args.threads,
                    "machine": platform.machine(), "note": "2-core CPU shared with other jobs: seconds are noisy"})
    for model_name in args.models.split(","):
        every = args.rec_every if model_name == "rec" else 1
        optimizers = (args.optimizers if model_name == "mf" else args.rec_optimizers).split(",")
        batches = [int(b) for b in args.batches.split(",")] if args.batches else BATCHES[model_name]
        default = None
        if args.part != "cells":
            print(f"== {model_name}: default", flush=True)
            default = run_cell(model_name, train, test, None, None, every)
            print(f"default ({default['optimizer']}, batch {default['batch_size']}): test RMSE "
                  f"{default['test_rmse']:.4f}  {default['wall_seconds']:.1f} s", flush=True)
        cells = []
        for optimizer in optimizers if args.part != "default" else ():
            for batch in batches:
                cells.append(run_cell(model_name, train, test, optimizer, batch, every,
                                      lambda curve, m=model_name, o=optimizer, b=batch:
                                      _save_running(results, out_path, m, o, b, curve)))
                results.pop("running", None)
                c = cells[-1]
                rmse = "diverged" if c["diverged"] else f"{c['test_rmse']:.4f}"
                print(f"{optimizer:10s} B={batch:6d} lr {c['learning_rate']:<9.4g} epochs {c['epochs']:3d}  "
                      f"test {rmse}  {c['wall_seconds']:6.1f} s", flush=True)
        results[model_name] = summarise(default, cells, args.tolerance)
        if default is not None and cells:
            _print_table(model_name, results[model_name])
        RESULTS.mkdir(exist_ok=True)
        write_json(out_path, results)
        print(f"wrote {out_path}", flush=True)


def _save_running(results: dict, out_path: Path, model_name: str, optimizer: str, batch: int,
                  curve: list[dict]) -> None:
    """Write ``results`` with the running cell's curve so far under ``running`` (removed when
    the cell ends): a cell stopped before its end leaves its test curve."""
    results["running"] = {"model": model_name, "optimizer": optimizer, "batch_size": batch, "curve": curve}
    RESULTS.mkdir(exist_ok=True)
    write_json(out_path, results)


def summarise(default: dict | None, cells: list[dict], tolerance: float) -> dict:
    """One model's grid: every cell's gap to the default, whether it is within ``tolerance``,
    its training seconds to the default's test RMSE, and the cell that gets there soonest."""
    out: dict = {"default": default, "cells": cells}
    if default is None:
        return out
    target = default["test_rmse"] + tolerance
    for cell in cells:
        cell["gap"] = None if cell["diverged"] else cell["test_rmse"] - default["test_rmse"]
        cell["within_tolerance"] = (not cell["diverged"]) and cell["test_rmse"] <= target
        cell["seconds_to_default_rmse"] = seconds_to(cell["curve"], default["test_rmse"])
    default["seconds_to_default_rmse"] = seconds_to(default["curve"], default["test_rmse"])
    reached = [c for c in [default, *cells] if c.get("seconds_to_default_rmse") is not None]
    soonest = min(reached, key=lambda c: c["seconds_to_default_rmse"]) if reached else None
    out["trace_kinds"] = trace_kinds(cells)
    out.update({
        "all_within_tolerance": all(c["within_tolerance"] for c in cells),
        "diverged": sum(c["diverged"] for c in cells),
        "soonest": None if soonest is None else {k: soonest[k] for k in ("optimizer", "batch_size",
                                                                         "seconds_to_default_rmse")},
    })
    return out


def trace_kinds(cells: list[dict]) -> dict:
    """TEKFAC against EKFAC and TKFAC against K-FAC: the largest test-RMSE difference over the
    batches both ran, and what it means (on embedding tables TEKFAC's trace weight cancels)."""
    out = {}
    for trace, plain in (("tekfac", "ekfac"), ("tkfac", "kfac")):
        a = {c["batch_size"]: c.get("test_rmse") for c in cells if c["optimizer"] == trace}
        b = {c["batch_size"]: c.get("test_rmse") for c in cells if c["optimizer"] == plain}
        both = [k for k in a if k in b and a[k] is not None and b[k] is not None]
        if not both:
            continue
        diff = max(abs(a[k] - b[k]) for k in both)
        out[trace] = {"against": plain, "max_abs_test_rmse_difference": diff,
                      "reading": (f"equals {plain.upper()} on embedding tables" if diff < 1e-5 else
                                  f"differs from {plain.upper()} by at most {diff:.5f} test RMSE")}
    return out


def merge(args: argparse.Namespace) -> None:
    """Join part files (each ``{model: {"default", "cells"}}``) into ``--out``."""
    results: dict = {}
    parts = [json.loads((RESULTS / name).read_text()) for name in args.merge]
    for part in parts:
        for key, value in part.items():
            if not isinstance(value, dict) or "cells" not in value:
                results.setdefault(key, value)
    for model_name in dict.fromkeys(k for p in parts for k, v in p.items() if isinstance(v, dict) and "cells" in v):
        default = next((p[model_name]["default"] for p in parts
                        if model_name in p and p[model_name].get("default")), None)
        cells = [c for p in parts if model_name in p for c in p[model_name]["cells"]]
        results[model_name] = summarise(default, cells, args.tolerance)
        if default is not None:
            _print_table(model_name, results[model_name])
    results["parts"] = args.merge
    write_json(RESULTS / args.out, results)
    print(f"wrote {RESULTS / args.out}", flush=True)


def _print_table(model_name: str, grid: dict) -> None:
    default, cells, soonest = grid["default"], grid["cells"], grid.get("soonest")
    batches = sorted({c["batch_size"] for c in cells})
    print(f"\n{model_name}: test RMSE (wall s) per batch size; default {default['test_rmse']:.4f} "
          f"({default['wall_seconds']:.1f} s)")
    print("| optimizer | " + " | ".join(f"B={b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for optimizer in dict.fromkeys(c["optimizer"] for c in cells):
        row = {c["batch_size"]: c for c in cells if c["optimizer"] == optimizer}
        print(f"| {optimizer} | " + " | ".join(
            "-" if b not in row else "diverged" if row[b]["diverged"]
            else f"{row[b]['test_rmse']:.4f} ({row[b]['wall_seconds']:.1f} s)" for b in batches) + " |")
    print(f"every cell within the tolerance: {grid.get('all_within_tolerance')}; diverged: {grid.get('diverged')}")
    for name, t in grid.get("trace_kinds", {}).items():
        print(f"{name}: {t['reading']} (max |difference| {t['max_abs_test_rmse_difference']:.2g})")
    if soonest is not None:
        print(f"soonest to the default's RMSE: {soonest['optimizer']} at batch {soonest['batch_size']}, "
              f"{soonest['seconds_to_default_rmse']:.1f} s of training")


if __name__ == "__main__":
    main()
