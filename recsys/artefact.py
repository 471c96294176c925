"""Trained models on disk: a directory that needs no pickle to load.

Layout of an artefact directory::

    model.json              format version, model name and config, rating scale, sizes,
                            training summary and metrics
    weights.safetensors     the model's state_dict (parameters and buffers)
    ratings.safetensors     the training ratings (users, items, values[, timestamps]):
                            row k is training example k, for explanations and serving
    ids.json                raw user and item ids in index order, item titles
    rollback.safetensors    optional: the gradient-rollback update log
                            (`recsys.models.mf.log.RollbackLog` or `CompactRollbackLog`,
                            the compact one without its examples' users and items, which
                            ratings.safetensors holds), row k = example k
    ranker/                 optional, beside a rating model: the ranking model fitted on the
                            same training rows (an artefact directory of its own, same
                            layout), which the service's recommendations use

The model is a `RatingModel` or a `RankingModel` (``model.json``'s ``task``); a ranking
model's directory is served as is (recommendations only, no rating predictions).

Writes go to a temporary sibling directory that is renamed into place, so a crash never
leaves a half-written artefact under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recsys.errors import ArtefactError
from recsys.models import MODELS, Model, build_model
from recsys.models.base import RankingModel
from recsys.ratings import IdMap, Ratings

if TYPE_CHECKING:
    from recsys.models.mf.log import RollbackLog

FORMAT_VERSION = 1
_FILES = ("model.json", "weights.safetensors", "ratings.safetensors", "ids.json")
_ROLLBACK = "rollback.safetensors"
#: the sub-directory holding the ranking model saved beside a rating model
RANKER_DIR = "ranker"


@dataclass
class Artefact:
    """A trained model with everything needed to use it from raw ids; ``ranker``: the
    ranking model saved beside a rating model (its own `Artefact`, on the same training
    rows), None when there is none."""

    model: Model
    train: Ratings
    metadata: dict = field(default_factory=dict)
    rollback: RollbackLog | None = None
    ranker: Artefact | None = None

    @property
    def task(self) -> str:
        """``rating`` or ``ranking``: what the artefact's model is for."""
        return self.model.task

    @property
    def user_ids(self) -> IdMap:
        return self.train.user_ids

    @property
    def item_ids(self) -> IdMap:
        return self.train.item_ids


def save_artefact(path: str | Path, model: Model, train: Ratings, metadata: dict | None = None,
                  rollback: RollbackLog | None = None, *, ranker: RankingModel | None = None,
                  ranker_metadata: dict | None = None) -> Path:
    """Write ``model`` trained (or fitted) on ``train`` (and its rollback log, if given) to
    directory ``path`` (replaced atomically, the ranker included). ``ranker``: a ranking model
    fitted on the same ``train``, saved beside a rating model in ``path/ranker`` with
    ``ranker_metadata``."""
    path = Path(path)
    if model.n_users != train.n_users or model.n_items != train.n_items:
        raise ValueError("model and training ratings disagree on the number of users or items")
    if ranker is not None:
        if model.task != "rating" or ranker.task != "ranking":
            raise ValueError("a ranker is saved beside a rating model: model must rate, ranker must rank")
        if ranker.n_users != train.n_users or ranker.n_items != train.n_items:
            raise ValueError("the ranker and the training ratings disagree on the number of users or items")
    if rollback is not None and rollback.n_examples != len(train):
        raise ValueError(f"rollback log has {rollback.n_examples} rows, the training ratings {len(train)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "weights.safetensors"))
        arrays = {
            "users": torch.from_numpy(train.users),
            "items": torch.from_numpy(train.items),
            "values": torch.from_numpy(train.values),
        }
        if train.timestamps is not None:
            arrays["timestamps"] = torch.from_numpy(train.timestamps)
        save_file(arrays, str(tmp / "ratings.safetensors"))
        ids = {
            "users": train.user_ids.raw_ids.tolist(),
            "items": train.item_ids.raw_ids.tolist(),
            "item_titles": dict(train.item_titles) if train.item_titles else None,
        }
        (tmp / "ids.json").write_text(json.dumps(ids))
        meta = {
            "format_version": FORMAT_VERSION,
            "model": model.name,
            "task": model.task,
            "config": model.config_dict(),
            "n_users": model.n_users,
            "n_items": model.n_items,
            "rating_scale": list(model.rating_scale),
            **(metadata or {}),
        }
        (tmp / "model.json").write_text(json.dumps(meta, indent=2))
        if rollback is not None:
            if getattr(rollback, "mode", None) == "compact" and hasattr(rollback, "n_base"):
                rollback.save(tmp / _ROLLBACK, with_examples=False)  # ratings.safetensors holds them
            else:
                rollback.save(tmp / _ROLLBACK)
        if ranker is not None:
            save_artefact(tmp / RANKER_DIR, ranker, train, ranker_metadata)
        for name in _FILES + ((_ROLLBACK,) if rollback is not None else ()):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_artefact(path: str | Path, *, device: str | torch.device = "cpu") -> Artefact:
    """Load an artefact directory (and the ranker saved beside its model, if any);
    `ArtefactError` says what is missing or inconsistent."""
    path = Path(path)
    if not path.is_dir():
        raise ArtefactError(f"{path}: no such model directory (train one with `recsys train --out {path}`)")
    missing = [n for n in _FILES if not (path / n).is_file()]
    if missing:
        raise ArtefactError(f"{path}: not a complete recsys model directory; missing {', '.join(missing)}")
    try:
        meta = json.loads((path / "model.json").read_text())
        ids = json.loads((path / "ids.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtefactError(f"{path}: corrupt JSON metadata ({exc})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtefactError(f"{path}: artefact format version {version!r}; this recsys reads version {FORMAT_VERSION}")
    name = meta.get("model")
    if name not in MODELS:
        raise ArtefactError(f"{path}: unknown model {name!r}; known: {sorted(MODELS)}")
    try:
        state = load_file(str(path / "weights.safetensors"))
        arrays = load_file(str(path / "ratings.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtefactError(f"{path}: corrupt tensor file ({exc})") from None
    user_ids, item_ids = IdMap(ids["users"]), IdMap(ids["items"])
    if (len(user_ids), len(item_ids)) != (meta["n_users"], meta["n_items"]):
        raise ArtefactError(f"{path}: ids.json does not match model.json's n_users/n_items")
    try:
        train = Ratings(
            arrays["users"].numpy(), arrays["items"].numpy(), arrays["values"].numpy(),
            arrays["timestamps"].numpy() if "timestamps" in arrays else None,
            user_ids, item_ids, tuple(meta["rating_scale"]), ids.get("item_titles"),
        )
        model = build_model(name, train.n_users, train.n_items, train.rating_scale, meta["config"])
        model.load_state_dict(state, strict=True)
        model.bind_ratings(train)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise ArtefactError(f"{path}: weights do not match the saved model description ({exc})") from None
    model.to(device).eval()
    rollback = None
    if (path / _ROLLBACK).is_file():
        # a model family with its own log format loads it (``load_update_log``); else MF's
        loader = getattr(type(model), "load_update_log", None)
        extra = {}
        if loader is None:
            from recsys.models.mf.log import RollbackLog

            loader, extra = RollbackLog.load, {"examples": train}  # a compact log's users and items
        try:
            rollback = loader(path / _ROLLBACK, device=device, **extra)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtefactError(f"{path}: corrupt rollback log ({exc})") from None
        if rollback.n_examples != len(train):
            raise ArtefactError(f"{path}: rollback log has {rollback.n_examples} rows, the training ratings {len(train)}")
    ranker = None
    if (path / RANKER_DIR).is_dir():
        ranker = load_artefact(path / RANKER_DIR, device=device)
        if ranker.task != "ranking":
            raise ArtefactError(f"{path / RANKER_DIR}: holds {ranker.model.name!r}, not a ranking model")
        same = (len(ranker.train) == len(train) and ranker.user_ids == user_ids and ranker.item_ids == item_ids
                and np.array_equal(ranker.train.users, train.users) and np.array_equal(ranker.train.items, train.items))
        if not same:
            raise ArtefactError(f"{path / RANKER_DIR}: the ranker was fitted on other training rows than the model")
        ranker.train = train  # one training Ratings for both models (same rows, same maps)
    return Artefact(model, train, meta, rollback, ranker)


def artefact_size_bytes(path: str | Path) -> int:
    return int(sum(np.int64(p.stat().st_size) for p in Path(path).iterdir() if p.is_file()))
