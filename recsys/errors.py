"""The exceptions and warnings recsys raises for users' mistakes (never for its own bugs).

Every error caused by input data names where the bad value came from (file, line, column,
value) so that the message alone is enough to fix the input.
"""

from __future__ import annotations

from pathlib import Path


class RecsysError(Exception):
    """Base class of every error recsys raises on purpose."""


class RatingsFormatError(RecsysError, ValueError):
    """A ratings file or array holds something that is not a valid rating.

    ``path`` and ``line`` (1-based, counting the header when there is one) say where;
    ``value`` is the offending text when there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        column: str | None = None,
        value: object = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.column = column
        self.value = value
        where = []
        if self.path is not None:
            where.append(self.path)
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column {column!r}")
        prefix = ", ".join(where)
        detail = f" (value {value!r})" if value is not None else ""
        super().__init__(f"{prefix}: {message}{detail}" if prefix else f"{message}{detail}")


class DatasetNotFoundError(RecsysError, FileNotFoundError):
    """A builtin dataset is neither in the data home nor downloadable."""


class ChecksumError(RecsysError):
    """A downloaded or cached file does not have the expected SHA-256."""


class UnknownIdError(RecsysError, KeyError):
    """A raw user or item id that the model or ratings have never seen."""

    def __init__(self, kind: str, raw_id: object) -> None:
        self.kind = kind
        self.raw_id = raw_id
        super().__init__(f"unknown {kind} id {raw_id!r}")

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


class ArtefactError(RecsysError):
    """A saved model directory is missing, corrupt, or of an incompatible version."""


class TrainingDivergedError(RecsysError, FloatingPointError):
    """The training loss became NaN or infinite; the message names epoch and batch."""


class DuplicateRatingsWarning(UserWarning):
    """Duplicate (user, item) pairs were found; only the latest rating of each was kept."""
