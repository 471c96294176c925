"""Schema-driven fuzzing of the REST API: ``schemathesis run --checks all`` (every check:
no server error, status codes and response bodies and headers as documented, valid data
accepted, invalid data rejected, auth not ignored, ``Allow`` on 405, ...; the coverage,
fuzzing and stateful phases) against `recsys serve` in its own process, over an MF artefact,
MF with the default ranker beside it (reads requiring the key), and a ranker alone (rating
predictions refused with a documented 400). A run reporting any failure fails the test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recsys.artefact import save_artefact
from recsys.models import DEFAULT_RANKER, build_model
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings
from tests.test_service_process import Server

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.fixture(scope="module", params=["mf", "mf+ranker, read auth", "ranker"])
def server(request, tmp_path_factory):
    train = make_ratings(n_users=20, n_items=15, n=200)
    model = build_model("mf", train.n_users, train.n_items, train.rating_scale, {"embedding_size": 4, "n_blocks": 1})
    Trainer(TrainConfig(epochs=3, progress=False)).fit(model, train)
    ranker = build_model(DEFAULT_RANKER, train.n_users, train.n_items, train.rating_scale)
    ranker.fit(train)
    root = tmp_path_factory.mktemp("fuzz")
    env = {}
    if request.param == "mf":
        path = save_artefact(root / "mf", model, train)
    elif request.param.startswith("mf+ranker"):
        path = save_artefact(root / "mf", model, train, ranker=ranker)
        env["RECSYS_READ_AUTH"] = "true"
    else:
        path = save_artefact(root / "ranker", ranker, train)
    s = Server(path, root / "db", **env)
    yield s
    s.kill()


@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="the schemathesis command is not installed")
def test_schemathesis_with_every_check_finds_no_failure(server):
    from tests.test_service_process import KEY

    res = subprocess.run([str(SCHEMATHESIS), "run", f"{server.url}/openapi.json", "--checks", "all",
                          "--header", f"Authorization: Bearer {KEY}", "--max-examples", "25", "--seed", "7",
                          "--no-color"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    tail = res.stdout[-6000:]
    assert res.returncode == 0, tail
    selected, tested = re.search(r"Selected: \d+/(\d+)", res.stdout), re.search(r"Tested: (\d+)", res.stdout)
    assert selected and tested and int(tested.group(1)) == int(selected.group(1)) >= 8, tail  # every operation
    assert "No issues found" in res.stdout, tail
