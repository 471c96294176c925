"""Data-parallel training (`recsys.distributed`): throughput and time-to-RMSE for 1 vs N
processes on MovieLens-100K u1, MF, with the learning rate scaled to the global batch by the
rules of `recsys.optim.scaling` (linear for SGD from its batch-1 default, square root for
Adam from a rate tuned at batch 512).

For each (optimizer, global batch) it trains the same run in one process and in ``--nproc``
processes (gloo on the CPU, NCCL with ``--device cuda``, one thread per process), validating
on u1.test after every epoch. Figures: training ratings per second (all epochs' ratings over
the summed epoch times), seconds until the held-out RMSE first reaches the target, and the
final RMSE (the two runs should agree to ~1e-5). Writes ``benchmarks/results/distributed.json``
with the machine and device.

    RECSYS_DATA=../shared/data python benchmarks/distributed.py            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from recsys.distributed import init_from_env, spawn
from recsys.optim.scaling import rule_for, scale_lr

RESULTS = Path(__file__).parent / "results" / "distributed.json"

#: (optimizer, base learning rate, the batch it is tuned for, global batch, epochs, RMSE target)
RUNS = (
    ("sgd", 0.018, 1, 1024, 10, 0.96),
    ("sgd", 0.018, 1, 4096, 10, 0.99),
    ("adam", 0.01, 512, 1024, 6, 0.99),
)
MODEL = {"embedding_size": 64, "n_blocks": 2}


def _fit(optimizer: str, lr: float, batch: int, epochs: int, device: str, parallel) -> dict:
    from recsys.datasets import load_split
    from recsys.models import build_model
    from recsys.train import TrainConfig, Trainer

    train, test = load_split("ml-100k", "u1")
    model = build_model("mf", train.n_users, train.n_items, train.rating_scale, dict(MODEL))
    config = TrainConfig(epochs=epochs, optimizer=optimizer, learning_rate=lr, batch_size=batch, lr_decay=0.94,
                         patience=None, progress=False, device=device, threads=1)
    result = Trainer(config, parallel=parallel).fit(model, train, test)
    # epoch seconds include the validation pass (the same in both runs)
    return {"step_kind": result.step_kind, "n_train": len(train),
            "epochs": [{"seconds": r.seconds, "rmse": r.validation_rmse} for r in result.history]}


def _worker(out: str, runs: list[tuple], device: str) -> None:
    parallel = init_from_env(device)
    figures = [_fit(opt, lr, batch, epochs, device, parallel) for opt, lr, batch, epochs in runs]
    if parallel is None or parallel.is_main:
        Path(out).write_text(json.dumps(figures))


def _summary(run: dict, target: float) -> dict:
    seconds = sum(e["seconds"] for e in run["epochs"])
    elapsed, reached = 0.0, None
    for e in run["epochs"]:
        elapsed += e["seconds"]
        if reached is None and e["rmse"] <= target:
            reached = elapsed
    return {"step_kind": run["step_kind"], "ratings_per_s": run["n_train"] * len(run["epochs"]) / seconds,
            "train_seconds": seconds, "seconds_to_target": reached, "final_rmse": run["epochs"][-1]["rmse"],
            "rmse_per_epoch": [e["rmse"] for e in run["epochs"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (NCCL, one GPU per process)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and torch.cuda.device_count() < args.nproc:
        parser.error(f"--device cuda with --nproc {args.nproc} needs {args.nproc} GPUs, "
                     f"found {torch.cuda.device_count()}")
    runs = [(opt, scale_lr(lr, base, batch, rule_for(opt)), batch, epochs) for opt, lr, base, batch, epochs, _ in RUNS]
    figures: dict[int, list[dict]] = {}
    for nproc in (1, args.nproc):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "figures.json")
            start = time.perf_counter()
            if nproc == 1:
                torch.set_num_threads(1)
                _worker(out, runs, args.device)
            else:
                spawn(_worker, nproc, out, runs, args.device, threads=1)
            figures[nproc] = json.loads(Path(out).read_text())
            print(f"{nproc} process(es): {time.perf_counter() - start:.1f} s wall", file=sys.stderr)
    rows = []
    for k, (opt, base_lr, base, batch, epochs, target) in enumerate(RUNS):
        row = {"optimizer": opt, "global_batch": batch, "learning_rate": runs[k][1], "lr_rule": rule_for(opt),
               "lr_base": {"learning_rate": base_lr, "batch": base}, "epochs": epochs, "rmse_target": target}
        for nproc in figures:
            row[f"nproc_{nproc}"] = _summary(figures[nproc][k], target)
        one, many = row["nproc_1"], row[f"nproc_{args.nproc}"]
        row["speedup"] = many["ratings_per_s"] / one["ratings_per_s"]
        row["final_rmse_difference"] = abs(many["final_rmse"] - one["final_rmse"])
        rows.append(row)
        reach = {n: (f"{row[f'nproc_{n}']['seconds_to_target']:.2f} s" if row[f"nproc_{n}"]["seconds_to_target"]
                     is not None else "not reached") for n in figures}
        print(f"{opt:5s} batch {batch:5d} lr {runs[k][1]:<8.4g} ({one['step_kind']}): "
              f"1 proc {one['ratings_per_s']:9,.0f} ratings/s, RMSE {target} in {reach[1]}, final {one['final_rmse']:.4f} | "
              f"{args.nproc} procs {many['ratings_per_s']:9,.0f} ratings/s, in {reach[args.nproc]}, "
              f"final {many['final_rmse']:.4f} | speed-up x{row['speedup']:.2f}")
    device = (torch.cuda.get_device_name(0) if args.device.startswith("cuda") else
              f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores")
    payload = {"benchmark": "distributed", "dataset": "ml-100k u1", "model": {"name": "mf", **MODEL},
               "nproc": args.nproc, "threads_per_process": 1,
               "backend": "nccl" if args.device.startswith("cuda") else "gloo", "device": device,
               "machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
               "note": "shared machine: other jobs ran at the same time; compare 1 vs N within this run",
               "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
