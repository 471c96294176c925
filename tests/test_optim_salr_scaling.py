"""SALR (sharpness-scaled lr around any optimizer) and the batch-size scaling rules."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from recsys.cli import _configs, build_parser
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.models.rec.model import EvidenceChainModel
from recsys.optim.salr import SALR
from recsys.optim.scaling import min_damping, rule_for, scale_lr
from recsys.train import TrainConfig, Trainer


def test_scaling_arithmetic():
    assert scale_lr(0.1, 256, 4096, "linear") == pytest.approx(1.6)
    assert scale_lr(0.1, 256, 1024, "sqrt") == pytest.approx(0.2)
    assert scale_lr(0.1, 256, 4096, "none") == 0.1
    assert scale_lr(0.1, 1024, 256, "linear") == pytest.approx(0.025)
    assert min_damping(0.5, 100) == pytest.approx(0.005)
    assert min_damping(0.5, 100, constant=3) == pytest.approx(0.015)
    assert rule_for("adam") == "sqrt" and rule_for("sgd") == "linear" and rule_for("kfac") == "linear"
    with pytest.raises(ValueError):
        scale_lr(0.1, 1, 2, "cubic")


def test_cli_applies_lr_scaling_and_new_flags():
    parser = build_parser()
    ns = parser.parse_args(_fit_argv(["--batch-size", "64", "--lr", "0.01", "--lr-scaling", "linear",
                                      "--optimizer", "cov-noise", "--noise-batch", "8", "--noise-structure",
                                      "full", "--noise-scale", "0.5", "--salr"]))
    _, cfg = _configs(ns)
    # the given rate is scaled from cov-noise's own reference batch on MF (4,096), not MF's batch 1
    assert cfg.learning_rate == pytest.approx(0.01 * 64 / MatrixFactorization.optimizer_defaults["cov-noise"]["batch_size"])
    assert (cfg.optimizer, cfg.noise.batch, cfg.noise.structure, cfg.noise.scale, cfg.salr is not None) == \
        ("cov-noise", 8, "full", 0.5, True)
    ns = parser.parse_args(_fit_argv(["--model", "rec", "--batch-size", "4096", "--lr-scaling", "sqrt"]))
    _, cfg = _configs(ns)
    rec = EvidenceChainModel.training_defaults  # the square root of the batch ratio
    assert cfg.learning_rate == pytest.approx(rec["learning_rate"] * (4096 / rec["batch_size"]) ** 0.5)


def _fit_argv(extra):
    return ["train", "--dataset", "ml-100k", *extra]


def quadratic(curv):
    w = torch.nn.Parameter(torch.ones(2))

    def closure():
        base.zero_grad()
        loss = 0.5 * (curv * w.square()).sum()
        loss.backward()
        return loss.detach()
    base = torch.optim.SGD([w], lr=0.1)
    return w, base, closure


def test_salr_scales_the_lr_by_sharpness_over_its_median():
    w, base, closure = quadratic(torch.tensor([1.0, 1.0]))
    salr = SALR(base, every=1, radius=0.1)
    for _ in range(3):
        closure()
        salr.step(closure)
    import statistics
    assert len(salr.history) == 3
    assert salr.ratio == pytest.approx(salr.history[-1] / statistics.median(salr.history))
    s_before = salr.history[-1]
    w2, base2, closure2 = quadratic(torch.tensor([10.0, 10.0]))
    with torch.no_grad():
        w2.copy_(w)
    salr2 = SALR(base2, every=1, radius=0.1)
    salr2.history = [s_before] * 3
    closure2()
    salr2.step(closure2)
    assert salr2.ratio > 1.5
    assert base2.param_groups[0]["lr"] == 0.1  # restored after the step
    assert math.isfinite(float(w2.detach().sum()))


def test_salr_leaves_parameters_and_gradients_as_they_were_when_estimating():
    w, base, closure = quadratic(torch.tensor([2.0, 3.0]))
    closure()
    saved_w, saved_g = w.detach().clone(), w.grad.clone()
    salr = SALR(base, every=1, radius=0.3, n_steps=2)
    s = salr.sharpness(closure)
    assert s > 0
    assert torch.equal(w.detach(), saved_w) and torch.equal(w.grad, saved_g)


def test_salr_state_dict_round_trip():
    w, base, closure = quadratic(torch.tensor([1.0, 4.0]))
    salr = SALR(torch.optim.Adam([w], lr=0.05), every=2)
    salr.base.zero_grad = base.zero_grad
    for _ in range(3):
        closure()
        salr.step(closure)
    saved_w, saved = w.detach().clone(), copy.deepcopy(salr.state_dict())
    for _ in range(3):
        closure()
        salr.step(closure)
    end = w.detach().clone()
    with torch.no_grad():
        w.copy_(saved_w)
    salr2 = SALR(torch.optim.Adam([w], lr=0.05))
    salr2.load_state_dict(saved)
    for _ in range(3):
        closure()
        salr2.step(closure)
    assert torch.equal(w.detach(), end)


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.01), ("sgd", 0.5), ("ekfac", 0.02), ("cov-noise", 0.5)])
def test_salr_trains_mf_through_the_trainer(small_ratings, optimizer, lr):
    model = MatrixFactorization(small_ratings.n_users, small_ratings.n_items, small_ratings.rating_scale,
                                MFConfig(embedding_size=8, n_blocks=2))
    model.prepare(small_ratings)
    u, i, v = small_ratings.tensors()
    before = float(((model.predict(u, i) - v) ** 2).mean().sqrt())
    trainer = Trainer(TrainConfig(epochs=4, batch_size=32, optimizer=optimizer, learning_rate=lr, salr={"every": 2},
                                  noise={"batch": 8}, progress=False))
    trainer.fit(model, small_ratings)
    assert isinstance(trainer.optimizer, SALR) and trainer.optimizer.history
    assert float(((model.predict(u, i) - v) ** 2).mean().sqrt()) < before
