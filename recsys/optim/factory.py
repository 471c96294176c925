"""Optimizers by name, for configs and the command line.

Embedding tables produce sparse gradients (only the rows of the batch); optimizers that
accept them keep steps sparse. Those that need dense gradients (Adam) get the tables
switched to dense gradients, which costs a pass over whole tables per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: name -> (factory(params, lr), accepts sparse gradients)
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], bool]] = {
    "sgd": (lambda params, lr: torch.optim.SGD(params, lr=lr), True),
    "adagrad": (lambda params, lr: torch.optim.Adagrad(params, lr=lr), True),
    "sparse-adam": (lambda params, lr: torch.optim.SparseAdam(params, lr=lr), True),
    "adam": (lambda params, lr: torch.optim.Adam(params, lr=lr), False),
}


#: names that are a Kronecker-factored preconditioner (`recsys.optim.kfac`) over plain SGD
PRECONDITIONED = ("kfac", "ekfac", "tkfac", "tekfac")
#: every name `build_optimizer` takes
NAMES = (*OPTIMIZERS, "cov-noise", *PRECONDITIONED)


NOISE_ESTIMATORS = ("per-example", "sub-batch")


def build_optimizer(name: str, model: nn.Module, learning_rate: float, *, noise_batch: int = 256,
                    noise_structure: str = "diag", noise_scale: float = 1.0, noise_base: str = "sgd",
                    noise_estimator: str = "per-example", seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s parameters, switching its embeddings to dense
    gradients when the optimizer cannot take sparse ones. For the K-FAC family this is the
    base SGD; build the preconditioner with `build_preconditioner`. ``noise_*`` and ``seed``
    configure ``cov-noise``: with the ``per-example`` estimator, `recsys.optim.noise.CovNoiseSGD`
    hooked to ``model`` (SGD only); with ``sub-batch``, the ``noise_base`` optimizer, and the
    trainer feeds it gradients from `recsys.optim.noise.SubBatchNoise`."""
    if name in PRECONDITIONED:
        name = "sgd"
    if name == "cov-noise" and noise_estimator not in NOISE_ESTIMATORS:
        raise ValueError(f"unknown noise estimator {noise_estimator!r}; choose one of {NOISE_ESTIMATORS}")
    if name == "cov-noise" and noise_estimator == "sub-batch":
        if noise_base not in OPTIMIZERS:
            raise ValueError(f"unknown noise base {noise_base!r}; choose one of {sorted(OPTIMIZERS)}")
        return build_optimizer(noise_base, model, learning_rate)
    if name == "cov-noise" and noise_base != "sgd":
        raise ValueError("per-example covariance noise steps with SGD; use noise_estimator='sub-batch' "
                         f"to put the noise under {noise_base!r}")
    if name == "cov-noise":
        from recsys.optim.noise import CovNoiseSGD

        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.sparse = True
        return CovNoiseSGD([p for p in model.parameters() if p.requires_grad], learning_rate,
                           noise_batch=noise_batch, structure=noise_structure, noise_scale=noise_scale,
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
    return factory([p for p in model.parameters() if p.requires_grad], learning_rate)


def build_preconditioner(name: str, model: nn.Module, **options):
    """The `recsys.optim.kfac.KFACPreconditioner` of kind ``name`` hooked to ``model`` (options:
    its keyword arguments), or None when ``name`` is not in `PRECONDITIONED`."""
    if name not in PRECONDITIONED:
        return None
    from recsys.optim.kfac import KFACPreconditioner

    return KFACPreconditioner(model, name, **options)
