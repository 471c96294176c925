"""recsys: rating prediction and recommendation on PyTorch, explained by the training
ratings behind every prediction.

The small public API; everything else lives in the submodules named for their concept
(`recsys.datasets`, `recsys.splits`, `recsys.models`, `recsys.train`, `recsys.evaluate`,
`recsys.artefact`).
"""

from recsys.artefact import Artefact, load_artefact, save_artefact
from recsys.datasets import data_home, load_dataset, load_split, read_ratings, synthetic_ratings
from recsys.errors import (
    ArtefactError,
    DatasetNotFoundError,
    DuplicateRatingsWarning,
    RatingsFormatError,
    RecsysError,
    TrainingDivergedError,
    UnknownIdError,
)
from recsys.evaluate import evaluate_ranking, evaluate_ratings
from recsys.models import MatrixFactorization, MFConfig, RatingModel, build_model
from recsys.ratings import IdMap, Ratings
from recsys.splits import Split, cold_start_users, random_split, temporal_split, validation_slice
from recsys.train import Callback, TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "Artefact", "ArtefactError", "Callback", "DatasetNotFoundError", "DuplicateRatingsWarning",
    "IdMap", "MFConfig", "MatrixFactorization", "RatingModel", "Ratings", "RatingsFormatError",
    "RecsysError", "Split", "TrainConfig", "Trainer", "TrainingDivergedError", "UnknownIdError",
    "build_model", "cold_start_users", "data_home", "evaluate_ranking", "evaluate_ratings",
    "load_artefact", "load_dataset", "load_split", "random_split", "read_ratings", "save_artefact",
    "synthetic_ratings", "temporal_split", "validation_slice",
]
