"""Rating models. Each is a `RatingModel` with a typed config; `MODELS` maps the names used
on the command line and in artefacts to (model class, config class)."""

from __future__ import annotations

import dataclasses

from recsys.models.base import RatingModel
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.models.rec import EvidenceChainModel, RECConfig

MODELS: dict[str, tuple[type[RatingModel], type]] = {
    "mf": (MatrixFactorization, MFConfig),
    "rec": (EvidenceChainModel, RECConfig),
}


def build_model(name: str, n_users: int, n_items: int, rating_scale: tuple[float, float],
                config: dict | None = None) -> RatingModel:
    """A fresh model ``name`` with its config built from ``config`` (unknown keys rejected)."""
    try:
        cls, config_cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(config or {}) - fields
    if unknown:
        raise ValueError(f"unknown {name} config keys {sorted(unknown)}; valid: {sorted(fields)}")
    return cls(n_users, n_items, rating_scale, config_cls(**(config or {})))


__all__ = ["MODELS", "EvidenceChainModel", "MFConfig", "MatrixFactorization", "RECConfig", "RatingModel",
           "build_model"]
