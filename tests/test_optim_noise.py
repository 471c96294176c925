"""Covariance-noise SGD: the injected noise's covariance matches its target; embedding noise
only on touched rows; state round trip; training through the Trainer."""

from __future__ import annotations

import copy

import pytest
import torch

from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.optim.factory import build_optimizer
from recsys.optim.noise import CovNoiseSGD, NoiseConfig, SubBatchNoise
from recsys.train import TrainConfig, Trainer

B, B_S, DIM = 8, 2, 4
COEF = 1 / B_S - 1 / B


def per_example(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, DIM, generator=g, dtype=torch.double) * torch.tensor([1.0, 0.5, 2.0, 0.1],
                                                                                dtype=torch.double)


def draws(structure, grads, rows=None, n=20000, param=None):
    param = param if param is not None else torch.zeros(DIM, dtype=torch.double, requires_grad=True)
    opt = CovNoiseSGD([param], lr=1.0, noise_batch=B_S, structure=structure, seed=1)
    opt.set_per_example_grads(param, grads, rows)
    out = [opt.noise_for(param, opt.param_groups[0]) for _ in range(n)]
    return out


@pytest.mark.parametrize("structure", ["diag", "full", "isotropic"])
def test_noise_covariance_matches_its_target(structure):
    grads = per_example()
    centred = grads - grads.mean(0)
    full = centred.T @ centred / B
    target = {"full": COEF * full, "diag": COEF * torch.diag(full.diagonal()),
              "isotropic": COEF * full.trace() / DIM * torch.eye(DIM, dtype=torch.double)}[structure]
    noise = torch.stack(draws(structure, grads))
    emp = noise.T @ noise / len(noise)
    assert noise.mean(0).abs().max() < 0.05 * target.diagonal().sqrt().max()
    torch.testing.assert_close(emp, target, rtol=0.06, atol=0.04 * float(target.diagonal().max()))
    assert float(emp.trace()) == pytest.approx(float(COEF * full.trace()), rel=0.05)


@pytest.mark.parametrize("structure", ["diag", "full", "isotropic"])
def test_embedding_noise_is_on_touched_rows_and_matches_dense(structure):
    """A table whose examples touch rows [0,0,1,1,...]: per-row noise covariance equals the
    dense per-example-gradient target restricted to those rows."""
    grads = per_example()
    rows = torch.tensor([0, 0, 1, 1, 3, 3, 3, 0])
    table = torch.zeros(5, DIM, dtype=torch.double, requires_grad=True)
    out = draws(structure, grads, rows, n=20000, param=table)
    touched = out[0][0]
    assert touched.tolist() == [0, 1, 3]
    noise = torch.stack([n for _, n in out]).reshape(len(out), -1)
    dense = torch.zeros(B, 5, DIM, dtype=torch.double)
    dense[torch.arange(B), rows] = grads
    dense = dense[:, touched].reshape(B, -1)
    c = dense - dense.mean(0)
    full = c.T @ c / B
    target = {"full": COEF * full, "diag": COEF * torch.diag(full.diagonal()),
              "isotropic": COEF * full.trace() / full.shape[0] * torch.eye(full.shape[0], dtype=torch.double)}
    emp = noise.T @ noise / len(noise)
    scale = float(target[structure].diagonal().max())
    torch.testing.assert_close(emp, target[structure], rtol=0.08, atol=0.04 * scale)


def test_no_noise_when_the_batch_is_not_larger_than_the_small_batch():
    p = torch.zeros(DIM, dtype=torch.double, requires_grad=True)
    opt = CovNoiseSGD([p], lr=1.0, noise_batch=B, structure="diag")
    opt.set_per_example_grads(p, per_example())
    assert torch.equal(opt.noise_for(p, opt.param_groups[0]), torch.zeros(DIM, dtype=torch.double))


def mf(r):
    return MatrixFactorization(r.n_users, r.n_items, r.rating_scale, MFConfig(embedding_size=8, n_blocks=2))


def test_state_dict_round_trip_resumes_identically(small_ratings):
    u, i, v = small_ratings.tensors()
    model = mf(small_ratings)
    model.prepare(small_ratings)
    opt = CovNoiseSGD(list(model.parameters()), lr=0.1, noise_batch=4, structure="full", model=model, seed=3)
    batches = [torch.arange(s, s + 32) for s in range(0, 192, 32)]

    def run(m, o, bs):
        for b in bs:
            o.zero_grad()
            m.loss(u[b], i[b], v[b]).backward()
            o.step()

    run(model, opt, batches[:3])
    saved_m, saved_o = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, batches[3:])
    other = mf(small_ratings)
    other.load_state_dict(saved_m)
    opt2 = CovNoiseSGD(list(other.parameters()), lr=0.1, noise_batch=4, structure="full", model=other, seed=99)
    opt2.load_state_dict(saved_o)
    run(other, opt2, batches[3:])
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("structure", ["diag", "full", "isotropic"])
def test_cov_noise_trains_mf_through_the_trainer(small_ratings, structure):
    model = mf(small_ratings)
    model.prepare(small_ratings)
    u, i, v = small_ratings.tensors()
    before = float(((model.predict(u, i) - v) ** 2).mean().sqrt())
    Trainer(TrainConfig(epochs=5, batch_size=64, optimizer="cov-noise", learning_rate=0.5,
                        noise={"batch": 16, "structure": structure}, progress=False)).fit(model, small_ratings)
    assert float(((model.predict(u, i) - v) ** 2).mean().sqrt()) < before


# ---------------------------------------------------------------------- sub-batch estimator
def sub_batch_source(structure, grads, scale=1.0):
    """A `SubBatchNoise` over one 4-vector parameter holding ``grads [m, 4]`` as recorded."""
    p = torch.zeros(DIM, dtype=torch.double, requires_grad=True)
    source = SubBatchNoise([p], noise_batch=B_S, structure=structure, noise_scale=scale, seed=1)
    for g in grads:
        p.grad = g.clone()
        source.record()
    return p, source


@pytest.mark.parametrize("structure", ["diag", "full", "isotropic"])
def test_sub_batch_noise_has_a_small_batch_deviations_covariance(structure):
    """m recorded sub-batch gradients g_j: the noise's covariance is (1 − 1/m)·Cov(g_j) (full),
    its diagonal (diag) or its mean variance (isotropic), around their mean."""
    grads = per_example(seed=2)  # 8 sub-batch gradients
    m = len(grads)
    cov = torch.cov(grads.T)  # unbiased, (m − 1) denominator
    target = {"full": cov, "diag": torch.diag(cov.diagonal()),
              "isotropic": cov.trace() / DIM * torch.eye(DIM, dtype=torch.double)}[structure] * (1 - 1 / m)
    draws = []
    p, source = sub_batch_source(structure, grads)
    for _ in range(20000):
        source._grads, source._sizes = list(grads), [B_S] * m
        source.apply()
        draws.append(p.grad - grads.mean(0))
    noise = torch.stack(draws)
    emp = noise.T @ noise / len(noise)
    torch.testing.assert_close(emp, target, rtol=0.06, atol=0.04 * float(target.diagonal().max()))


def test_sub_batch_noise_without_noise_is_the_size_weighted_mean_gradient():
    grads = per_example()[:3]
    p = torch.zeros(DIM, dtype=torch.double, requires_grad=True)
    source = SubBatchNoise([p], noise_batch=4, noise_scale=0.0)
    for g, n in zip(grads, (4, 4, 2), strict=True):
        p.grad = g.clone()
        source.record(n)
        assert p.grad is None  # cleared for the next sub-batch
    source.apply()
    torch.testing.assert_close(p.grad, (4 * grads[0] + 4 * grads[1] + 2 * grads[2]) / 10)


def test_sub_batch_noise_at_scale_zero_trains_like_the_plain_large_batch(small_ratings):
    """MF's loss is a mean over ratings, so sub-batch passes without noise are the large
    batch's gradient: the same weights as plain SGD through autograd."""
    u, i, v = small_ratings.tensors()
    models = []
    for cfg in (dict(optimizer="cov-noise", noise={"estimator": "sub-batch", "scale": 0.0, "batch": 16}),
                dict(optimizer="sgd")):
        model = mf(small_ratings)
        trainer = Trainer(TrainConfig(epochs=2, batch_size=64, learning_rate=0.5, progress=False, **cfg),
                          optimizer_factory=None if cfg["optimizer"] == "cov-noise"
                          else (lambda m: torch.optim.SGD(m.parameters(), lr=0.5)))
        trainer.fit(model, small_ratings)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sub_batch_noise_puts_covariance_noise_under_adam(small_ratings):
    model = mf(small_ratings)
    model.prepare(small_ratings)
    u, i, v = small_ratings.tensors()
    before = float(((model.predict(u, i) - v) ** 2).mean().sqrt())
    trainer = Trainer(TrainConfig(epochs=4, batch_size=64, optimizer="cov-noise",
                                  noise={"estimator": "sub-batch", "base": "adam", "batch": 16}, learning_rate=0.01, progress=False))
    trainer.fit(model, small_ratings)
    assert isinstance(trainer.optimizer, torch.optim.Adam) and trainer.sub_batch_noise is not None
    assert float(((model.predict(u, i) - v) ** 2).mean().sqrt()) < before


def test_per_example_noise_refuses_another_base():
    with pytest.raises(ValueError, match="sub-batch"):
        build_optimizer("cov-noise", torch.nn.Linear(2, 1), 0.1, noise=NoiseConfig(base="adam"))
