"""Read a ratings file (CSV, TSV, any delimiter, or Parquet) into `Ratings`.

Files are parsed with pyarrow as text and validated vectorised, so ten million lines load in
seconds, yet every bad value is reported with its file, 1-based physical line number (blank
lines and the header count), column and text.

Column spec (``columns``), one of:

* roles in the file's column order, e.g. ``("user", "item", "rating", "timestamp")`` or the
  string ``"user,item,rating"``; ``"_"`` or ``"skip"`` marks a column to ignore; trailing
  columns not named (or named ``_``) are ignored and may be absent. Works with and without
  a header line (which is skipped).
* header names, for files with a header: ``"user=userId,item=movieId,rating=rating"`` or a
  mapping ``{"user": "userId", ...}``; or a sequence of header names in role order
  ``("userId", "movieId", "rating"[, "timestamp"])`` (told apart from roles because its
  entries are not all role names).

Roles are ``user`` and ``item`` (required), ``rating`` or ``weight`` (at most one of them) and
``timestamp`` (optional, integer seconds). For Parquet the schema is the header and "line" in
errors means the 1-based row.

Explicit and implicit feedback:

* with a ``rating`` column the file holds *explicit* ratings (any scale);
* with no ``rating`` column it holds *implicit* feedback (clicks, plays, purchases: "user chose
  item"), e.g. ``user,item`` or ``user,item,timestamp``. Every interaction gets the value
  ``1.0`` and the rating scale defaults to ``(0, 1)`` ("no interaction" to "interaction");
* an optional ``weight`` column gives implicit interactions a strength (play counts, dwell
  time): finite and non-negative; the scale defaults to ``(0, largest weight)``.

`ColumnSpec.implicit` says which kind a spec reads. Ranking evaluation treats every implicit
interaction as relevant (`recsys.evaluate.evaluate_ranking` with ``relevance_threshold=None``);
explicit ratings are relevant from a threshold (``--relevance``, default 4.0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recsys.errors import RatingsFormatError
from recsys.ratings import IdMap, Ratings

ROLES = ("user", "item", "rating", "weight", "timestamp")
REQUIRED_ROLES = ("user", "item")
#: the rating scale of implicit feedback without weights: "no interaction" to "interaction"
IMPLICIT_SCALE = (0.0, 1.0)
SKIP = frozenset({"_", "skip"})
WHITESPACE = r"\s+"
"""``sep`` value meaning "runs of spaces and tabs"; sniffed when no other separator fits."""
SNIFF_ORDER = ("::", "\t", ",", "|", ";")
PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})

_NUMBER = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"
_INTEGER = r"^[-+]?\d+$"
_CANONICAL_INT = r"^-?(0|[1-9]\d{0,17})$"  # spelled as str(int) and fits int64


@dataclass(frozen=True)
class ColumnSpec:
    """Where each role's values are: by 0-based field position, or by header name."""

    positions: Mapping[str, int] | None = None
    names: Mapping[str, str] | None = None
    width: int = 0
    """Fields the positional spec needs: 1 + the last role's position (trailing skips and
    unnamed columns may be absent)."""

    @property
    def roles(self) -> frozenset[str]:
        """The roles this spec reads."""
        return frozenset(self.positions if self.positions is not None else self.names or {})

    @property
    def implicit(self) -> bool:
        """Whether the file holds implicit feedback (no ``rating`` column)."""
        return "rating" not in self.roles

    @classmethod
    def parse(cls, columns: Sequence[str] | Mapping[str, str] | str) -> ColumnSpec:
        """Parse any accepted ``columns`` form (see the module docstring)."""
        if isinstance(columns, str):
            parts = [p.strip() for p in columns.split(",")]
            if any("=" in p for p in parts):
                pairs = [p.split("=", 1) for p in parts]
                return cls._by_name({role.strip(): name.strip() for role, name in pairs})
            columns = parts
        if isinstance(columns, Mapping):
            return cls._by_name(dict(columns))
        tokens = [str(c).strip() for c in columns]
        if all(t in ROLES or t in SKIP for t in tokens):
            positions = {t: k for k, t in enumerate(tokens) if t not in SKIP}
            if len(positions) != sum(t not in SKIP for t in tokens):
                raise ValueError(f"columns names a role twice: {tokens}")
            _check_roles(positions, tokens)
            return cls(positions=positions, width=max(positions.values()) + 1)
        if not 3 <= len(tokens) <= 4:
            raise ValueError(
                f"columns {tokens} is neither roles ({', '.join(ROLES)}, _) nor 3-4 header "
                "names for user, item, rating[, timestamp] (for implicit feedback by header "
                "name, say user=NAME,item=NAME[,timestamp=NAME])"
            )
        return cls._by_name(dict(zip(("user", "item", "rating", "timestamp"), tokens, strict=False)))

    @classmethod
    def _by_name(cls, names: dict[str, str]) -> ColumnSpec:
        unknown = [r for r in names if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown column role {unknown[0]!r}; roles are {', '.join(ROLES)}")
        _check_roles(names, names)
        return cls(names=names)


def _check_roles(found: Mapping[str, object], given: object) -> None:
    missing = [r for r in REQUIRED_ROLES if r not in found]
    if missing:
        raise ValueError(f"columns {given} lacks the {', '.join(missing)} column")
    if "rating" in found and "weight" in found:
        raise ValueError(f"columns {given} has both rating (explicit ratings) and weight (implicit "
                         "feedback's strength); give one of them")


def read_ratings(
    path: str | Path,
    *,
    sep: str | None = None,
    columns: Sequence[str] | Mapping[str, str] | str = ("user", "item", "rating"),
    header: bool | None = None,
    rating_scale: tuple[float, float] | None = None,
    user_ids: IdMap | None = None,
    item_ids: IdMap | None = None,
) -> Ratings:
    """Ratings (explicit) or interactions (implicit) from a delimited text file (optionally
    ``.gz``/``.bz2``) or Parquet file.

    With no ``rating`` column (e.g. ``columns="user,item,timestamp"``) the file is implicit
    feedback: each row's value is ``1.0`` (or its ``weight`` column) and the rating scale
    defaults to ``(0, 1)`` (``(0, largest weight)`` with weights); see the module docstring.
    Repeated (user, item) rows keep the latest, as for ratings.

    Args:
        path: the file; Parquet when the suffix is ``.parquet`` or ``.pq``.
        sep: field separator, literal (``","``, ``"::"``...) or `WHITESPACE`; None sniffs
            it from the first line (``::``, tab, comma, ``|``, ``;``, else whitespace).
        columns: which column holds which role (module docstring).
        header: whether the first non-blank line is a header; None detects it (a header when
            that line's rating, weight or else timestamp field is not a number; with only
            user and item columns, when that line's user field starts with "user"). Header
            names imply a header.
        rating_scale: ``(low, high)``; defaults to the observed min and max for ratings,
            ``(0, 1)`` for implicit feedback, ``(0, largest weight)`` for weights.
        user_ids, item_ids: index into these maps (e.g. a training set's) instead of new ones.

    Raises:
        RatingsFormatError: for a malformed line, non-numeric, empty or NaN rating (or
            weight; a negative weight too), non-integer timestamp, empty id, missing header
            column or a file with no ratings.
    """
    path = Path(path)
    spec = ColumnSpec.parse(columns)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        fields, lines = _read_parquet(path, spec)
    else:
        fields, lines = _read_text(path, spec, sep, header)
    source = str(path)
    users = _ids(fields["user"], "user", lines, source)
    items = _ids(fields["item"], "item", lines, source)
    if "rating" in fields:
        values = _ratings(fields["rating"], lines, source)
    elif "weight" in fields:
        values = _ratings(fields["weight"], lines, source, role="weight")
        k = int(np.argmax(values < 0)) if len(values) and values.min() < 0 else -1
        if k >= 0:
            raise RatingsFormatError("weight is negative", path=source, line=int(lines[k]), column="weight",
                                     value=fields["weight"][k].as_py())
        if rating_scale is None:
            top = float(values.max()) if len(values) else 0.0
            rating_scale = (0.0, top if top > 0 else 1.0)
    else:
        values = np.ones(len(users), dtype=np.float64)
        rating_scale = IMPLICIT_SCALE if rating_scale is None else rating_scale
    timestamps = _timestamps(fields["timestamp"], lines, source) if "timestamp" in fields else None
    return Ratings.from_arrays(users, items, values, timestamps, rating_scale=rating_scale,
                               user_ids=user_ids, item_ids=item_ids, source=source)


# --------------------------------------------------------------------------- text files
def _read_lines(path: Path) -> pa.ChunkedArray:
    """Every physical line of ``path`` as a string, blank lines included."""
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=["line"]),
            parse_options=pacsv.ParseOptions(
                delimiter="\x1f", quote_char=False, escape_char=False,
                newlines_in_values=False, ignore_empty_lines=False,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={"line": pa.string()}, strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except FileNotFoundError:
        raise
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            return pa.chunked_array([], type=pa.string())
        raise RatingsFormatError(f"cannot read as UTF-8 text lines: {exc}", path=path) from None
    return table["line"]


def sniff_separator(line: str) -> str:
    """The field separator of a ratings line: the first of `SNIFF_ORDER` in it, else
    `WHITESPACE`."""
    return next((s for s in SNIFF_ORDER if s in line), WHITESPACE)


def _split(lines: pa.ChunkedArray, sep: str) -> pa.ChunkedArray:
    if sep == WHITESPACE:
        return pc.split_pattern_regex(pc.utf8_trim_whitespace(lines), WHITESPACE)
    return pc.split_pattern(lines, sep)


def _split_one(line: str, sep: str) -> list[str]:
    parts = line.split() if sep == WHITESPACE else line.split(sep)
    return [_unquote(p.strip()) for p in parts]


def _unquote(text: str) -> str:
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_text(
    path: Path, spec: ColumnSpec, sep: str | None, header: bool | None
) -> tuple[dict[str, pa.ChunkedArray], np.ndarray]:
    """The text field of each role for every data line, and those lines' numbers."""
    lines = _read_lines(path)
    nonblank = np.flatnonzero(pc.not_equal(pc.utf8_trim_whitespace(lines), "").to_numpy())
    if len(nonblank) == 0:
        raise RatingsFormatError("file is empty: no ratings", path=path, line=1)
    first_no = int(nonblank[0])
    first = lines[first_no].as_py()
    if not sep:
        sep = sniff_separator(first)
    first_fields = _split_one(first, sep)
    if spec.names is not None:
        if header is False:
            raise ValueError("columns given as header names need a file with a header line")
        header = True
    elif header is None:
        header = _looks_like_header(spec, first_fields)

    n_fields = len(first_fields)
    if spec.positions is not None and spec.width > n_fields:
        raise RatingsFormatError(
            f"expected at least {spec.width} fields separated by {sep!r}, found {n_fields}",
            path=path, line=first_no + 1, value=first,
        )
    positions = (dict(spec.positions) if spec.positions is not None
                 else _header_positions(spec.names, first_fields, path, first_no + 1))

    rows = nonblank[1:] if header else nonblank
    if len(rows) == 0:
        raise RatingsFormatError("no ratings after the header", path=path, line=first_no + 2)
    data = lines if len(rows) == len(lines) else lines.take(pa.array(rows))
    split = _split(data, sep)
    counts = pc.list_value_length(split)
    k = pc.index(pc.equal(counts, n_fields), False).as_py()
    if k >= 0:
        raise RatingsFormatError(
            f"expected {n_fields} fields separated by {sep!r}, found {counts[k].as_py()}",
            path=path, line=int(rows[k]) + 1, value=data[k].as_py(),
        )
    fields = {role: _clean(pc.list_element(split, pos)) for role, pos in positions.items()}
    return fields, rows + 1


def _looks_like_header(spec: ColumnSpec, first: list[str]) -> bool:
    """Whether the first line of a positional spec's file is a header: its rating (else
    weight, else timestamp) field is not a number; with only user and item columns, its user
    field starts with "user" (``user``, ``userId``, ``user_id``)."""
    assert spec.positions is not None
    for role in ("rating", "weight", "timestamp"):
        if role in spec.positions:
            pos = spec.positions[role]
            return pos < len(first) and not _is_number(first[pos])
    pos = spec.positions["user"]
    return pos < len(first) and first[pos].strip().lower().startswith("user")


def _header_positions(names: Mapping[str, str], header: list[str], path: Path,
                      line: int | None) -> dict[str, int]:
    positions = {}
    for role, name in names.items():
        if name not in header:
            raise RatingsFormatError(
                f"header lacks column {name!r} (for {role}); it has {', '.join(map(repr, header))}",
                path=path, line=line, column=name,
            )
        positions[role] = header.index(name)
    return positions


def _clean(field: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strip surrounding whitespace and one pair of double quotes."""
    field = pc.utf8_trim_whitespace(field)
    if pc.any(pc.starts_with(field, '"')).as_py():
        field = pc.replace_substring_regex(field, r'^"(.*)"$', r"\1")
    return field


# --------------------------------------------------------------------------- parquet
def _read_parquet(path: Path, spec: ColumnSpec) -> tuple[dict[str, pa.ChunkedArray], np.ndarray]:
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError) as exc:
        raise RatingsFormatError(f"cannot read as Parquet: {exc}", path=path) from None
    names = table.column_names
    if spec.names is not None:
        positions = _header_positions(spec.names, names, path, line=None)
    else:
        if spec.width > len(names):
            raise RatingsFormatError(
                f"expected at least {spec.width} columns, found {len(names)} ({', '.join(names)})",
                path=path,
            )
        positions = dict(spec.positions)
    if table.num_rows == 0:
        raise RatingsFormatError("file is empty: no ratings", path=path, line=1)
    fields = {role: table.column(pos) for role, pos in positions.items()}
    return fields, np.arange(1, table.num_rows + 1)


# --------------------------------------------------------------------------- validation
def _writable(array: np.ndarray) -> np.ndarray:
    """``array``, copied when it is a read-only view of Arrow memory (torch needs writable)."""
    return np.require(array, requirements="W")


def _fail_at(ok: pa.ChunkedArray | pa.Array) -> int:
    """Index of the first False (or null) in ``ok``, -1 when all are True."""
    return pc.index(pc.fill_null(ok, False), False).as_py()


def _raise(message: str, k: int, column: str, values: pa.ChunkedArray, lines: np.ndarray,
           source: str) -> None:
    raise RatingsFormatError(message, path=source, line=int(lines[k]), column=column,
                             value=values[k].as_py())


def _ids(values: pa.ChunkedArray, role: str, lines: np.ndarray, source: str) -> np.ndarray:
    """Raw ids as ``int64`` when all are canonical integers (fast factorisation), else ``str``."""
    if pa.types.is_integer(values.type):
        k = _fail_at(pc.is_valid(values))
        if k >= 0:
            _raise(f"{role} id is empty", k, role, values, lines, source)
        return _writable(values.to_numpy().astype(np.int64, copy=False))
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        values = pc.cast(values, pa.string())
    k = _fail_at(pc.not_equal(values, ""))
    if k >= 0:
        _raise(f"{role} id is empty", k, role, values, lines, source)
    if pc.all(pc.match_substring_regex(values, _CANONICAL_INT)).as_py():
        return _writable(pc.cast(values, pa.int64()).to_numpy())
    return values.to_numpy(zero_copy_only=False).astype(object)


def _ratings(values: pa.ChunkedArray, lines: np.ndarray, source: str, role: str = "rating") -> np.ndarray:
    """Ratings (or implicit weights, ``role="weight"``) as ``float64 [n]``; any scale, every
    value finite."""
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        k = _fail_at(pc.match_substring_regex(values, _NUMBER))
        if k >= 0:
            text = values[k].as_py()
            if text == "":
                message = f"{role} is empty"
            elif _is_number(text):
                message = f"{role} is NaN or infinite"
            else:
                message = f"{role} is not a number"
            _raise(message, k, role, values, lines, source)
    elif not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise RatingsFormatError(f"{role} column has type {values.type}, not numbers",
                                 path=source, column=role)
    numbers = pc.cast(values, pa.float64())
    k = _fail_at(pc.is_valid(numbers))
    if k >= 0:
        _raise(f"{role} is empty", k, role, values, lines, source)
    k = _fail_at(pc.is_finite(numbers))
    if k >= 0:
        _raise(f"{role} is NaN or infinite", k, role, values, lines, source)
    return _writable(numbers.to_numpy())


def _timestamps(values: pa.ChunkedArray, lines: np.ndarray, source: str) -> np.ndarray:
    """Timestamps as ``int64 [n]`` seconds."""
    if pa.types.is_timestamp(values.type):
        values = pc.cast(pc.cast(values, pa.timestamp("s"), safe=False), pa.int64())
    elif pa.types.is_date(values.type):
        values = pc.cast(pc.cast(values, pa.timestamp("s")), pa.int64())
    k = _fail_at(pc.is_valid(values))
    if k >= 0:
        _raise("timestamp is empty", k, "timestamp", values, lines, source)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        k = _fail_at(pc.match_substring_regex(values, _INTEGER))
        if k >= 0:
            _raise("timestamp is not an integer", k, "timestamp", values, lines, source)
    elif pa.types.is_floating(values.type):
        k = _fail_at(pc.equal(values, pc.round(values)))
        if k >= 0:
            _raise("timestamp is not an integer", k, "timestamp", values, lines, source)
    elif not pa.types.is_integer(values.type):
        raise RatingsFormatError(f"timestamp column has type {values.type}, not integers",
                                 path=source, column="timestamp")
    try:
        return _writable(pc.cast(values, pa.int64()).to_numpy())
    except pa.ArrowInvalid as exc:
        raise RatingsFormatError(f"timestamp does not fit in 64 bits: {exc}", path=source,
                                 column="timestamp") from None
