"""Builtin datasets: data home, download, checksums, offline errors, and MovieLens-100K folds.

Integration tests read ml-100k from ``$RECSYS_DATA`` and skip when it is not there; the
download tests use a tiny fake archive served from a ``file://`` URL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import platformdirs
import pytest

from recsys.datasets import (
    available_datasets,
    builtin,
    data_home,
    dataset_splits,
    fetch_dataset,
    item_titles,
    load_dataset,
    load_split,
)
from recsys.datasets.builtin import ML_100K, RemoteArchive
from recsys.errors import ChecksumError, DatasetNotFoundError


def _ml100k_home() -> Path | None:
    home = os.environ.get("RECSYS_DATA")
    if home and (Path(home) / "ml-100k" / "u.data").is_file():
        return Path(home)
    return None


requires_ml100k = pytest.mark.skipif(
    _ml100k_home() is None,
    reason="MovieLens-100K not in the data home: set RECSYS_DATA to a folder holding ml-100k/ "
           "(see data/README.md)",
)


# --------------------------------------------------------------------------- data home
def test_data_home_order(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_DATA", str(tmp_path / "env"))
    assert data_home(tmp_path / "explicit") == tmp_path / "explicit"
    assert (tmp_path / "explicit").is_dir()
    assert data_home() == tmp_path / "env" and (tmp_path / "env").is_dir()
    monkeypatch.delenv("RECSYS_DATA")
    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda app: str(tmp_path / "cache" / app))
    assert data_home() == tmp_path / "cache" / "recsys"


def test_registry_lists_ml100k_and_its_folds():
    assert "ml-100k" in available_datasets()
    assert dataset_splits("ml-100k") == ["u1", "u2", "u3", "u4", "u5", "ua", "ub"]
    with pytest.raises(ValueError, match="builtin datasets are .*ml-100k"):
        dataset_splits("ml-1b")


def test_unknown_split_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid splits are u1, u2, u3, u4, u5, ua, ub"):
        load_split("ml-100k", "u6", data_home=tmp_path)


# --------------------------------------------------------------------------- offline
def test_offline_error_says_where_it_looked_and_how_to_fix(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(builtin, "_download", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("ml-100k", data_home=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "ml-100k" / "u.data") in message
    assert "RECSYS_DATA" in message and "no network" in message and "online" in message
    assert not (tmp_path / "ml-100k").exists()


def test_download_false_does_not_download(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "_download", lambda url, dest: pytest.fail("downloaded"))
    with pytest.raises(DatasetNotFoundError, match="download=False"):
        load_split("ml-100k", "u1", data_home=tmp_path, download=False)


# --------------------------------------------------------------------------- fake archive
FAKE_FILES = {
    "r.data": "1\t10\t5\t100\n2\t10\t3\t200\n2\t20\t4\t300\n3\t30\t1\t400\n",
    "s1.base": "1\t10\t5\t100\n2\t10\t3\t200\n",
    "s1.test": "2\t20\t4\t300\n",
    "titles": "10|Ten (1990)|x\n20|Twenty|y\n30|Caf\xe9|z\n",
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Registers dataset ``fake``: a zip (top folder ``fake-v1/``) behind a file:// URL."""
    blobs = {name: text.encode("latin-1") for name, text in FAKE_FILES.items()}
    zip_path = tmp_path / "server" / "fake.zip"
    zip_path.parent.mkdir()
    with zipfile.ZipFile(zip_path, "w") as zf:
        for name, blob in blobs.items():
            zf.writestr(f"fake-v1/{name}", blob)
        zf.writestr("fake-v1/extra.txt", "not listed, not extracted")
    archive = RemoteArchive(url=zip_path.as_uri(), filename="fake.zip",
                            members={n: sha(b) for n, b in blobs.items()},
                            sizes={n: len(b) for n, b in blobs.items()})
    ds = dataclasses.replace(ML_100K, name="fake", folder="fake", archive=archive,
                             ratings_file="r.data", splits={"s1": ("s1.base", "s1.test")},
                             titles_file="titles")
    monkeypatch.setitem(builtin.REGISTRY, "fake", ds)
    return ds


def test_download_extracts_verifies_and_loads(tmp_path, fake):
    home = tmp_path / "home"
    train, test = load_split("fake", "s1", data_home=home)
    assert sorted(p.name for p in (home / "fake").iterdir()) == sorted(FAKE_FILES)
    assert not [p for p in home.iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert (len(train), len(test)) == (2, 1)
    assert train.user_ids is test.user_ids and train.n_users == 3 and test.n_items == 3
    assert test.title("20") == "Twenty" and item_titles("fake", data_home=home)["30"] == "Caf\xe9"


def test_checksum_mismatch_names_file_and_both_hashes(tmp_path, fake, monkeypatch):
    wrong = "0" * 64
    archive = dataclasses.replace(fake.archive, members={**fake.archive.members, "s1.test": wrong})
    monkeypatch.setitem(builtin.REGISTRY, "fake", dataclasses.replace(fake, archive=archive))
    home = tmp_path / "home"
    with pytest.raises(ChecksumError) as info:
        load_dataset("fake", data_home=home)
    message = str(info.value)
    assert "s1.test" in message and wrong in message
    assert sha(FAKE_FILES["s1.test"].encode()) in message
    assert not (home / "fake").exists()  # nothing half-installed


def test_archive_lacking_a_member_is_a_checksum_error(tmp_path, fake, monkeypatch):
    archive = dataclasses.replace(fake.archive, members={**fake.archive.members, "gone": "0" * 64})
    monkeypatch.setitem(builtin.REGISTRY, "fake", dataclasses.replace(fake, archive=archive))
    with pytest.raises(ChecksumError, match="lacks the expected file 'gone'"):
        fetch_dataset("fake", data_home=tmp_path / "home")


def test_present_files_trusted_by_size_verified_on_request(tmp_path, fake, monkeypatch):
    home = tmp_path / "home"
    fetch_dataset("fake", data_home=home)
    monkeypatch.setattr(builtin, "_download", lambda url, dest: pytest.fail("downloaded again"))
    path = home / "fake" / "r.data"
    path.write_bytes(path.read_bytes().replace(b"\t5\t", b"\t4\t"))  # same size, other content
    assert 4.0 in load_dataset("fake", data_home=home).values
    with pytest.raises(ChecksumError, match="r.data"):
        load_dataset("fake", data_home=home, verify=True)


def test_file_of_wrong_size_is_downloaded_again(tmp_path, fake):
    home = tmp_path / "home"
    fetch_dataset("fake", data_home=home)
    (home / "fake" / "s1.test").write_text("truncated")
    train, test = load_split("fake", "s1", data_home=home)
    assert len(test) == 1


# --------------------------------------------------------------------------- MovieLens-100K
@pytest.mark.integration
@requires_ml100k
def test_ml100k_all_ratings():
    r = load_dataset("ml-100k")
    assert (len(r), r.n_users, r.n_items) == (100_000, 943, 1682)
    assert r.rating_scale == (1.0, 5.0) and r.timestamps is not None
    assert r.title("1") == "Toy Story (1995)"
    assert set(np.unique(r.values)) == {1.0, 2.0, 3.0, 4.0, 5.0}


@pytest.mark.integration
@requires_ml100k
def test_ml100k_u1_shares_the_full_maps():
    full = load_dataset("ml-100k")
    train, test = load_split("ml-100k", "u1")
    assert (len(train), len(test)) == (80_000, 20_000)
    assert train.user_ids is test.user_ids and train.item_ids is test.item_ids
    assert train.user_ids == full.user_ids and train.item_ids == full.item_ids
    assert train.title("1") == test.title("1") == "Toy Story (1995)"


@pytest.mark.integration
@requires_ml100k
@pytest.mark.parametrize("split", ["u2", "u5", "ua", "ub"])
def test_ml100k_every_fold_indexes_the_same_users(split):
    u1_train, _ = load_split("ml-100k", "u1")
    train, test = load_split("ml-100k", split)
    assert len(train) + len(test) == 100_000
    assert (train.n_users, train.n_items) == (943, 1682)
    assert train.user_ids.raw(10) == u1_train.user_ids.raw(10) == "11"


@pytest.mark.integration
@requires_ml100k
def test_ml100k_titles_and_checksums():
    titles = item_titles("ml-100k")
    assert len(titles) == 1682 and titles["1"] == "Toy Story (1995)"
    fetch_dataset("ml-100k", download=False, verify=True)
