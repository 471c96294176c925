"""Top-N recommendation as users meet it: implicit-feedback files, the ranking splits, the
ranking metrics against hand-computed lists, the command line end to end with a ranker, and
the service whose recommendations come from the ranking model (with the predicted rating
beside each item, popularity for a user with no interaction, fold-in of ingested ratings)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from api.app import Settings, create_app
from recsys.artefact import load_artefact, save_artefact
from recsys.cli import main
from recsys.datasets import ColumnSpec, read_ratings
from recsys.errors import RatingsFormatError
from recsys.evaluate import evaluate_ranking
from recsys.models import DEFAULT_RANKER, MODELS, build_model, model_task, ranking_models
from recsys.models.base import RankingModel
from recsys.ratings import Ratings
from recsys.recommender import NoRatingModelError, Recommender
from recsys.splits import parse_split, random_leave_k_out, temporal_leave_k_out
from recsys.store import NewRating
from recsys.train import TrainConfig, Trainer
from tests.conftest import require_ml100k

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def two_tastes(seed: int = 3, explicit: bool = False) -> Ratings:
    """60 users of two tastes: users 0-23 choose mostly items 0-9, users 24-59 mostly items
    10-19 (the more popular taste); implicit (value 1) or explicit (own taste rated 4-5, the
    other 1-2). Raw ids ``u<n>`` and ``i<n>``, timestamps."""
    rng = np.random.default_rng(seed)
    users, items, values = [], [], []
    for u in range(60):
        own, other = (np.arange(10), np.arange(10, 20)) if u < 24 else (np.arange(10, 20), np.arange(10))
        mine = rng.choice(own, size=6, replace=False)
        theirs = rng.choice(other, size=1)
        users += [f"u{u}"] * 7
        items += [f"i{i}" for i in (*mine, *theirs)]
        values += [float(rng.integers(4, 6)) for _ in mine] + [float(rng.integers(1, 3))]
    values_arr = np.asarray(values) if explicit else np.ones(len(values))
    return Ratings.from_arrays(users, items, values_arr, np.arange(len(users)) * 10,
                               rating_scale=(1.0, 5.0) if explicit else (0.0, 1.0))


def taste(first: int, last: int) -> set[str]:
    """Raw ids of items ``first..last-1``."""
    return {f"i{i}" for i in range(first, last)}


# =========================================================================== implicit input
def write(tmp_path, text: str, name: str = "clicks.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_file_with_no_rating_column_is_implicit_feedback_of_value_one(tmp_path):
    path = write(tmp_path, "user,item,timestamp\nann,x,100\nann,y,200\nbob,x,150\n")
    r = read_ratings(path, columns="user,item,timestamp")
    assert len(r) == 3 and r.values.tolist() == [1.0, 1.0, 1.0]
    assert r.rating_scale == (0.0, 1.0)  # "no interaction" to "interaction"
    assert sorted(r.timestamps.tolist()) == [100, 150, 200]
    assert ColumnSpec.parse("user,item,timestamp").implicit and not ColumnSpec.parse("user,item,rating").implicit


def test_user_item_pairs_alone_with_and_without_a_header(tmp_path):
    plain = read_ratings(write(tmp_path, "1,10\n1,11\n2,10\n"), columns="user,item")
    with_header = read_ratings(write(tmp_path, "userId,movieId\n1,10\n1,11\n2,10\n", "h.csv"), columns="user,item")
    for r in (plain, with_header):
        assert len(r) == 3 and set(r.user_ids.raw_ids) == {"1", "2"} and r.values.tolist() == [1.0] * 3
    by_name = read_ratings(write(tmp_path, "userId,movieId,ts\n1,10,5\n", "n.csv"), columns="user=userId,item=movieId")
    assert len(by_name) == 1 and by_name.timestamps is None


def test_a_weight_column_gives_interactions_their_strength(tmp_path):
    r = read_ratings(write(tmp_path, "a,x,3\na,y,0.5\nb,x,7\n"), columns="user,item,weight")
    assert sorted(r.values.tolist()) == [0.5, 3.0, 7.0] and r.rating_scale == (0.0, 7.0)
    err = pytest.raises(RatingsFormatError, read_ratings, write(tmp_path, "a,x,3\nb,y,-1\n", "neg.csv"),
                        columns="user,item,weight").value
    assert (err.line, err.column) == (2, "weight") and "negative" in str(err)
    err = pytest.raises(RatingsFormatError, read_ratings, write(tmp_path, "a,x,3\nb,y,lots\n", "nan.csv"),
                        columns="user,item,weight").value
    assert "weight is not a number" in str(err)


@pytest.mark.parametrize("columns", ["user,item,rating,weight", "item,timestamp", "user=a,item=b,weight=c,rating=d"])
def test_ambiguous_or_incomplete_implicit_specs_are_errors(columns):
    with pytest.raises(ValueError):
        ColumnSpec.parse(columns)


# =========================================================================== ranking splits
def hand_built() -> Ratings:
    """Three users: ``a`` 4 interactions (times 40, 10, 30, 20), ``b`` 2 (both at time 5:
    the later row wins the tie), ``c`` 1."""
    return Ratings.from_arrays(["a", "a", "a", "a", "b", "b", "c"], ["w", "x", "y", "z", "w", "x", "y"],
                               np.ones(7), [40, 10, 30, 20, 5, 5, 7], rating_scale=(0, 1))


def pairs(r: Ratings) -> set[tuple[str, str]]:
    return {(r.user_ids.raw(int(u)), r.item_ids.raw(int(i))) for u, i in zip(r.users, r.items, strict=True)}


def test_temporal_leave_k_out_holds_out_each_user_s_last_k():
    r = hand_built()
    one = temporal_leave_k_out(r, 1)
    assert pairs(one.test) == {("a", "w"), ("b", "x")}  # a's latest (t=40); b's tie: the later row
    assert pairs(one.train) == pairs(r) - pairs(one.test)  # c (one interaction) stays in train
    two = temporal_leave_k_out(r, 2)
    assert pairs(two.test) == {("a", "w"), ("a", "y")}  # b has only 2: wholly in train
    assert one.name == "temporal-leave:1" and parse_split("temporal-leave:2").apply(r).name == "temporal-leave:2"
    with pytest.raises(ValueError, match="timestamps"):
        temporal_leave_k_out(Ratings.from_arrays(["a", "a"], ["x", "y"], [1.0, 1.0]), 1)


def test_random_leave_k_out_is_a_seeded_partition_with_k_per_user():
    r = two_tastes()
    split = random_leave_k_out(r, 2, seed=5)
    assert np.bincount(split.test.users, minlength=r.n_users).tolist() == [2] * r.n_users
    assert pairs(split.train) | pairs(split.test) == pairs(r) and not pairs(split.train) & pairs(split.test)
    again = parse_split("random-leave:2:5").apply(r)
    assert again.name == split.name == "random-leave:2:5" and pairs(again.test) == pairs(split.test)
    assert pairs(random_leave_k_out(r, 2, seed=6).test) != pairs(split.test)
    few = random_leave_k_out(hand_built(), 3, seed=0)
    assert pairs(few.test) <= {("a", i) for i in "wxyz"} and len(few.test) == 3  # b, c: too few


@pytest.mark.parametrize("spec", ["temporal-leave:0", "temporal-leave:1:2", "random-leave:x", "random-leave:1:2:3"])
def test_bad_ranking_split_specs_name_the_grammar(spec):
    with pytest.raises(ValueError, match="temporal-leave:K"):
        parse_split(spec)


# =========================================================================== metrics by hand
class Fixed(RankingModel):
    """A test double: user ``u`` scores item ``i`` as ``scores[u, i]``."""

    name = "fixed-ranker"

    def __init__(self, scores: list[list[float]]) -> None:
        t = torch.tensor(scores, dtype=torch.float32)
        super().__init__(t.shape[0], t.shape[1])
        self.register_buffer("scores", t)

    def fit(self, interactions: Ratings, *, progress: bool | None = None) -> dict:
        self.prepare(interactions)
        return {"fit_seconds": 0.0}

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        return self.scores[users]


def metric_case() -> tuple[Ratings, Ratings, Fixed]:
    """Users 0-2, items 0-5. Train: user 0 item 0, user 1 item 5. Test: user 0 items 2 (5),
    3 (2), 4 (4); user 1 items 0 (4), 1 (5); user 2 item 3 (1)."""
    full = Ratings.from_arrays([0, 1, 0, 0, 0, 1, 1, 2], [0, 5, 2, 3, 4, 0, 1, 3],
                               [5, 5, 5, 2, 4, 4, 5, 1], rating_scale=(1, 5))
    assert full.user_ids.raw_ids.tolist() == ["0", "1", "2"]
    assert full.item_ids.raw_ids.tolist() == ["0", "1", "2", "3", "4", "5"]
    train, test = full.subset(np.arange(2)), full.subset(np.arange(2, 8))
    model = Fixed([[9, 8, 7, 6, 1, 0.5],      # top 3 without item 0: 1, 2, 3
                   [3, 1, 2, 0, -1, 10],      # top 3 without item 5: 0, 2, 1
                   [0.1, 5, 0.2, 4, 0.3, 0.05]])  # top 3: 1, 3, 4
    model.fit(train)
    return train, test, model


def test_ranking_metrics_of_explicit_data_by_hand():
    """Relevant = test rating >= 4. User 0: list 1, 2, 3; relevant {2, 4}: hit at rank 2.
    User 1: list 0, 2, 1; relevant {0, 1}: hits at ranks 1 and 3. User 2: nothing relevant,
    skipped."""
    train, test, model = metric_case()
    m = evaluate_ranking(model, train, test, k=3, relevance_threshold=4.0)
    idcg2 = 1 + 1 / math.log2(3)
    ndcg0 = (1 / math.log2(3)) / idcg2
    ndcg1 = (1 + 1 / math.log2(4)) / idcg2
    assert m["n_users"] == 2 and m["n_users_skipped"] == 1
    assert m["precision"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert m["recall"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["ndcg"] == pytest.approx((ndcg0 + ndcg1) / 2)
    assert m["map"] == pytest.approx(((1 / 2) / 2 + (1 + 2 / 3) / 2) / 2)
    assert m["coverage"] == pytest.approx(4 / 6)  # items 0, 1, 2, 3 shown to the evaluated users


def test_ranking_metrics_of_implicit_data_count_every_test_interaction():
    """``relevance_threshold=None``: user 0's relevant are {2, 3, 4} (hits at ranks 2, 3),
    user 1's {0, 1}, user 2's {3} (hit at rank 2)."""
    train, test, model = metric_case()
    m = evaluate_ranking(model, train, test, k=3, relevance_threshold=None)
    d2, d3 = 1 / math.log2(3), 1 / math.log2(4)
    ndcg = [(d2 + d3) / (1 + d2 + d3), (1 + d3) / (1 + d2), d2 / 1]
    assert m["n_users"] == 3 and m["n_users_skipped"] == 0 and m["relevance_threshold"] is None
    assert m["precision"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    assert m["recall"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert m["ndcg"] == pytest.approx(sum(ndcg) / 3)
    assert m["map"] == pytest.approx(((1 / 2 + 2 / 3) / 3 + (1 + 2 / 3) / 2 + 1 / 2) / 3)
    assert m["coverage"] == pytest.approx(5 / 6)


def test_a_relevant_test_item_the_list_cannot_hold_still_counts():
    """n_relevant counts every relevant test item: user 1's relevant item 5 is a training
    item (masked out of the list), so recall is 2/3 and the ideal DCG has three hits."""
    train, test, model = metric_case()
    extra = Ratings(np.array([1]), np.array([5]), np.array([5.0], np.float32), None, test.user_ids, test.item_ids,
                    test.rating_scale)
    both = Ratings(np.concatenate([test.users, extra.users]), np.concatenate([test.items, extra.items]),
                   np.concatenate([test.values, extra.values]), None, test.user_ids, test.item_ids, test.rating_scale)
    m = evaluate_ranking(model, train, both.subset(both.users == 1), k=3, relevance_threshold=4.0)
    d2, d3 = 1 / math.log2(3), 1 / math.log2(4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["ndcg"] == pytest.approx((1 + d3) / (1 + d2 + d3))


# =========================================================================== command line
@pytest.fixture
def clicks(tmp_path):
    """An implicit-feedback file (user,item,timestamp, no header) of `two_tastes`, and a
    test file of later clicks."""
    r = two_tastes()
    frame = r.to_frame()
    path = tmp_path / "clicks.csv"
    frame[["user", "item", "timestamp"]].to_csv(path, index=False, header=False)
    test = tmp_path / "later.csv"
    test.write_text("u0,i9,9000\nu1,i8,9001\nu30,i19,9002\nu31,i18,9003\nnew-user,i1,9004\n")
    return path, test, r


def test_an_implicit_file_end_to_end_train_recommend_evaluate(clicks, tmp_path, capsys):
    path, test, r = clicks
    cols = "user,item,timestamp"
    code, out, err = run(capsys, "train", "--ratings", path, "--columns", cols, "--model", "ease", "--out",
                         tmp_path / "m", "--json")
    assert code == 0, err
    assert json.loads(out)["fit_seconds"] >= 0
    assert load_artefact(tmp_path / "m").model.task == "ranking"

    code, out, err = run(capsys, "recommend", "--model", tmp_path / "m", "--user", "u0", "--k", "5", "--json")
    assert code == 0, err
    rec = json.loads(out)
    seen = {r.item_ids.raw(int(i)) for i in r.items[r.users == r.user_ids.index("u0")]}
    items = [it["item"] for it in rec["items"]]
    scores = [it["score"] for it in rec["items"]]
    assert rec["path"] == "model" and len(items) == 5 and not seen & set(items)
    assert scores == sorted(scores, reverse=True) and all(it["rating"] is None for it in rec["items"])
    assert len(set(items) & taste(0, 10)) >= 3  # u0's taste first

    code, out, _ = run(capsys, "recommend", "--model", tmp_path / "m", "--user", "stranger", "--k", "3", "--json")
    stranger = json.loads(out)
    assert code == 0 and stranger["path"] == "popularity"
    counts = r.item_counts()
    assert [it["score"] for it in stranger["items"]] == sorted(counts.astype(float).tolist(), reverse=True)[:3]

    code, _, err = run(capsys, "predict", "--model", tmp_path / "m", "--user", "u0", "--item", "i1")
    assert code == 2 and "ranks; it predicts no ratings" in err and "Traceback" not in err

    code, out, err = run(capsys, "evaluate", "--ratings", path, "--test", test, "--columns", cols, "--ranking",
                         "--k", "5", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["model"] == DEFAULT_RANKER and res["relevance_threshold"] is None  # every click is relevant
    for key in ("precision", "recall", "ndcg", "map", "coverage"):
        assert 0 <= res[key] <= 1
    assert res["n_users"] == 5  # the new user is evaluated too: their list is the popularity list
    assert res["recall"] > 0


def test_evaluate_on_a_ranking_split_for_every_ranker_named(clicks, capsys):
    path, _, _ = clicks
    for name in ("ease", "popular"):
        code, out, err = run(capsys, "evaluate", "--ratings", path, "--columns", "user,item,timestamp",
                             "--split", "temporal-leave:2", "--model", name, "--k", "5", "--json")
        assert code == 0, err
        res = json.loads(out)
        assert res["model"] == name and res["n_users"] == 60 and res["split"] == "temporal-leave:2"
    code, out, err = run(capsys, "evaluate", "--ratings", path, "--columns", "user,item,timestamp",
                         "--split", "random-leave:1:3", "--model", "ease", "--relevance", "all", "--json")
    assert code == 0, err
    assert json.loads(out)["n_test"] == 60


def test_a_rating_model_ranks_by_predicted_rating_when_named(clicks, tmp_path, capsys):
    r = two_tastes(explicit=True)
    path = tmp_path / "ratings.csv"
    r.to_frame()[["user", "item", "rating", "timestamp"]].to_csv(path, index=False, header=False)
    code, out, err = run(capsys, "evaluate", "--ratings", path, "--columns", "user,item,rating,timestamp",
                         "--split", "random-leave:2:0", "--model", "mf", "--epochs", "2", "--ranking", "--json",
                         "--quiet")
    assert code == 0, err
    res = json.loads(out)
    assert res["model"] == "mf" and res["relevance_threshold"] == 4.0 and "rmse" in res and "ndcg" in res


def test_training_a_rating_model_saves_the_default_ranker_beside_it(tmp_path, capsys):
    r = two_tastes(explicit=True)
    path = tmp_path / "ratings.csv"
    r.to_frame()[["user", "item", "rating", "timestamp"]].to_csv(path, index=False, header=False)
    code, out, err = run(capsys, "train", "--ratings", path, "--columns", "user,item,rating,timestamp",
                         "--split", "temporal-leave:1", "--epochs", "3", "--out", tmp_path / "m", "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["ranker"]["model"] == DEFAULT_RANKER and "ndcg" in summary["ranker"]["test_metrics"]
    art = load_artefact(tmp_path / "m")
    assert art.model.task == "rating" and art.ranker is not None and art.ranker.model.name == DEFAULT_RANKER
    code, out, _ = run(capsys, "recommend", "--model", tmp_path / "m", "--user", "u0", "--k", "4", "--json")
    items = json.loads(out)["items"]
    assert code == 0 and all(1 <= it["rating"] <= 5 for it in items)  # the predicted rating beside each
    ranker_scores = art.ranker.model.score_all(torch.tensor([r.user_ids.index("u0")]))[0]
    assert [it["score"] for it in items] == pytest.approx(
        [float(ranker_scores[art.item_ids.index(it["item"])]) for it in items])
    code, _, err = run(capsys, "train", "--ratings", path, "--columns", "user,item,rating,timestamp",
                       "--epochs", "1", "--ranker", "none", "--out", tmp_path / "alone", "--quiet")
    assert code == 0, err
    assert load_artefact(tmp_path / "alone").ranker is None


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "ease", "--epochs", "3"], "--epochs does not apply to --model ease"),
    (["train", "--model", "ease", "--validation", "0.1"], "--validation does not apply"),
    (["train", "--model", "ease", "--rollback"], "--rollback does not apply"),
    (["train", "--model", "ease", "--param", "nonsense=1"], "unknown ease config keys"),
    (["train", "--model", "mf", "--ranker", "mf"], "not a ranking model"),
    (["evaluate", "--ranking", "--split", "temporal-leave:0"], "K must be at least 1"),
])
def test_ranker_flag_mistakes_are_one_line(clicks, capsys, argv, message):
    path, _, _ = clicks
    code, _, err = run(capsys, *argv, "--ratings", path, "--columns", "user,item,timestamp", "--quiet")
    assert code == 2 and err.startswith("recsys: error:") and message in err, err
    assert "Traceback" not in err


@pytest.mark.integration
def test_evaluate_ranking_on_ml100k_uses_the_default_ranker(capsys):
    require_ml100k()
    code, out, err = run(capsys, "evaluate", "--dataset", "ml-100k", "--split", "u1,u2", "--ranking", "--k", "10",
                         "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["model"] == DEFAULT_RANKER and len(res["folds"]) == 2
    for key in ("precision", "recall", "ndcg", "map", "coverage"):
        assert res[key] == pytest.approx(res["mean"][key])
        assert res[key] == pytest.approx((res["folds"][0][key] + res["folds"][1][key]) / 2)
    assert res["ndcg"] > 0.3 and res["relevance_threshold"] == 4.0


# =========================================================================== the service
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An MF artefact with the default ranker beside it, and a ranker-only artefact, fitted on
    the explicit two-taste ratings."""
    r = two_tastes(explicit=True)
    mf = build_model("mf", r.n_users, r.n_items, r.rating_scale, {"embedding_size": 4, "n_blocks": 1})
    Trainer(TrainConfig(epochs=10, progress=False)).fit(mf, r)
    ranker = build_model(DEFAULT_RANKER, r.n_users, r.n_items, r.rating_scale)
    ranker.fit(r)
    root = tmp_path_factory.mktemp("served")
    both = save_artefact(root / "mf", mf, r, ranker=ranker, ranker_metadata={"note": "beside"})
    alone = save_artefact(root / "ease", ranker, r)
    return r, both, alone


def client(path, db) -> TestClient:
    return TestClient(create_app(Settings(model=path, db=db, api_key=KEY)))


def test_the_recommendations_route_uses_the_ranker_not_the_predicted_rating(served, tmp_path):
    r, both, _ = served
    art = load_artefact(both)
    u = r.user_ids.index("u30")
    seen = r.items[r.users == u]

    def top(scores: torch.Tensor, k: int = 5) -> list[str]:
        s = scores.clone()
        s[torch.from_numpy(seen)] = -torch.inf
        return [r.item_ids.raw(int(i)) for i in torch.topk(s, k).indices]

    by_ranker = top(art.ranker.model.score_all(torch.tensor([u]))[0])
    by_rating = top(art.model.score_all(torch.tensor([u]))[0])
    assert by_ranker != by_rating  # the two orders differ on this data
    with client(both, tmp_path / "db") as c:
        res = c.get("/v1/users/u30/recommendations", params={"k": 5, "explain": 2}).json()
        assert res["path"] == "model" and [it["item"] for it in res["items"]] == by_ranker
        predicted = c.post("/v1/predict", json={"pairs": [{"user": "u30", "item": i} for i in by_ranker]}).json()
        assert [it["rating"] for it in res["items"]] == pytest.approx([p["rating"] for p in predicted["predictions"]])
        assert all(it["score"] is not None for it in res["items"])
        for it in res["items"]:  # explained by u30's own interactions, in score units
            assert it["explanation"] and all(e["user"] == "u30" for e in it["explanation"])
            assert it["explanation_method"] and not it["explanation_method"].startswith("none")
        nobody = c.get("/v1/users/nobody/recommendations", params={"k": 3, "explain": 1}).json()
        assert nobody["path"] == "popularity" and all(it["explanation"] is None for it in nobody["items"])
        assert c.get("/v1/predict", params={"user": "u30", "item": "i1"}).json()["path"] == "model"


def test_ingested_interactions_change_a_new_user_s_list_at_once(served, tmp_path):
    _, both, _ = served
    with client(both, tmp_path / "db") as c:
        assert c.post("/v1/users", json={"user": "newbie"}, headers=AUTH).status_code == 201
        before = c.get("/v1/users/newbie/recommendations", params={"k": 5}).json()
        assert before["path"] == "popularity"
        assert len({it["item"] for it in before["items"]} & taste(10, 20)) >= 3  # the popular taste
        body = {"ratings": [{"user": "newbie", "item": f"i{i}", "rating": 5} for i in range(4)]}
        assert c.post("/v1/ratings", headers=AUTH, json=body).status_code == 200
        after = c.get("/v1/users/newbie/recommendations", params={"k": 5, "explain": 3}).json()
        items = [it["item"] for it in after["items"]]
        assert after["path"] != "popularity" and items != [it["item"] for it in before["items"]]
        assert not {"i0", "i1", "i2", "i3"} & set(items) and len(set(items) & taste(0, 10)) >= 4
        own = {e["item"] for it in after["items"] for e in it["explanation"]}
        assert own <= {"i0", "i1", "i2", "i3"}  # explained by the ingested interactions
    with client(both, tmp_path / "db") as c:  # a restart replays them into the ranker
        again = c.get("/v1/users/newbie/recommendations", params={"k": 5}).json()
        assert [it["item"] for it in again["items"]] == items


def test_a_ranker_only_artefact_serves_lists_and_refuses_predictions(served, tmp_path):
    _, _, alone = served
    with client(alone, tmp_path / "db") as c:
        res = c.get("/v1/predict", params={"user": "u0", "item": "i1"})
        assert res.status_code == 400 and "ranks; it predicts no ratings" in res.json()["detail"]
        assert c.post("/v1/predict", json={"pairs": [{"user": "u0", "item": "i1"}]}).status_code == 400
        recs = c.get("/v1/users/u0/recommendations", params={"k": 4}).json()
        assert recs["path"] == "model" and len(recs["items"]) == 4
        assert all(it["rating"] is None and isinstance(it["score"], float) for it in recs["items"])
        c.post("/v1/ratings", headers=AUTH, json={"ratings": [{"user": "u0", "item": "i15", "rating": 1}]})
        assert "i15" not in {it["item"] for it in c.get("/v1/users/u0/recommendations").json()["items"]}
        assert c.get("/v1/users/u0").json()["n_live_ratings"] == 1


def test_the_facade_asks_the_model_s_task_not_its_class(served):
    _, both, alone = served
    rec = Recommender.load(alone, warm=False)
    assert rec.rater is None and rec.ranker is rec.model and model_task(rec.model.name) == "ranking"
    with pytest.raises(NoRatingModelError):
        rec.predict("u0", "i1")
    rec = Recommender.load(both, warm=True)
    assert rec.rater is rec.model and rec.ranker is not None and rec.ranker.task == "ranking"
    assert DEFAULT_RANKER in MODELS


@pytest.mark.parametrize("name", ranking_models())
def test_every_ranker_serves_through_the_facade(name, tmp_path):
    """Any registered ranker, saved alone: a created user gets the popularity list; after a
    few ingested interactions (no refit) their list leaves popularity and excludes them."""
    from tests.test_model_contract import SMALL_RANKER_CONFIGS

    r = two_tastes()
    model = build_model(name, r.n_users, r.n_items, r.rating_scale, SMALL_RANKER_CONFIGS.get(name))
    model.fit(r)
    rec = Recommender(load_artefact(save_artefact(tmp_path / name, model, r)), warm=True)
    assert rec.add_user("fresh")
    before = rec.recommend("fresh", 5)
    assert before.path == "popularity" and all(p.rating is None for p in before.items)
    rec.add_ratings([NewRating("fresh", f"i{i}", 1.0, None, None) for i in range(4)])
    after = rec.recommend("fresh", 5, explain=2)
    items = [p.item for p in after.items]
    assert len(items) == 5 and not {"i0", "i1", "i2", "i3"} & set(items)
    if rec.recommend("u0", 1).path == "popularity":  # a ranker that ranks everyone alike
        return
    assert after.path != "popularity" and items != [p.item for p in before.items]
    assert all(p.explanation_method for p in after.items)
