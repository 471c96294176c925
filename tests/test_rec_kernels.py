"""The compiled CPU kernels of REC equal the tensor code they replace: the same chains bit
for bit from the same generator (inference and training), the same vectors and predictions
up to float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.models import build_model
from recsys.models.rec.chains import EvidenceGraph, sample_chains
from recsys.ratings import Ratings
from recsys.train import TrainConfig, Trainer
from tests.conftest import SMALL_REC

LEVEL_FIELDS = ("nodes", "parent", "child", "values", "examples", "reverse_edge")


@pytest.fixture
def model(rec_trained):
    rec_trained.eval()
    return rec_trained


def assert_same_chains(a, b) -> None:
    assert len(a.levels) == len(b.levels) and (a.passes, a.n_nodes) == (b.passes, b.n_nodes)
    for la, lb in zip(a.levels, b.levels, strict=True):
        for name in LEVEL_FIELDS:
            x, y = getattr(la, name), getattr(lb, name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert torch.equal(a.leaves, b.leaves)


def draw_both(graph, roots, fanouts, seed, **kwargs):
    gens = [torch.Generator().manual_seed(seed) for _ in range(2)]
    compiled = sample_chains(graph, roots, fanouts, gens[0], compiled=True, **kwargs)
    tensors = sample_chains(graph, roots, fanouts, gens[1], compiled=False, **kwargs)
    # the same random numbers were consumed: the streams continue identically
    assert torch.equal(torch.rand(3, generator=gens[0]), torch.rand(3, generator=gens[1]))
    return compiled, tensors


@pytest.mark.parametrize("passes", [1, 3])
@pytest.mark.parametrize("fanouts", [(6, 4, 3), (30, 30), (1,), (2, 2, 2, 2)])
def test_compiled_sampling_draws_the_tensor_codes_chains_bit_for_bit(model, fanouts, passes):
    graph, _ = model.live()
    rng = np.random.default_rng(len(fanouts) + passes)
    for seed in range(5):
        roots = torch.unique(torch.from_numpy(rng.integers(0, graph.n_nodes, int(rng.integers(1, 30)))))
        users = torch.from_numpy(rng.integers(0, graph.n_users, 40))
        items = torch.from_numpy(rng.integers(0, graph.n_items, 40))
        for exclude in (None, graph.pair_keys(users, items)):
            assert_same_chains(*draw_both(graph, roots, fanouts, seed, exclude=exclude, passes=passes))


@pytest.mark.parametrize("dropout", [0.0, 0.5, 1.0])
def test_compiled_training_sampling_draws_the_same_dropout_and_truncation(model, dropout):
    """Evidence dropout and root truncation (cold roots) draw the same random numbers on
    both paths and keep the same edges."""
    graph, _ = model.live()
    rng = np.random.default_rng(11)
    for seed in range(6):
        roots = torch.unique(torch.from_numpy(rng.integers(0, graph.n_nodes, int(rng.integers(1, 40)))))
        keep = torch.from_numpy(rng.integers(-2, 5, len(roots)))  # <= 0: untouched
        users = torch.from_numpy(rng.integers(0, graph.n_users, 30))
        items = torch.from_numpy(rng.integers(0, graph.n_items, 30))
        for root_keep in (None, keep):
            a, b = draw_both(graph, roots, (6, 4, 3), seed, exclude=graph.pair_keys(users, items),
                             evidence_dropout=dropout, root_keep=root_keep)
            assert_same_chains(a, b)


def test_training_with_the_compiled_sampler_is_bit_for_bit_training_with_the_tensor_sampler(rec_ratings):
    """The chains, hence the losses, gradients and parameters of a whole training run, are
    the same on both paths (defaults: evidence dropout and cold roots on)."""
    params = {}
    for compiled in (True, False):
        model = build_model("rec", rec_ratings.n_users, rec_ratings.n_items, rec_ratings.rating_scale, SMALL_REC)
        model.compiled_kernels = compiled
        Trainer(TrainConfig(epochs=2, optimizer="adam", learning_rate=0.01, batch_size=64, progress=False)).fit(
            model, rec_ratings)
        params[compiled] = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in params[True].items():
        assert torch.equal(value, params[False][name]), name


def test_compiled_sampling_handles_repeated_pairs_and_nodes_without_ratings():
    """A pair rated twice is two edges between the same nodes (the parent-skip takes the
    first); a user with no ratings expands to nothing; both paths agree."""
    base = Ratings.from_arrays(np.array([0, 1, 1, 2, 2, 3]), np.array([0, 0, 1, 1, 2, 0]),
                               np.array([1, 3, 4, 2, 5, 4.0]), rating_scale=(1, 5))
    # built directly (`from_arrays` keeps one rating per pair): (0, 0) and (2, 2) twice
    r = Ratings(np.append(base.users, [0, 2]), np.append(base.items, [0, 2]), np.append(base.values, [5, 2]).astype(np.float32),
                None, base.user_ids.extend(["ghost"]), base.item_ids, base.rating_scale)
    graph = EvidenceGraph.build(r, np.array([0]), np.array([0]))
    roots = torch.arange(graph.n_nodes)
    for seed in range(10):
        a, b = draw_both(graph, roots, (3, 3, 2), seed, passes=2)
        assert_same_chains(a, b)


def test_compiled_aggregation_equals_the_tensor_code(model):
    graph, bias = model.live()
    roots = torch.unique(torch.tensor([0, 3, 7, 19, graph.n_users + 1, graph.n_users + 4, graph.n_users + 20]))
    for passes in (1, 3):
        chains = sample_chains(graph, roots, model.config.fanouts, torch.Generator().manual_seed(passes),
                               passes=passes)
        root_bias = bias[chains.base(chains.levels[0].nodes)] + 0.25
        for rb in (None, root_bias):
            with torch.no_grad():
                compiled = model.aggregate(chains, None, rb)
                model.compiled_kernels = False
                try:
                    tensors = model.aggregate(chains, None, rb)
                finally:
                    model.compiled_kernels = True
            assert compiled.shape == tensors.shape == (passes * len(roots), model.config.embedding_size)
            torch.testing.assert_close(compiled, tensors, atol=1e-5, rtol=1e-5)


def test_compiled_predictions_and_recommendations_equal_the_tensor_codes(model, rec_ratings):
    users = torch.from_numpy(rec_ratings.users[:100].astype(np.int64))
    items = torch.from_numpy(rec_ratings.items[:100].astype(np.int64))
    unrated_items = (items + 7) % rec_ratings.n_items
    out = {}
    for compiled in (True, False):
        model.compiled_kernels = compiled
        try:
            out[compiled] = (model.predict(users, items), model.predict(users, unrated_items),
                             model.predict(users[:1], items[:1]), model.score_all(torch.arange(5)))
        finally:
            model.compiled_kernels = True
    for a, b in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_training_and_autograd_keep_the_tensor_code(model):
    """Gradients need the tensor code: with autograd on, aggregation builds a graph."""
    graph, _ = model.live()
    roots = torch.tensor([0, graph.n_users + 2])
    chains = sample_chains(graph, roots, model.config.fanouts, torch.Generator().manual_seed(0))
    vec = model.aggregate(chains)
    assert vec.requires_grad
    with torch.no_grad():
        assert not model.aggregate(chains).requires_grad
