"""K-FAC on embedding tables: the model's L2 penalty in a row's curvature, the per-row visit
gain cap, and the Fisher statistic's sampled pass stopping at the hooked modules' outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.optim.kfac import KFACPreconditioner


class Table(nn.Module):
    """One embedding table read by a fixed linear map (``outputs [B, m]``), with a per-row L2
    penalty like MF's (per example, ``0.5 · l2[row] · |e_row|²``)."""

    def __init__(self, rows: int = 6, dim: int = 3, m: int = 1, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(rows, dim, sparse=True).double()
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(rows, dim, generator=g, dtype=torch.double))
        self.w = torch.randn(dim, m, generator=g, dtype=torch.double)
        self.l2 = torch.linspace(0.1, 2.0, rows, dtype=torch.double)

    def curvature_l2(self) -> dict[str, torch.Tensor]:
        return {"emb": self.l2}

    def loss_terms(self, idx: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.emb(idx)
        outputs = e @ self.w
        penalty = self.l2[idx] * self.emb(idx).square().sum(1)
        return outputs, 0.5 * ((outputs - y).square().sum(1) + penalty).mean()


def one_step(model: Table, idx: torch.Tensor, y: torch.Tensor, **kw) -> KFACPreconditioner:
    kw = {"damping": 1e-10, "row_floor": 0.0, "kl_clip": None, "visit_gain": None, **kw}
    pre = KFACPreconditioner(model, "kfac", **kw)
    model.zero_grad()
    pre.backward(*model.loss_terms(idx, y))
    pre.step()
    return pre


def test_the_penalty_enters_each_rows_curvature():
    """Row r's step is the natural gradient under F_r = a_r (G + l2_r I): the Kronecker
    approximation of the data term plus the penalty's exact Hessian (l2_r per visit)."""
    model = Table()
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([0, 1, 1, 2, 3, 3, 3, 5])
    y = torch.randn(len(idx), 1, generator=g, dtype=torch.double)
    model.zero_grad()
    model.loss_terms(idx, y)[1].backward()
    raw = model.emb.weight.grad.to_dense().clone()
    pre = one_step(model, idx, y)
    a, gg = pre.kronecker_factors("emb")
    new = model.emb.weight.grad.to_dense()
    for r in idx.unique():
        expected = torch.linalg.solve(a[r] * (gg + model.l2[r] * torch.eye(3, dtype=torch.double)), raw[r])
        torch.testing.assert_close(new[r], expected, rtol=1e-6, atol=1e-9)
    # without the penalty (penalties=False) the step is the larger a_r⁻¹ G⁻¹ g_r
    other = Table()
    one_step(other, idx, y, penalties=False)
    assert float(other.emb.weight.grad.to_dense().norm()) > 1.5 * float(new.norm())


def test_mf_exposes_the_penalty_of_every_table(small_ratings):
    model = MatrixFactorization(small_ratings.n_users, small_ratings.n_items, small_ratings.rating_scale,
                                MFConfig(embedding_size=8, n_blocks=2))
    model.prepare(small_ratings)
    pre = KFACPreconditioner(model, "kfac")
    l2 = model.curvature_l2()
    assert set(l2) == set(pre.modules)
    for name, weights in l2.items():
        assert weights.shape == (pre.modules[name].num_embeddings,)
    torch.testing.assert_close(l2["user_factors"], model.reg_user)
    torch.testing.assert_close(l2["item_bias"], model.bias_reg_item)


def rare_row_gain(visit_gain, lr=0.5, kind="kfac"):
    """Row 0 in every example for 30 steps, row 999 once in the last batch: the change of the
    rare example's prediction per unit residual that the step at ``lr`` makes."""
    torch.manual_seed(0)
    model = Table(rows=1000, dim=4, m=1)
    model.l2.zero_()
    pre = KFACPreconditioner(model, kind, damping=1e-3, row_floor=0.0, visit_gain=visit_gain, lr=lr)
    g = torch.Generator().manual_seed(2)
    for step in range(30):
        idx = torch.zeros(64, dtype=torch.long)
        if step == 29:
            idx[-1] = 999
        model.zero_grad()
        pre.backward(*model.loss_terms(idx, torch.randn(64, 1, generator=g, dtype=torch.double)))
        pre.step()
    w = model.w[:, 0]
    step_dir = pre.precondition_rows("emb", torch.tensor([999]), w[None])[0]
    return lr * float(w @ step_dir) / 64


@pytest.mark.parametrize(("kind", "lr"), [("kfac", 0.5), ("tkfac", 0.5), ("ekfac", 5.0)])
def test_visit_gain_caps_a_rare_rows_step(kind, lr):
    """K-FAC's running row frequency of a row seen once is tiny, so its one visit gets a huge
    step; EKFAC's per-row statistic is per touched step (a single-example Newton step), too
    large only at large rates. The cap holds the gain at ``visit_gain`` (up to the sampled
    E[z²] ≈ 1 in the Fisher statistic's G = E[z²] w wᵀ)."""
    capped = rare_row_gain(0.25, lr=lr, kind=kind)
    assert capped == pytest.approx(0.25, rel=0.15)
    assert rare_row_gain(None, lr=lr, kind=kind) > 8 * 0.25  # what the cap prevents


def test_frequent_rows_are_below_the_cap_and_untouched():
    model = Table(rows=4, dim=3, m=1)
    g = torch.Generator().manual_seed(3)
    idx = torch.arange(4).repeat(16)
    y = torch.randn(len(idx), 1, generator=g, dtype=torch.double)
    a = one_step(model, idx, y, lr=1e-4, visit_gain=0.25)
    b = one_step(Table(rows=4, dim=3, m=1), idx, y, lr=1e-4)
    torch.testing.assert_close(a.last_rows["emb"][1], b.last_rows["emb"][1])


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "tkfac"])
def test_sampled_pass_through_the_outputs_records_the_same_statistics(small_ratings, kind):
    """The Fisher statistic's sampled-target pass asks for the gradients at the hooked
    modules' outputs, not at their weights: the same records, factors and steps."""
    u, i, v = small_ratings.tensors()
    cfg = MFConfig(embedding_size=8, n_blocks=2)
    models = [MatrixFactorization(small_ratings.n_users, small_ratings.n_items, small_ratings.rating_scale, cfg)
              for _ in range(2)]
    pres = []
    for m in models:
        m.prepare(small_ratings)
        pres.append(KFACPreconditioner(m, kind, update_freq=2))
    for h in pres[1]._output_handles:  # the second one back-propagates to the weights
        h.remove()
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models]
    for s in range(0, 128, 32):
        b = torch.arange(s, s + 32)
        for m, pre, opt in zip(models, pres, opts, strict=True):
            opt.zero_grad()
            pre.backward(*m.loss_terms(u[b], i[b], v[b]))
            pre.step()
            opt.step()
    assert pres[1]._outputs == [] and len(pres[0]._output_handles) == 4
    for name in pres[0].state:
        for key, value in pres[0].state[name].items():
            torch.testing.assert_close(pres[1].state[name][key], value, rtol=1e-5, atol=1e-7)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
