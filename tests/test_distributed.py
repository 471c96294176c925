"""Data-parallel training (`recsys.distributed`): two CPU processes with gloo.

One spawn per module runs everything on both ranks (`_worker`): unit checks of the gradient
and row exchanges against sums computed here, then (with MovieLens-100K) one epoch of u1 per
optimizer data-parallel, and the same runs in one process (split between the ranks while the
group idles). The tests below read what the ranks wrote.

Tolerances (stated, and why):

- exchanges (unit): 1e-6 absolute: the same numbers summed in another order (float32);
- MF with SGD (closed form), Adam and covariance-noise SGD on the same global batches
  and seed: weights within 1e-4 absolute (max over all entries, weights are O(0.1..1)) and
  held-out RMSE within 1e-5 of one process: the step is mathematically the same, the
  difference is float32 summation order compounding over 16 steps;
- the rollback log merged from the ranks: within 1e-5 absolute + 1e-4 relative of the
  single-process log (Adam divides by √v̂, which amplifies rounding on rarely seen rows);
- K-FAC with the sampled Fisher (its Monte-Carlo targets are drawn per rank, not as one process
  draws them) and REC (chains are sampled per rank, excluding only the rank's own batch
  pairs): the replicas equal each other bit for bit, and held-out RMSE within 0.02 of one
  process (the run-to-run spread of one epoch over seeds is of that order).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.distributed import shard_bounds, spawn
from tests.conftest import make_ratings, ml100k_home, require_ml100k

#: MovieLens-100K u1 runs: name -> (model, model config, train config overrides, rollback)
_MF = {"embedding_size": 16, "n_blocks": 2}
#: SGD's learning rate: MF's batch-1 default scaled linearly to the batch (`recsys.optim.scaling`)
_SGD_LR = 0.018 * 512
CONFIGS: dict[str, tuple[str, dict, dict, bool]] = {
    "mf-sgd": ("mf", _MF, {"optimizer": "sgd", "learning_rate": _SGD_LR}, True),
    "mf-adam": ("mf", _MF, {"optimizer": "adam", "learning_rate": 0.01}, True),
    "mf-cov-noise": ("mf", _MF, {"optimizer": "cov-noise", "learning_rate": _SGD_LR, "noise": {"batch": 64}}, False),
    "mf-kfac": ("mf", _MF, {"optimizer": "kfac", "learning_rate": 0.003}, False),
    "rec": ("rec", {"fanouts": (4, 2), "embedding_size": 16, "hidden_size": 32, "prototypes": 50},
            {"optimizer": "adam", "learning_rate": 2e-3}, False),
}
EXACT = ("mf-sgd", "mf-adam", "mf-cov-noise")
#: every run trains one epoch on the first 8,192 ratings of u1.base in global batches of 512
#: (16 steps: the 2-core machine is shared), evaluated on all of u1.test
EXAMPLES, BATCH = 8_192, 512


# ------------------------------------------------------------------ inputs both sides rebuild
def local_grads(rank: int) -> dict[str, torch.Tensor | None]:
    """Rank ``rank``'s gradients for the exchange unit check: an uncoalesced sparse table, a
    dense table gradient with few nonzero rows (exchanged by rows), a dense table with every
    row nonzero (all-reduced), a dense matrix, one present on rank 1 only, one on none."""
    gen = torch.Generator().manual_seed(rank)
    rows = torch.randint(0, 50, (30,), generator=gen)
    sparse = torch.sparse_coo_tensor(rows.unsqueeze(0), torch.randn(30, 4, generator=gen), (50, 4),
                                     check_invariants=True)
    few = torch.zeros(1000, 3)
    few[torch.randint(0, 1000, (7,), generator=gen)] = torch.randn(7, 3, generator=gen)
    return {"sparse": sparse, "few_rows": few, "all_rows": torch.randn(10, 3, generator=gen),
            "dense": torch.randn(5, 6, generator=gen),
            "one_rank": torch.randn(2, 2, generator=gen) if rank == 1 else None, "none": None}


def _params() -> dict[str, torch.nn.Parameter]:
    shapes = {"sparse": (50, 4), "few_rows": (1000, 3), "all_rows": (10, 3), "dense": (5, 6),
              "one_rank": (2, 2), "none": (3,)}
    return {k: torch.nn.Parameter(torch.zeros(s)) for k, s in shapes.items()}


def _small_mf(r):
    from recsys.models.mf import MatrixFactorization, MFConfig

    model = MatrixFactorization(r.n_users, r.n_items, r.rating_scale, MFConfig(embedding_size=8, n_blocks=2))
    model.prepare(r)
    return model


def _unit_checks(dp, out: Path) -> None:
    from recsys.models.mf.steps import parallel_sgd_batch
    from recsys.optim.capture import LayerCapture

    # 1. gradient exchange
    params = _params()
    for name, g in local_grads(dp.rank).items():
        params[name].grad = g
    total = dp.reduce_gradients(list(params.values()), loss=dp.rank + 1.5,
                                row_tables=[params["sparse"], params["few_rows"], params["all_rows"]])
    torch.save({"loss": total, "sparse_is_sparse": params["sparse"].grad.is_sparse,
                "sparse_coalesced": params["sparse"].grad.is_coalesced(),
                "grads": {k: None if p.grad is None else p.grad.to_dense() for k, p in params.items()}},
               out / f"unit-grads-{dp.rank}.pt")

    # 2. closed-form MF step, and 3. gathered curvature records, on a batch of 64 and of 1
    r = make_ratings()
    results = {}
    for n in (64, 1):
        ids = np.arange(n, dtype=np.int64) * 3 % len(r)
        mine, weight = dp.shard(ids)
        model = _small_mf(r)
        u, i, v = (t[torch.from_numpy(mine)] for t in r.tensors())
        loss = parallel_sgd_batch(dp, model, u, i, v, 0.5, weight)
        results[f"sgd-{n}"] = ({k: t.clone() for k, t in model.state_dict().items()}, loss)

        model = _small_mf(r)
        capture = LayerCapture((name, getattr(model, name)) for name in
                               ("user_factors", "item_factors", "user_bias", "item_bias"))
        if len(mine):
            (model.loss(u, i, v) * weight).backward()
        dp.gather_captures([capture])
        results[f"capture-{n}"] = {k: capture.take_embedding(k, getattr(model, k).embedding_dim)
                                   for k in capture.records}
    torch.save(results, out / f"unit-mf-{dp.rank}.pt")


@functools.cache
def _u1():
    from recsys.datasets import load_split

    return load_split("ml-100k", "u1")


def _train(dp, name: str, parallel: bool, out: Path) -> None:
    from recsys.evaluate import evaluate_ratings
    from recsys.explain.rollback import RollbackCallback
    from recsys.models import build_model
    from recsys.train import TrainConfig, Trainer

    model_name, model_cfg, train_cfg, rollback = CONFIGS[name]
    train, test = _u1()
    train = train.subset(np.arange(EXAMPLES))
    config = TrainConfig(**{"epochs": 1, "batch_size": BATCH, "lr_decay": 1.0, "patience": None,
                            "progress": False, "seed": 0, **train_cfg})
    model = build_model(model_name, train.n_users, train.n_items, train.rating_scale, dict(model_cfg))
    callbacks = [RollbackCallback()] if rollback else []
    result = Trainer(config, callbacks=callbacks, parallel=dp if parallel else None).fit(model, train)
    log = callbacks[0].log if rollback else None
    if parallel and log is not None:
        dp.merge_rollback_log(log)
    tag = f"dp{dp.rank}" if parallel else "single"
    torch.save({"state": {k: v.clone() for k, v in model.state_dict().items()},
                "rmse": evaluate_ratings(model, test)["rmse"], "train_mse": result.history[-1].train_mse,
                "step_kind": result.step_kind, "log": None if log is None else log.data.clone()},
               out / f"{name}-{tag}.pt")


def _worker(out: str, with_data: bool) -> None:
    from recsys.distributed import init_from_env

    dp = init_from_env()
    assert dp is not None and dp.world_size == 2
    out_dir = Path(out)
    _unit_checks(dp, out_dir)
    if not with_data:
        return
    for name in CONFIGS:
        _train(dp, name, True, out_dir)
    # the single-process references, split between the ranks
    for k, name in enumerate(CONFIGS):
        if k % dp.world_size == dp.rank:
            _train(dp, name, False, out_dir)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    with_data = ml100k_home() is not None
    spawn(_worker, 2, str(out), with_data, threads=1)
    return out


# ------------------------------------------------------------------ unit tests
def test_shard_bounds_cover_the_batch_in_rank_order():
    for n in (0, 1, 2, 7, 1024):
        bounds = [shard_bounds(n, r, 3) for r in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_gradient_exchange_sums_sparse_rows_and_dense_gradients(results):
    expected: dict[str, torch.Tensor | None] = {}
    for rank in range(2):
        for k, g in local_grads(rank).items():
            if g is not None:
                g = g.to_dense()
                expected[k] = g if expected.get(k) is None else expected[k] + g
            else:
                expected.setdefault(k, None)
    for rank in range(2):
        got = torch.load(results / f"unit-grads-{rank}.pt")
        assert got["loss"] == pytest.approx(1.5 + 2.5)
        assert got["sparse_is_sparse"] and got["sparse_coalesced"]  # never densified
        for k, want in expected.items():
            if want is None:
                assert got["grads"][k] is None, k
            else:
                torch.testing.assert_close(got["grads"][k], want, atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("n", [64, 1])
def test_closed_form_step_and_curvature_records_match_one_process(results, n):
    from recsys.optim.capture import LayerCapture

    r = make_ratings()
    ids = np.arange(n, dtype=np.int64) * 3 % len(r)
    u, i, v = (t[torch.from_numpy(ids)] for t in r.tensors())
    model = _small_mf(r)
    loss = model.sgd_batch(u, i, v, 0.5)
    ref = _small_mf(r)
    capture = LayerCapture((name, getattr(ref, name)) for name in
                           ("user_factors", "item_factors", "user_bias", "item_bias"))
    ref.loss(u, i, v).backward()
    records = {k: capture.take_embedding(k, getattr(ref, k).embedding_dim) for k in capture.records}
    for rank in range(2):
        got = torch.load(results / f"unit-mf-{rank}.pt")
        state, got_loss = got[f"sgd-{n}"]
        assert got_loss == pytest.approx(loss, rel=1e-5)
        for k, t in model.state_dict().items():
            torch.testing.assert_close(state[k], t, atol=1e-6, rtol=0, msg=k)
        for k, (rows, grads) in records.items():
            got_rows, got_grads = got[f"capture-{n}"][k]
            assert torch.equal(got_rows, rows), k  # the global batch, in order
            torch.testing.assert_close(got_grads, grads, atol=1e-6, rtol=1e-5, msg=k)


# ------------------------------------------------------------------ MovieLens-100K u1
def _runs(results: Path, name: str) -> tuple[dict, dict, dict]:
    require_ml100k()
    return tuple(torch.load(results / f"{name}-{tag}.pt") for tag in ("dp0", "dp1", "single"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_replicas_stay_identical(results, name):
    a, b, _ = _runs(results, name)
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), f"{name}: ranks disagree on {k}"
    assert math.isfinite(a["rmse"])


@pytest.mark.parametrize("name", EXACT)
def test_matches_one_process_with_the_same_global_batch_and_seed(results, name):
    dp, _, single = _runs(results, name)
    assert dp["step_kind"] == single["step_kind"]
    for k, want in single["state"].items():
        if want.is_floating_point():
            diff = float((dp["state"][k] - want).abs().max())
            assert diff < 1e-4, f"{name}: {k} differs by {diff:.2e}"
    assert dp["rmse"] == pytest.approx(single["rmse"], abs=1e-5)
    assert dp["train_mse"] == pytest.approx(single["train_mse"], rel=1e-5)


@pytest.mark.parametrize("name", ["mf-sgd", "mf-adam"])
def test_rollback_log_sharded_by_example_merges_to_the_single_process_log(results, name):
    dp, other, single = _runs(results, name)
    assert torch.equal(dp["log"], other["log"])
    assert float(single["log"].abs().max()) > 0
    torch.testing.assert_close(dp["log"], single["log"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["mf-kfac", "rec"])
def test_sampled_statistics_match_one_process_in_accuracy(results, name):
    dp, _, single = _runs(results, name)
    assert abs(dp["rmse"] - single["rmse"]) < 0.02, (dp["rmse"], single["rmse"])


def test_cli_nproc_trains_and_rank_0_writes_the_artefact(tmp_path, capsys):
    require_ml100k()
    import json
    import subprocess
    import sys

    from recsys.artefact import load_artefact
    from recsys.cli import build_parser, fit_model, main

    argv = ["train", "--dataset", "ml-100k", "--split", "u1", "--embedding-size", "8", "--n-blocks", "2",
            "--epochs", "1", "--batch-size", "2048", "--lr-scaling", "linear", "--quiet", "--json",
            "--threads", "1"]
    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, "-m", "recsys.cli", *argv, "--nproc", "2", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "1"}, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["world_size"] == 2 and lines[0]["backend"] == "gloo"  # rank 0 alone
    parallel = load_artefact(out).model.state_dict()

    from recsys.datasets import load_split

    single, _, summary = fit_model(build_parser().parse_args(argv), load_split("ml-100k", "u1")[0])
    assert summary["step_kind"] == lines[0]["step_kind"] == "closed-form"
    for k, want in single.state_dict().items():
        assert float((parallel[k].float() - want.float()).abs().max()) < 1e-4, k

    capsys.readouterr()
    assert main([*argv[:-2], "--batch-size", "1", "--nproc", "2"]) == 2
    assert "needs minibatches" in capsys.readouterr().err
