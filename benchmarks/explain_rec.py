"""Faithfulness and cost of the evidence-chain model's explanations as served (issue 22), on
the default REC model (`recsys train --model rec` defaults) of MovieLens-100K u1.

- ``served`` (`recsys.experiments.rec_faithfulness.served_run`): the served explainer's
  effects against leave-one-out on the served model (same trained parameters, the rating
  removed from the live ratings under the same evaluation sampling seed, baselines
  refitted), on ``--pairs`` test predictions x up to ``--candidates`` first-hop evidence
  ratings, top-1 / random removal directions on ``--removal-pairs``, the leave-one-out under
  another sampling seed as noise floor, cold users built from 5 ratings; the first-hop
  shares of ``u·v`` (the estimate served before) scored on the same points.
- ``retrained`` (``--retrain-users N``): does retraining change the picture? For N test users
  with at most ``fanouts[0]`` training ratings (all of them first-hop evidence of every
  prediction for the user), one random training rating each is removed and the model
  retrained on the same trajectory (`recsys.experiments.rec_rollback.retrain`: same initial
  weights, orders and batches, the rating at loss weight 0 and hidden from every chain; the
  chains' draws are keyed by node, so the rest of every step samples what the full run
  sampled); the true change of each of the user's test predictions, and of the rated item's
  test predictions whose chains read the rating first-hand, against the served effect (and
  the share) of that rating in the full model, which is itself `retrain` with nothing removed.
  Retrains run in parallel processes (``--workers``), each writing its predictions to JSON.
- ``latency``: the served explainer's wall time for ``--latency-pairs`` test pairs (k=5);
  with ``--artefact``, also the service path (`Recommender.predict(user, item, explain=5)`
  in-process, the artefact loaded and warmed) against the reference computation the
  explainer made before the batched `leave_one_out_effects` (the first-hop evidence by
  `EvidenceChainModel.explain`, then `leave_one_out_effects_reference`: one `substituted`
  forward per rating), on the same pairs in the same run, interleaved pair by pair.
  ``--latency-only`` measures this alone and keeps the results file's other figures.

    NUMBA_NUM_THREADS=1 RECSYS_DATA=../shared/data python benchmarks/explain_rec.py \\
        [--artefact DIR] [--retrain-users 4] [--workers 3] [--latency-only]

``--artefact``: a saved default REC model of u1 to measure (else one is trained here, or,
with ``--retrain-users``, the full retrain is used).
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # numba's OpenMP pool otherwise slows torch here

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from results_file import write_json  # noqa: E402  (this folder is on the path when run as a script)

from recsys.artefact import load_artefact, save_artefact  # noqa: E402
from recsys.datasets import load_split  # noqa: E402
from recsys.experiments.faithfulness import agreement_stats  # noqa: E402
from recsys.experiments.rec_faithfulness import first_hop_shares, served_run  # noqa: E402
from recsys.experiments.rec_rollback import predict_without, raw_prediction, retrain  # noqa: E402
from recsys.models.rec.explain import leave_one_out_effects_reference  # noqa: E402
from recsys.models.rec.model import EvidenceChainModel, RECConfig  # noqa: E402
from recsys.recommender import Recommender  # noqa: E402
from recsys.train import TrainConfig, Trainer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "explain_rec.json"


def default_configs() -> tuple[RECConfig, TrainConfig]:
    """`recsys train --model rec`'s defaults (no validation slice, so no early stopping)."""
    return RECConfig(), TrainConfig.for_model(EvidenceChainModel, patience=None, progress=False)


def retrain_users(train, test, n: int, seed: int, max_ratings: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """``(user, removed example, [test pairs])`` for ``n`` random test users with
    2..``max_ratings`` training ratings (all of them first-hop evidence of every prediction for
    the user), one random rating ``(user, item)`` of theirs removed: the pairs are the user's
    test items and the item's test users that have training ratings (the rating is first-hop
    evidence of those where the item's chains sample it; the others are skipped when scored)."""
    counts = np.bincount(train.users, minlength=train.n_users)
    rated = np.bincount(train.items, minlength=train.n_items) > 0
    rng = np.random.default_rng(seed)
    out = []
    for u in rng.permutation(np.unique(test.users)):
        u = int(u)
        if u >= train.n_users or not 2 <= counts[u] <= max_ratings:
            continue
        items = [int(i) for i in test.items[test.users == u] if i < train.n_items and rated[i]]
        if not items:
            continue
        z = int(rng.choice(np.flatnonzero(train.users == u)))
        i = int(train.items[z])
        users = [int(v) for v in test.users[test.items == i] if v < train.n_users and counts[v] > 0 and v != u]
        out.append((u, z, [(u, j) for j in items] + [(v, i) for v in users]))
        if len(out) == n:
            break
    return out


def worker(removed: int, pairs: list[tuple[int, int]], out: Path, artefact: Path | None) -> None:
    """One same-trajectory retrain without example ``removed`` (-1: nothing removed, saved
    as an artefact to ``artefact``); writes the unclipped predictions of ``pairs`` (with the
    rating removed from the live ratings, as the retrain trained) to ``out``."""
    train, _ = load_split("ml-100k", "u1")
    model_config, train_config = default_configs()
    t0 = time.perf_counter()
    model = retrain(train, model_config, train_config, [] if removed < 0 else [removed])
    seconds = time.perf_counter() - t0
    if removed < 0:
        preds = [raw_prediction(model, u, i) for u, i in pairs]
        if artefact is not None:
            save_artefact(artefact, model, train)
    else:
        preds = [predict_without(model, u, i, [removed]) for u, i in pairs]
    out.write_text(json.dumps({"removed": removed, "pairs": pairs, "predictions": preds, "seconds": seconds}))


def retrained(model: EvidenceChainModel, picks: list[tuple[int, int, list[int]]], runs: dict[int, dict]) -> dict:
    """The served effects and shares of the removed ratings against the retrained changes."""
    base = runs[-1]
    base_pred = {tuple(p): v for p, v in zip(base["pairs"], base["predictions"], strict=True)}
    served, shares, true, no_retrain = [], [], [], []
    explainer = model.explainer(model.ratings)
    for _user, z, _items in picks:
        run = runs.get(z)
        if run is None:
            continue
        for (pu, pi), without in zip(run["pairs"], run["predictions"], strict=True):
            exp = explainer.explain(pu, pi, 10_000)
            effect = {c.example: c.effect for c in exp.contributions}
            share_ids, share = first_hop_shares(model, pu, pi)
            if z not in effect:
                continue
            served.append(effect[z])
            shares.append(float(share[list(share_ids).index(z)]))
            true.append(base_pred[(pu, pi)] - without)
            no_retrain.append(raw_prediction(model, pu, pi) - predict_without(model, pu, pi, [z]))
    s, sh, t, nr = (np.array(a) for a in (served, shares, true, no_retrain))
    return {"n_users": len([z for _, z, _ in picks if z in runs]), "n_points": int(len(t)),
            "served_vs_retrained": agreement_stats(s, t), "shares_vs_retrained": agreement_stats(sh, t),
            "no_retrain_leave_one_out_equals_served_max_abs_diff": float(np.abs(nr - s).max()) if len(s) else None,
            "sign_agreement_served": float(np.mean(np.sign(s) == np.sign(t))) if len(t) else None,
            "true_mean_abs": float(np.abs(t).mean()) if len(t) else None,
            "served_mean_abs": float(np.abs(s).mean()) if len(s) else None,
            "points": [{"served": float(a), "share": float(b), "retrained": float(c)} for a, b, c in zip(s, sh, t, strict=True)],
            "retrain_seconds": {str(k): v["seconds"] for k, v in runs.items()}}


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
    parser.add_argument("--retrain-users", type=int, default=0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--retrain-dir", type=Path, default=None,
                        help="where the retrains write their results (default: a new temporary folder); "
                             "a retrain whose result is already there is not run again")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (default: results/explain_rec.json)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # removed, pairs json, out
    parser.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        worker(int(args.worker[0]), json.loads(args.worker[1]), Path(args.worker[2]), args.save)
        return
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
    picks: list = []
    runs: dict[int, dict] = {}
    if args.retrain_users:
        # choose the users on the given (or a freshly trained) model, then retrain base + removals
        picks = retrain_users(train, test, args.retrain_users, args.seed, default_configs()[0].fanouts[0])
        all_pairs = sorted({pair for _, _, pairs in picks for pair in pairs})
        tmp = args.retrain_dir or Path(tempfile.mkdtemp(prefix="explain_rec_"))
        tmp.mkdir(parents=True, exist_ok=True)
        jobs = [(z, pairs) for _, z, pairs in picks]
        if args.artefact is None:  # the full model is retrain() with nothing removed
            jobs.insert(0, (-1, all_pairs))
        procs: list[subprocess.Popen] = []
        for removed, pairs in jobs:
            if (tmp / f"{removed}.json").is_file():  # finished by an earlier run in the same --retrain-dir
                continue
            while len([p for p in procs if p.poll() is None]) >= args.workers:
                time.sleep(5)
            cmd = [sys.executable, __file__, "--worker", str(removed), json.dumps(pairs), str(tmp / f"{removed}.json")]
            if removed < 0:
                cmd += ["--save", str(tmp / "full")]
            procs.append(subprocess.Popen(cmd))
        for p in procs:
            p.wait()
        for removed, _ in jobs:
            f = tmp / f"{removed}.json"
            if f.is_file():
                runs[removed] = json.loads(f.read_text())
        if args.artefact is None:
            model = load_artefact(tmp / "full").model.eval()
            out["model"] = "retrain(nothing removed) of the default configs"
        else:  # Trainer.fit of the same configs, which retrain() with nothing removed reproduces (tested)
            model = load_artefact(args.artefact).model.eval()
            runs[-1] = {"pairs": all_pairs, "predictions": [raw_prediction(model, u, i) for u, i in all_pairs],
                        "seconds": None}
            out["model"] = str(args.artefact)
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
    if runs:
        out["retrained"] = retrained(model, picks, runs)
        r = out["retrained"]
        print(f"retrained ({r['n_points']} points): served Spearman {r['served_vs_retrained']['spearman']:.3f} "
              f"slope {r['served_vs_retrained']['slope']:.3f}; shares {r['shares_vs_retrained']['spearman']:.3f}",
              flush=True)
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
