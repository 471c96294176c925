"""The served model is kept out of the garbage collector's generations (`api.heap`), and a
model swapped out by a reload is still freed."""

from __future__ import annotations

import gc
import time
import weakref

from fastapi.testclient import TestClient

from api.app import Settings, create_app
from api.heap import FrozenModelHeap
from tests.test_api import AUTH, KEY, model_dir  # noqa: F401 (a fixture)


def collected(obj: object) -> bool:
    """Whether the cyclic collector's generations hold ``obj`` (frozen objects are not listed)."""
    return any(o is obj for o in gc.get_objects())


def test_the_loaded_model_is_frozen_and_a_swapped_out_one_is_freed(model_dir, tmp_path):  # noqa: F811
    app = create_app(Settings(model=model_dir, db=tmp_path / "db", api_key=KEY))
    with TestClient(app) as client:
        first = app.state.service.recommender
        assert gc.get_freeze_count() > 0 and not collected(first)
        first.cycle = first  # only a collection can free it now: frozen, never
        old = weakref.ref(first)
        del first
        assert client.post("/v1/admin/reload", headers=AUTH).status_code == 200
        fresh = app.state.service.recommender
        deadline = time.monotonic() + 10
        while (old() is not None or collected(fresh)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert old() is None  # the refreeze after the swap collected it
        assert not collected(fresh)  # and froze the new model
        assert client.get("/v1/predict", params={"user": "0", "item": "1", "explain": 2}).status_code == 200


def test_stale_until_the_current_model_is_frozen():
    class Model:
        pass

    current = [None]
    heap = FrozenModelHeap(lambda: current[0])
    assert not heap.stale()  # nothing loaded yet
    current[0] = Model()
    assert heap.stale()
    heap.refreeze()
    assert not heap.stale() and not collected(current[0])
    current[0] = Model()  # a swap
    assert heap.stale()
    heap.refreeze()
    assert not heap.stale()
    gc.unfreeze()
