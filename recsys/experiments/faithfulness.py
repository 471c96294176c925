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


def summary_run(train: Ratings, test: Ratings, *, optimizer: str = "sgd", n_pairs: int = 6,
                n_candidates: int = 10, n_removal_pairs: int | None = None, seed: int = 0,
                overhead_reps: int = 2) -> dict:
    """The figures ``recsys explain-eval`` prints: tests A (k=1), B and C on one split.

    Faithfulness uses `default_setup` (D=32, one block); overhead and explanation latency use
    the default MF config (D=128, 4 blocks) with the default training config (the kernel)."""
    setup = default_setup(optimizer, seed=seed)
    model, log, _ = fit_logged(train, setup)
    b = agreement(train, test, setup, model, log, n_pairs=n_pairs, n_candidates=n_candidates, seed=seed)
    a = removal(train, test, setup, model, log, n_pairs=n_removal_pairs or max(n_pairs, 10), ks=(1,), seed=seed)
    cost = training_overhead(train, MFConfig(), TrainConfig(patience=None, progress=False), reps=overhead_reps)
    big = MatrixFactorization(train.n_users, train.n_items, train.rating_scale, MFConfig())
    cb = RollbackCallback()
    Trainer(TrainConfig(patience=None, progress=False), callbacks=[cb]).fit(big, train)
    lat = explain_latency(big, cb.log, train, test, n=200, seed=seed)
    best = b.methods[DEFAULT_METHOD]
    return {
        "optimizer": optimizer, "default_method": DEFAULT_METHOD,
        "spearman": best["spearman"], "pearson": best["pearson"], "precision_at_5": best["precision_at_5"],
        "top1_direction_rate": a.strategies[f"{DEFAULT_METHOD}@1"]["direction_rate"],
        "random_direction_rate": a.strategies["random-neighbour@1"]["direction_rate"],
        "overhead_ratio": cost["overhead_ratio"], "explain_p50_ms": lat["p50_ms"], "explain_p99_ms": lat["p99_ms"],
        "log_bytes_per_example": cost["log_bytes_per_example_float32"],
        "methods": b.methods, "removal": a.strategies, "n_pairs": b.n_pairs, "n_candidates": n_candidates,
        "setup": setup.to_dict(),
    }
