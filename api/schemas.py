"""Request and response bodies of the REST API (pydantic v2)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Id = Field(min_length=1, max_length=128, description="a raw user or item id")
Path = Literal["model", "fold-in", "online", "fallback", "popularity"]


class Effect(BaseModel):
    """One training rating (or interaction) and its estimated effect: on a predicted rating in
    rating points, on a recommended item's ranking score in score units (positive: it raised
    the prediction or score)."""

    user: str
    item: str
    title: str | None = None
    rating: float
    timestamp: int | None = None
    effect: float


class PredictionOut(BaseModel):
    user: str
    item: str
    title: str | None = None
    rating: float | None = Field(description="the predicted rating, on the model's scale; null where the "
                                             "service has no rating model (a ranker alone)")
    score: float | None = Field(None, description="recommendations: the ranking model's score (higher: ranked "
                                                  "earlier; not a rating); with a rating model alone, the "
                                                  "predicted rating the items were ranked by")
    path: Path = Field(description="what produced it: model, fold-in, online, fallback, or popularity (a "
                                   "recommendation list for a user with no interaction)")
    explanation: list[Effect] | None = None
    explanation_method: str | None = None


class PairIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Id
    item: str = Id


class PredictBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[PairIn] = Field(min_length=1)
    explain: int = Field(0, ge=0, le=50)


class PredictBatchOut(BaseModel):
    predictions: list[PredictionOut]


class RecommendationsOut(BaseModel):
    user: str
    path: Path
    items: list[PredictionOut]


class RatingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Id
    item: str = Id
    rating: float = Field(allow_inf_nan=False)
    timestamp: int | None = Field(None, ge=0, le=2**62)
    event_id: str | None = Field(None, min_length=1, max_length=128,
                                 description="client id of this rating; retries with the same id are stored once")


class RatingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratings: list[RatingIn] = Field(min_length=1)


class StoredOut(BaseModel):
    seq: int
    user: str
    item: str
    rating: float
    timestamp: int
    event_id: str | None
    duplicate: bool


class RatingsOut(BaseModel):
    accepted: int = Field(description="ratings newly stored and applied")
    duplicates: int = Field(description="ratings whose event_id was already stored")
    ratings: list[StoredOut]


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Id


class UserOut(BaseModel):
    user: str
    known: bool = Field(description="whether the model can personalise for this user")
    n_ratings: int = Field(description="ratings the service holds for the user (training + online)")
    n_training_ratings: int
    n_live_ratings: int
    path: Path


class CreatedOut(BaseModel):
    user: str
    created: bool


class ReloadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="artefact directory; default: the one configured")


class ReloadOut(BaseModel):
    model: str
    replayed: int


class Problem(BaseModel):
    detail: str
