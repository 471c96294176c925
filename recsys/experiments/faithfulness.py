"""How faithful are explanations? Exact leave-one-out by retraining, for MF.

Ground truth is *same-trajectory* removal: retrain from the same initial weights, with the
same seed, visiting every epoch's examples in the same order with the removed ones filtered
out. The frequency-scaled L2 weights and the global mean stay those of the full training set,
and on minibatch paths the nominal batch boundaries and the ``1/|B|`` scale are kept (the
removed examples get weight 0), so the only difference is the removed examples' updates. A
re-seeded retrain (another shuffle) shows what of it survives training noise.

- Test A (removal): for N test predictions, remove each method's top-1 / top-10 (the
  candidates with the largest effect in the direction of the method's top-1), retrain, and
  measure the change of the (unclipped) prediction: mean change in the predicted direction,
  share that moved as predicted; beside random removal from the candidates (the paper's NH)
  and a noise floor (random ratings touching neither the user nor the item).
- Test B (agreement): exact leave-one-out for N predictions × C random candidates each:
  Pearson and Spearman (pooled and per prediction), sign agreement, slope of true on estimated
  effect, precision@5.
- Test C (cost): training time with and without logging in the same run, log bytes per
  example, explanation latency.

`served_run` (what ``recsys explain-eval`` prints) runs tests A and B on the model and
explainer the service uses (`served_setup`: ``recsys train``'s defaults), with the truth
retrained under another seed as the noise floor, plus fold-in users (`fold_in_agreement`,
against the exact re-fold) and online users (`online_agreement`, against re-running the online
steps). `agreement` / `removal` score every method of `METHODS` on any `Setup`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from scipy import stats

from recsys.explain.influence import DEFAULT_METHOD, METHODS, candidates, estimate_effects, explain
from recsys.explain.rollback import RollbackCallback
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.models.mf.log import RollbackLog
from recsys.optim.factory import build_optimizer, build_preconditioner
from recsys.optim.sampling import make_sampler
from recsys.ratings import Ratings
from recsys.train import TrainConfig, Trainer


@dataclass(frozen=True)
class Setup:
    """Model and training configuration of a faithfulness run."""

    model: MFConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "train": asdict(self.train)}


def default_setup(optimizer: str = "sgd", *, seed: int = 0) -> Setup:
    """The small configs the faithfulness runs use (D=32, one block: a u1 retrain is a
    fraction of a second with the kernel): SGD batch 1, 20 epochs (the compiled kernel), or
    an autograd optimizer with batch 1024, 10 epochs."""
    model = MFConfig(embedding_size=32, n_blocks=1, seed=seed)
    if optimizer == "sgd":
        train = TrainConfig(epochs=20, learning_rate=0.015, lr_decay=0.95, batch_size=1, patience=None,
                            progress=False, seed=seed)
    else:
        lr = {"adam": 0.003, "sparse-adam": 0.003, "adagrad": 0.05, "cov-noise": 8.0}.get(optimizer, 0.003)
        if optimizer in ("kfac", "ekfac", "tkfac", "tekfac"):
            lr = 0.02  # the family's default 0.01 at batch 256, square-root scaled to 1024
        extra = {"noise": {"scale": 0.1}} if optimizer == "cov-noise" else {}
        train = TrainConfig(epochs=10, learning_rate=lr, lr_decay=1.0, batch_size=1024, optimizer=optimizer,
                            patience=None, progress=False, seed=seed, **extra)
    return Setup(model, train)


def build(train: Ratings, setup: Setup) -> MatrixFactorization:
    return MatrixFactorization(train.n_users, train.n_items, train.rating_scale, setup.model)


def fit_logged(train: Ratings, setup: Setup) -> tuple[MatrixFactorization, RollbackLog, float]:
    """Train with a `RollbackCallback` through the `Trainer`; returns model, log, seconds."""
    model = build(train, setup)
    cb = RollbackCallback()
    result = Trainer(setup.train, callbacks=[cb]).fit(model, train)
    assert cb.log is not None
    return model, cb.log, result.fit_seconds


def retrain(train: Ratings, setup: Setup, removed: Sequence[int] | np.ndarray = (), *,
            seed: int | None = None) -> MatrixFactorization:
    """Same-trajectory retrain without the examples ``removed`` (see the module docstring).

    With nothing removed it reproduces ``Trainer(setup.train).fit`` exactly (tested).
    ``seed`` re-seeds both the initial weights and the shuffles."""
    if seed is not None:
        setup = Setup(replace(setup.model, seed=seed), replace(setup.train, seed=seed))
    c = setup.train
    torch.manual_seed(c.seed)
    model = build(train, setup)
    model.prepare(train)
    model.train()
    keep = np.ones(len(train), dtype=bool)
    keep[np.asarray(removed, dtype=np.int64)] = False
    sampler = make_sampler(c.sampler, len(train), c.seed)
    kind = Trainer(c).step_kind(model)
    tensors = train.tensors()
    pre = None
    if kind == "autograd":
        optimizer = build_optimizer(c.optimizer, model, c.learning_rate, noise=c.noise, seed=c.seed)
        pre = build_preconditioner(c.optimizer, model, c.kfac, seed=c.seed)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=c.lr_decay)
    for epoch in range(c.epochs):
        lr = c.learning_rate * c.lr_decay ** epoch
        order = sampler.epoch_order(epoch)
        if kind == "kernel":
            order = order[keep[order]]
            for s in range(0, len(order), c.chunk_size):
                model.sgd_examples(train, order[s:s + c.chunk_size], lr)
            continue
        for s in range(0, len(order), c.batch_size):
            ids = order[s:s + c.batch_size]
            kept = torch.from_numpy(ids[keep[ids]])
            u, i, r = tensors[0][kept], tensors[1][kept], tensors[2][kept]
            share = len(kept) / len(ids)
            if kind == "closed-form":
                if len(kept):
                    model.sgd_batch(u, i, r, lr * share)
                continue
            optimizer.zero_grad(set_to_none=True)
            if pre is not None and len(kept):
                # the K-FAC family: the kept examples keep the Fisher target noise they drew in
                # the full run (the whole batch's is drawn, the removed examples' dropped; on
                # the steps without statistics, stats_freq > 1, none is drawn)
                outputs, loss = model.loss_terms(u, i, r)
                loss = loss * share  # the kept examples' gradients keep their 1/|B| weight
                z = (pre.draw_targets((len(ids), *outputs.shape[1:]), outputs)[torch.from_numpy(keep[ids])]
                     if pre.statistics_due else None)
                pre.backward(outputs, loss, z=z)
                pre.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
                pre.step()
            else:
                if len(kept):
                    loss = model.loss(u, i, r) if share == 1.0 else model.loss(u, i, r) * share
                else:  # an emptied batch still takes its (momentum-only) optimizer step
                    loss = sum((p * 0).sum() for p in model.parameters())
                loss.backward()
            optimizer.step()
        if kind == "autograd":
            scheduler.step()
    for hooked in (pre, optimizer if kind == "autograd" else None):
        if hasattr(hooked, "remove_hooks"):
            hooked.remove_hooks()
    model.eval()
    return model


def raw_prediction(model: MatrixFactorization, user: int, item: int) -> float:
    """The unclipped prediction (clipping would hide changes at the scale's ends)."""
    with torch.no_grad():
        return float(model(torch.tensor([user]), torch.tensor([item]))[0])


def sample_pairs(train: Ratings, test: Ratings, n: int, rng: np.random.Generator, min_candidates: int = 1
                 ) -> list[tuple[int, int]]:
    """``n`` distinct test pairs whose user and item both have training ratings."""
    uc, ic = train.user_counts(), train.item_counts()
    ok = np.flatnonzero((uc[test.users] > 0) & (ic[test.items] > 0)
                        & (uc[test.users] + ic[test.items] >= min_candidates))
    rows = rng.choice(ok, size=min(n, len(ok)), replace=False)
    return [(int(test.users[r]), int(test.items[r])) for r in rows]


def agreement_stats(est: np.ndarray, true: np.ndarray) -> dict:
    """How well estimated effects ``est [n]`` agree with true ones ``true [n]``: Pearson,
    Spearman, sign agreement (where the true effect is nonzero) and the least-squares slope
    of true on estimated; NaN for fewer than 3 pairs or a constant side."""
    if len(est) < 3 or np.std(est) == 0 or np.std(true) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "sign_agreement": float("nan"), "slope": float("nan")}
    slope = float(np.dot(est - est.mean(), true - true.mean()) / np.dot(est - est.mean(), est - est.mean()))
    nz = np.abs(true) > 1e-7
    return {"pearson": float(stats.pearsonr(est, true)[0]), "spearman": float(stats.spearmanr(est, true)[0]),
            "sign_agreement": float(np.mean(np.sign(est[nz]) == np.sign(true[nz]))) if nz.any() else float("nan"),
            "slope": slope}


@dataclass
class AgreementResult:
    """Test B: per method, correlation of estimated with true leave-one-out effects."""

    n_pairs: int
    n_candidates: int
    methods: dict[str, dict] = field(default_factory=dict)
    true_mean_abs: float = 0.0
    reseeded: dict[str, dict] | None = None
    points: list[dict] = field(default_factory=list)


def agreement(train: Ratings, test: Ratings, setup: Setup, model: MatrixFactorization, log: RollbackLog,
              n_pairs: int = 15, n_candidates: int = 15, seed: int = 0, reseed_pairs: int = 0,
              methods: Sequence[str] = METHODS) -> AgreementResult:
    """Test B (see the module docstring). ``reseed_pairs``: for that many of the pairs, also
    measure the true effect under another seed (both full and removed retrains re-seeded)."""
    rng = np.random.default_rng(seed)
    pairs = sample_pairs(train, test, n_pairs, rng, min_candidates=n_candidates)
    est: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    true: list[np.ndarray] = []
    reseed_true: list[np.ndarray] = []
    reseed_est: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    alt_full = retrain(train, setup, seed=setup.train.seed + 1000) if reseed_pairs else None
    points = []
    for n, (u, i) in enumerate(pairs):
        ids, _, _ = candidates(train, u, i)
        pick = np.sort(rng.choice(len(ids), size=min(n_candidates, len(ids)), replace=False))
        effects = {m: estimate_effects(model, train, u, i, m, log)[1][pick] for m in methods}
        base = raw_prediction(model, u, i)
        t = np.array([base - raw_prediction(retrain(train, setup, [ids[j]]), u, i) for j in pick])
        true.append(t)
        for m in methods:
            est[m].append(effects[m])
        points.extend({"user": u, "item": i, "example": int(ids[j]), "true": float(t[c]),
                       **{m: float(effects[m][c]) for m in methods}} for c, j in enumerate(pick))
        if alt_full is not None and n < reseed_pairs:
            alt_base = raw_prediction(alt_full, u, i)
            reseed_true.append(np.array([alt_base - raw_prediction(
                retrain(train, setup, [ids[j]], seed=setup.train.seed + 1000), u, i) for j in pick]))
            for m in methods:
                reseed_est[m].append(effects[m])
    true_all = np.concatenate(true)
    res = AgreementResult(len(pairs), n_candidates, true_mean_abs=float(np.abs(true_all).mean()), points=points)
    for m in methods:
        e_all = np.concatenate(est[m])
        per_pair = [stats.spearmanr(e, t)[0] for e, t in zip(est[m], true, strict=True) if np.std(e) > 0 and np.std(t) > 0]
        prec = [len(set(np.argsort(-np.abs(e))[:5]) & set(np.argsort(-np.abs(t))[:5])) / min(5, len(t))
                for e, t in zip(est[m], true, strict=True)]
        res.methods[m] = {**agreement_stats(e_all, true_all), "spearman_per_pair_mean": float(np.nanmean(per_pair)),
                          "precision_at_5": float(np.mean(prec)), "estimate_mean_abs": float(np.abs(e_all).mean())}
    if reseed_true:
        rt = np.concatenate(reseed_true)
        res.reseeded = {m: agreement_stats(np.concatenate(reseed_est[m]), rt) for m in methods}
        res.reseeded["true_same_vs_reseeded"] = agreement_stats(np.concatenate(true[:len(reseed_true)]), rt)
    return res


@dataclass
class RemovalResult:
    """Test A: per removal strategy and k, the prediction changes after retraining."""

    n_pairs: int
    strategies: dict[str, dict] = field(default_factory=dict)


def removal(train: Ratings, test: Ratings, setup: Setup, model: MatrixFactorization, log: RollbackLog,
            n_pairs: int = 20, ks: Sequence[int] = (1, 10), seed: int = 0,
            methods: Sequence[str] = METHODS) -> RemovalResult:
    """Test A (see the module docstring). Each strategy's predicted direction is the opposite
    of the sign of its top-1 effect; the random strategies are judged against the default
    method's predicted direction (≈ 50% if removal is uninformative)."""
    rng = np.random.default_rng(seed + 1)
    pairs = sample_pairs(train, test, n_pairs, rng, min_candidates=max(ks) + 1)
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    cache: dict[frozenset, MatrixFactorization] = {}
    n_train = len(train)
    for u, i in pairs:
        base = raw_prediction(model, u, i)
        ids, _, _ = candidates(train, u, i)
        effects = {m: estimate_effects(model, train, u, i, m, log)[1] for m in methods}
        default_sign = np.sign(effects[DEFAULT_METHOD][np.argmax(np.abs(effects[DEFAULT_METHOD]))])
        touching = np.zeros(n_train, dtype=bool)
        touching[ids] = True
        far = np.flatnonzero(~touching)
        for k in ks:
            sets: dict[str, tuple[np.ndarray, float, float]] = {}
            for m in methods:
                e = effects[m]
                s = np.sign(e[np.argmax(np.abs(e))]) or 1.0
                chosen = np.argsort(-s * e, kind="stable")[:k]
                sets[m] = (ids[chosen], -s, float(-e[chosen].sum()))
            sets["random-neighbour"] = (rng.choice(ids, size=k, replace=False), -default_sign, float("nan"))
            sets["random-far"] = (rng.choice(far, size=k, replace=False), -default_sign, float("nan"))
            for name, (removed, direction, predicted) in sets.items():
                key = frozenset(int(x) for x in removed)
                if key not in cache:
                    cache[key] = retrain(train, setup, removed)
                change = raw_prediction(cache[key], u, i) - base
                rows.setdefault((name, k), []).append((change, direction, predicted))
        cache.clear()
    out = RemovalResult(len(pairs))
    for (name, k), vals in rows.items():
        change = np.array([v[0] for v in vals])
        direction = np.array([v[1] for v in vals])
        predicted = np.array([v[2] for v in vals])
        along = change * direction
        entry = {"direction_rate": float(np.mean(along > 0)), "mean_change_along_predicted": float(along.mean()),
                 "median_change_along_predicted": float(np.median(along)), "mean_abs_change": float(np.abs(change).mean())}
        if np.isfinite(predicted).all():
            entry["mean_predicted_change"] = float(np.mean(predicted * direction))
        out.strategies[f"{name}@{k}"] = entry
    return out


def training_overhead(train: Ratings, model_config: MFConfig, train_config: TrainConfig, reps: int = 3) -> dict:
    """Test C, training: wall time of ``Trainer.fit`` with and without a `RollbackCallback`,
    alternating in one run (after a warm-up of both); the ratio of the medians."""
    last_log = []

    def once(logged: bool) -> float:
        model = MatrixFactorization(train.n_users, train.n_items, train.rating_scale, model_config)
        cbs = [RollbackCallback()] if logged else []
        t0 = time.perf_counter()
        Trainer(train_config, callbacks=cbs).fit(model, train)
        seconds = time.perf_counter() - t0
        if logged:
            last_log[:] = [cbs[0].log]
        return seconds

    warm = replace(train_config, epochs=1)
    for logged in (False, True):
        m = MatrixFactorization(train.n_users, train.n_items, train.rating_scale, model_config)
        Trainer(warm, callbacks=[RollbackCallback()] if logged else []).fit(m, train)
    plain, logged = [], []
    for _ in range(reps):
        plain.append(once(False))
        logged.append(once(True))
    log = last_log[0]  # the default log (compact on the compiled path), float32
    return {"plain_seconds": plain, "logged_seconds": logged,
            "overhead_ratio": float(np.median(logged) / np.median(plain)),
            "log_kind": type(log).__name__,
            "log_bytes_per_example_float32": log.bytes_per_example,
            "log_bytes_per_example_float16": log.bytes_per_example / 2,
            "log_megabytes_float32": log.nbytes / 1e6}


def explain_latency(model: MatrixFactorization, log: RollbackLog | None, train: Ratings, test: Ratings,
                    n: int = 200, method: str | None = None, k: int = 5, seed: int = 0) -> dict:
    """Test C, queries: wall time of `explain` (raw ids in, top-k out) over ``n`` test pairs."""
    pairs = sample_pairs(train, test, n, np.random.default_rng(seed))
    raw = [(train.user_ids.raw(u), train.item_ids.raw(i)) for u, i in pairs]
    for ru, ri in raw[:5]:
        explain(model, log, train, ru, ri, k, method)
    times = []
    for ru, ri in raw:
        t0 = time.perf_counter()
        explain(model, log, train, ru, ri, k, method)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"method": method or DEFAULT_METHOD, "n": len(ms), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def cached_newton_latency(model: MatrixFactorization, train: Ratings, test: Ratings, n: int = 300,
                          k: int = 5, seed: int = 0) -> dict:
    """Test C, serving path: `NewtonInfluence` with every row precomputed (what the service
    does at load), top-k effects for ``n`` test pairs; also reports the precompute time."""
    from recsys.explain.influence import NewtonInfluence

    cache = NewtonInfluence(model, train)
    t0 = time.perf_counter()
    cache.warm()
    warm_s = time.perf_counter() - t0
    pairs = sample_pairs(train, test, n, np.random.default_rng(seed))
    times = []
    for u, i in pairs:
        t0 = time.perf_counter()
        ids, eff = cache.effects(u, i)
        ids[np.argsort(-np.abs(eff), kind="stable")[:k]]
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"method": "newton (cached rows)", "n": len(ms), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), "precompute_seconds": warm_s}


_POOL_DATA: tuple[Ratings, Setup] | None = None  # a worker's training ratings and setup


def _init_pool(train: Ratings, setup: Setup) -> None:
    global _POOL_DATA
    torch.set_num_threads(1)
    _POOL_DATA = (train, setup)


def _retrain_job(key: tuple[int, int | None], pairs: list[tuple[int, int]]) -> list[float]:
    assert _POOL_DATA is not None
    train, setup = _POOL_DATA
    model = retrain(train, setup, [key[0]], seed=key[1])
    return [raw_prediction(model, u, i) for u, i in pairs]


def retrained_predictions(train: Ratings, setup: Setup, jobs: Sequence[tuple[int, int | None, int, int]],
                          workers: int = 1) -> dict[tuple[int, int | None, int, int], float]:
    """For each job ``(removed example, seed or None, user, item)``: the raw prediction of
    ``(user, item)`` by `retrain` without that example under that seed (None: the setup's).
    One retrain per distinct ``(example, seed)``; ``workers > 1`` spreads them over that many
    spawned processes, one thread each (each retrain is deterministic: the same result)."""
    global _POOL_DATA
    groups: dict[tuple[int, int | None], list[tuple[int, int]]] = {}
    for z, sd, u, i in jobs:
        groups.setdefault((z, sd), []).append((u, i))
    keys = list(groups)
    _POOL_DATA = (train, setup)
    try:
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_pool, initargs=(train, setup)) as pool:
                results = list(pool.map(_retrain_job, keys, [groups[k] for k in keys], chunksize=4))
        else:
            results = [_retrain_job(k, groups[k]) for k in keys]
    finally:
        _POOL_DATA = None
    return {(k[0], k[1], u, i): v for k, res in zip(keys, results, strict=True)
            for (u, i), v in zip(groups[k], res, strict=True)}


def served_setup(optimizer: str | None = None, *, seed: int = 0) -> Setup:
    """What ``recsys train`` fits by default (no validation slice): `MFConfig()` (D=128 in 4
    blocks) and `TrainConfig.for_model` (the compiled SGD kernel, 32 epochs), no early
    stopping; ``optimizer``: that optimizer with MF's own defaults for it, as ``recsys train
    --optimizer`` gives."""
    over: dict[str, object] = {"patience": None, "progress": False, "seed": seed}
    if optimizer is not None:
        over["optimizer"] = optimizer
    return Setup(MFConfig(seed=seed), TrainConfig.for_model(MatrixFactorization, **over))


def _reseeded(setup: Setup, seed: int) -> Setup:
    return Setup(replace(setup.model, seed=seed), replace(setup.train, seed=seed))


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions in ``ids`` of each of ``wanted`` (all present)."""
    order = np.argsort(ids, kind="stable")
    return order[np.searchsorted(ids, wanted, sorter=order)]


def fold_in_agreement(model: MatrixFactorization, train: Ratings, test: Ratings, n_users: int = 20,
                      n_revealed: int = 5, n_items: int = 4, seed: int = 0) -> dict:
    """Cold users as the service folds them in: ``n_users`` users of ``test`` (with at least
    ``n_revealed`` training ratings) come back as new users with ``n_revealed`` of their
    training ratings (on a copy of ``model``, through `MatrixFactorization.learn`, the path
    `recsys.recommender.Recommender` takes); for ``n_items`` of their test items, the effect
    of each revealed rating as the served explainer gives it (`MFExplainer.effects`) against
    the truth, the prediction minus that of the user re-folded without the rating
    (`MatrixFactorization.fold_in_user`). Also scores the one-row Newton estimate on those
    users (what fold-in users were explained with before: the training model's per-visit L2
    on a row that never trained) against the same truth."""
    import copy

    rng = np.random.default_rng(seed + 7)
    counts = train.user_counts()
    users = np.unique(test.users)
    users = users[counts[users] >= n_revealed]
    users = rng.choice(users, size=min(n_users, len(users)), replace=False)
    clone = copy.deepcopy(model)
    clone.start_online(train)
    raw_new = [f"cold-{train.user_ids.raw(int(u))}" for u in users]
    user_ids = train.user_ids.extend(raw_new)
    revealed = [rng.choice(train.by_user.examples[train.by_user.row(int(u))], size=n_revealed, replace=False)
                for u in users]
    rows = np.concatenate(revealed)
    new_users = np.repeat([user_ids.index(r, "user") for r in raw_new], n_revealed)
    new = Ratings(new_users, train.items[rows], train.values[rows], None, user_ids, train.item_ids,
                  train.rating_scale)
    ratings = train.append(new)
    clone.learn(ratings, np.arange(len(train), len(ratings)))
    explainer = clone.explainer(ratings)
    est, old, true, methods = [], [], [], set()
    for n, u in enumerate(users):
        nu = int(new_users[n * n_revealed])
        items = test.items[test.users == u]
        items = rng.choice(items, size=min(n_items, len(items)), replace=False)
        mine = np.arange(len(train) + n * n_revealed, len(train) + (n + 1) * n_revealed)
        for i in items:
            ids, eff, _, _, method = explainer.effects(nu, int(i))
            methods.add(method)
            est.append(eff[_positions(ids, mine)])
            o_ids, o_eff, _, _ = estimate_effects(clone, ratings, nu, int(i), "newton")
            old.append(o_eff[_positions(o_ids, mine)])
            base = raw_prediction(clone, nu, int(i))
            t = []
            for z in mine:
                keep = mine[mine != z]
                p, b = clone.fold_in_user(torch.from_numpy(ratings.items[keep]), torch.from_numpy(ratings.values[keep]))
                with torch.no_grad():
                    q = clone.item_factors.weight[int(i)]
                    pred = (float(clone.global_mean) + float(b) + float(clone.item_bias.weight[int(i)].mean())
                            + float((p * q).sum()) / clone.config.n_blocks)
                t.append(base - pred)
            true.append(np.array(t))
    e_all, o_all, t_all = np.concatenate(est), np.concatenate(old), np.concatenate(true)
    return {**{k: v for k, v in agreement_stats(e_all, t_all).items()},
            "method": " | ".join(sorted(methods)), "n_users": len(users), "n_revealed": n_revealed,
            "n_points": len(t_all), "true_mean_abs": float(np.abs(t_all).mean()),
            "max_abs_error": float(np.abs(e_all - t_all).max()),
            "previous_one_row_newton": {**agreement_stats(o_all, t_all),
                                        "estimate_mean_abs": float(np.abs(o_all).mean())}}


def online_agreement(model: MatrixFactorization, train: Ratings, test: Ratings, n_users: int = 20,
                     n_new: int = 5, n_items: int = 4, seed: int = 0) -> dict:
    """Trained users who rate again, as the service learns it: ``n_users`` users of ``test``
    send ``n_new`` of their test ratings (one `MatrixFactorization.learn` call on a copy of
    ``model``: online SGD, `recsys.models.mf.online`); for ``n_items`` random items each, the
    served effect of each new rating (`MFExplainer.effects`) against the truth, the
    prediction minus that after the same online learning without the rating (the steps
    re-run from the trained model). Measures the served estimate; there is no online-specific
    estimate yet."""
    import copy

    rng = np.random.default_rng(seed + 11)
    counts = np.bincount(test.users, minlength=train.n_users)
    users = np.flatnonzero((counts >= n_new) & (train.user_counts() > 0))
    users = rng.choice(users, size=min(n_users, len(users)), replace=False)
    if len(users) == 0:
        return {"n_users": 0, "n_new": n_new, "n_points": 0, "reason": f"no test user with {n_new} test ratings"}
    rows = np.concatenate([rng.choice(np.flatnonzero(test.users == u), size=n_new, replace=False) for u in users])
    new = Ratings(test.users[rows], test.items[rows], test.values[rows], None, train.user_ids, train.item_ids,
                  train.rating_scale)
    ratings = train.append(new)
    ids = np.arange(len(train), len(ratings))
    before = copy.deepcopy(model)
    before.start_online(train)
    after = copy.deepcopy(before)
    after.learn(ratings, ids)
    explainer = after.explainer(ratings)
    est, true, methods = [], [], set()
    for n, u in enumerate(users):
        mine = ids[n * n_new:(n + 1) * n_new]
        items = rng.choice(np.flatnonzero(train.item_counts() > 0), size=n_items, replace=False)
        without = {}
        for z in mine:
            again = copy.deepcopy(before)
            again.learn(ratings, ids[ids != z])
            without[int(z)] = again
        for i in items:
            cid, eff, _, _, method = explainer.effects(int(u), int(i))
            methods.add(method)
            est.append(eff[_positions(cid, mine)])
            base = raw_prediction(after, int(u), int(i))
            true.append(np.array([base - raw_prediction(without[int(z)], int(u), int(i)) for z in mine]))
    e_all, t_all = np.concatenate(est), np.concatenate(true)
    return {**agreement_stats(e_all, t_all), "method": " | ".join(sorted(methods)), "n_users": len(users),
            "n_new": n_new, "n_points": len(t_all), "true_mean_abs": float(np.abs(t_all).mean()),
            "estimate_mean_abs": float(np.abs(e_all).mean())}


def served_run(train: Ratings, test: Ratings, *, setup: Setup | None = None, method: str | None = None,
               n_predictions: int = 30, n_candidates: int = 20, n_removal_pairs: int = 50,
               fold_in_users: int = 20, noise_floor: bool = True, seed: int = 0, workers: int = 1) -> dict:
    """The figures ``recsys explain-eval`` prints, on the model and method the service uses.

    The model: ``setup`` (default `served_setup`: ``recsys train``'s defaults), trained by
    the `Trainer`; its explainer: ``model.explainer(train, log, method)`` (``method`` None:
    the service's default, one-row Newton cached per row; ``rollback`` trains with the log).
    Truth: same-trajectory leave-one-out (`retrain`, same seed). Returned (JSON-ready):

    - agreement over ``n_predictions`` test predictions × ``n_candidates`` random candidates
      each: ``spearman``, ``pearson``, ``slope`` (least squares of true on estimated),
      ``sign_agreement``, ``precision_at_5``;
    - ``noise_floor_spearman``: Spearman between the truth and the truth retrained under
      another seed (initial weights and shuffles), the same points; ``spearman_vs_reseeded``:
      the estimate against that other truth;
    - removal over ``n_removal_pairs`` other test predictions: ``top1_direction_rate`` (share
      where removing the estimated top-1 moved the prediction the way its effect says),
      ``random_direction_rate`` (a random candidate removed instead, judged against the
      top-1's direction: the paper's random-neighbour baseline), ``random_own_direction_rate``
      (the random candidate judged by its own estimated sign);
    - ``fold_in``: `fold_in_agreement` for ``fold_in_users`` cold users of 5 ratings;
    - ``online``: `online_agreement` for as many trained users sending 5 ratings online;
    - ``points``: every agreement point (user, item, example, true, estimate[, true_reseeded]).

    ``workers``: retrain in that many processes (`retrained_predictions`)."""
    setup = setup or served_setup(seed=seed)
    if method == "rollback":
        model, log, _ = fit_logged(train, setup)
    else:
        model, log = build(train, setup), None
        Trainer(setup.train).fit(model, train)
    model.eval()
    explainer = model.explainer(train, log, method)
    explainer.warm()
    rng = np.random.default_rng(seed)
    alt_seed = setup.train.seed + 1000

    def served(u: int, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        ids, eff, _, _, used = explainer.effects(u, i)
        return ids, eff, used

    # agreement (test B) and removal (test A) on the served estimate: sample first, then retrain
    pairs = sample_pairs(train, test, n_predictions, rng, min_candidates=n_candidates)
    jobs: list[tuple[int, int | None, int, int]] = []  # (removed example, seed, user, item)
    est, picked, used_methods = [], [], set()
    for u, i in pairs:
        ids, eff, used = served(u, i)
        used_methods.add(used)
        pick = np.sort(rng.choice(len(ids), size=min(n_candidates, len(ids)), replace=False))
        est.append(eff[pick])
        picked.append(ids[pick])
        jobs += [(int(z), None, u, i) for z in ids[pick]]
        if noise_floor:
            jobs += [(int(z), alt_seed, u, i) for z in ids[pick]]
    rng_a = np.random.default_rng(seed + 1)
    rem_pairs = sample_pairs(train, test, n_removal_pairs, rng_a, min_candidates=2)
    removals = []
    for u, i in rem_pairs:
        ids, eff, _ = served(u, i)
        top, r = int(np.argmax(np.abs(eff))), int(rng_a.integers(len(ids)))
        removals.append((u, i, int(ids[top]), float(eff[top]), int(ids[r]), float(eff[r])))
        jobs += [(int(ids[top]), None, u, i), (int(ids[r]), None, u, i)]
    pred = retrained_predictions(train, setup, jobs, workers=workers)
    if noise_floor:
        alt_full = retrain(train, setup, seed=alt_seed)

    true, alt, prec, points = [], [], [], []
    for (u, i), e, zs in zip(pairs, est, picked, strict=True):
        base = raw_prediction(model, u, i)
        t = np.array([base - pred[(int(z), None, u, i)] for z in zs])
        true.append(t)
        prec.append(len(set(np.argsort(-np.abs(e))[:5]) & set(np.argsort(-np.abs(t))[:5])) / min(5, len(t)))
        if noise_floor:
            alt_base = raw_prediction(alt_full, u, i)
            alt.append(np.array([alt_base - pred[(int(z), alt_seed, u, i)] for z in zs]))
        points.extend({"user": u, "item": i, "example": int(z), "true": float(t[c]), "estimate": float(e[c]),
                       **({"true_reseeded": float(alt[-1][c])} if noise_floor else {})}
                      for c, z in enumerate(zs))
    e_all, t_all = np.concatenate(est), np.concatenate(true)
    agree = agreement_stats(e_all, t_all)
    out: dict = {
        "method": " | ".join(sorted(used_methods)) + (" (cached per row: the service's default)" if method is None else ""),
        "embedding_size": setup.model.embedding_size, "n_blocks": setup.model.n_blocks,
        "optimizer": setup.train.optimizer, "epochs": setup.train.epochs,
        "n_pairs": len(pairs), "n_candidates": n_candidates, "n_points": len(t_all),
        "spearman": agree["spearman"], "pearson": agree["pearson"], "slope": agree["slope"],
        "sign_agreement": agree["sign_agreement"], "precision_at_5": float(np.mean(prec)),
        "true_mean_abs": float(np.abs(t_all).mean()), "estimate_mean_abs": float(np.abs(e_all).mean()),
    }
    if alt:
        a_all = np.concatenate(alt)
        floor = agreement_stats(t_all, a_all)
        vs_alt = agreement_stats(e_all, a_all)
        out.update({"noise_floor_spearman": floor["spearman"], "noise_floor_slope": floor["slope"],
                    "spearman_vs_reseeded": vs_alt["spearman"], "slope_vs_reseeded": vs_alt["slope"]})
    else:
        out["noise_floor_spearman"] = None

    top_along, rand_along, rand_own, top_est = [], [], [], []
    for u, i, top, top_eff, r, r_eff in removals:
        base = raw_prediction(model, u, i)
        direction = -np.sign(top_eff) or 1.0  # removal changes the prediction by -effect
        top_along.append((pred[(top, None, u, i)] - base) * direction)
        top_est.append(abs(top_eff))
        change_r = pred[(r, None, u, i)] - base
        rand_along.append(change_r * direction)
        rand_own.append(change_r * (-np.sign(r_eff) or 1.0))
    top_along, rand_along = np.array(top_along), np.array(rand_along)
    out.update({
        "n_removal_pairs": len(rem_pairs),
        "top1_direction_rate": float(np.mean(top_along > 0)),
        "random_direction_rate": float(np.mean(rand_along > 0)),
        "random_own_direction_rate": float(np.mean(np.array(rand_own) > 0)),
        "top1_mean_change_along_estimate": float(top_along.mean()),
        "top1_mean_abs_estimate": float(np.mean(top_est)),
        "random_mean_abs_change": float(np.abs(rand_along).mean()),
        "retrains": len({(z, sd) for z, sd, _, _ in jobs}) + (1 if noise_floor else 0),
    })
    out["fold_in"] = (fold_in_agreement(model, train, test, n_users=fold_in_users, seed=seed)
                      if fold_in_users else None)
    out["online"] = online_agreement(model, train, test, n_users=fold_in_users, seed=seed) if fold_in_users else None
    out["setup"] = setup.to_dict()
    out["points"] = points
    out["truth"] = ("same-trajectory leave-one-out: full retrain from the same initial weights and seed without "
                    "the rating (epoch orders kept, the removed visits skipped; global mean and per-row L2 "
                    "weights of the full data)")
    return out
