"""Faithfulness and cost of the evidence-chain model's explanations as served (issue 22), on
the default REC model (`recsys train --model rec` defaults) of MovieLens-100K u1.

- ``served`` (`recsys.experiments.rec_faithfulness.served_run`): the served explainer's
  effects against leave-one-out on the served model (same trained parameters, the rating
  removed from the live ratings under the same evaluation sampling seed, baselines
  refitted), on ``--pairs`` test predictions x up to ``--candidates`` first-hop evidence
  ratings, top-1 / random removal directions on ``--removal-pairs``, the leave-one-out under
  another sampling seed as noise floor, cold users built from 5 ratings; the first-hop
  shares of ``u·v`` (the estimate served before) scored on the same points.
- ``retrained`` (``--retrain-removals N``,
  `recsys.experiments.rec_faithfulness.retrained_run`, what ``recsys explain-eval --model
  rec`` reports): N random training ratings of test users with at most ``fanouts[0]``
  ratings (all first-hop evidence of the user's predictions), each removed and the model
  retrained on the same trajectory (`recsys.experiments.rec_rollback.retrain`: same initial
  weights, orders and sampling keys; the chains' draws are keyed by node, so the rest of
  every step samples what the full run sampled); the true change of every test prediction
  of the user and of the rated item whose served explanation lists the rating, against its
  served effect (and share) in the full model, which is the retrain with nothing removed
  (= `Trainer.fit`). Retrains run in ``--workers`` processes, each writing its result to
  ``--retrain-dir`` (a run started again there skips the retrains already done).
  ``--replica-removals R``: the full run and the first R removals retrained again in a
  replica perturbed by removing a far rating (one no measured prediction's user or item
  rated) from both: the truth is the two retrains' mean change, and one against the other is
  the replica floor. ``--noise-removals K``: the full run and the first K removals retrained
  under ``--noise-seed`` too (other initial weights, prototypes, orders and sampling keys):
  the retrain noise floor, that truth against the served model's truth on the same points.
- ``latency``: the served explainer's wall time for ``--latency-pairs`` test pairs (k=5);
  with ``--artefact``, also the service path (`Recommender.predict(user, item, explain=5)`
  in-process, the artefact loaded and warmed) against the reference computation the
  explainer made before the batched `leave_one_out_effects` (the first-hop evidence by
  `EvidenceChainModel.explain`, then `leave_one_out_effects_reference`: one `substituted`
  forward per rating), on the same pairs in the same run, interleaved pair by pair.
  ``--latency-only`` measures this alone and keeps the results file's other figures.

    NUMBA_NUM_THREADS=1 RECSYS_DATA=../shared/data python benchmarks/explain_rec.py \\
        [--artefact DIR] [--retrain-removals 16 --replica-removals 16 --noise-removals 4 --retrain-dir DIR] [--workers 2] [--latency-only]

``--artefact``: a saved default REC model of u1 to measure (else one is trained here, or,
with ``--retrain-removals``, the full run of the retrains is used).
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # numba's OpenMP pool otherwise slows torch here

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from results_file import write_json  # noqa: E402  (this folder is on the path when run as a script)

from recsys.artefact import load_artefact  # noqa: E402
from recsys.datasets import load_split  # noqa: E402
from recsys.experiments.rec_faithfulness import retrained_run, served_run  # noqa: E402
from recsys.models.rec.explain import leave_one_out_effects_reference  # noqa: E402
from recsys.models.rec.model import EvidenceChainModel, RECConfig  # noqa: E402
from recsys.recommender import Recommender  # noqa: E402
from recsys.train import TrainConfig, Trainer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "explain_rec.json"


def default_configs() -> tuple[RECConfig, TrainConfig]:
    """`recsys train --model rec`'s defaults (no validation slice, so no early stopping)."""
    return RECConfig(), TrainConfig.for_model(EvidenceChainModel, patience=None, progress=False)


def latency(model: EvidenceChainModel, test, n: int) -> dict:
    explainer = model.explainer(model.ratings)
    rng = np.random.default_rng(1)
    times, sizes = [], []
    for k in rng.permutation(len(test))[:n]:
        u, i = int(test.users[k]), int(test.items[k])
        t0 = time.perf_counter()
        exp = explainer.explain(u, i, 5)
        times.append(time.perf_counter() - t0)
        sizes.append(exp.n_candidates)
    t = np.array(times) * 1e3
    return {"n": len(t), "k": 5, "p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
            "mean_candidates": float(np.mean(sizes)),
            "note": "one masked re-prediction per first-hop evidence rating; machine shared, timings noisy"}


def _percentiles(ms: list[float]) -> dict:
    t = np.array(ms)
    return {"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
            "max_ms": float(t.max()), "mean_ms": float(t.mean())}


def service_latency(artefact: Path, test, n: int) -> dict:
    """Per explanation, on the same ``n`` test pairs, interleaved: ``served`` =
    `Recommender.predict(user, item, explain=5)` (raw ids, in-process, artefact loaded and
    warmed); ``reference`` = what the explainer computed before the batched effects: the
    prediction, the first-hop evidence (`EvidenceChainModel.explain`) and
    `leave_one_out_effects_reference` on it. Checks that both give the same effects."""
    rec = Recommender.load(artefact)
    model = rec.model
    rng = np.random.default_rng(1)
    pairs = [(int(test.users[k]), int(test.items[k])) for k in rng.permutation(len(test))[:n]]
    raw = [(test.user_ids.raw(u), test.item_ids.raw(i)) for u, i in pairs]
    rec.predict(*raw[0], explain=5)  # first-use costs out of the figures
    served, reference, sizes, worst = [], [], [], 0.0
    for (ru, ri) in raw:
        t0 = time.perf_counter()
        pred = rec.predict(ru, ri, explain=5)
        served.append((time.perf_counter() - t0) * 1e3)
        u, i = model.ratings.user_ids.index(ru), model.ratings.item_ids.index(ri)
        t0 = time.perf_counter()
        rec.predict(ru, ri)
        res = model.explain(ru, ri, top=None)
        ids = np.array([int(e["example"]) for e in res["evidence"] if e["hop"] == 1], dtype=np.int64)
        ref = leave_one_out_effects_reference(model, u, i, ids)[0] if len(ids) else np.zeros(0)
        reference.append((time.perf_counter() - t0) * 1e3)
        sizes.append(len(ids))
        r = model.ratings
        by_pair = {(r.user_ids.raw(int(r.users[z])), r.item_ids.raw(int(r.items[z]))): e
                   for z, e in zip(ids.tolist(), ref.tolist(), strict=True)}
        for c in pred.explanation or []:
            worst = max(worst, abs(c["effect"] - by_pair[(c["user"], c["item"])]))
    return {"n": len(pairs), "k": 5, "mean_candidates": float(np.mean(sizes)),
            "served": _percentiles(served), "reference": _percentiles(reference),
            "max_abs_effect_difference": worst,
            "note": "same pairs, same run, interleaved; 2 shared CPU cores with other jobs running, so "
                    "absolute figures are noisy, the ratio less so"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artefact", type=Path, default=None)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--removal-pairs", type=int, default=50)
    parser.add_argument("--fold-in-users", type=int, default=20)
    parser.add_argument("--latency-pairs", type=int, default=50)
    parser.add_argument("--latency-only", action="store_true",
                        help="measure the latency only (needs --artefact); keep the results file's other figures")
    parser.add_argument("--retrain-removals", type=int, default=0,
                        help="training ratings removed and retrained without (same trajectory), one retrain each")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--retrain-dir", type=Path, default=None,
                        help="where the retrains write their results (default: a new temporary folder); "
                             "a retrain whose result is already there is not run again")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (default: results/explain_rec.json)")
    parser.add_argument("--noise-removals", type=int, default=0,
                        help="retrain the first N removals (and the full run) under --noise-seed too: the retrain "
                             "noise floor")
    parser.add_argument("--noise-seed", type=int, default=1)
    parser.add_argument("--replica-removals", type=int, default=0,
                        help="retrain the first N removals (and the full run) again in a replica perturbed by a far "
                             "rating's removal: the truth is the two retrains' mean change")

    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = load_split("ml-100k", "u1")
    if args.latency_only:
        if args.artefact is None:
            parser.error("--latency-only needs --artefact (a saved default REC model of u1)")
        out = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "explain_rec"}
        latency_only(out, args.artefact, test, args.latency_pairs)
        write_json(args.out, out)
        return
    out: dict = {"benchmark": "explain_rec", "dataset": "ml-100k", "split": "u1",
                 "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                             "note": "2 shared cores, other jobs running"}}
    if args.retrain_removals:  # the served explanations against retraining, on the full run of the retrains
        model_config, train_config = default_configs()
        model, out["retrained"] = retrained_run(
            train, test, dataclasses.asdict(model_config), train_config, n_removals=args.retrain_removals,
            replica_removals=args.replica_removals, noise_removals=args.noise_removals, noise_seed=args.noise_seed,
            workers=args.workers, seed=args.seed, work_dir=args.retrain_dir)
        out["model"] = "retrain(nothing removed) of the default configs (= Trainer.fit)"
        r = out["retrained"]
        print(f"retrained, mean of {r['n_replicas']} replicas ({r['n_removals']} removals, {r['n_pairs']} predictions, "
              f"{r['n_points']} points): served Spearman {r['spearman']:.3f} slope {r['slope']:.3f} Pearson "
              f"{r['pearson']:.3f} sign {r['sign_agreement']:.3f}; shares Spearman {r['shares']['spearman']:.3f}",
              flush=True)
        one = r["one_retrain"]
        print(f"one retrain ({one['n_removals']} removals, {one['n_points']} points): served Spearman "
              f"{one['spearman']:.3f} slope {one['slope']:.3f}", flush=True)
        if r["replica_floor_spearman"] is not None:
            print(f"replica floor: one replica's change vs the other's Spearman {r['replica_floor_spearman']:.3f} "
                  f"slope {r['replica_floor_slope']:.3f}", flush=True)
        if r["noise_floor_spearman"] is not None:
            nf = r["noise_floor"]
            print(f"retrain noise floor ({nf['n_points']} points, {nf['variant']}): re-seeded truth vs truth "
                  f"Spearman {r['noise_floor_spearman']:.3f} slope {r['noise_floor_slope']:.3f}; served vs truth on "
                  f"those points {nf['served_vs_retrained_same_points']['spearman']:.3f}", flush=True)
    else:
        model = _model(args.artefact, train)
        out["model"] = str(args.artefact) if args.artefact else "trained here with the default configs"
    out["config"] = {"rec": model.config_dict(), "train": str(default_configs()[1])}
    t0 = time.perf_counter()
    out["served"] = served_run(model, test, n_pairs=args.pairs, n_candidates=args.candidates,
                               n_removal_pairs=args.removal_pairs, n_fold_in_users=args.fold_in_users, seed=args.seed)
    out["served"]["seconds"] = time.perf_counter() - t0
    s = out["served"]
    print(f"served ({s['method']}): Spearman {s['spearman']:.3f} slope {s['slope']:.3f} top-1 {s['top1_direction_rate']:.2f} "
          f"random {s['random_direction_rate']:.2f} noise floor {s['noise_floor_spearman']:.3f}; shares: Spearman "
          f"{s['shares']['spearman']:.3f} slope {s['shares']['slope']:.3f} top-1 {s['shares']['top1_direction_rate']:.2f}; "
          f"fold-in {s['fold_in']['spearman']:.3f} (shares {s['fold_in']['shares']['spearman']:.3f})", flush=True)
    out["latency"] = latency(model, test, args.latency_pairs)
    print(f"latency p50 {out['latency']['p50_ms']:.1f} ms p99 {out['latency']['p99_ms']:.1f} ms", flush=True)
    if args.artefact is not None:
        latency_only(out, args.artefact, test, args.latency_pairs)
    write_json(args.out, out)


def latency_only(out: dict, artefact: Path, test, n: int) -> None:
    """``out["service_latency"]`` (`service_latency`), printed."""
    out["service_latency"] = s = service_latency(artefact, test, n)
    out["service_latency"]["artefact"] = str(artefact)
    print(f"service path (Recommender.predict explain=5, {s['n']} pairs, {s['mean_candidates']:.1f} candidates): "
          f"served p50 {s['served']['p50_ms']:.1f} ms p99 {s['served']['p99_ms']:.1f} ms; reference (before) "
          f"p50 {s['reference']['p50_ms']:.1f} ms p99 {s['reference']['p99_ms']:.1f} ms; "
          f"max |effect difference| {s['max_abs_effect_difference']:.2e}", flush=True)


def _model(artefact: Path | None, train) -> EvidenceChainModel:
    if artefact is not None:
        return load_artefact(artefact).model.eval()
    model_config, train_config = default_configs()
    model = EvidenceChainModel(train.n_users, train.n_items, train.rating_scale, model_config)
    Trainer(train_config).fit(model, train)
    return model.eval()


if __name__ == "__main__":
    main()
