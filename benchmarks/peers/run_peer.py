#!/usr/bin/env python
"""Run one peer-library benchmark job and print its result as one JSON object.

This script is executed by the *peers* virtualenv's interpreter (see
``benchmarks/peers/setup.sh``), never by the project's own venv, and it does not
import ``recsys``: it only needs the standard library, numpy, pandas and the peer
library under test (Surprise, LensKit or cornac).

The job is a JSON object given as the first argument (JSON text, or the path of a
file holding it) or, without arguments, on standard input.  Exactly one JSON
object is written to standard output; everything the libraries print, progress
and warnings go to standard error.  On failure the object is ``{"error": ...}``
and the exit status is 1.

Jobs
----
``{"task": "fold", "peer": P, "train": PATH, "test": PATH, "params": {...}}``
    Fit peer ``P`` (``surprise-svd``, ``surprise-baseline``, ``lenskit-biasedmf``
    or ``cornac-mf``) with the library's default hyper-parameters, overridden by
    ``params``, on a MovieLens-style tab-separated file (user, item, rating,
    timestamp) and predict the test file.  Predictions are clipped to [1, 5].
    Pairs the peer cannot score are predicted with the training mean and counted
    in ``n_fallback``.

``{"task": "throughput", "peer": P, "npz": PATH, "factors": 64, "epochs": 2}``
    Fit ``cornac-mf`` or ``surprise-svd`` on the arrays ``users``, ``items`` and
    ``values`` of an ``.npz`` file and report training ratings per second.
    Surprise is capped at ``max_ratings`` (default 2,000,000) ratings.

Both jobs accept ``"repeats": N`` (default 1): the model is built and fitted N
times, ``fit_seconds`` is the fastest fit and ``fit_seconds_all`` lists them all
(metrics come from the last fit).  Thread knobs are set to the CPUs available
(cornac ``num_threads``, LensKit ``lenskit.parallel.initialize``; Surprise has
none) and reported under ``threads``.

``{"task": "rank", "peer": P, "train": PATH, "users": [...], "items": [...], "runs": [...]}``
    Top-N ranking peers for implicit feedback: ``cornac-bpr`` (``cornac.models.BPR``) or
    ``lenskit-implicitmf`` (``lenskit.als.ImplicitMFScorer``), fitted on the (user, item)
    pairs of a MovieLens-style TSV file (both libraries ignore the rating value at their
    defaults: every row is one positive interaction).  Each entry of ``runs`` is
    ``{"params": {...}, "out": PATH}`` (or give ``"params"`` and ``"out"`` at top level
    for one run): the library's defaults overridden by ``params`` are fitted, and the scores
    of every raw item id of ``items`` for every raw user id of ``users`` are saved to
    ``out`` as a ``float32 [len(users), len(items)]`` ``.npy`` matrix (higher = ranked
    earlier; ``-inf`` where the peer knows the user or the item not).  No item is masked
    and no list is cut here: the caller masks training items, takes the top k and computes
    the metrics with its own code, the same for every model.  Each run reports its effective
    ``params``, ``fit_seconds`` (the fit call alone, fastest of ``repeats``),
    ``score_seconds`` and how many users/items were unknown to the peer.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

RATING_MIN = 1.0
RATING_MAX = 5.0
DEFAULT_MAX_RATINGS_SURPRISE = 2_000_000

M = TypeVar("M")

#: Surprise's baseline defaults (surprise/prediction_algorithms/optimize_baselines.pyx),
#: used to report the effective options of ``BaselineOnly()``.
SURPRISE_BASELINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "als": {"method": "als", "n_epochs": 10, "reg_u": 15, "reg_i": 10},
    "sgd": {"method": "sgd", "n_epochs": 20, "reg": 0.02, "learning_rate": 0.005},
}


class JobError(ValueError):
    """A malformed or unsupported job."""


@dataclass
class FoldRun:
    """What a peer's fold runner hands back to :func:`run_fold`."""

    library_version: str
    params: dict[str, Any]
    predictions: np.ndarray
    prep_seconds: float
    fit_seconds: list[float]
    predict_seconds: float
    n_fallback: int
    threads: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def log(message: str) -> None:
    print(f"[run_peer] {message}", file=sys.stderr, flush=True)


def load_ratings(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a tab-separated user/item/rating/timestamp file (MovieLens ``u*.base``)."""
    df = pd.read_csv(
        path,
        sep="\t",
        header=None,
        names=["user", "item", "rating", "timestamp"],
        dtype={"user": np.int64, "item": np.int64, "rating": np.float64, "timestamp": np.int64},
    )
    if df.empty:
        raise JobError(f"no ratings in {path}")
    return df


def constructor_params(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """Effective keyword arguments of ``cls(**overrides)``: signature defaults + overrides."""
    params: dict[str, Any] = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not p.empty:
            params[name] = p.default
    unknown = set(overrides) - set(params)
    if unknown:
        raise JobError(f"{cls.__name__} has no parameter(s) {sorted(unknown)}")
    params.update(overrides)
    return params


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def fit_repeated(
    make: Callable[[], M], fit: Callable[[M], Any], repeats: int
) -> tuple[M, list[float]]:
    """Build and fit a fresh model ``repeats`` times; return the last model and every fit time.

    Only ``fit(model)`` is timed.  Repeats exist because a shared 2-core machine
    is noisy: the minimum is the figure to compare, the full list shows the spread.
    """
    model: M | None = None
    seconds: list[float] = []
    for _ in range(max(1, repeats)):
        model = make()
        _, elapsed = timed(lambda m=model: fit(m))
        seconds.append(elapsed)
    assert model is not None
    return model, seconds


def json_safe(value: Any) -> Any:
    """Make library objects (numpy scalars, enums, tuples) JSON-serialisable."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# --------------------------------------------------------------------------- Surprise


def _surprise_fold(
    algo_name: str,
    train: pd.DataFrame,
    test: pd.DataFrame,
    overrides: dict[str, Any],
    repeats: int,
) -> FoldRun:
    import surprise

    algo_cls = {"svd": surprise.SVD, "baseline": surprise.BaselineOnly}[algo_name]
    params = constructor_params(algo_cls, overrides)

    def prepare() -> tuple[Any, list[tuple[int, int, float]]]:
        reader = surprise.Reader(rating_scale=(RATING_MIN, RATING_MAX))
        data = surprise.Dataset.load_from_df(train[["user", "item", "rating"]], reader)
        trainset = data.build_full_trainset()
        testset = list(
            zip(test["user"].tolist(), test["item"].tolist(), test["rating"].tolist(), strict=True)
        )
        return trainset, testset

    (trainset, testset), prep_seconds = timed(prepare)
    algo, fit_seconds = fit_repeated(lambda: algo_cls(**params), lambda a: a.fit(trainset), repeats)
    predictions, predict_seconds = timed(lambda: algo.test(testset))

    est = np.array([p.est for p in predictions], dtype=np.float64)
    impossible = np.array([bool(p.details.get("was_impossible", False)) for p in predictions])
    # Surprise already predicts the global mean for impossible pairs; keep that.
    if algo_name == "baseline":
        method = params["bsl_options"].get("method", "als")
        params["bsl_options"] = {**SURPRISE_BASELINE_DEFAULTS[method], **params["bsl_options"]}
    return FoldRun(
        library_version=dist_version("scikit-surprise"),
        params=params,
        predictions=est,
        prep_seconds=prep_seconds,
        fit_seconds=fit_seconds,
        predict_seconds=predict_seconds,
        n_fallback=int(impossible.sum()),
        threads={"fit": 1, "knob": None},
        notes=["Surprise has no thread setting; it trains single-threaded"],
    )


# --------------------------------------------------------------------------- LensKit


def _lenskit_init_threads() -> dict[str, Any]:
    """Configure LensKit's parallelism: training threads = CPUs, batch inference in-process."""
    from lenskit.parallel import get_parallel_config, initialize

    initialize(processes=1, threads=cpu_count())
    cfg = get_parallel_config()
    return {
        "fit": cfg.threads,
        "backend": cfg.backend_threads,
        "processes": cfg.processes,
        "knob": "lenskit.parallel.initialize",
    }


def _lenskit_fold(
    train: pd.DataFrame, test: pd.DataFrame, overrides: dict[str, Any], repeats: int
) -> FoldRun:
    import lenskit
    from lenskit.als import BiasedMFScorer
    from lenskit.batch import predict
    from lenskit.data import ItemListCollection, from_interactions_df
    from lenskit.pipeline import predict_pipeline

    threads = _lenskit_init_threads()
    params = BiasedMFScorer(**overrides).config.model_dump(mode="json")

    def prepare() -> tuple[Any, Any]:
        train_df = train.rename(columns={"user": "user_id", "item": "item_id"})
        ds = from_interactions_df(train_df[["user_id", "item_id", "rating"]].copy())
        test_df = test.rename(columns={"user": "user_id", "item": "item_id"})
        test_ilc = ItemListCollection.from_df(test_df[["user_id", "item_id"]], "user_id")
        return ds, test_ilc

    (ds, test_ilc), prep_seconds = timed(prepare)
    # No fallback component: pairs the scorer cannot handle come back NaN and get
    # the training mean below, like the other peers.
    pipe, fit_seconds = fit_repeated(
        lambda: predict_pipeline(BiasedMFScorer(**overrides), fallback=False),
        lambda p: p.train(ds),
        repeats,
    )
    preds, predict_seconds = timed(lambda: predict(pipe, test_ilc))

    pred_df = preds.to_df()
    merged = test[["user", "item"]].merge(
        pred_df.rename(columns={"user_id": "user", "item_id": "item"})[["user", "item", "score"]],
        on=["user", "item"],
        how="left",
        validate="many_to_one",
    )
    est = merged["score"].to_numpy(dtype=np.float64)
    missing = ~np.isfinite(est)
    est[missing] = float(train["rating"].mean())
    return FoldRun(
        library_version=lenskit.__version__,
        params=params,
        predictions=est,
        prep_seconds=prep_seconds,
        fit_seconds=fit_seconds,
        predict_seconds=predict_seconds,
        n_fallback=int(missing.sum()),
        threads=threads,
        notes=["predict_pipeline(BiasedMFScorer(), fallback=False); NaN -> training mean"],
    )


# --------------------------------------------------------------------------- cornac


def _cornac_params(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``cornac.models.MF(use_bias=True)``: library defaults, all CPUs."""
    from cornac.models import MF

    params = constructor_params(MF, {"use_bias": True, "num_threads": cpu_count(), **overrides})
    # MF resolves num_threads itself (0 -> all CPUs, any seed -> 1): record what it uses.
    params["num_threads"] = MF(**params).num_threads
    return params


def _cornac_fit(ds: Any, params: dict[str, Any], repeats: int) -> tuple[Any, list[float]]:
    from cornac.models import MF

    return fit_repeated(lambda: MF(**params), lambda m: m.fit(ds), repeats)


def _cornac_dataset(users: np.ndarray, items: np.ndarray, values: np.ndarray) -> Any:
    from cornac.data import Dataset

    triples = list(zip(users.tolist(), items.tolist(), values.tolist(), strict=True))
    return Dataset.from_uir(triples)


def _cornac_fold(
    train: pd.DataFrame, test: pd.DataFrame, overrides: dict[str, Any], repeats: int
) -> FoldRun:
    import cornac

    params = _cornac_params(overrides)
    ds, prep_seconds = timed(
        lambda: _cornac_dataset(
            train["user"].to_numpy(), train["item"].to_numpy(), train["rating"].to_numpy()
        )
    )
    model, fit_seconds = _cornac_fit(ds, params, repeats)

    def predict() -> tuple[np.ndarray, int]:
        uid_map, iid_map = ds.uid_map, ds.iid_map
        mean = float(ds.global_mean)
        out = np.empty(len(test), dtype=np.float64)
        n_unknown = 0
        for k, (u, i) in enumerate(zip(test["user"].tolist(), test["item"].tolist(), strict=True)):
            uidx, iidx = uid_map.get(u), iid_map.get(i)
            if uidx is None or iidx is None:
                out[k] = mean
                n_unknown += 1
            else:
                out[k] = float(model.score(uidx, iidx))
        return out, n_unknown

    (est, n_fallback), predict_seconds = timed(predict)
    return FoldRun(
        library_version=cornac.__version__,
        params=params,
        predictions=est,
        prep_seconds=prep_seconds,
        fit_seconds=fit_seconds,
        predict_seconds=predict_seconds,
        n_fallback=n_fallback,
        threads={"fit": params["num_threads"], "knob": "MF(num_threads=...)"},
        notes=["unknown user or item -> training mean"],
    )


# --------------------------------------------------------------------------- ranking peers


def _ranking_pairs(train: pd.DataFrame) -> pd.DataFrame:
    """One row per (user, item) pair: the interactions a ranking peer is fitted on."""
    return train.drop_duplicates(["user", "item"], keep="last")


def _cornac_bpr_run(
    train: pd.DataFrame, users: np.ndarray, items: np.ndarray, overrides: dict[str, Any],
    repeats: int,
) -> dict[str, Any]:
    """``cornac.models.BPR`` (library defaults + ``overrides``): scores ``[users, items]``."""
    import cornac
    from cornac.models import BPR

    params = constructor_params(BPR, overrides)
    params.pop("init_params", None)
    ds, prep_seconds = timed(
        lambda: _cornac_dataset(
            train["user"].to_numpy(), train["item"].to_numpy(), train["rating"].to_numpy()
        )
    )
    model, fit_seconds = fit_repeated(lambda: BPR(**params), lambda m: m.fit(ds), repeats)
    params["num_threads"] = model.num_threads  # what BPR resolved (a seed forces 1)

    def score() -> tuple[np.ndarray, int, int]:
        out = np.full((len(users), len(items)), -np.inf, dtype=np.float32)
        iidx = np.array([ds.iid_map.get(i, -1) for i in items.tolist()], dtype=np.int64)
        known_items = iidx >= 0
        n_unknown_users = 0
        for row, u in enumerate(users.tolist()):
            uidx = ds.uid_map.get(u)
            if uidx is None:
                n_unknown_users += 1
                continue
            out[row, known_items] = np.asarray(model.score(uidx), dtype=np.float32)[iidx[known_items]]
        return out, n_unknown_users, int((~known_items).sum())

    (scores, n_unknown_users, n_unknown_items), score_seconds = timed(score)
    return {
        "library_version": cornac.__version__,
        "params": params,
        "scores": scores,
        "prep_seconds": prep_seconds,
        "fit_seconds_all": fit_seconds,
        "score_seconds": score_seconds,
        "n_unknown_users": n_unknown_users,
        "n_unknown_items": n_unknown_items,
        "threads": {"fit": params["num_threads"], "knob": "BPR(num_threads=...)"},
        "note": "score = item bias + user . item factors (BPR.score)",
    }


def _lenskit_implicitmf_run(
    train: pd.DataFrame, users: np.ndarray, items: np.ndarray, overrides: dict[str, Any],
    repeats: int,
) -> dict[str, Any]:
    """``lenskit.als.ImplicitMFScorer`` (library defaults + ``overrides``): the trained user
    embeddings times the item embeddings, ``[users, items]``."""
    import lenskit
    from lenskit.als import ImplicitMFScorer
    from lenskit.data import from_interactions_df
    from lenskit.training import TrainingOptions

    threads = _lenskit_init_threads()
    params = ImplicitMFScorer(**overrides).config.model_dump(mode="json")

    def prepare() -> Any:
        df = train.rename(columns={"user": "user_id", "item": "item_id"})
        return from_interactions_df(df[["user_id", "item_id", "rating"]].copy())

    ds, prep_seconds = timed(prepare)
    scorer, fit_seconds = fit_repeated(
        lambda: ImplicitMFScorer(**overrides), lambda s: s.train(ds, TrainingOptions()), repeats
    )

    def score() -> tuple[np.ndarray, int, int]:
        out = np.full((len(users), len(items)), -np.inf, dtype=np.float32)
        unums = scorer.users.numbers(users, missing="negative")
        inums = scorer.items.numbers(items, missing="negative")
        ku, ki = unums >= 0, inums >= 0
        block = np.asarray(scorer.user_embeddings)[unums[ku]] @ np.asarray(
            scorer.item_embeddings
        )[inums[ki]].T
        out[np.ix_(np.flatnonzero(ku), np.flatnonzero(ki))] = block
        return out, int((~ku).sum()), int((~ki).sum())

    (scores, n_unknown_users, n_unknown_items), score_seconds = timed(score)
    return {
        "library_version": lenskit.__version__,
        "params": params,
        "scores": scores,
        "prep_seconds": prep_seconds,
        "fit_seconds_all": fit_seconds,
        "score_seconds": score_seconds,
        "n_unknown_users": n_unknown_users,
        "n_unknown_items": n_unknown_items,
        "threads": threads,
        "note": "score = trained user embedding . item embedding (no re-solve from query items)",
    }


RankRunner = Callable[
    [pd.DataFrame, np.ndarray, np.ndarray, dict[str, Any], int], dict[str, Any]
]
RANK_PEERS: dict[str, RankRunner] = {
    "cornac-bpr": _cornac_bpr_run,
    "lenskit-implicitmf": _lenskit_implicitmf_run,
}


def _raw_ids(values: Any, what: str) -> np.ndarray:
    if not isinstance(values, list) or not values:
        raise JobError(f"rank job needs a non-empty list {what!r} of raw ids")
    return np.asarray(values, dtype=np.int64)


def run_rank(job: dict[str, Any]) -> dict[str, Any]:
    peer = job.get("peer")
    if peer not in RANK_PEERS:
        raise JobError(f"unknown rank peer {peer!r}; expected one of {sorted(RANK_PEERS)}")
    if not job.get("train"):
        raise JobError("rank job needs 'train'")
    runs = job.get("runs")
    if runs is None:
        runs = [{"params": job.get("params") or {}, "out": job.get("out")}]
    if not isinstance(runs, list) or not runs:
        raise JobError("rank job 'runs' must be a non-empty list of {params, out}")
    for run in runs:
        if not isinstance(run, dict) or not run.get("out"):
            raise JobError("every rank run needs an 'out' path for its score matrix")
    users = _raw_ids(job.get("users"), "users")
    items = _raw_ids(job.get("items"), "items")
    repeats = int(job.get("repeats", 1))
    train = _ranking_pairs(load_ratings(job["train"]))
    log(f"{peer}: {len(train)} interactions, {len(runs)} run(s), "
        f"{len(users)} users x {len(items)} items to score")

    results = []
    common: dict[str, Any] = {}
    for run in runs:
        out = RANK_PEERS[peer](train, users, items, dict(run.get("params") or {}), repeats)
        scores = out.pop("scores")
        np.save(run["out"], scores)
        common = {"library_version": out.pop("library_version"), "threads": out.pop("threads")}
        results.append({
            **out,
            "fit_seconds": min(out["fit_seconds_all"]),
            "repeats": len(out["fit_seconds_all"]),
            "out": str(run["out"]),
        })
    return {
        "peer": peer,
        **common,
        "n_train": len(train),
        "n_users": len(users),
        "n_items": len(items),
        "train": str(job["train"]),
        "runs": results,
    }


# --------------------------------------------------------------------------- jobs

FoldRunner = Callable[[pd.DataFrame, pd.DataFrame, dict[str, Any], int], FoldRun]
FOLD_PEERS: dict[str, FoldRunner] = {
    "surprise-svd": lambda tr, te, p, r: _surprise_fold("svd", tr, te, p, r),
    "surprise-baseline": lambda tr, te, p, r: _surprise_fold("baseline", tr, te, p, r),
    "lenskit-biasedmf": _lenskit_fold,
    "cornac-mf": _cornac_fold,
}


def run_fold(job: dict[str, Any]) -> dict[str, Any]:
    peer = job.get("peer")
    if peer not in FOLD_PEERS:
        raise JobError(f"unknown fold peer {peer!r}; expected one of {sorted(FOLD_PEERS)}")
    for key in ("train", "test"):
        if not job.get(key):
            raise JobError(f"fold job needs {key!r}")
    overrides = dict(job.get("params") or {})
    repeats = int(job.get("repeats", 1))
    train = load_ratings(job["train"])
    test = load_ratings(job["test"])

    log(f"{peer}: {len(train)} train / {len(test)} test ratings from {job['train']}")
    run = FOLD_PEERS[peer](train, test, overrides, repeats)
    if run.predictions.shape != (len(test),):
        raise RuntimeError(f"{peer} returned {run.predictions.shape} predictions for {len(test)}")
    pred = np.clip(run.predictions, RATING_MIN, RATING_MAX)
    err = pred - test["rating"].to_numpy(dtype=np.float64)
    known_users = set(train["user"].tolist())
    known_items = set(train["item"].tolist())
    n_unknown_pairs = sum(
        u not in known_users or i not in known_items
        for u, i in zip(test["user"].tolist(), test["item"].tolist(), strict=True)
    )
    return {
        "peer": peer,
        "library_version": run.library_version,
        "params": run.params,
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "prep_seconds": run.prep_seconds,
        "fit_seconds": min(run.fit_seconds),
        "fit_seconds_all": run.fit_seconds,
        "repeats": len(run.fit_seconds),
        "predict_seconds": run.predict_seconds,
        "n_train": len(train),
        "n_test": len(test),
        "n_fallback": run.n_fallback,
        "n_unknown_pairs": int(n_unknown_pairs),
        "threads": run.threads,
        "notes": run.notes,
        "train": str(job["train"]),
        "test": str(job["test"]),
    }


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(path) as z:
        missing = {"users", "items", "values"} - set(z.files)
        if missing:
            raise JobError(f"{path} lacks array(s) {sorted(missing)}")
        users = np.asarray(z["users"], dtype=np.int64)
        items = np.asarray(z["items"], dtype=np.int64)
        values = np.asarray(z["values"], dtype=np.float32)
    if not (users.shape == items.shape == values.shape) or users.ndim != 1:
        raise JobError(f"{path}: users/items/values must be 1-D arrays of one length")
    return users, items, values


def run_throughput(job: dict[str, Any]) -> dict[str, Any]:
    peer = job.get("peer")
    if not job.get("npz"):
        raise JobError("throughput job needs 'npz'")
    factors = int(job.get("factors", 64))
    epochs = int(job.get("epochs", 2))
    overrides = dict(job.get("params") or {})
    repeats = int(job.get("repeats", 1))
    users, items, values = _load_npz(job["npz"])
    n_input = len(values)
    result: dict[str, Any] = {"peer": peer, "n_input": n_input}

    if peer == "cornac-mf":
        import cornac

        params = _cornac_params({"k": factors, "max_iter": epochs, **overrides})
        ds, prep_seconds = timed(lambda: _cornac_dataset(users, items, values))
        _, fit_seconds = _cornac_fit(ds, params, repeats)
        n_ratings = len(ds.uir_tuple[2])  # cornac drops duplicate (user, item) pairs
        result.update(
            library_version=cornac.__version__,
            threads={"fit": params["num_threads"], "knob": "MF(num_threads=...)"},
        )
        if n_ratings != n_input:
            result["note"] = f"cornac dropped {n_input - n_ratings} duplicate (user, item) pairs"
    elif peer == "surprise-svd":
        import surprise

        max_ratings = int(job.get("max_ratings", DEFAULT_MAX_RATINGS_SURPRISE))
        n_ratings = min(n_input, max_ratings)
        params = constructor_params(
            surprise.SVD, {"n_factors": factors, "n_epochs": epochs, **overrides}
        )
        df = pd.DataFrame(
            {"user": users[:n_ratings], "item": items[:n_ratings], "rating": values[:n_ratings]}
        )
        lo, hi = float(df["rating"].min()), float(df["rating"].max())

        def prepare() -> Any:
            reader = surprise.Reader(rating_scale=(lo, hi))
            return surprise.Dataset.load_from_df(df, reader).build_full_trainset()

        trainset, prep_seconds = timed(prepare)
        _, fit_seconds = fit_repeated(
            lambda: surprise.SVD(**params), lambda m: m.fit(trainset), repeats
        )
        result.update(
            library_version=dist_version("scikit-surprise"),
            max_ratings=max_ratings,
            capped=n_input > max_ratings,
            threads={"fit": 1, "knob": None},
        )
        if n_input > max_ratings:
            result["note"] = f"Surprise trained on the first {n_ratings} of {n_input} ratings"
    else:
        raise JobError(f"unknown throughput peer {peer!r}; expected 'cornac-mf' or 'surprise-svd'")

    result.update(
        params=params,
        n_ratings=n_ratings,
        epochs=epochs,
        factors=factors,
        prep_seconds=prep_seconds,
        fit_seconds=min(fit_seconds),
        fit_seconds_all=fit_seconds,
        repeats=len(fit_seconds),
        ratings_per_second=n_ratings * epochs / min(fit_seconds),
    )
    return result


TASKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "fold": run_fold,
    "throughput": run_throughput,
    "rank": run_rank,
}


def read_job(argv: list[str]) -> dict[str, Any]:
    if len(argv) > 1:
        raise JobError("usage: run_peer.py [JOB_JSON | JOB_FILE]  (or the job on stdin)")
    if argv:
        text = argv[0]
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
    else:
        text = sys.stdin.read()
    job = json.loads(text)
    if not isinstance(job, dict):
        raise JobError("the job must be a JSON object")
    return job


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[int]:
    """Send everything written to fd 1 (Python or C level) to stderr; yield a dup of the real stdout."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    saved = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield real_stdout
    finally:
        sys.stdout.flush()
        sys.stdout = saved
        os.dup2(real_stdout, 1)
        os.close(real_stdout)


def main(argv: list[str]) -> int:
    with stdout_to_stderr() as real_stdout:
        status = 0
        try:
            job = read_job(argv)
            task = job.get("task")
            if task not in TASKS:
                raise JobError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
            result = TASKS[task](job)
        except Exception as exc:  # report any failure as one JSON object + traceback
            traceback.print_exc(file=sys.stderr)
            result = {"error": f"{type(exc).__name__}: {exc}"}
            status = 1
        payload = json.dumps(json_safe(result), allow_nan=False) + "\n"
        with os.fdopen(os.dup(real_stdout), "w") as out:
            out.write(payload)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
