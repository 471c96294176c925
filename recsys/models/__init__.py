"""Models. Each is a `RatingModel` (predicts ratings; ``task == "rating"``) or a `RankingModel`
(ranks items for top-N recommendation; ``task == "ranking"``) with a typed config; `MODELS`
maps the names used on the command line and in artefacts to (model class, config class).

`DEFAULT_RANKER` names the ranking model that `recsys evaluate --ranking`, `recsys train`
(saved beside a rating model) and the service's recommendations use when none is named.
"""

from __future__ import annotations

import dataclasses

from recsys.models.base import RankingModel, RatingModel
from recsys.models.ease import EASE, EASEConfig
from recsys.models.implicit import ALS, BPR, ALSConfig, BPRConfig
from recsys.models.mf import MatrixFactorization, MFConfig
from recsys.models.popularity import PopularityConfig, PopularityRanker
from recsys.models.rankmf import RankingMF, RankMFConfig
from recsys.models.rec import EvidenceChainModel, RECConfig

#: a model of either task
Model = RatingModel | RankingModel

MODELS: dict[str, tuple[type[RatingModel] | type[RankingModel], type]] = {
    "mf": (MatrixFactorization, MFConfig),
    "rec": (EvidenceChainModel, RECConfig),
    "ease": (EASE, EASEConfig),
    "popular": (PopularityRanker, PopularityConfig),
    "rank-mf": (RankingMF, RankMFConfig),
    "als": (ALS, ALSConfig),
    "bpr": (BPR, BPRConfig),
}

#: the ranking model used where none is named (chosen on validation slices; see docs)
DEFAULT_RANKER = "ease"


def model_task(name: str) -> str:
    """``rating`` or ``ranking``: what the registered model ``name`` is for."""
    try:
        return MODELS[name][0].task
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None


def ranking_models() -> list[str]:
    """Names of the registered ranking models, sorted."""
    return sorted(n for n, (cls, _) in MODELS.items() if cls.task == "ranking")


def rating_models() -> list[str]:
    """Names of the registered rating models, sorted."""
    return sorted(n for n, (cls, _) in MODELS.items() if cls.task == "rating")


def build_model(name: str, n_users: int, n_items: int, rating_scale: tuple[float, float],
                config: dict | None = None) -> Model:
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


__all__ = ["DEFAULT_RANKER", "MODELS", "EvidenceChainModel", "MFConfig", "MatrixFactorization", "Model",
           "RECConfig", "RankingModel", "RatingModel", "build_model", "model_task", "ranking_models",
           "rating_models"]
