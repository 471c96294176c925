"""What distinguishes TKFAC and TEKFAC, and where they equal K-FAC and EKFAC: the trace weight
``δ = E[|a|²|g|²]`` normalises dense layers' factors; on an embedding table (``Q_A = I``, the
input factor a row frequency) TEKFAC's eigenvalue correction makes it EKFAC exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.optim.kfac import KFACPreconditioner
from recsys.train import TrainConfig, Trainer

KFAC_EXTRA: dict = {}  # extra KFACConfig fields (the default visit cap is on)


def _trained_mf(ratings, kind):
    model = MatrixFactorization(ratings.n_users, ratings.n_items, ratings.rating_scale,
                                MFConfig(embedding_size=8, n_blocks=2))
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer=kind, learning_rate=0.03, progress=False,
                      kfac={"damping": 0.01, **KFAC_EXTRA})
    result = Trainer(cfg).fit(model, ratings)
    return model, result


def test_tekfac_equals_ekfac_on_embedding_tables(small_ratings):
    tekfac, res_t = _trained_mf(small_ratings, "tekfac")
    ekfac, res_e = _trained_mf(small_ratings, "ekfac")
    for (name, a), (_, b) in zip(tekfac.named_parameters(), ekfac.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert [h.train_mse for h in res_t.history] == pytest.approx([h.train_mse for h in res_e.history], rel=1e-5)


def test_tkfac_differs_from_kfac_on_tables_through_its_gradient_weighted_row_frequencies(small_ratings):
    tkfac, _ = _trained_mf(small_ratings, "tkfac")
    kfac, _ = _trained_mf(small_ratings, "kfac")
    with torch.no_grad():
        gap = max(float((a - b).abs().max()) for a, b in zip(tkfac.parameters(), kfac.parameters(), strict=True))
    assert gap > 1e-6


def _dense_step(kind):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(64, 4, dtype=torch.double) * torch.linspace(0.2, 3.0, 4, dtype=torch.double)
    y = torch.randn(64, 1, dtype=torch.double)
    pre = KFACPreconditioner(net, kind, damping=1e-3, statistic="empirical", kl_clip=None)
    for _ in range(3):
        net.zero_grad()
        (0.5 * (net(x) - y).square().mean()).backward()
        pre.step()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.mark.parametrize(("trace_kind", "plain_kind"), [("tekfac", "ekfac"), ("tkfac", "kfac")])
def test_on_dense_layers_the_trace_normalised_factors_change_the_step(trace_kind, plain_kind):
    a, b = _dense_step(trace_kind), _dense_step(plain_kind)
    assert float((a - b).norm() / b.norm()) > 1e-3


@pytest.mark.parametrize(("trace_kind", "plain_kind"), [("tkfac", "kfac"), ("tekfac", "ekfac")])
def test_on_rec_the_trace_kinds_are_their_own_preconditioners(small_ratings, trace_kind, plain_kind):
    # REC's preconditioned modules are its message networks' nn.Linear layers (dense; its
    # prototype table is a plain parameter under the base SGD): the trace weight changes the
    # step, so TKFAC and TEKFAC are not K-FAC and EKFAC there, unlike on MF's tables
    from recsys.models.rec.model import EvidenceChainModel, RECConfig

    def trained(kind):
        r = small_ratings
        model = EvidenceChainModel(r.n_users, r.n_items, r.rating_scale,
                                   RECConfig(embedding_size=4, hidden_size=8, prototypes=3, fanouts=(3, 2)))
        cfg = TrainConfig(epochs=1, batch_size=32, optimizer=kind, learning_rate=0.05, progress=False,
                          patience=None, kfac={"damping": 10.0})
        Trainer(cfg).fit(model, r)
        return model

    a, b = trained(trace_kind), trained(plain_kind)
    assert not torch.allclose(a.phi_user[0].weight, b.phi_user[0].weight, atol=1e-6)
