"""Benchmark results written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, data: object, *, indent: int | None = 2) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file moved into place, so that a
    run killed mid-write leaves the previous file whole (results that accumulate over hours of
    runs, or over the splits of one run, are not truncated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    os.replace(tmp, path)
