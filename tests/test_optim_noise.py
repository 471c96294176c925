"""Covariance-noise SGD: the injected noise's covariance matches its target; embedding noise
only on touched rows; state round trip; training through the Trainer."""

from __future__ import annotations

import copy

import pytest
import torch

from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.optim.noise import CovNoiseSGD
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
    Trainer(TrainConfig(epochs=5, batch_size=64, optimizer="cov-noise", learning_rate=0.5, noise_batch=16,
                        noise_structure=structure, progress=False)).fit(model, small_ratings)
    assert float(((model.predict(u, i) - v) ** 2).mean().sqrt()) < before
