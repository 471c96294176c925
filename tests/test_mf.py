"""Biased MF: the three training paths agree with autograd, steps are sparse, fold-in works."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.optim.factory import build_optimizer


def fresh(r, **cfg) -> MatrixFactorization:
    m = MatrixFactorization(r.n_users, r.n_items, r.rating_scale, MFConfig(**{"embedding_size": 8, "n_blocks": 2, **cfg}))
    m.prepare(r)
    return m


def autograd_sgd(m, users, items, values, lr):
    opt = build_optimizer("sgd", m, lr)
    opt.zero_grad()
    m.loss(users, items, values).backward()
    opt.step()


@pytest.mark.parametrize("n_blocks", [1, 2])
def test_compiled_kernel_equals_autograd_sgd_with_batch_one(small_ratings, n_blocks):
    r = small_ratings
    kernel, reference = fresh(r, n_blocks=n_blocks), fresh(r, n_blocks=n_blocks)
    order = np.random.default_rng(0).permutation(len(r))[:50]
    kernel.sgd_examples(r, order, 0.05)
    u, i, v = r.tensors()
    for k in order:
        autograd_sgd(reference, u[k:k + 1], i[k:k + 1], v[k:k + 1], 0.05)
    for a, b in zip(kernel.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_closed_form_batch_step_equals_autograd_with_repeated_rows(small_ratings):
    r = small_ratings
    closed, reference = fresh(r), fresh(r)
    u, i, v = r.tensors()
    idx = torch.tensor([0, 3, 3, 7, 0, 12])  # repeated examples: rows must accumulate
    closed.sgd_batch(u[idx], i[idx], v[idx], 0.1)
    autograd_sgd(reference, u[idx], i[idx], v[idx], 0.1)
    for a, b in zip(closed.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_of_loss_matches_hand_derivation(small_ratings):
    r = small_ratings
    m = fresh(r, n_blocks=1, reg_exponent=0.0)
    u, i, v = (t[:1] for t in r.tensors())
    m.loss(u, i, v).backward()
    p, q = m.user_factors.weight[u[0]].detach(), m.item_factors.weight[i[0]].detach()
    err = v[0] - float(m.forward(u, i).detach()[0])
    expected = -(err * q) + m.config.reg * p
    torch.testing.assert_close(m.user_factors.weight.grad.to_dense()[u[0]], expected)


def test_a_step_touches_only_the_rows_of_its_batch(small_ratings):
    r = small_ratings
    m = fresh(r)
    before = m.user_factors.weight.detach().clone()
    u, i, v = (t[:4] for t in r.tensors())
    m.sgd_batch(u, i, v, 0.1)
    changed = (m.user_factors.weight != before).any(1).nonzero().flatten()
    assert set(changed.tolist()) <= set(u.tolist())
    assert m.user_factors.weight.grad is None  # no dense gradient was ever built


def test_prediction_is_mean_of_blocks_and_clipped(small_ratings):
    r = small_ratings
    m = fresh(r, n_blocks=2)
    u, i, _ = (t[:5] for t in r.tensors())
    torch.testing.assert_close(m.forward(u, i), m.block_predictions(u, i).mean(-1))
    with torch.no_grad():
        m.user_factors.weight.mul_(100)
    pred = m.predict(u, i)
    assert pred.min() >= 1 and pred.max() <= 5


def test_fold_in_recovers_a_user_from_noise_free_ratings():
    torch.manual_seed(0)
    n_items, d = 200, 4
    m = MatrixFactorization(1, n_items, (-100, 100), MFConfig(embedding_size=d, n_blocks=1, fold_in_reg=1e-6, fold_in_bias_reg=1e-6))
    m.global_mean.fill_(3.0)
    with torch.no_grad():
        m.item_factors.weight.normal_()
        m.item_bias.weight.normal_()
    true_p, true_b = torch.randn(d), torch.tensor(0.7)
    items = torch.arange(50)
    values = 3.0 + true_b + m.item_bias.weight[items, 0] + m.item_factors.weight[items] @ true_p
    p, b = m.fold_in_user(items, values.detach())
    torch.testing.assert_close(p, true_p, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(b, true_b, atol=1e-3, rtol=1e-3)
    m.set_user(0, p, b)
    assert bool(m.known_users[0])


def test_fold_in_item_is_symmetric(small_ratings):
    r = small_ratings
    m = fresh(r)
    rows = r.by_item.row(0)
    users = torch.from_numpy(r.by_item.columns[rows])
    values = torch.from_numpy(r.by_item.values[rows])
    q, b = m.fold_in_item(users, values)
    assert q.shape == (m.config.embedding_size,) and b.ndim == 0


def test_config_rejects_block_mismatch():
    with pytest.raises(ValueError, match="multiple of n_blocks"):
        MFConfig(embedding_size=10, n_blocks=3)


def test_hogwild_kernel_trains_as_well_as_the_deterministic_one(small_ratings):
    from recsys.train import TrainConfig, Trainer

    r = small_ratings
    errors = {}
    for hogwild in (False, True):
        m = fresh(r)
        res = Trainer(TrainConfig(epochs=30, hogwild=hogwild, threads=2, progress=False)).fit(m, r)
        errors[hogwild] = res.history[-1].train_mse
        assert res.step_kind == ("kernel-hogwild" if hogwild else "kernel")
    assert errors[True] == pytest.approx(errors[False], rel=0.05)


def test_hogwild_with_one_shard_is_the_deterministic_kernel(small_ratings):
    from recsys.models.mf.kernels import sgd_examples, sgd_examples_hogwild

    r = small_ratings
    a, b = fresh(r), fresh(r)
    for model, kernel, sq in ((a, sgd_examples, np.zeros(2)), (b, sgd_examples_hogwild, np.zeros(1))):
        kernel(r.users, r.items, r.values, model.user_factors.weight.data.numpy(),
               model.item_factors.weight.data.numpy(), model.user_bias.weight.data.numpy(),
               model.item_bias.weight.data.numpy(), float(model.global_mean), 0.05, 0.05,
               model.reg_user.numpy(), model.reg_item.numpy(), model.bias_reg_user.numpy(),
               model.bias_reg_item.numpy(), sq)
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y)
