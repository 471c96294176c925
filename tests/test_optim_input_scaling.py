"""SGD with a fixed input-scale diagonal preconditioner (`recsys.optim.input_scaling`), Adagrad
with a warm accumulator (`recsys.optim.adagrad`), their options in the factory, and REC's
``sgd`` / ``adagrad`` references that use them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from recsys.cli import _configs, build_parser
from recsys.models.rec.model import EvidenceChainModel, RECConfig
from recsys.optim.adagrad import WarmAdagrad
from recsys.optim.factory import build_optimizer, check_optimizer_options
from recsys.optim.input_scaling import InputScaledSGD
from recsys.train import AutogradStepper, TrainConfig, Trainer

REC = EvidenceChainModel


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def _inputs(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # columns of very different scales, as REC's message input [vector; encoding; residual]
    x = torch.randn(n, 3, generator=g) * torch.tensor([0.1, 0.5, 1.0])
    return x, torch.randn(n, 1, generator=g)


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (net(x) - y).square().mean()


# ------------------------------------------------------------------ InputScaledSGD
def test_the_step_divides_each_weight_column_by_its_inputs_mean_square():
    net, (x, y) = _net(), _inputs()
    lr, damping = 0.3, 0.05
    first = net[0]
    w0, b0 = first.weight.detach().clone(), first.bias.detach().clone()
    opt = InputScaledSGD(net.parameters(), lr, model=net, layers=["0"], damping=damping)
    _loss(net, x, y).backward()
    gw, gb = first.weight.grad.clone(), first.bias.grad.clone()
    w2 = net[2].weight.detach().clone()
    g2 = net[2].weight.grad.clone()
    opt.step()
    mean_square = x.double().square().mean(0)
    s = (mean_square + damping * mean_square.mean()).float()
    torch.testing.assert_close(first.weight.detach(), w0 - lr * gw / s)
    torch.testing.assert_close(first.bias.detach(), b0 - lr * gb)  # bias: input 1, plain SGD
    torch.testing.assert_close(net[2].weight.detach(), w2 - lr * g2)  # not in ``layers``: plain SGD
    torch.testing.assert_close(opt.state[first.weight]["input_scale"], s)


def test_fixed_scales_are_plain_sgd_on_standardised_inputs():
    # SGD with the fixed diagonal preconditioner s equals plain SGD on the same network with
    # its first layer's inputs divided by √s and the weights multiplied by √s
    x, y = _inputs()
    net, twin = _net(), _net()
    opt = InputScaledSGD(net.parameters(), 0.2, momentum=0.5, model=net, calibration_steps=1)
    _loss(net, x, y).backward()
    opt.step()  # calibrates on this batch, then steps
    s0 = opt.state[net[0].weight]["input_scale"]
    s2 = opt.state[net[2].weight]["input_scale"]
    # replay from the same start on the change of variables
    with torch.no_grad():
        twin[0].weight.mul_(s0.sqrt())
        twin[2].weight.mul_(s2.sqrt())
    plain = torch.optim.SGD(twin.parameters(), lr=0.2, momentum=0.5)

    def twin_forward(inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(twin[0](inputs / s0.sqrt()))
        return twin[2](hidden / s2.sqrt())

    for step in range(4):
        if step:
            opt.zero_grad()
            _loss(net, x, y).backward()
            opt.step()
        plain.zero_grad()
        (0.5 * (twin_forward(x) - y).square().mean()).backward()
        plain.step()
        torch.testing.assert_close(net(x), twin_forward(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[net[0].weight]["input_scale"], s0)  # fixed after calibration


def test_calibration_averages_the_first_training_batches_then_stops_recording():
    net, (x, y) = _net(), _inputs(64)
    opt = InputScaledSGD(net.parameters(), 0.1, model=net, layers=["0"], calibration_steps=2, damping=1e-3)
    for k, part in enumerate((x[:32], x[32:])):
        with torch.no_grad():
            net.eval()
            net(torch.full((5, 3), 100.0))  # an evaluation pass: not recorded
            net.train()
        opt.zero_grad()
        _loss(net, part, y[:32]).backward()
        opt.step()
        seen = x[: 32 * (k + 1)].double().square().mean(0)
        expected = (seen + 1e-3 * seen.mean()).float()
        torch.testing.assert_close(opt.state[net[0].weight]["input_scale"], expected)
    assert opt.calibrated and not opt._handles
    net(torch.full((5, 3), 100.0)).sum().backward()  # later inputs change nothing
    opt.step()
    torch.testing.assert_close(opt.state[net[0].weight]["input_scale"], expected)


def test_state_dict_resumes_the_scales_bit_for_bit():
    x, y = _inputs()
    a, b = _net(), _net()
    opt_a = InputScaledSGD(a.parameters(), 0.1, momentum=0.9, model=a)
    for _ in range(2):
        opt_a.zero_grad()
        _loss(a, x, y).backward()
        opt_a.step()
    b.load_state_dict(a.state_dict())
    opt_b = InputScaledSGD(b.parameters(), 0.1, momentum=0.9, model=b)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # torch's state_dict shares its tensors
    assert opt_b.calibrated and not opt_b._handles
    for opt, net in ((opt_a, a), (opt_b, b)):
        opt.zero_grad()
        _loss(net, x * 3, y).backward()  # other inputs: a recalibration would show
        opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bad_input_scaling_options_are_clear_errors():
    net = _net()
    with pytest.raises(ValueError, match=r"'1' is not an nn.Linear .*\['0', '2'\]"):
        InputScaledSGD(net.parameters(), 0.1, model=net, layers=["0", "1"])
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        InputScaledSGD([nn.Parameter(torch.zeros(2))], 0.1, model=net)
    with pytest.raises(ValueError, match="calibration_steps"):
        InputScaledSGD(net.parameters(), 0.1, model=net, calibration_steps=0)
    with pytest.raises(ValueError, match="damping"):
        InputScaledSGD(net.parameters(), 0.1, model=net, damping=0.0)


def test_a_layer_without_inputs_yet_steps_plainly_and_calibrates_when_it_has_some():
    # e.g. one of REC's message networks gets no edge in a small first batch
    net, (x, y) = _net(), _inputs()
    opt = InputScaledSGD(net.parameters(), 0.1, model=net, layers=["0"])
    with torch.no_grad():  # an evaluation forward: nothing to calibrate on
        net(torch.full((5, 3), 100.0))
    net[2].bias.grad = torch.ones(1)
    opt.step()
    assert not opt.calibrated and "input_scale" not in opt.state[net[0].weight]
    opt.zero_grad()
    _loss(net, x, y).backward()
    opt.step()
    assert opt.calibrated
    seen = x.double().square().mean(0)
    torch.testing.assert_close(opt.state[net[0].weight]["input_scale"], (seen + 1e-2 * seen.mean()).float())


# ------------------------------------------------------------------ WarmAdagrad
def test_warm_adagrads_first_step_is_lr_over_root_warm_steps_plus_one_in_every_coordinate():
    start = torch.tensor([1.0, -2.0, 0.5, 3.0])
    p = nn.Parameter(start.clone())
    g1 = torch.tensor([1e-4, -0.5, 0.0, 20.0])  # scales 2e5 apart, one coordinate not reached
    opt = WarmAdagrad([p], lr=0.1, warm_steps=99.0)
    p.grad = g1.clone()
    opt.step()
    moved = p.detach() - start
    torch.testing.assert_close(moved, -0.1 * torch.sign(g1) / math.sqrt(100.0), rtol=1e-5, atol=0)


def test_warm_adagrad_divides_by_the_sum_plus_warm_steps_times_the_largest_square():
    p = nn.Parameter(torch.zeros(3))
    opt = WarmAdagrad([p], lr=0.2, warm_steps=10.0)
    grads = [torch.tensor([1e-3, 1.0, -2.0]), torch.tensor([3e-2, 0.5, 1.0]), torch.tensor([1e-3, -0.2, 4.0])]
    expected = torch.zeros(3)
    for k, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        seen = torch.stack(grads[: k + 1]).square()
        expected = expected - 0.2 * g / ((seen.sum(0) + 10.0 * seen.max(0).values).sqrt() + 1e-10)
        torch.testing.assert_close(p.detach(), expected)
    # a gradient 30x the first (REC's grow about 10x after the first step) moves by at most lr/√11
    # (torch's Adagrad: 0.2 · 30/√(1 + 900) = 0.9995 of the full rate)
    step = grads[1][0] / (seen[:2, 0].sum() + 10 * seen[:2, 0].max()).sqrt()
    assert float(step) <= 1 / math.sqrt(11) + 1e-6


def test_warm_adagrad_with_no_warm_steps_is_torchs_adagrad_and_resumes():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5))
    b = nn.Parameter(a.detach().clone())
    warm, plain = WarmAdagrad([a], lr=0.05, warm_steps=0), torch.optim.Adagrad([b], lr=0.05)
    for k in range(3):
        g = torch.randn(5, generator=torch.Generator().manual_seed(k))
        a.grad, b.grad = g.clone(), g.clone()
        warm.step()
        plain.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    c = nn.Parameter(a.detach().clone())
    resumed = WarmAdagrad([c], lr=0.05, warm_steps=0)
    resumed.load_state_dict(copy.deepcopy(warm.state_dict()))
    for opt, p in ((warm, a), (resumed, c)):
        p.grad = torch.ones(5)
        opt.step()
    assert torch.equal(a, c)
    with pytest.raises(ValueError, match="warm_steps"):
        WarmAdagrad([a], lr=0.1, warm_steps=-1)
    a.grad = torch.ones(5).to_sparse()
    with pytest.raises(ValueError, match="dense gradients only"):
        WarmAdagrad([a], lr=0.1).step()


# ------------------------------------------------------------------ factory options
def test_the_factory_builds_them_from_options_and_refuses_others():
    net = _net()
    assert isinstance(build_optimizer("sgd", net, 0.1, options={"input_scaling": {"layers": ["0"]}}),
                      InputScaledSGD)
    assert isinstance(build_optimizer("adagrad", net, 0.1, options={"warm_steps": 10}), WarmAdagrad)
    assert type(build_optimizer("sgd", net, 0.1)) is torch.optim.SGD
    with pytest.raises(ValueError, match=r"'warm_steps' is not an option of 'adam'"):
        build_optimizer("adam", net, 0.1, options={"warm_steps": 10})
    with pytest.raises(ValueError, match="keys among"):
        check_optimizer_options("sgd", {"input_scaling": {"layer": ["0"]}})
    with pytest.raises(ValueError, match="number >= 0"):
        check_optimizer_options("adagrad", {"warm_steps": -3})
    with pytest.raises(ValueError, match="not an option of 'kfac'"):
        TrainConfig(optimizer="kfac", optimizer_options={"input_scaling": {}})


# ------------------------------------------------------------------ REC's references
@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_recs_reference_is_what_the_command_line_uses_and_scales_by_its_rule(name):
    ref = REC.optimizer_defaults[name]
    parser = build_parser()
    _, cfg = _configs(parser.parse_args(["evaluate", "--dataset", "ml-100k", "--model", "rec", "--optimizer", name]))
    assert cfg.optimizer_options == ref["optimizer_options"]
    assert cfg.lr_scales == ref.get("lr_scales")
    assert (cfg.batch_size, cfg.learning_rate) == (ref["batch_size"], ref["learning_rate"])
    _, cfg = _configs(parser.parse_args(["evaluate", "--dataset", "ml-100k", "--model", "rec", "--optimizer", name,
                                         "--batch-size", "256"]))
    # SGD: linear; Adagrad: the rate kept (its 1/√steps already scales the rate per example)
    expected = ref["learning_rate"] * (256 / ref["batch_size"] if name == "sgd" else 1.0)
    assert cfg.learning_rate == pytest.approx(expected)
    assert cfg.scaling.rule == ("linear" if name == "sgd" else "none")
    assert cfg.optimizer_options == ref["optimizer_options"]  # the options move with the reference


def test_recs_sgd_trains_with_its_first_layers_input_scaled(small_ratings):
    r = small_ratings
    model = REC(r.n_users, r.n_items, r.rating_scale, RECConfig(prototypes=3, fanouts=(4, 2)))
    cfg = TrainConfig.for_model(REC, optimizer="sgd", batch_size=32, epochs=1, progress=False, patience=None)
    trainer = Trainer(cfg)
    trainer.fit(model, r)
    assert isinstance(trainer.stepper, AutogradStepper) and isinstance(trainer.optimizer, InputScaledSGD)
    scaled = {id(w) for w in trainer.optimizer.layers}
    assert scaled == {id(model.phi_user[0].weight), id(model.phi_item[0].weight)}
    s = trainer.optimizer.state[model.phi_user[0].weight]["input_scale"]
    k = model.config.embedding_size
    # the vector columns' inputs are smaller than the residual's: they get the larger steps
    assert s.shape == (k + model.config.rating_levels + 1,) and bool((s[:k] < s[-1]).all())
