"""Per-parameter learning rates (``lr_scales``) and SGD momentum: how a model's reference for an
optimizer with one rate for all parameters can balance its parts (REC's tables against its
shared message networks)."""

from __future__ import annotations

import pytest
import torch

from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.models.rec.model import EvidenceChainModel, RECConfig
from recsys.optim.factory import build_optimizer, parameter_groups
from recsys.train import TrainConfig, Trainer


def _rec(r) -> EvidenceChainModel:
    return EvidenceChainModel(r.n_users, r.n_items, r.rating_scale,
                              RECConfig(embedding_size=4, hidden_size=8, prototypes=3, fanouts=(3, 2)))


def test_groups_put_the_unnamed_parameters_first_at_the_base_rate(small_ratings):
    model = _rec(small_ratings)
    groups = parameter_groups(model, 0.5, {"prototype_vectors": 10, "phi_user.3.bias": 0.1})
    assert [g["lr"] for g in groups] == pytest.approx([0.5, 5.0, 0.05])
    assert groups[1]["params"] == [model.prototype_vectors]
    assert groups[2]["params"] == [model.phi_user[3].bias]
    # a prefix takes a module's every parameter; every parameter is in exactly one group
    by_prefix = parameter_groups(model, 1.0, {"phi_item": 2})
    assert {id(p) for p in by_prefix[1]["params"]} == {id(p) for p in model.phi_item.parameters()}
    assert sorted(id(p) for g in by_prefix for p in g["params"]) == sorted(id(p) for p in model.parameters())


def test_a_mistyped_name_or_a_bad_scale_is_refused(small_ratings):
    model = _rec(small_ratings)
    with pytest.raises(ValueError, match="'prototypes' names no trainable parameter.*prototype_vectors"):
        parameter_groups(model, 1.0, {"prototypes": 10})
    with pytest.raises(ValueError, match="positive"):
        parameter_groups(model, 1.0, {"gate": 0})
    with pytest.raises(ValueError, match="lr_scales"):
        TrainConfig(lr_scales={"gate": -1.0})


def test_a_scaled_group_moves_by_its_scale_in_the_first_sgd_step(small_ratings):
    r = small_ratings

    def first_step(lr_scales):
        model = MatrixFactorization(r.n_users, r.n_items, r.rating_scale, MFConfig(embedding_size=4, n_blocks=1))
        model.prepare(r)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = TrainConfig(epochs=1, batch_size=len(r), learning_rate=0.5, patience=None, progress=False,
                          lr_scales=lr_scales)
        trainer = Trainer(cfg)
        trainer.fit(model, r)
        return trainer, {n: p.detach() - before[n] for n, p in model.named_parameters()}

    plain, base = first_step(None)
    scaled, moved = first_step({"item_factors": 3.0})
    assert plain.stepper.kind == "closed-form"  # MF's own SGD step when there is one rate
    assert scaled.stepper.kind == "autograd"  # per-parameter rates take the generic step
    assert torch.allclose(moved["item_factors.weight"], 3 * base["item_factors.weight"], atol=1e-6)
    assert torch.allclose(moved["user_factors.weight"], base["user_factors.weight"], atol=1e-6)


def test_momentum_is_sgds_and_the_k_fac_familys_only(small_ratings):
    model = _rec(small_ratings)
    opt = build_optimizer("kfac", model, 0.1, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="momentum is an option of sgd"):
        build_optimizer("adam", model, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum is an option of sgd"):
        TrainConfig(optimizer="adagrad", momentum=0.5)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        TrainConfig(momentum=1.0)


def test_a_diverging_rec_run_stops_in_its_first_epoch_with_rate_batch_and_a_rate_to_try(small_ratings):
    # REC under SGD far above its stable rate (the message networks blow up), as K-FAC does on
    # u1 at the rate scaled from REC's Adam schedule: caught before the epoch ends
    from recsys.errors import TrainingDivergedError

    cfg = TrainConfig(optimizer="sgd", batch_size=8, learning_rate=1e4, epochs=5, patience=None, progress=False)
    with pytest.raises(TrainingDivergedError) as err:
        Trainer(cfg).fit(_rec(small_ratings), small_ratings)
    msg = str(err.value)
    assert "epoch 1," in msg and "learning rate 10000" in msg and "batch size 8" in msg and "Try --lr" in msg


def test_recs_kfac_reference_scales_every_group_together(small_ratings):
    ref = EvidenceChainModel.optimizer_defaults["kfac"]
    cfg = TrainConfig.for_model(EvidenceChainModel, optimizer="kfac", batch_size=256, examples=80_000)
    assert cfg.learning_rate == pytest.approx(ref["learning_rate"] * (256 / ref["batch_size"]) ** 0.5)
    assert cfg.lr_scales == ref["lr_scales"]
    # Adam, REC's own optimizer, keeps one rate
    assert TrainConfig.for_model(EvidenceChainModel, batch_size=256).lr_scales is None
    trainer = Trainer(TrainConfig.for_model(EvidenceChainModel, optimizer="kfac", epochs=1, progress=False,
                                            patience=None))
    model = _rec(small_ratings)
    trainer.fit(model, small_ratings)
    base, vectors = trainer.optimizer.param_groups[0], trainer.optimizer.param_groups[1]
    assert vectors["params"][0] is model.prototype_vectors
    assert vectors["lr"] == pytest.approx(100 * base["lr"])  # after the epoch's decay, still 100x
    assert trainer.preconditioner is not None


def test_a_models_reference_may_name_the_rule_auto_stands_for():
    # REC's K-FAC: the square root (measured at 256), with the K-FAC damping rule raising the
    # damping by the growth of lr/B; MF's K-FAC keeps SGD's linear rule; explicit rules win
    ref = EvidenceChainModel.optimizer_defaults["kfac"]
    assert ref["lr_scaling"] == "sqrt"
    cfg = TrainConfig.for_model(EvidenceChainModel, optimizer="kfac", batch_size=256, examples=80_000)
    assert cfg.scaling.rule == "sqrt"
    assert cfg.learning_rate == pytest.approx(ref["learning_rate"] * (256 / ref["batch_size"]) ** 0.5)
    assert cfg.kfac.damping == pytest.approx(ref["kfac"]["damping"] * 4)  # (lr/B) grew 4x
    linear = TrainConfig.for_model(EvidenceChainModel, optimizer="kfac", batch_size=256, lr_scaling="linear")
    assert linear.learning_rate == pytest.approx(ref["learning_rate"] / 16) and linear.kfac.damping == 10.0
    assert TrainConfig.for_model(MatrixFactorization, optimizer="kfac", batch_size=4096).scaling.rule == "linear"
    # the key configures the scaling only: it is not a TrainConfig field
    assert not hasattr(cfg, "lr_scaling")


def test_the_eigenbasis_refresh_interval_reaches_the_preconditioner():
    # KFACConfig.update_freq: 1 refreshes a dense layer's eigenbases at every step, 10 keeps
    # the first step's basis for the next nine
    from recsys.optim.factory import build_preconditioner
    from recsys.optim.kfac import KFACConfig

    with pytest.raises(ValueError, match="update_freq must be >= 1, got 0"):
        KFACConfig(update_freq=0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=gen), torch.randn(64, 1, generator=gen)
    bases = {}
    for update_freq in (1, 10):
        layer = torch.nn.Sequential(torch.nn.Linear(5, 1))
        pre = build_preconditioner("ekfac", layer, KFACConfig(update_freq=update_freq), statistic="empirical")
        assert pre.param_groups[0]["update_freq"] == update_freq
        seen = []
        for step in range(2):
            layer.zero_grad()
            ((layer(x[32 * step:32 * (step + 1)]) - y[32 * step:32 * (step + 1)]) ** 2).mean().backward()
            pre.step()
            seen.append(pre.state["0"]["QA"])
        bases[update_freq] = seen
    assert bases[1][1] is not bases[1][0]
    assert bases[10][1] is bases[10][0]


def test_recs_ekfac_reference_refreshes_every_step_and_scales_its_vectors(small_ratings):
    ref = EvidenceChainModel.optimizer_defaults["ekfac"]
    assert ref == EvidenceChainModel.optimizer_defaults["tekfac"]
    cfg = TrainConfig.for_model(EvidenceChainModel, optimizer="ekfac", epochs=1, progress=False, patience=None)
    assert cfg.kfac.update_freq == 1 and cfg.kfac.damping == ref["kfac"]["damping"]
    trainer = Trainer(cfg)
    model = _rec(small_ratings)
    trainer.fit(model, small_ratings)
    assert trainer.preconditioner.param_groups[0]["update_freq"] == 1
    base, vectors = trainer.optimizer.param_groups[0], trainer.optimizer.param_groups[1]
    assert vectors["params"][0] is model.prototype_vectors
    assert vectors["lr"] == pytest.approx(ref["lr_scales"]["prototype_vectors"] * base["lr"])
    # the square root to other batches (measured at 256), the damping raised by the growth of lr/B
    small = TrainConfig.for_model(EvidenceChainModel, optimizer="ekfac", batch_size=256, examples=80_000)
    assert small.scaling.rule == "sqrt"
    assert small.learning_rate == pytest.approx(ref["learning_rate"] / 4)
    assert small.kfac.damping == pytest.approx(ref["kfac"]["damping"] * 4) and small.kfac.update_freq == 1


@pytest.mark.parametrize("damping", [0.5, 10.0])
def test_dense_ekfac_with_kroneckers_eigenvalues_is_damped_kfac(damping):
    # every input paired with every residual: the per-entry second moments in the eigenbasis
    # are exactly the products of the factors' eigenvalues, so EKFAC's damping (K-FAC's
    # damping of the two factors) must give K-FAC's step at any damping
    from recsys.optim.kfac import KFACPreconditioner

    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(6, 3, generator=gen, dtype=torch.double)
    ds = torch.randn(5, 2, generator=gen, dtype=torch.double)
    x, d = xs.repeat_interleave(5, 0), ds.repeat(6, 1)
    steps = {}
    for kind in ("kfac", "ekfac"):
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 2).double()
        with torch.no_grad():
            y = layer(x) - d
        pre = KFACPreconditioner(layer, kind, damping=damping, statistic="empirical", kl_clip=None)
        (0.5 * (layer(x) - y).square().sum(1).mean()).backward()
        pre.step()
        steps[kind] = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    torch.testing.assert_close(steps["ekfac"], steps["kfac"], rtol=1e-6, atol=1e-10)
