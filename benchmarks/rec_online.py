"""Online learning and serving speed of the evidence-chain model on MovieLens-100K u1.

1. Online: for ``--trials`` random test pairs (u, i) of u1.test, insert one other rating of u
   (a real u1.test rating of u for another item) with `add_ratings` and no training step;
   report how often and by how much the prediction for (u, i) moves, split into the part
   from the baseline bias update and the part from the generated vectors, and the time an
   insertion takes. The live ratings are restored between trials.
2. Latency: single-pair `predict` calls on the CPU at the default fanouts and eval passes,
   p50/p99 over ``--calls`` random pairs (``--latency-threads`` torch threads), and the same
   at each of ``--other-fanouts`` (same parameters; only the sampling changes) for the
   accuracy/latency trade-off. CPU inference runs the compiled kernels
   (`recsys.models.rec.kernels`); the tensor code's latency is measured beside them, in the
   same run (``compiled_kernels`` off), with the largest difference between the two
   paths' predictions over u1.test.
3. Throughput: predictions per second for u1.test in batches of 1, 256, 4096 and 20000,
   for both paths.

The model is trained here for ``--epochs`` epochs (speed does not depend on accuracy).
Writes ``benchmarks/results/rec_online.json``.

    RECSYS_DATA=../shared/data python benchmarks/rec_online.py [--epochs 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from results_file import write_json  # this folder is on the path when run as a script

from recsys.datasets import load_split
from recsys.models import EvidenceChainModel, build_model
from recsys.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--latency-threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--other-fanouts", default="16-8-4", help="comma-separated, e.g. 16-8-4,8-8-4 ('' for none)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, test = load_split("ml-100k", "u1")
    model = build_model("rec", train.n_users, train.n_items, train.rating_scale, {"seed": args.seed})
    tc = {**EvidenceChainModel.training_defaults, "epochs": args.epochs, "progress": False, "patience": None}
    Trainer(TrainConfig(**tc)).fit(model, train)
    model.eval()
    live = model.ratings
    rng = np.random.default_rng(args.seed)
    raw_u, raw_i = test.user_ids.raw_ids, test.item_ids.raw_ids

    # ---- 1. online insertion
    moved, deltas, bias_parts, insert_s = 0, [], [], []
    by_user = test.by_user
    trials = 0
    for row in rng.permutation(len(test)):
        if trials == args.trials:
            break
        u, i = int(test.users[row]), int(test.items[row])
        others = [k for k in range(*by_user.row(u).indices(len(by_user.columns))) if by_user.columns[k] != i]
        if not others:
            continue
        k = others[int(rng.integers(len(others)))]
        j, r = int(by_user.columns[k]), float(by_user.values[k])
        model.bind_ratings(live)
        pair = (torch.tensor([u]), torch.tensor([i]))
        before = float(model.predict(*pair)[0])
        bias_before = model.live()[1].clone()
        t0 = time.perf_counter()
        model.add_ratings([raw_u[u]], [raw_i[j]], [r])
        insert_s.append(time.perf_counter() - t0)
        after = float(model.predict(*pair)[0])
        nb = model.live()[1]
        bias_parts.append(float((nb[u] - bias_before[u]) + (nb[live.n_users + i] - bias_before[live.n_users + i])))
        deltas.append(after - before)
        moved += after != before
        trials += 1
    model.bind_ratings(live)
    d = np.abs(np.asarray(deltas))
    online = {"trials": trials, "moved": int(moved), "mean_abs_change": float(d.mean()),
              "median_abs_change": float(np.median(d)), "max_abs_change": float(d.max()),
              "mean_abs_bias_part": float(np.abs(bias_parts).mean()),
              "mean_abs_vector_part": float(np.abs(np.asarray(deltas) - np.asarray(bias_parts)).mean()),
              "insert_ms_p50": 1e3 * float(np.percentile(insert_s, 50)),
              "insert_ms_p99": 1e3 * float(np.percentile(insert_s, 99))}
    print("online:", json.dumps(online), flush=True)

    # ---- 2. single-prediction latency
    torch.set_num_threads(args.latency_threads)
    model.to(args.device)
    pick = rng.integers(len(test), size=args.calls)

    def single_latency() -> dict:
        times = []
        for row in pick[:20]:  # warm-up
            model.predict(torch.tensor([int(test.users[row])]), torch.tensor([int(test.items[row])]))
        for row in pick:
            u, i = torch.tensor([int(test.users[row])]), torch.tensor([int(test.items[row])])
            t0 = time.perf_counter()
            model.predict(u, i)
            if args.device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return {"calls": args.calls, "threads": args.latency_threads, "p50_ms": 1e3 * float(np.percentile(times, 50)),
                "p99_ms": 1e3 * float(np.percentile(times, 99)), "max_ms": 1e3 * float(np.max(times)),
                "fanouts": list(model.config.fanouts), "eval_passes": model.config.eval_passes,
                "path": "compiled kernels" if model.compiled_kernels else "tensor code"}

    latency = single_latency()
    print("latency:", json.dumps(latency), flush=True)
    model.compiled_kernels = False
    latency_tensor = single_latency()
    print("latency, tensor code:", json.dumps(latency_tensor), flush=True)
    u_all, i_all, _ = test.tensors()
    tensor_pred = model.predict(u_all, i_all)
    model.compiled_kernels = True
    path_gap = float((model.predict(u_all, i_all) - tensor_pred).abs().max())
    print(f"largest |compiled - tensor code| prediction over u1.test: {path_gap:.2e}", flush=True)
    trained = model.config
    other_latency = []
    for spec in filter(None, args.other_fanouts.split(",")):
        model.config = dataclasses.replace(trained, fanouts=tuple(int(f) for f in spec.split("-")))
        other_latency.append(single_latency())
        print("latency at other fanouts:", json.dumps(other_latency[-1]), flush=True)
    model.config = trained

    # ---- 3. batch throughput
    torch.set_num_threads(2)
    throughput: dict[str, dict[str, float]] = {"compiled": {}, "tensor_code": {}}
    for bs in (1, 256, 4096, 20000):
        n = min(len(test), 2000 if bs == 1 else len(test))
        for path in ("compiled", "tensor_code"):  # alternating, so both see the same machine
            model.compiled_kernels = path == "compiled"
            t0 = time.perf_counter()
            for s in range(0, n, bs):
                model.predict(u_all[s:min(s + bs, n)], i_all[s:min(s + bs, n)])
            throughput[path][str(bs)] = n / (time.perf_counter() - t0)
    model.compiled_kernels = True
    print("throughput (predictions/s by batch size):", json.dumps(throughput), flush=True)
    out = {"benchmark": "rec_online", "dataset": "ml-100k u1", "epochs_trained": args.epochs,
           "device": args.device, "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "parameters": model.parameter_count(), "config": model.config_dict(),
           "online": online, "latency": latency, "latency_tensor_code": latency_tensor,
           "compiled_vs_tensor_code_max_abs_prediction_gap": path_gap, "latency_other_fanouts": other_latency,
           "throughput_per_s": throughput, "throughput_threads": 2}
    write_json(RESULTS / "rec_online.json", out)


if __name__ == "__main__":
    main()
