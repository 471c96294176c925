"""Optimizers by name, for configs and the command line.

Embedding tables produce sparse gradients (only the rows of the batch); optimizers that
accept them keep steps sparse. Those that need dense gradients (Adam) get the tables
switched to dense gradients, which costs a pass over whole tables per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict

import torch
from torch import nn

from recsys.optim.adagrad import WarmAdagrad
from recsys.optim.input_scaling import InputScaledSGD
from recsys.optim.kfac import KFACConfig
from recsys.optim.noise import NOISE_ESTIMATORS, CovNoiseSGD, NoiseConfig

__all__ = ["NAMES", "NOISE_ESTIMATORS", "OPTIMIZERS", "OPTIMIZER_OPTIONS", "PRECONDITIONED", "build_optimizer",
           "build_preconditioner", "check_optimizer_options", "parameter_groups"]

#: name -> (factory(params, lr), accepts sparse gradients)
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], bool]] = {
    "sgd": (lambda params, lr, momentum=0.0: torch.optim.SGD(params, lr=lr, momentum=momentum), True),
    "adagrad": (lambda params, lr: torch.optim.Adagrad(params, lr=lr), True),
    "sparse-adam": (lambda params, lr: torch.optim.SparseAdam(params, lr=lr), True),
    "adam": (lambda params, lr: torch.optim.Adam(params, lr=lr), False),
}


#: the options an optimizer takes beyond its rate (``TrainConfig.optimizer_options``), by name:
#: ``sgd``'s ``input_scaling`` (`recsys.optim.input_scaling.InputScaledSGD`'s keyword options,
#: e.g. ``{"layers": ["phi_user.0"]}``; ``{}``: every linear layer) and ``adagrad``'s
#: ``warm_steps`` (`recsys.optim.adagrad.WarmAdagrad`)
OPTIMIZER_OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "sgd": {"input_scaling": ("layers", "calibration_steps", "damping")},
    "adagrad": {"warm_steps": ()},
}


def check_optimizer_options(name: str, options: Mapping[str, object] | None) -> None:
    """Raise a ValueError naming what is wrong when ``options`` are not options
    `build_optimizer` takes for the optimizer ``name`` (`OPTIMIZER_OPTIONS`)."""
    if not options:
        return
    if not isinstance(options, Mapping):
        raise ValueError(f"optimizer_options must be a dict of option -> value, got {options!r}")
    known = OPTIMIZER_OPTIONS.get(name, {})
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"optimizer option {key!r} is not an option of {name!r} "
                             f"(its options: {sorted(known) or 'none'})")
        fields = known[key]
        if fields and not (isinstance(value, Mapping) and set(value) <= set(fields)):
            raise ValueError(f"optimizer option {key!r} of {name!r} must be a dict with keys among {list(fields)}, "
                             f"got {value!r}")
        if key == "warm_steps" and not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"optimizer option 'warm_steps' must be a number >= 0, got {value!r}")


#: names that are a Kronecker-factored preconditioner (`recsys.optim.kfac`) over plain SGD
PRECONDITIONED = ("kfac", "ekfac", "tkfac", "tekfac")
#: every name `build_optimizer` takes
NAMES = (*OPTIMIZERS, "cov-noise", *PRECONDITIONED)


def parameter_groups(model: nn.Module, learning_rate: float,
                     lr_scales: Mapping[str, float] | None = None) -> list[dict]:
    """``model``'s trainable parameters as optimizer parameter groups: first every parameter
    no key of ``lr_scales`` names, at ``learning_rate`` (so that ``param_groups[0]["lr"]`` is
    the base rate), then one group per key, at ``learning_rate × lr_scales[key]``, holding the
    parameters whose name (`nn.Module.named_parameters`) is the key or starts with ``key.``.
    A key that names no trainable parameter, or a scale that is not a positive number, is an
    error (a mistyped name would otherwise silently train at the base rate)."""
    lr_scales = dict(lr_scales or {})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    taken: set[str] = set()
    groups: list[dict] = []
    for key, scale in lr_scales.items():
        if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"lr_scales[{key!r}] must be a positive number, got {scale!r}")
        params = [p for n, p in named if (n == key or n.startswith(key + ".")) and n not in taken]
        if not params:
            names = sorted({n.split(".")[0] for n, _ in named})
            raise ValueError(f"lr_scales key {key!r} names no trainable parameter of {type(model).__name__} "
                             f"(its parameters start with {names})")
        taken.update(n for n, p in named if n == key or n.startswith(key + "."))
        groups.append({"params": params, "lr": learning_rate * float(scale)})
    rest = [p for n, p in named if n not in taken]
    return ([{"params": rest, "lr": learning_rate}] if rest else []) + groups


def build_optimizer(name: str, model: nn.Module, learning_rate: float, *, noise: NoiseConfig | None = None,
                    seed: int = 0, lr_scales: Mapping[str, float] | None = None,
                    momentum: float = 0.0, options: Mapping[str, object] | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s parameters, switching its embeddings to dense
    gradients when the optimizer cannot take sparse ones. For the K-FAC family this is the
    base SGD; build the preconditioner with `build_preconditioner`. ``noise`` (default
    `NoiseConfig()`) and ``seed`` configure ``cov-noise``: with the ``per-example`` estimator,
    `recsys.optim.noise.CovNoiseSGD` hooked to ``model`` (SGD only); with ``sub-batch``, the
    ``noise.base`` optimizer, and the trainer feeds it gradients from
    `recsys.optim.noise.SubBatchNoise`. ``lr_scales``: learning-rate multipliers by parameter
    name (`parameter_groups`; e.g. REC's SGD reference steps its prototype table faster than
    its shared message networks); not for the per-example ``cov-noise``. ``momentum``: SGD's
    heavy-ball momentum (``sgd`` and the K-FAC family's base SGD; 0 for the others).
    ``options``: the optimizer's own options (`OPTIMIZER_OPTIONS`): ``sgd`` with
    ``input_scaling`` is `recsys.optim.input_scaling.InputScaledSGD` over ``model``'s linear
    layers, ``adagrad`` with ``warm_steps`` is `recsys.optim.adagrad.WarmAdagrad`."""
    noise = noise or NoiseConfig()
    check_optimizer_options(name, options)
    options = dict(options or {})
    if name in PRECONDITIONED:
        name = "sgd"
    if momentum and name != "sgd":
        raise ValueError(f"momentum is an option of sgd and the K-FAC family, not of {name!r}")
    if name == "cov-noise" and noise.estimator == "sub-batch":
        if noise.base not in OPTIMIZERS:
            raise ValueError(f"unknown noise base {noise.base!r}; choose one of {sorted(OPTIMIZERS)}")
        return build_optimizer(noise.base, model, learning_rate, lr_scales=lr_scales)
    if name == "cov-noise" and noise.base != "sgd":
        raise ValueError("per-example covariance noise steps with SGD; use noise_estimator='sub-batch' "
                         f"to put the noise under {noise.base!r}")
    if name == "cov-noise" and lr_scales:
        raise ValueError("per-example covariance noise takes one learning rate; lr_scales needs the "
                         "sub-batch estimator")
    if name == "cov-noise":
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.sparse = True
        return CovNoiseSGD([p for p in model.parameters() if p.requires_grad], learning_rate,
                           noise_batch=noise.batch, structure=noise.structure, noise_scale=noise.scale,
                           model=model, seed=seed)
    try:
        factory, sparse_ok = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(NAMES)}") from None
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.sparse = sparse_ok
    if name == "sparse-adam":
        dense = [p for m in model.modules() if not isinstance(m, nn.Embedding)
                 for p in m.parameters(recurse=False)]
        if dense:
            raise ValueError("sparse-adam takes only embedding tables; this model has dense layers too")
    groups = parameter_groups(model, learning_rate, lr_scales)
    if "input_scaling" in options:
        return InputScaledSGD(groups, learning_rate, momentum, model=model, **dict(options["input_scaling"]))
    if "warm_steps" in options:
        return WarmAdagrad(groups, learning_rate, warm_steps=float(options["warm_steps"]))
    return factory(groups, learning_rate, momentum) if momentum else factory(groups, learning_rate)


def build_preconditioner(name: str, model: nn.Module, kfac: KFACConfig | None = None, **options):
    """The `recsys.optim.kfac.KFACPreconditioner` of kind ``name`` hooked to ``model``, with the
    options of ``kfac`` (default `KFACConfig()`) and then ``options`` (its other keyword
    arguments, e.g. ``seed``), or None when ``name`` is not in `PRECONDITIONED`."""
    if name not in PRECONDITIONED:
        return None
    from recsys.optim.kfac import KFACPreconditioner

    return KFACPreconditioner(model, name, **{**asdict(kfac or KFACConfig()), **options})
