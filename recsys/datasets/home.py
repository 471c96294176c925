"""Where datasets live on disk: the data home."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

ENV_VAR = "RECSYS_DATA"


def data_home(path: str | Path | None = None) -> Path:
    """The data home folder: ``path`` if given, else ``$RECSYS_DATA``, else the user cache
    folder (``~/.cache/recsys`` on Linux).

    The folder is created when missing and its parent is writable; a read-only data home
    (e.g. a shared copy of the datasets) is returned as is.
    """
    if path is None:
        path = os.environ.get(ENV_VAR) or platformdirs.user_cache_dir("recsys")
    home = Path(path).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    return home


CACHE_ENV_VAR = "RECSYS_CACHE"


def cache_home(path: str | Path | None = None) -> Path:
    """Where recsys caches what it generates (synthetic sets for benchmarks): ``path`` if
    given, else ``$RECSYS_CACHE``, else ``<user cache folder>/generated``. Kept apart from
    the data home, which may be a shared, read-only copy of the datasets."""
    if path is None:
        path = os.environ.get(CACHE_ENV_VAR) or Path(platformdirs.user_cache_dir("recsys")) / "generated"
    home = Path(path).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
