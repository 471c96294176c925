"""Request and response bodies of the REST API (pydantic v2).

Ids (users, items, event ids; in paths, queries and bodies alike) follow one rule, `ID_RULE`:
1 to `MAX_ID_LENGTH` characters, none of them ``/``, a control character or a lone
surrogate. Numbers are strict: a rating is a JSON number (an integer is fine; a string such
as ``"4"`` or a boolean is a 422), finite; a timestamp a JSON integer. The limits that depend
on the settings (entries per request, ``k``, explanation length) are set on these models by
`bounded_models` so that the OpenAPI document states them."""

from __future__ import annotations

from collections.abc import Sequence
from json.encoder import encode_basestring as _string
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator

if TYPE_CHECKING:
    from recsys.store import StoredRating

#: the longest id (users, items, event ids) the service accepts
MAX_ID_LENGTH = 128
#: what an id may hold: 1 to MAX_ID_LENGTH characters, no '/', no control character (lone
#: surrogates are refused too: pydantic's strings are valid Unicode)
ID_PATTERN = rf"^[^/\x00-\x1f\x7f]{{1,{MAX_ID_LENGTH}}}$"
ID_RULE = (f"1 to {MAX_ID_LENGTH} characters; no '/', no control character (U+0000-U+001F, U+007F), "
           "no lone surrogate")
def _json_number(value: object) -> object:
    """Refuse what JSON would not call a number (a string, a boolean) before pydantic's lax
    int conversion, which then takes ``3`` and ``3.0`` (JSON Schema integers) alike."""
    if isinstance(value, (str, bool, bytes)):
        raise ValueError("Input should be a JSON number, not a string or boolean")
    return value


#: an integer as JSON Schema means it (``3`` or ``3.0``; not ``"3"``, not ``true``)
JsonInt = Annotated[int, BeforeValidator(_json_number)]
#: the largest timestamp: 2^53 - 1, the largest integer every JSON reader keeps exact
MAX_TIMESTAMP = 2**53 - 1

Id = Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN, description=f"a raw user or item id: {ID_RULE}")
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
    explain: JsonInt = Field(0, ge=0, le=50)


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
    rating: float = Field(strict=True, allow_inf_nan=False,
                          description="a finite JSON number on the model's rating scale (integers are fine; "
                                      "strings and booleans are not)")
    timestamp: int | None = Field(None, ge=0, le=MAX_TIMESTAMP, description="seconds since 1970 (default: now)")
    event_id: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN,
                                 description="client id of this rating; a retry with the same id and payload is "
                                             "stored once (answered as a duplicate), the same id with another "
                                             f"payload is a 409. {ID_RULE}")


    _timestamp_is_a_number = field_validator("timestamp", mode="before")(_json_number)


class RatingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratings: list[RatingIn] = Field(min_length=1)


def bounded_models(max_batch: int, max_explain: int) -> tuple[type[PredictBatchIn], type[RatingsIn]]:
    """`PredictBatchIn` and `RatingsIn` with the service's limits in their schema: at most
    ``max_batch`` pairs or ratings, at most ``max_explain`` explanation entries."""
    predict = create_model("PredictBatchIn", __base__=PredictBatchIn,
                           pairs=(list[PairIn], Field(min_length=1, max_length=max_batch,
                                                      description=f"1 to {max_batch} pairs")),
                           explain=(JsonInt, Field(0, ge=0, le=max_explain,
                                               description="explanation entries per prediction")))
    ratings = create_model("RatingsIn", __base__=RatingsIn,
                           ratings=(list[RatingIn], Field(min_length=1, max_length=max_batch,
                                                          description=f"1 to {max_batch} ratings")))
    return predict, ratings


class StoredOut(BaseModel):
    seq: int
    user: str
    item: str
    rating: float
    timestamp: int
    event_id: str | None
    duplicate: bool


class RatingsOut(BaseModel):
    accepted: int = Field(description="ratings newly stored and applied to the live model (before the reply)")
    duplicates: int = Field(description="ratings whose event_id was already stored")
    ratings: list[StoredOut]

    @staticmethod
    def render(stored: Sequence[StoredRating]) -> bytes:
        """This reply for ``stored`` (what the store returned, in request order) as the JSON
        bytes ``JSONResponse`` would send (compact, UTF-8), written row by row: 0.8 us a
        rating against 1.1 us through dicts and ``json.dumps`` (a 100-rating reply)."""
        duplicates = sum(s.duplicate for s in stored)
        rows = ",".join([
            f'{{"seq":{s.seq},"user":{_string(s.user)},"item":{_string(s.item)},"rating":{float(s.rating)!r},'
            f'"timestamp":{s.timestamp},"event_id":{"null" if s.event_id is None else _string(s.event_id)},'
            f'"duplicate":{"true" if s.duplicate else "false"}}}' for s in stored])
        return f'{{"accepted":{len(stored) - duplicates},"duplicates":{duplicates},"ratings":[{rows}]}}'.encode()


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


class SkippedOut(BaseModel):
    seq: int | None
    user: str
    item: str
    rating: float
    reason: str


class ReloadOut(BaseModel):
    model: str
    replayed: int = Field(description="stored ratings applied to the new model")
    skipped: int = Field(description="stored ratings the new model cannot apply (unknown item, off its scale): "
                                     "left out, still in the store")
    skipped_examples: list[SkippedOut] = Field(description="the first few skipped ratings and why")


class ReadyOut(BaseModel):
    model: bool
    store: bool
    applied_seq: int = Field(0, description="seq of the last stored rating the live model has applied")
    skipped: int = Field(0, description="stored ratings the live model cannot apply (see /v1/admin/reload)")
    artefact: str = Field("", description="the artefact directory this worker serves")
    generation: int = Field(0, description="its generation in the store's record of chosen models (0: none "
                                           "chosen; every process on the store converges on the latest)")
    worker_pid: int = Field(0, description="the process id of the worker that answered")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: 'body', 'query' or 'path', then the field")
    msg: str
    type: str


class Problem(BaseModel):
    """Every error answer: ``detail``, a message, or (a request that does not match the
    schema, 422) the list of what is wrong where."""

    detail: str | list[FieldError]
