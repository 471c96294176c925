"""Ratings data: builtin datasets (MovieLens), ratings files (explicit ratings or implicit
feedback: `read_ratings`), and synthetic ratings.

The data home (``$RECSYS_DATA``, else the user cache folder) holds downloaded datasets; see
``data/README.md``.
"""

from recsys.datasets.builtin import (
    RemoteArchive,
    available_datasets,
    dataset_splits,
    fetch_dataset,
    item_titles,
    load_dataset,
    load_split,
)
from recsys.datasets.home import cache_home, data_home
from recsys.datasets.readers import IMPLICIT_SCALE, WHITESPACE, ColumnSpec, read_ratings
from recsys.datasets.synthetic import load_ratings_npz, save_ratings_npz, synthetic_ratings

__all__ = [
    "IMPLICIT_SCALE",
    "WHITESPACE",
    "ColumnSpec",
    "RemoteArchive",
    "available_datasets",
    "cache_home",
    "data_home",
    "dataset_splits",
    "fetch_dataset",
    "item_titles",
    "load_dataset",
    "load_ratings_npz",
    "load_split",
    "read_ratings",
    "save_ratings_npz",
    "synthetic_ratings",
]
