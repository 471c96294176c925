"""K-FAC family: exact natural gradient on a Kronecker-factored problem, EKFAC, TKFAC's trace,
the embedding special case against dense K-FAC, eigh failures, state round trip, training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.optim.kfac import KFACPreconditioner, stable_eigh
from recsys.train import TrainConfig, Trainer


def kronecker_regression(n_in=3, n_out=2, n_x=6, n_d=5, seed=0):
    """A linear layer (with bias) and data whose empirical Fisher is exactly A ⊗ G: every
    input x_i paired with every residual d_j (targets y_ij = W x_i − d_j)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, n_out).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=g, dtype=torch.double))
        layer.bias.copy_(torch.randn(n_out, generator=g, dtype=torch.double))
    xs = torch.randn(n_x, n_in, generator=g, dtype=torch.double)
    ds = torch.randn(n_d, n_out, generator=g, dtype=torch.double)
    x = xs.repeat_interleave(n_d, 0)
    d = ds.repeat(n_x, 1)
    with torch.no_grad():
        y = layer(x) - d
    return layer, x, y


def loss_of(layer, x, y):
    return 0.5 * (layer(x) - y).square().sum(1).mean()


def exact_natural_gradient(layer, x, y):
    """F⁻¹ ∇L with F the empirical Fisher of the per-example gradients, [W | b] row-major."""
    with torch.no_grad():
        resid = layer(x) - y
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    per = torch.einsum("no,ni->noi", resid, a).reshape(len(x), -1)
    fisher = per.T @ per / len(x)
    grad = per.mean(0)
    return torch.linalg.solve(fisher, grad).reshape(resid.shape[1], -1), fisher, per


def preconditioned(layer, x, y, kind, **kw):
    pre = KFACPreconditioner(layer, kind, damping=1e-10, statistic="empirical", kl_clip=None, **kw)
    layer.zero_grad()
    loss_of(layer, x, y).backward()
    pre.step()
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1), pre


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kfac_and_ekfac_equal_the_exact_natural_gradient(kind):
    layer, x, y = kronecker_regression()
    expected, _, _ = exact_natural_gradient(layer, x, y)
    got, _ = preconditioned(layer, x, y, kind)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


def test_tkfac_keeps_the_trace_of_the_fisher():
    layer, _, _ = kronecker_regression()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=torch.double) * torch.linspace(0.2, 3, 40, dtype=torch.double)[:, None]
    y = torch.randn(40, 2, generator=g, dtype=torch.double)
    _, fisher, _ = exact_natural_gradient(layer, x, y)
    _, pre = preconditioned(layer, x, y, "tkfac")
    a, gg = pre.kronecker_factors("")
    assert float(torch.trace(a) * torch.trace(gg)) == pytest.approx(float(torch.trace(fisher)), rel=1e-9)
    _, pre_k = preconditioned(copy.deepcopy(layer), x, y, "kfac")
    a, gg = pre_k.kronecker_factors("")
    assert float(torch.trace(a) * torch.trace(gg)) != pytest.approx(float(torch.trace(fisher)), rel=1e-3)


def test_embedding_matches_dense_kfac_on_one_hot_linear():
    torch.manual_seed(0)
    rows, dim = 7, 3
    emb = nn.Embedding(rows, dim, sparse=True).double()
    lin = nn.Linear(rows, dim, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(emb.weight.T)
    target = torch.randn(dim, dtype=torch.double)
    kw = dict(damping=0.3, factor_decay=0.8, update_freq=1, row_floor=0.0, statistic="empirical", kl_clip=None,
              visit_gain=None)
    pe, pl = KFACPreconditioner(emb, "kfac", **kw), KFACPreconditioner(lin, "kfac", **kw)
    opt_e = torch.optim.SGD(emb.parameters(), lr=0.05)
    opt_l = torch.optim.SGD(lin.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        idx = torch.randint(0, rows - 2, (9,), generator=g)  # the last two rows never seen
        for module, pre, opt, inp in ((emb, pe, opt_e, idx),
                                      (lin, pl, opt_l, nn.functional.one_hot(idx, rows).double())):
            opt.zero_grad()
            (0.5 * (module(inp) * target).sum(1).sub(1).square().mean()).backward()
            pre.step()
            opt.step()
        torch.testing.assert_close(emb.weight.grad.to_dense(), lin.weight.grad.T, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(emb.weight, lin.weight.T, rtol=1e-6, atol=1e-9)


def rare_to_common_step(row_floor):
    """Row 0 in every example for 30 steps, row 999 once at the end: the ratio of their
    preconditioned step norms (same per-example gradient)."""
    emb = nn.Embedding(1000, 4, sparse=True)
    pre = KFACPreconditioner(emb, "kfac", damping=1e-3, row_floor=row_floor, statistic="empirical",
                             visit_gain=None)
    for step in range(30):
        idx = torch.zeros(64, dtype=torch.long)
        if step == 29:
            idx[-1] = 999
        emb.zero_grad()
        emb(idx).sum().div(64).backward()
        pre.step()
    new = emb.weight.grad.to_dense()
    assert torch.isfinite(new).all()
    return float(new[999].norm() / new[0].norm())


def test_rare_rows_are_not_amplified_by_the_damping():
    # the floor bounds a rare row's step by 1/row_floor times a frequent row's
    assert rare_to_common_step(0.5) <= 2.05
    assert rare_to_common_step(0.0) > 10  # what the floor prevents


def test_eigh_failure_keeps_the_previous_basis():
    m = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    vals, vecs, ok = stable_eigh(m)
    assert ok and torch.allclose(vecs @ torch.diag(vals) @ vecs.T, m, atol=1e-5)
    vals2, vecs2, ok2 = stable_eigh(torch.full((2, 2), float("nan")), (vals, vecs))
    assert not ok2 and torch.equal(vals2, vals) and torch.equal(vecs2, vecs)
    _, eye, ok3 = stable_eigh(torch.full((2, 2), float("inf")))
    assert not ok3 and torch.equal(eye, torch.eye(2))


def test_cached_eigenvalues_are_not_mutated_by_damping():
    layer, x, y = kronecker_regression()
    pre = KFACPreconditioner(layer, "kfac", damping=0.5, update_freq=100, statistic="empirical")
    for _ in range(3):
        layer.zero_grad()
        loss_of(layer, x, y).backward()
        pre.step()
        if _ == 0:
            d_a = pre.state[""]["dA"].clone()
    assert torch.equal(pre.state[""]["dA"], d_a)


def mf(r, **cfg):
    return MatrixFactorization(r.n_users, r.n_items, r.rating_scale,
                               MFConfig(**{"embedding_size": 8, "n_blocks": 2, **cfg}))


def rmse(m, r):
    u, i, v = r.tensors()
    return float(((m.predict(u, i) - v) ** 2).mean().sqrt())


@pytest.mark.parametrize(("kind", "stats_freq"), [("kfac", 1), ("ekfac", 1), ("tkfac", 1), ("tekfac", 1),
                                                  ("kfac", 3), ("tkfac", 3)])
def test_state_dict_round_trip_resumes_identically(small_ratings, kind, stats_freq):
    """Saved after 3 steps (with ``stats_freq=3``: the next step updates the factors) and
    resumed, the next 5 steps are bit-for-bit those of the uninterrupted run."""
    u, i, v = small_ratings.tensors()
    model = mf(small_ratings)
    model.prepare(small_ratings)
    pre = KFACPreconditioner(model, kind, update_freq=2, stats_freq=stats_freq)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [torch.arange(s, s + 32) for s in range(0, 256, 32)]

    def run(m, p, o, bs):
        for b in bs:
            o.zero_grad()
            p.backward(*m.loss_terms(u[b], i[b], v[b]))
            p.step()
            o.step()

    run(model, pre, opt, batches[:3])
    saved_model, saved_pre, saved_opt = (copy.deepcopy(model.state_dict()), copy.deepcopy(pre.state_dict()),
                                         copy.deepcopy(opt.state_dict()))
    run(model, pre, opt, batches[3:])
    other = mf(small_ratings)
    other.load_state_dict(saved_model)
    pre2 = KFACPreconditioner(other, kind, update_freq=2, stats_freq=stats_freq)
    pre2.load_state_dict(saved_pre)
    opt2 = torch.optim.SGD(other.parameters(), lr=0.01)
    opt2.load_state_dict(saved_opt)
    run(other, pre2, opt2, batches[3:])
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["kfac", "tkfac"])
def test_factors_update_every_stats_freq_steps_and_row_frequencies_every_step(small_ratings, kind):
    """With ``stats_freq=3`` the sampled-target pass and the factor G run on steps 1, 4, 7, ...
    only (the generator draws nothing in between, G stays as it was); the rows a batch
    touches get their frequency on every step."""
    u, i, v = small_ratings.tensors()
    model = mf(small_ratings)
    model.prepare(small_ratings)
    pre = KFACPreconditioner(model, kind, stats_freq=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 8):
        b = torch.arange(32 * step, 32 * step + 32)
        due = pre.statistics_due
        assert due == (step % 3 == 1)
        rng, g_before = pre.generator.get_state(), pre.state["item_factors"].get("G", torch.zeros(())).clone()
        opt.zero_grad()
        pre.backward(*model.loss_terms(u[b], i[b], v[b]))
        pre.step()
        opt.step()
        st = pre.state["item_factors"]
        assert torch.equal(pre.generator.get_state(), rng) != due
        assert torch.equal(st["G"], g_before) != due
        assert int(st["n"]) == 1 + (step - 1) // 3
        assert int(st["row_n"]) == step
        touched = i[b].unique()
        assert (st["row_last"][touched] == step).all()
        assert (st["row"][touched] > 0).all()


@pytest.mark.parametrize("kind", ["kfac", "tkfac"])
def test_a_table_first_used_between_statistics_steps_keeps_its_plain_gradient(kind):
    """Table ``b`` is read from step 2 on, with statistics every 3 steps: on steps 2 and 3 it
    has no factors yet, so its gradient is left as it is; from step 4 it is preconditioned."""
    class TwoTables(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Embedding(5, 2, sparse=True), nn.Embedding(5, 2, sparse=True)
            self.use_b = False

        def loss_terms(self, idx: torch.Tensor, y: torch.Tensor):
            out = self.a(idx).sum(1, keepdim=True)
            if self.use_b:
                out = out + self.b(idx).sum(1, keepdim=True)
            return out, 0.5 * (out - y).square().mean()

    torch.manual_seed(0)
    model = TwoTables()
    pre = KFACPreconditioner(model, kind, stats_freq=3)
    idx, y = torch.tensor([0, 1, 1, 3]), torch.randn(4, 1)
    for step in range(1, 6):
        model.use_b = step >= 2
        model.zero_grad()
        pre.backward(*model.loss_terms(idx, y))
        raw = model.b.weight.grad.to_dense().clone() if model.use_b else None
        pre.step()
        if step in (2, 3):
            assert torch.equal(model.b.weight.grad.to_dense(), raw)
        if step >= 4:
            assert "QG" in pre.state["b"] and not torch.equal(model.b.weight.grad.to_dense(), raw)
        for p in model.parameters():
            assert p.grad is None or bool(torch.isfinite(p.grad.to_dense()).all())


def test_eigenbasis_kinds_refuse_sparse_statistics():
    model = nn.Linear(3, 2)
    for kind in ("ekfac", "tekfac"):
        with pytest.raises(ValueError, match="stats_freq=1"):
            KFACPreconditioner(model, kind, stats_freq=2)
        with pytest.raises(ValueError, match="stats_freq must be 1"):
            TrainConfig(optimizer=kind, kfac={"stats_freq": 2})


@pytest.mark.parametrize(("kind", "lr"), [("kfac", 1e-3), ("tkfac", 5e-3), ("ekfac", 0.02), ("tekfac", 0.02)])
def test_every_kind_trains_mf_through_the_trainer(small_ratings, kind, lr):
    model = mf(small_ratings)
    model.prepare(small_ratings)
    before = rmse(model, small_ratings)
    trainer = Trainer(TrainConfig(epochs=5, batch_size=32, optimizer=kind, learning_rate=lr, progress=False))
    trainer.fit(model, small_ratings)
    assert trainer.preconditioner is not None and not trainer.preconditioner.capture.active
    assert rmse(model, small_ratings) < before


@pytest.mark.parametrize("residual_scale", [0.1, 10.0])
def test_fisher_statistic_is_the_gauss_newton_matrix_whatever_the_residuals(residual_scale):
    """Squared loss on a linear layer: the Fisher of its Gaussian likelihood is E[aaᵀ] ⊗ I
    (output factor: identity), however large or small the residuals; the empirical statistic
    follows the residuals instead."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(3, 2, bias=False).double()
    x = torch.randn(40000, 3, generator=g, dtype=torch.double)
    y = (layer(x) + residual_scale * torch.randn(40000, 2, generator=g, dtype=torch.double)).detach()
    factors = {}
    for statistic in ("fisher", "empirical"):
        pre = KFACPreconditioner(layer, "kfac", statistic=statistic)
        layer.zero_grad()
        outputs = layer(x)
        pre.backward(outputs, 0.5 * (outputs - y).square().sum(1).mean())
        pre.step()
        factors[statistic] = pre.kronecker_factors("")
        pre.remove_hooks()
    a, gg = factors["fisher"]
    torch.testing.assert_close(gg, torch.eye(2, dtype=torch.double), atol=0.03, rtol=0)
    torch.testing.assert_close(a[:3, :3], x.T @ x / len(x))
    assert float(factors["empirical"][1].trace()) == pytest.approx(2 * residual_scale ** 2, rel=0.05)


def test_fisher_statistic_refuses_a_plain_backward():
    layer, x, y = kronecker_regression()
    pre = KFACPreconditioner(layer, "kfac")
    loss_of(layer, x, y).backward()
    with pytest.raises(RuntimeError, match="sampled-target pass"):
        pre.step()


def test_records_gathered_from_ranks_give_the_single_process_factors():
    """Data-parallel training: two ranks each back-propagate half the batch (loss weighted by
    its share) and the records are concatenated; told the global batch size, the factors are
    those of one process on the whole batch."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(3, 2).double()
    x = torch.randn(8, 3, generator=g, dtype=torch.double)
    y = torch.randn(8, 2, generator=g, dtype=torch.double)

    def loss(out, target, share=1.0):
        return 0.5 * (out - target).square().sum(1).mean() * share

    single = KFACPreconditioner(layer, "kfac", statistic="empirical", kl_clip=None)
    out = layer(x)
    single.backward(out, loss(out, y))
    single.step()
    expected = single.kronecker_factors("")
    single.remove_hooks()

    layer.zero_grad()
    sharded = KFACPreconditioner(layer, "kfac", statistic="empirical", kl_clip=None)
    for part in (slice(0, 4), slice(4, 8)):
        out = layer(x[part])
        sharded.backward(out, loss(out, y[part], share=0.5))
    (a1, g1), (a2, g2) = sharded.capture.records[""]
    sharded.capture.records[""] = [[torch.cat([a1, a2]), torch.cat([g1, g2])]]
    sharded.records_gathered(8)
    sharded.step()
    for got, want in zip(sharded.kronecker_factors(""), expected, strict=True):
        torch.testing.assert_close(got, want)
