"""Builtin datasets: where to download them, their checksums, and how to load them.

A dataset lives in ``<data home>/<folder>/`` (see `recsys.datasets.home.data_home`). Files
found there are trusted after a size check; a download is verified against the SHA-256 of
every member before any file is moved into place, so the folder never holds a partial or
corrupt copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from recsys.datasets.home import ENV_VAR
from recsys.datasets.home import data_home as resolve_data_home
from recsys.datasets.readers import read_ratings
from recsys.errors import ChecksumError, DatasetNotFoundError
from recsys.ratings import Ratings

DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteArchive:
    """A zip file to download and the members to extract from it.

    ``members`` maps a member's path inside the dataset folder (the archive's single top-level
    folder stripped) to its SHA-256 hex digest; ``sizes`` to its size in bytes, the cheap check
    for files already on disk.
    """

    url: str
    filename: str
    members: Mapping[str, str]
    sizes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BuiltinDataset:
    """How to read one builtin dataset once its archive is extracted into ``folder``."""

    name: str
    folder: str
    archive: RemoteArchive
    ratings_file: str
    sep: str
    columns: tuple[str, ...]
    rating_scale: tuple[float, float]
    splits: Mapping[str, tuple[str, str]]
    """Canonical fold name -> (train file, test file)."""
    titles_file: str | None = None
    titles_encoding: str = "utf-8"
    citation: str = ""


_ML100K_FILES = {
    "README": ("4883b8cf340ed0059971b33f56ad3adc88a40792108ebca3d24aafc4c82e8b52", 6750),
    "u.data": ("f4555b8e3a89b4068229ae5c8ca7eaa12c27fd3b0a38a2fbc0b58789d228438e", 1979173),
    "u.item": ("553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701", 236344),
    "u.user": ("f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c", 22628),
    "u.genre": ("9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb", 202),
    "u.info": ("5b0a40b2e47a729ee6203063f6dcf8790c2e63f5a18663e6ee318a72c5f3c27b", 36),
    "u.occupation": ("cd5fbec9afe345d993a62fc7817df1a4a9079c4feb267b3118763b8fd942137d", 193),
    "u1.base": ("ce253ec86c448b44fb3ba9a30d12dcfc2e9210cbde71efada3730c22e9ac212a", 1586544),
    "u1.test": ("18c6014a4b2c7324f250a63f8904a7b16b2b19f911129e346141507b0cbac950", 392629),
    "u2.base": ("6c06f0b5df4b256da1a994f3ac66edc8da4d3f09bc9282df6b14d893366d703e", 1583948),
    "u2.test": ("4de658d1e04ed9104629509a2e2528fce833ac8e048280183f1df167632038c3", 395225),
    "u3.base": ("afdc155c291c6edc41c0407e39d7462eb98d341e064f0b0a12175b80b3c4af5d", 1582546),
    "u3.test": ("0f548b51c78327de4c156461d3e430b7e5579fe2b5681586a59416e48fd35f6d", 396627),
    "u4.base": ("219f0f4d40dfe9c5141d425f53fa91ee23ed275f14e280bbf1b50117afb064ca", 1581878),
    "u4.test": ("7c02ad0a1e7ab1083c8b9d4b627203a051dd7b5eab46d99fa44de33470de8db9", 397295),
    "u5.base": ("a9574e59ce961eec2121627760b6e9b0974ce1637b3fe69ac32cb14a4bfab485", 1581776),
    "u5.test": ("351cc52e0d15b6c721466276fc24671d40936899e3d01fadeaf312915b8c5634", 397397),
    "ua.base": ("67b5bcdb380c29f85d56a012ecd88612ae020f30a6730d117a334ee8203b91f2", 1792501),
    "ua.test": ("d0497e202417720f57a184ec8c66be2d1afa4ff41bb53787c57b28d6bf79bc42", 186672),
    "ub.base": ("237254d253b6ad7de84f919d041055428646254f34ed8f562703c899430cd881", 1792476),
    "ub.test": ("d54a72d05730d5892062734b2bec73e976f9b713d18c828a18b968d6cce442da", 186697),
}

ML_100K = BuiltinDataset(
    name="ml-100k",
    folder="ml-100k",
    archive=RemoteArchive(
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        filename="ml-100k.zip",
        members={name: digest for name, (digest, _) in _ML100K_FILES.items()},
        sizes={name: size for name, (_, size) in _ML100K_FILES.items()},
    ),
    ratings_file="u.data",
    sep="\t",
    columns=("user", "item", "rating", "timestamp"),
    rating_scale=(1.0, 5.0),
    splits={f"u{k}": (f"u{k}.base", f"u{k}.test") for k in range(1, 6)}
    | {s: (f"{s}.base", f"{s}.test") for s in ("ua", "ub")},
    titles_file="u.item",
    titles_encoding="latin-1",
    citation=("F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History "
              "and Context. ACM Transactions on Interactive Intelligent Systems (TiiS) 5, 4, "
              "Article 19. https://doi.org/10.1145/2827872"),
)

REGISTRY: dict[str, BuiltinDataset] = {ML_100K.name: ML_100K}


def available_datasets() -> list[str]:
    """Names of the builtin datasets."""
    return sorted(REGISTRY)


def dataset_splits(name: str) -> list[str]:
    """Canonical fold names of a builtin dataset, e.g. ``["u1", ..., "u5", "ua", "ub"]``."""
    return list(_dataset(name).splits)


def _dataset(name: str) -> BuiltinDataset:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; builtin datasets are {', '.join(available_datasets())}"
        ) from None


# --------------------------------------------------------------------------- fetching
def fetch_dataset(
    name: str,
    files: list[str] | None = None,
    *,
    data_home: str | Path | None = None,
    download: bool = True,
    verify: bool = False,
) -> Path:
    """The folder holding dataset ``name``'s ``files`` (default: all members), downloading
    the archive when one is missing or has the wrong size.

    Raises:
        DatasetNotFoundError: a file is missing and cannot be downloaded.
        ChecksumError: a downloaded file (or, with ``verify``, any file) has the wrong SHA-256.
    """
    ds = _dataset(name)
    archive = ds.archive
    files = list(archive.members) if files is None else files
    home = resolve_data_home(data_home)
    folder = home / ds.folder
    missing = [f for f in files if not _looks_complete(folder / f, archive.sizes.get(f))]
    if missing:
        if not download:
            raise DatasetNotFoundError(_not_found(ds, folder, missing, "downloading is disabled "
                                                  "(download=False)"))
        try:
            _download_and_extract(ds, folder)
        except ChecksumError:
            raise
        except OSError as exc:  # URLError, timeouts, unwritable data home
            raise DatasetNotFoundError(
                _not_found(ds, folder, missing, f"downloading {archive.url} failed: {exc}")
            ) from exc
    elif verify:
        for f in files:
            _check_digest(folder / f, archive.members[f], archive.url)
    return folder


def _looks_complete(path: Path, size: int | None) -> bool:
    try:
        return path.stat().st_size == size if size is not None else path.is_file()
    except OSError:
        return False


def _not_found(ds: BuiltinDataset, folder: Path, missing: list[str], why: str) -> str:
    return (
        f"dataset {ds.name!r} not found: {folder / missing[0]} is missing or incomplete"
        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, and {why}. "
        f"To fix: set {ENV_VAR} (or pass data_home=) to a folder containing {ds.folder}/ with "
        f"the extracted files of {ds.archive.url}, or go online and retry with download=True."
    )


def _download(url: str, dest: Path) -> None:
    """Copy ``url`` to ``dest`` with a progress bar (``OSError`` when offline)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {Path(url).name}",
                  leave=False) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))


def _download_and_extract(ds: BuiltinDataset, folder: Path) -> None:
    """Download the archive into a temporary folder beside ``folder``, verify every member,
    then move each one into place (``os.replace``: a reader never sees a partial file)."""
    archive = ds.archive
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{ds.folder}-", dir=folder.parent) as tmp:
        zip_path = Path(tmp) / archive.filename
        _download(archive.url, zip_path)
        staged = Path(tmp) / "extracted"
        _extract_members(zip_path, archive, staged)
        for member, digest in archive.members.items():
            _check_digest(staged / member, digest, archive.url)
        folder.mkdir(exist_ok=True)
        for member in archive.members:
            (folder / member).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / member, folder / member)


def _extract_members(zip_path: Path, archive: RemoteArchive, dest: Path) -> None:
    """Extract the listed members (and nothing else) from the zip's single top folder."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise ChecksumError(f"{archive.url} did not download as a zip file: {exc}") from None
    with zf:
        by_name = {}
        for info in zf.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            by_name["/".join(parts[1:]) if len(parts) > 1 else parts[0]] = info
        for member in archive.members:
            info = by_name.get(member)
            if info is None:
                raise ChecksumError(f"{archive.url}: the archive lacks the expected file {member!r}")
            target = dest / member
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_digest(path: Path, expected: str, url: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"{path.name}: SHA-256 {actual} does not match the expected {expected} "
            f"(corrupt or changed download of {url}); delete it and retry"
        )


# --------------------------------------------------------------------------- loading
def load_dataset(
    name: str = "ml-100k",
    *,
    data_home: str | Path | None = None,
    download: bool = True,
    verify: bool = False,
) -> Ratings:
    """All ratings of a builtin dataset, with item titles attached when it has them."""
    ds = _dataset(name)
    folder = fetch_dataset(name, _needed(ds), data_home=data_home, download=download,
                           verify=verify)
    return _with_titles(_read(ds, folder / ds.ratings_file), ds, folder)


def load_split(
    name: str,
    split: str,
    *,
    data_home: str | Path | None = None,
    download: bool = True,
    verify: bool = False,
) -> tuple[Ratings, Ratings]:
    """A canonical ``(train, test)`` fold, e.g. ``load_split("ml-100k", "u1")``.

    Both parts share the id maps of the full dataset, so index ``i`` is the same user (item)
    in every fold of the dataset and in `load_dataset`.
    """
    ds = _dataset(name)
    if split not in ds.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; valid splits are "
                         f"{', '.join(ds.splits)}")
    train_file, test_file = ds.splits[split]
    folder = fetch_dataset(name, [*_needed(ds), train_file, test_file], data_home=data_home,
                           download=download, verify=verify)
    full = _read(ds, folder / ds.ratings_file)
    maps = {"user_ids": full.user_ids, "item_ids": full.item_ids}
    train = _read(ds, folder / train_file, **maps)
    test = _read(ds, folder / test_file, **maps)
    return _with_titles(train, ds, folder), _with_titles(test, ds, folder)


def item_titles(name: str, data_home: str | Path | None = None) -> dict[str, str]:
    """Raw item id -> title (e.g. ``"1"`` -> ``"Toy Story (1995)"``); empty when the dataset
    has no titles."""
    ds = _dataset(name)
    if ds.titles_file is None:
        return {}
    folder = fetch_dataset(name, [ds.titles_file], data_home=data_home)
    return _read_titles(folder / ds.titles_file, ds.titles_encoding)


def _needed(ds: BuiltinDataset) -> list[str]:
    return [ds.ratings_file] + ([ds.titles_file] if ds.titles_file else [])


def _read(ds: BuiltinDataset, path: Path, **maps) -> Ratings:
    return read_ratings(path, sep=ds.sep, columns=ds.columns, header=False,
                        rating_scale=ds.rating_scale, **maps)


def _with_titles(ratings: Ratings, ds: BuiltinDataset, folder: Path) -> Ratings:
    if ds.titles_file is None:
        return ratings
    return dataclasses.replace(ratings,
                               item_titles=_read_titles(folder / ds.titles_file, ds.titles_encoding))


def _read_titles(path: Path, encoding: str) -> dict[str, str]:
    """``id|title|...`` lines (MovieLens ``u.item``) as id -> title."""
    titles = {}
    for line in path.read_text(encoding=encoding).splitlines():
        parts = line.split("|", 2)
        if len(parts) >= 2 and parts[0].strip():
            titles[parts[0].strip()] = parts[1].strip()
    return titles
