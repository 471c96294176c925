"""Trained models on disk: a directory that needs no pickle to load.

Layout of an artefact directory::

    model.json              format version, model name and config, rating scale, sizes,
                            training summary and metrics
    weights.safetensors     the model's state_dict (parameters and buffers)
    ratings.safetensors     the training ratings (users, items, values[, timestamps]):
                            row k is training example k, for explanations and serving
    ids.json                raw user and item ids in index order, item titles
    rollback.safetensors    optional: the gradient-rollback update log
                            (`recsys.explain.rollback.RollbackLog`), row k = example k

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
from recsys.models import MODELS, build_model
from recsys.models.base import RatingModel
from recsys.ratings import IdMap, Ratings

if TYPE_CHECKING:
    from recsys.models.mf.log import RollbackLog

FORMAT_VERSION = 1
_FILES = ("model.json", "weights.safetensors", "ratings.safetensors", "ids.json")
_ROLLBACK = "rollback.safetensors"


@dataclass
class Artefact:
    """A trained model with everything needed to use it from raw ids."""

    model: RatingModel
    train: Ratings
    metadata: dict = field(default_factory=dict)
    rollback: RollbackLog | None = None

    @property
    def user_ids(self) -> IdMap:
        return self.train.user_ids

    @property
    def item_ids(self) -> IdMap:
        return self.train.item_ids


def save_artefact(path: str | Path, model: RatingModel, train: Ratings, metadata: dict | None = None,
                  rollback: RollbackLog | None = None) -> Path:
    """Write ``model`` trained on ``train`` (and its rollback log, if given) to directory
    ``path`` (replaced atomically)."""
    path = Path(path)
    if model.n_users != train.n_users or model.n_items != train.n_items:
        raise ValueError("model and training ratings disagree on the number of users or items")
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
            "config": model.config_dict(),
            "n_users": model.n_users,
            "n_items": model.n_items,
            "rating_scale": list(model.rating_scale),
            **(metadata or {}),
        }
        (tmp / "model.json").write_text(json.dumps(meta, indent=2))
        if rollback is not None:
            rollback.save(tmp / _ROLLBACK)
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
    """Load an artefact directory; `ArtefactError` says what is missing or inconsistent."""
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
        from recsys.models.mf.log import RollbackLog

        try:
            rollback = RollbackLog.load(path / _ROLLBACK, device=device)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtefactError(f"{path}: corrupt rollback log ({exc})") from None
        if rollback.n_examples != len(train):
            raise ArtefactError(f"{path}: rollback log has {rollback.n_examples} rows, the training ratings {len(train)}")
    return Artefact(model, train, meta, rollback)


def artefact_size_bytes(path: str | Path) -> int:
    return int(sum(np.int64(p.stat().st_size) for p in Path(path).iterdir() if p.is_file()))
