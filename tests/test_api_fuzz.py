"""Schema-driven fuzzing of the REST API (schemathesis over the generated OpenAPI document):
whatever a client sends, the service answers without a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from api.app import Settings, create_app
from recsys.artefact import save_artefact
from recsys.models import DEFAULT_RANKER, build_model
from recsys.train import TrainConfig, Trainer
from tests.conftest import make_ratings


@pytest.fixture(scope="module", params=["mf", "mf+ranker", "ranker"])
def client(request, tmp_path_factory):
    """The service over an MF artefact, MF with the default ranker beside it, and a ranker
    alone (recommendations by the ranker; rating predictions refused with a 4xx)."""
    train = make_ratings(n_users=20, n_items=15, n=200)
    model = build_model("mf", train.n_users, train.n_items, train.rating_scale, {"embedding_size": 4, "n_blocks": 1})
    Trainer(TrainConfig(epochs=3, progress=False)).fit(model, train)
    ranker = build_model(DEFAULT_RANKER, train.n_users, train.n_items, train.rating_scale)
    ranker.fit(train)
    root = tmp_path_factory.mktemp("fuzz")
    if request.param == "mf":
        path = save_artefact(root / "mf", model, train)
    elif request.param == "mf+ranker":
        path = save_artefact(root / "mf", model, train, ranker=ranker)
    else:
        path = save_artefact(root / "ranker", ranker, train)
    with TestClient(create_app(Settings(model=path, db=root / "db", api_key="fuzz"))) as c:
        yield c


def operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    for result in schema.get_all_operations():
        yield result.ok()


def test_no_input_makes_the_service_fail(client):
    checked = []
    for operation in operations(client.app):

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.headers = {**(case.headers or {}), "Authorization": "Bearer fuzz"}
            response = case.call()
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} {case.query} {case.body!r} -> "
                f"{response.status_code}: {response.text[:300]}")

        fuzz()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert len(checked) >= 10, checked  # every route of the document was fuzzed
