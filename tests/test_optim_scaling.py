"""Batch-size scaling from each optimizer's reference schedule, divergence caught early, and one
meaning of ``train_mse`` on every step path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.cli import _configs, build_parser
from recsys.errors import TrainingDivergedError
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.models.mf.steps import ClosedFormStepper, KernelStepper
from recsys.models.rec.model import EvidenceChainModel
from recsys.optim.scaling import LIMIT_BATCH, MIN_STEPS, Reference, scale_schedule
from recsys.train import AutogradStepper, Callback, TrainConfig, Trainer

MF = MatrixFactorization


# ------------------------------------------------------------------ the rules
def test_linear_rule_scales_the_rate_with_the_batch_and_keeps_the_schedule():
    ref = Reference(learning_rate=2.0, batch_size=256, epochs=40, lr_decay=1.0)
    s = scale_schedule("cov-noise", ref, 16384)
    assert s.rule == "linear" and s.learning_rate == pytest.approx(128.0)
    assert (s.epochs, s.lr_decay, s.warning) == (40, 1.0, "")


def test_sqrt_rule_for_adaptive_optimizers():
    ref = Reference(learning_rate=3e-3, batch_size=256, epochs=20, lr_decay=0.9)
    for name in ("adam", "adagrad", "sparse-adam"):
        s = scale_schedule(name, ref, 4096)
        assert s.rule == "sqrt" and s.learning_rate == pytest.approx(3e-3 * 4)


def test_above_the_measured_limit_the_rate_grows_by_the_square_root_and_the_epochs_stretch():
    limit = LIMIT_BATCH["sgd"]
    ref = Reference(learning_rate=0.018, batch_size=1, epochs=32, lr_decay=0.94)
    s = scale_schedule("sgd", ref, 4 * limit)
    assert s.learning_rate == pytest.approx(0.018 * limit * 2)  # linear to the limit, √4 beyond
    assert s.limit_batch == limit and str(limit) in s.warning and "sqrt" not in s.warning
    assert s.epochs == 64  # the distance per epoch lost to the cap (a factor 2) comes back as epochs
    assert s.lr_decay ** s.epochs == pytest.approx(0.94 ** 32)  # ending at the reference's final rate
    assert scale_schedule("sgd", ref, limit).warning == ""


def test_short_schedules_are_stretched_to_the_step_floor():
    ref = Reference(learning_rate=0.01, batch_size=256, epochs=5, lr_decay=0.7, damping=0.01, stats_freq=10)
    s = scale_schedule("kfac", ref, 16384, examples=80_000)  # 5 steps an epoch
    assert s.epochs * math.ceil(80_000 / 16384) >= MIN_STEPS
    assert s.lr_decay ** s.epochs == pytest.approx(0.7 ** 5)
    assert scale_schedule("kfac", ref, 16384).epochs == 5  # no example count, no floor


def test_kfac_damping_follows_lr_over_batch_and_factors_refresh_after_as_many_examples():
    ref = Reference(learning_rate=0.01, batch_size=256, epochs=5, lr_decay=0.7, damping=0.01, stats_freq=10)
    linear = scale_schedule("kfac", ref, 4096)
    assert linear.learning_rate == pytest.approx(0.16) and linear.damping == pytest.approx(0.01)
    assert linear.stats_freq == 1
    assert scale_schedule("kfac", ref, 1024).stats_freq == round(10 * 256 / 1024)
    # a rate the user tuned higher at the reference batch: lr/B grows, so the damping rises with it
    higher = scale_schedule("kfac", ref, 4096, learning_rate=0.04)
    assert higher.damping == pytest.approx(0.04)
    # never lowered below the tuned damping (the rule is a minimum)
    assert scale_schedule("kfac", ref, 4096, "sqrt").damping == pytest.approx(0.01)


def test_no_scaling_and_unknown_rules():
    ref = Reference(learning_rate=0.1, batch_size=256, epochs=5, lr_decay=0.9)
    assert scale_schedule("sgd", ref, 4096, "none").learning_rate == 0.1
    with pytest.raises(ValueError, match="cubic"):
        scale_schedule("sgd", ref, 4096, "cubic")


# ------------------------------------------------------------------ the configs users get
def test_for_model_scales_each_optimizers_own_reference_to_the_batch():
    refs = MF.optimizer_defaults
    cov = TrainConfig.for_model(MF, optimizer="cov-noise", batch_size=256)
    assert cov.learning_rate == pytest.approx(refs["cov-noise"]["learning_rate"] * 256 / refs["cov-noise"]["batch_size"])
    assert cov.learning_rate < refs["cov-noise"]["learning_rate"]  # shrinks towards small batches
    adam = TrainConfig.for_model(MF, optimizer="adam", batch_size=4096)
    assert adam.learning_rate == pytest.approx(refs["adam"]["learning_rate"] * 4)
    assert adam.scaling is not None and adam.scaling.reference.batch_size == refs["adam"]["batch_size"]
    sgd = TrainConfig.for_model(MF, batch_size=256)  # MF's own optimizer: its batch-1 kernel schedule
    assert sgd.learning_rate == pytest.approx(TrainConfig().learning_rate * 256)
    # the reference batch itself is the reference, untouched
    assert TrainConfig.for_model(MF, optimizer="adam", batch_size=256).scaling is None


def test_an_explicit_rate_or_no_scaling_gives_the_user_control():
    assert TrainConfig.for_model(MF, optimizer="adam", batch_size=4096, learning_rate=0.5).learning_rate == 0.5
    plain = TrainConfig.for_model(MF, optimizer="adam", batch_size=4096, lr_scaling="none")
    assert plain.learning_rate == MF.optimizer_defaults["adam"]["learning_rate"] and plain.scaling is None
    kept = TrainConfig.for_model(MF, optimizer="kfac", batch_size=16384, epochs=3, kfac={"damping": 0.5},
                                 examples=80_000)
    assert (kept.epochs, kept.kfac.damping) == (3, 0.5)


def test_the_command_line_scales_by_default_and_reports_the_limit():
    parser = build_parser()
    _, cfg = _configs(parser.parse_args(["evaluate", "--dataset", "ml-100k", "--model", "mf", "--optimizer", "cov-noise",
                                         "--batch-size", "16384"]), examples=80_000)
    assert cfg.learning_rate == pytest.approx(32.0 * 4)  # 8192 to 524288 before (scaled from batch 1)
    _, cfg = _configs(parser.parse_args(["evaluate", "--dataset", "ml-100k", "--model", "mf", "--batch-size", "16384"]),
                      examples=80_000)
    assert "4096" in cfg.scaling.warning and cfg.epochs > TrainConfig().epochs
    _, cfg = _configs(parser.parse_args(["evaluate", "--dataset", "ml-100k", "--model", "mf", "--batch-size", "4096", "--lr", "3"]))
    assert cfg.learning_rate == 3.0
    _, cfg = _configs(parser.parse_args(["evaluate", "--dataset", "ml-100k", "--model", "rec", "--batch-size",
                                         "4096"]))
    rec = EvidenceChainModel.training_defaults
    assert cfg.learning_rate == pytest.approx(rec["learning_rate"] * math.sqrt(4096 / rec["batch_size"]))


def test_cov_noise_scales_by_the_rule_of_the_optimizer_that_steps():
    # REC's cov-noise steps with Adam (sub-batch noise): the square-root rule; MF's with SGD: linear
    ref = EvidenceChainModel.optimizer_defaults["cov-noise"]
    rec = TrainConfig.for_model(EvidenceChainModel, optimizer="cov-noise", batch_size=256)
    assert rec.learning_rate == pytest.approx(ref["learning_rate"] * math.sqrt(256 / ref["batch_size"]))
    mf = TrainConfig.for_model(MF, optimizer="cov-noise", batch_size=1024)
    assert mf.learning_rate == pytest.approx(MF.optimizer_defaults["cov-noise"]["learning_rate"] / 4)


# ------------------------------------------------------------------ divergence
def _mf(r, **cfg):
    return MF(r.n_users, r.n_items, r.rating_scale, MFConfig(**{"embedding_size": 8, "n_blocks": 2, **cfg}))


def test_a_blowing_up_loss_stops_in_the_first_epoch_with_rate_batch_and_a_rate_to_try(small_ratings):
    steps = []

    class Count(Callback):
        def on_batch_end(self, example_ids, loss):
            steps.append(loss)

    cfg = TrainConfig(epochs=30, batch_size=16, optimizer="adam", learning_rate=50.0, progress=False)
    with pytest.raises(TrainingDivergedError) as err:
        Trainer(cfg, callbacks=[Count()]).fit(_mf(small_ratings), small_ratings)
    msg = str(err.value)
    assert "epoch 1," in msg and "learning rate 50" in msg and "batch size 16" in msg and "adam" in msg
    assert len(steps) < math.ceil(len(small_ratings) / 16)  # caught within the first epoch
    # the suggestion is adam's reference rate for MF scaled to batch 16 (sqrt rule)
    suggested = MF.optimizer_defaults["adam"]["learning_rate"] * math.sqrt(16 / 256)
    assert f"--lr {suggested:.4g}" in msg


def test_a_finite_but_growing_loss_is_caught_too(small_ratings):
    # SGD far above its stable rate: the error grows by orders of magnitude before any NaN
    cfg = TrainConfig(epochs=5, batch_size=8, learning_rate=60.0, progress=False)
    with pytest.raises(TrainingDivergedError, match=r"the first step's .*and rising.*Try --lr"):
        Trainer(cfg).fit(_mf(small_ratings), small_ratings)


def test_an_ordinary_run_is_not_stopped(small_ratings):
    res = Trainer(TrainConfig(epochs=3, batch_size=16, optimizer="adam", learning_rate=0.01,
                              progress=False)).fit(_mf(small_ratings), small_ratings)
    assert len(res.history) == 3


# ------------------------------------------------------------------ one train_mse
def _block_mse(model, r, ids):
    u, i, v = (t[torch.from_numpy(ids)] for t in r.tensors())
    with torch.no_grad():
        return float((v.unsqueeze(-1) - model.block_predictions(u, i)).square().mean())


@pytest.mark.parametrize("batch", [1, 16])
def test_every_step_path_reports_the_mse_of_the_training_ratings_without_penalty(small_ratings, batch):
    r = small_ratings
    ids = np.arange(batch, dtype=np.int64)
    lr = 1e-9  # steps that do not move the weights: every path's figure is the same MSE
    cfg = TrainConfig(batch_size=batch, learning_rate=lr, optimizer="sgd", progress=False, chunk_size=batch)
    figures = {}
    for name, make in (("kernel", lambda m: KernelStepper(m, r, cfg)),
                       ("closed-form", lambda m: ClosedFormStepper(m, r, cfg)),
                       ("autograd", lambda m: AutogradStepper(m, r, cfg))):
        model = _mf(r, reg=0.5, bias_reg=0.5)  # a large penalty: it must not enter the figure
        model.prepare(r)
        model.train()
        expected = _block_mse(model, r, ids)
        figures[name] = make(model).step(ids, lr)
        assert figures[name] == pytest.approx(expected, rel=1e-5), name
    with torch.no_grad():
        model = _mf(r, reg=0.5, bias_reg=0.5)
        model.prepare(r)
        u, i, v = (t[torch.from_numpy(ids)] for t in r.tensors())
        assert float(model.loss(u, i, v)) > figures["autograd"]  # the objective is another figure


def test_the_trainers_epoch_figure_agrees_across_paths(small_ratings):
    r = small_ratings
    base = {"epochs": 2, "batch_size": 8, "learning_rate": 0.2, "lr_decay": 1.0, "progress": False, "sampler": "fixed"}
    closed = Trainer(TrainConfig(**base)).fit(_mf(r), r)
    auto = Trainer(TrainConfig(**base), optimizer_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.2)).fit(_mf(r), r)
    assert (closed.step_kind, auto.step_kind) == ("closed-form", "autograd")
    for a, b in zip(closed.history, auto.history, strict=True):
        assert a.train_mse == pytest.approx(b.train_mse, rel=1e-4)
