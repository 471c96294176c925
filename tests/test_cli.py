"""The `recsys` command line end to end: MovieLens-100K integration, any ratings file, and
errors that are one clear line with exit status 2."""

from __future__ import annotations

import json

import pytest

from recsys.cli import main
from tests.conftest import make_ratings, require_ml100k


@pytest.fixture
def ratings_file(tmp_path):
    frame = make_ratings(n_users=40, n_items=30, n=600).to_frame()
    path = tmp_path / "ratings.csv"
    frame[["user", "item", "rating", "timestamp"]].to_csv(path, index=False, header=False)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.integration
def test_train_on_ml100k_reports_accuracy_titles_and_saves(tmp_path, capsys):
    require_ml100k()
    code, out, _ = run(capsys, "train", "--dataset", "ml-100k", "--split", "u1", "--epochs", "10",
                       "--out", tmp_path / "m", "--quiet")
    assert code == 0
    assert "held-out u1: RMSE 0.9" in out
    assert "(19" in out  # titles carry their year, e.g. "Star Wars (1977)"
    code, out, _ = run(capsys, "predict", "--model", tmp_path / "m", "--user", "196", "--item", "242", "--json")
    pred = json.loads(out)
    assert code == 0 and 1 <= pred["prediction"] <= 5 and pred["path"] == "model"
    assert pred["title"] == "Kolya (1996)"
    code, out, _ = run(capsys, "recommend", "--model", tmp_path / "m", "--user", "196", "--k", "3", "--json")
    assert code == 0 and len(json.loads(out)["items"]) == 3


@pytest.mark.integration
def test_evaluate_json_over_two_folds_has_the_promised_fields(capsys):
    require_ml100k()
    code, out, _ = run(capsys, "evaluate", "--dataset", "ml-100k", "--split", "u1,u2", "--model", "mf",
                       "--epochs", "5", "--json", "--quiet")
    res = json.loads(out)
    assert code == 0
    for key in ("rmse", "mae", "fit_seconds", "n_train", "n_test"):
        assert key in res
    assert len(res["folds"]) == 2 and res["n_test"] == 40_000
    assert res["rmse"] == pytest.approx((res["folds"][0]["rmse"] + res["folds"][1]["rmse"]) / 2)


def test_evaluate_any_ratings_file_with_each_split_kind(ratings_file, capsys):
    for split in ("random:0.2:1", "temporal:0.2", "cold-users:0.2:3:0"):
        code, out, err = run(capsys, "evaluate", "--ratings", ratings_file, "--columns", "user,item,rating,timestamp",
                             "--split", split, "--epochs", "3", "--embedding-size", "8", "--n-blocks", "1",
                             "--json", "--quiet")
        assert code == 0, err
        res = json.loads(out)
        assert res["n_test"] > 0 and res["rmse"] > 0


def test_a_separate_test_file_with_unseen_ids_uses_the_fallback(ratings_file, tmp_path, capsys):
    test = tmp_path / "test.csv"
    test.write_text("1,2,4\nnew-user,3,5\n4,new-item,2\n")
    code, out, err = run(capsys, "evaluate", "--ratings", ratings_file, "--columns", "user,item,rating,_",
                         "--test", test, "--epochs", "2", "--json", "--quiet")
    assert code == 0, err
    res = json.loads(out)
    assert res["n_test"] == 3 and res["n_fallback"] == 2


def test_validation_and_early_stopping_from_the_command_line(ratings_file, capsys):
    code, out, err = run(capsys, "train", "--ratings", ratings_file, "--split", "random:0.2",
                         "--validation", "0.1", "--epochs", "4", "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["best_validation_rmse"] is not None


@pytest.mark.parametrize("argv, message", [
    (["train", "--ratings", "missing.csv"], "missing.csv"),
    (["predict", "--model", "no-such-dir", "--user", "1", "--item", "1"], "no such model directory"),
    (["evaluate", "--ratings", "{file}", "--split", "random:1.5"], "random:1.5"),
    (["evaluate", "--ratings", "{file}"], "needs a test set"),
    (["train", "--ratings", "{file}", "--split", "u1"], "canonical fold"),
    (["train", "--ratings", "{file}", "--rating-scale", "five"], "--rating-scale"),
    (["train", "--ratings", "{file}", "--model", "mf", "--cold-roots", "0.3"], "--cold-roots does not apply"),
    (["train", "--ratings", "{file}", "--model", "rec", "--n-blocks", "2"], "--n-blocks does not apply"),
])
def test_user_errors_are_one_line_and_exit_2(ratings_file, capsys, argv, message):
    argv = [a.replace("{file}", str(ratings_file)) for a in argv]
    code, _, err = run(capsys, *argv, "--quiet") if argv[0] != "predict" else run(capsys, *argv)
    assert code == 2
    assert err.startswith("recsys: error:") and message in err
    assert "Traceback" not in err


def test_unknown_item_on_predict_is_a_clear_error(ratings_file, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--ratings", ratings_file, "--epochs", "1", "--out", tmp_path / "m", "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "predict", "--model", tmp_path / "m", "--user", "0", "--item", "nope")
    assert code == 2 and "unknown item id 'nope'" in err
    code, out, _ = run(capsys, "predict", "--model", tmp_path / "m", "--user", "stranger", "--item", "1", "--json")
    assert code == 0 and json.loads(out)["path"] == "fallback"  # the service's label (one path, `Recommender`)


def test_model_and_optimizer_flags_reach_their_configs():
    from recsys.cli import _configs, build_parser

    args = build_parser().parse_args([
        "train", "--ratings", "r.csv", "--model", "rec", "--cold-roots", "0.25", "--item-bias-reg", "3",
        "--mlp-reg", "0.001", "--message-dropout", "0.1", "--no-target-free-bias",
        "--optimizer", "kfac", "--visit-gain", "0"])
    model_cfg, train_cfg = _configs(args)
    assert model_cfg | {"seed": 0} == {"cold_roots": 0.25, "item_bias_reg": 3.0, "mlp_reg": 0.001,
                                       "dropout": 0.1, "target_free_bias": False, "seed": 0}
    assert train_cfg.optimizer == "kfac" and train_cfg.kfac.visit_gain is None  # 0: no cap
    args = build_parser().parse_args(["train", "--ratings", "r.csv", "--optimizer", "kfac", "--visit-gain", "0.2"])
    assert _configs(args)[1].kfac.visit_gain == 0.2


def test_predict_recommend_and_explain_take_the_service_s_path(tmp_path, capsys):
    """`recsys predict`, `recommend` and `explain` answer through `Recommender`, as the
    service does: the same clipped values, path labels and explanations, for any model."""
    from recsys.artefact import save_artefact
    from recsys.models import build_model
    from recsys.recommender import Recommender
    from recsys.train import TrainConfig, Trainer

    train = make_ratings(n_users=40, n_items=30, n=700)
    model = build_model("rec", train.n_users, train.n_items, train.rating_scale,
                        {"embedding_size": 8, "hidden_size": 16, "prototypes": 4, "fanouts": (4, 2)})
    Trainer(TrainConfig(epochs=1, batch_size=64, optimizer="adam", learning_rate=0.01, progress=False)).fit(model, train)
    path = save_artefact(tmp_path / "rec", model, train)
    service = Recommender.load(path)
    user, item = train.user_ids.raw(0), train.item_ids.raw(1)
    code, out, _ = run(capsys, "predict", "--model", path, "--user", user, "--item", item, "--json")
    want = service.predict(user, item)
    assert code == 0 and json.loads(out) == {"user": user, "item": item, "title": None, "prediction": want.rating,
                                            "path": want.path}
    code, out, _ = run(capsys, "recommend", "--model", path, "--user", user, "--k", "3", "--json")
    got, want = json.loads(out), service.recommend(user, 3)
    assert code == 0 and got["path"] == want.path == "model"
    assert [(i["item"], i["score"]) for i in got["items"]] == [(p.item, p.rating) for p in want.items]
    assert all(1 <= i["score"] <= 5 for i in got["items"])  # clipped to the scale, as served
    code, out, _ = run(capsys, "explain", "--model", path, "--user", user, "--item", item, "--k", "2", "--json")
    got = json.loads(out)
    assert code == 0 and got["method"] == "leave-one-out (evidence removed, same parameters)" and len(got["contributions"]) == 2
    served = service.predict(user, item, explain=2).explanation
    assert [(c["user"], c["item"], c["effect"]) for c in got["contributions"]] == \
        [(e["user"], e["item"], e["effect"]) for e in served]
    assert set(got["terms"]) >= {"global_mean", "user_bias", "item_bias"}
