"""read_ratings: separators, headers, column specs, scales, Parquet, and exact error locations."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.datasets import WHITESPACE, read_ratings
from recsys.datasets.readers import ColumnSpec, sniff_separator
from recsys.errors import DuplicateRatingsWarning, RatingsFormatError
from recsys.ratings import IdMap


def write(tmp_path: Path, text: str, name: str = "r.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def raw(r, k: int) -> tuple[str, str, float]:
    return r.user_ids.raw(r.users[k]), r.item_ids.raw(r.items[k]), float(r.values[k])


def format_error(path: Path, **kwargs) -> RatingsFormatError:
    with pytest.raises(RatingsFormatError) as info:
        read_ratings(path, **kwargs)
    assert info.value.path == str(path)
    return info.value


# --------------------------------------------------------------------------- happy paths
@pytest.mark.parametrize("sep", ["\t", ",", "::", "|", ";"])
def test_separator_is_sniffed(tmp_path, sep):
    path = write(tmp_path, sep.join(["1", "10", "4", "100"]) + "\n" + sep.join(["2", "20", "3", "50"]) + "\n")
    r = read_ratings(path, columns=("user", "item", "rating", "timestamp"))
    assert [raw(r, 0), raw(r, 1)] == [("1", "10", 4.0), ("2", "20", 3.0)]
    assert list(r.timestamps) == [100, 50]
    assert r.timestamps.flags.writeable and r.users.flags.writeable  # torch.from_numpy needs it


def test_whitespace_runs_are_sniffed_and_can_be_given():
    assert sniff_separator("1   2\t3") == "\t"
    assert sniff_separator("1   2 3") == WHITESPACE


def test_whitespace_separated_file(tmp_path):
    path = write(tmp_path, "  1   10  4\n2 20      3.5\n")
    r = read_ratings(path)
    assert raw(r, 1) == ("2", "20", 3.5)


def test_explicit_separator_and_trailing_columns_ignored(tmp_path):
    path = write(tmp_path, "1;10;4;x;y\n2;20;3;x;y\n")
    r = read_ratings(path, sep=";")
    assert len(r) == 2 and r.timestamps is None


def test_header_is_detected(tmp_path):
    path = write(tmp_path, "user,item,rating\n1,10,4\n2,20,3\n")
    assert len(read_ratings(path)) == 2
    assert len(read_ratings(path, header=True)) == 2
    err = format_error(path, header=False)
    assert (err.line, err.column, err.value) == (1, "rating", "rating")
    assert "not a number" in str(err)


def test_header_names_as_spec_string_mapping_or_sequence(tmp_path):
    path = write(tmp_path, "ts,movieId,userId,rating\n100,10,1,4.5\n200,20,2,3\n")
    for columns in ("user=userId,item=movieId,rating=rating,timestamp=ts",
                    {"user": "userId", "item": "movieId", "rating": "rating", "timestamp": "ts"},
                    ("userId", "movieId", "rating", "ts")):
        r = read_ratings(path, columns=columns)
        assert raw(r, 0) == ("1", "10", 4.5)
        assert list(r.timestamps) == [100, 200]


def test_roles_skip_columns_with_underscore(tmp_path):
    path = write(tmp_path, "x|1|y|10|4\nx|2|y|20|5\n")
    r = read_ratings(path, columns="_,user,skip,item,rating")
    assert raw(r, 1) == ("2", "20", 5.0)


def test_string_ids_quotes_and_crlf(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b'alice,"The Matrix",5\r\nbob,Alien,2.5\r\n\r\n')
    r = read_ratings(path)
    assert sorted(r.user_ids.raw_ids) == ["alice", "bob"]
    assert r.title("x") is None
    assert {raw(r, k) for k in range(2)} == {("alice", "The Matrix", 5.0), ("bob", "Alien", 2.5)}


def test_integer_ids_keep_numeric_order(tmp_path):
    path = write(tmp_path, "10\t1\t1\n2\t1\t1\n9\t1\t2\n")
    assert list(read_ratings(path).user_ids.raw_ids) == ["2", "9", "10"]


def test_leading_zero_ids_keep_their_spelling(tmp_path):
    path = write(tmp_path, "007\t1\t1\n7\t1\t2\n")
    assert set(read_ratings(path).user_ids.raw_ids) == {"007", "7"}


@pytest.mark.parametrize(("text", "scale"), [
    ("1,1,0.5\n1,2,5\n2,1,3.5\n", (0.5, 5.0)),
    ("1,1,0\n1,2,10\n2,1,7\n", (0.0, 10.0)),
    ("1,1,-3\n1,2,3\n2,1,0\n", (-3.0, 3.0)),
])
def test_any_scale_defaults_to_observed_range(tmp_path, text, scale):
    assert read_ratings(write(tmp_path, text)).rating_scale == scale


def test_explicit_rating_scale(tmp_path):
    r = read_ratings(write(tmp_path, "1,1,2\n1,2,3\n"), rating_scale=(1, 5))
    assert r.rating_scale == (1.0, 5.0)


def test_given_id_maps_are_used(tmp_path):
    users, items = IdMap(["a", "b", "c"]), IdMap(["x", "y"])
    r = read_ratings(write(tmp_path, "c,y,4\n"), user_ids=users, item_ids=items)
    assert r.user_ids is users and r.item_ids is items
    assert (int(r.users[0]), int(r.items[0])) == (2, 1)


def test_duplicates_warn_with_their_count(tmp_path):
    path = write(tmp_path, "1,1,1,10\n1,1,5,30\n2,1,3,1\n1,1,2,20\n")
    with pytest.warns(DuplicateRatingsWarning, match="2 duplicate") as record:
        r = read_ratings(path, columns="user,item,rating,timestamp")
    assert len(record) == 1 and str(path) in str(record[0].message)
    assert len(r) == 2 and 5.0 in r.values


def test_parquet_round_trip(tmp_path):
    frame = pd.DataFrame({"userId": ["a", "b", "a"], "movieId": [10, 20, 20],
                          "rating": [4.5, 3.0, 1.0], "ts": [3, 2, 1]})
    path = tmp_path / "r.parquet"
    frame.to_parquet(path)
    r = read_ratings(path, columns="user=userId,item=movieId,rating=rating,timestamp=ts")
    back = r.to_frame().sort_values(["user", "item"]).reset_index(drop=True)
    assert back["user"].tolist() == ["a", "a", "b"]
    assert back["item"].tolist() == ["10", "20", "20"]
    assert back["rating"].tolist() == [4.5, 1.0, 3.0]
    assert sorted(back["timestamp"]) == [1, 2, 3]
    positional = read_ratings(path, columns="user,item,rating,timestamp")
    assert np.array_equal(positional.values, r.values)


def test_parquet_null_rating_names_its_row(tmp_path):
    path = tmp_path / "r.pq"
    pd.DataFrame({"u": [1, 2, 3], "i": [1, 1, 1], "r": [1.0, None, 2.0]}).to_parquet(path)
    err = format_error(path)
    assert (err.line, err.column) == (2, "rating")
    assert "empty" in str(err)


def test_large_file_loads_vectorised(tmp_path):
    n = 200_000
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"u": np.arange(n) % 5000, "i": np.arange(n) // 5000,
                          "r": rng.integers(1, 6, n), "t": rng.integers(0, 10**9, n)})
    path = tmp_path / "big.tsv"
    frame.to_csv(path, sep="\t", header=False, index=False)
    r = read_ratings(path, columns="user,item,rating,timestamp")
    assert len(r) == n and r.n_users == 5000 and r.n_items == 40


# --------------------------------------------------------------------------- errors
def test_malformed_line_counts_blank_lines_and_header(tmp_path):
    path = write(tmp_path, "u,i,r\n1,1,4\n\n2,1,3\n3,1\n4,1,2\n")
    err = format_error(path)
    assert err.line == 5 and err.value == "3,1"
    assert "expected 3 fields" in str(err) and "found 2" in str(err)
    assert f"{path}, line 5" in str(err)


def test_too_many_fields(tmp_path):
    err = format_error(write(tmp_path, "1\t1\t4\n2\t1\t3\t9\n"))
    assert err.line == 2 and "found 4" in str(err)


def test_first_line_shorter_than_columns(tmp_path):
    err = format_error(write(tmp_path, "1,1,4\n"), columns="user,item,rating,timestamp")
    assert err.line == 1 and "at least 4 fields" in str(err)


@pytest.mark.parametrize(("bad", "message"), [
    ("abc", "rating is not a number"),
    ("", "rating is empty"),
    ("nan", "rating is NaN or infinite"),
    ("NaN", "rating is NaN or infinite"),
    ("inf", "rating is NaN or infinite"),
    ("1e999", "rating is NaN or infinite"),
])
def test_bad_rating_names_line_column_and_value(tmp_path, bad, message):
    path = write(tmp_path, f"user,item,rating\n1,1,4\n2,2,{bad}\n3,3,1\n")
    err = format_error(path)
    assert (err.line, err.column, err.value) == (3, "rating", bad)
    assert message in str(err)


@pytest.mark.parametrize("bad", ["12.5", "abc", ""])
def test_non_integer_timestamp(tmp_path, bad):
    path = write(tmp_path, f"1\t1\t4\t100\n\n2\t1\t3\t{bad}\n")
    err = format_error(path, columns="user,item,rating,timestamp")
    assert (err.line, err.column, err.value) == (3, "timestamp", bad)


def test_empty_id(tmp_path):
    err = format_error(write(tmp_path, "1,1,4\n,2,3\n"))
    assert (err.line, err.column) == (2, "user") and "user id is empty" in str(err)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path, text):
    err = format_error(write(tmp_path, text))
    assert "no ratings" in str(err)


def test_header_only(tmp_path):
    err = format_error(write(tmp_path, "user,item,rating\n"))
    assert err.line == 2 and "no ratings after the header" in str(err)


def test_missing_header_column_lists_what_it_has(tmp_path):
    path = write(tmp_path, "userId,movieId,score\n1,1,4\n")
    err = format_error(path, columns="user=userId,item=movieId,rating=rating")
    assert (err.line, err.column) == (1, "rating")
    assert "'userId', 'movieId', 'score'" in str(err)


def test_header_names_need_a_header(tmp_path):
    with pytest.raises(ValueError, match="header"):
        read_ratings(write(tmp_path, "1,1,4\n"), columns="user=a,item=b,rating=c", header=False)


@pytest.mark.parametrize("columns", ["item,rating", "user,user,item,rating", "who=a,item=b,rating=c",
                                     ("a", "b"), "user,item,rating,weight"])
def test_bad_column_specs(columns):
    with pytest.raises(ValueError):
        ColumnSpec.parse(columns)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_ratings(tmp_path / "absent.csv")


def test_no_warning_for_clean_file(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_ratings(write(tmp_path, "1,1,4\n1,2,3\n"))


def test_trailing_skip_columns_may_be_absent(tmp_path):
    r = read_ratings(write(tmp_path, "1,2,4\n2,3,5\n"), columns="user,item,rating,_")
    assert len(r) == 2
