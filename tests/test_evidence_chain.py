"""The evidence-chain model (REC): sampled chains, prototypes, target exclusion, online
insertion, fallback, artefacts, gradients, explanations. Small synthetic data only."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from recsys.artefact import load_artefact, save_artefact
from recsys.models import build_model
from recsys.models.rec import explain as rec_explain
from recsys.models.rec.chains import (
    draw_key,
    keyed_uniform,
    sample_chains,
    sample_neighbours,
    stream_base,
)
from recsys.models.rec.model import EvidenceChainModel, RECConfig, fit_baseline
from recsys.train import TrainConfig, Trainer
from tests.conftest import SMALL_REC as SMALL
from tests.conftest import make_ratings


@pytest.fixture(scope="module")
def ratings(rec_ratings):
    return rec_ratings


@pytest.fixture(scope="module")
def trained(rec_trained):
    return rec_trained


def fresh(ratings, **over) -> EvidenceChainModel:
    model = build_model("rec", ratings.n_users, ratings.n_items, ratings.rating_scale, {**SMALL, **over})
    model.prepare(ratings)
    return model


def graph_of(model):
    return model._live()[0]


# ---------------------------------------------------------------------------- sampling
def test_graph_rows_put_prototype_neighbours_first(ratings):
    model = fresh(ratings)
    g = graph_of(model)
    for node in range(g.n_nodes):
        lo, hi, k = int(g.indptr[node]), int(g.indptr[node + 1]), int(g.n_proto[node])
        slots = g.proto_slot[g.neighbours[lo:hi]]
        assert (slots[:k] >= 0).all() and (slots[k:] < 0).all()
    assert int(g.degrees().sum()) == 2 * len(ratings)


def test_sampled_neighbours_are_distinct_real_edges_prototypes_first(ratings):
    model = fresh(ratings)
    g = graph_of(model)
    nodes = torch.arange(g.n_nodes)
    edges = sample_neighbours(g, nodes, 5, draw_key(torch.Generator().manual_seed(0)))
    deg, n_proto = g.degrees(), g.n_proto
    counts = torch.bincount(edges.parent, minlength=len(nodes))
    assert torch.equal(counts, deg.clamp(max=5))
    for node in range(g.n_nodes):
        got = edges.child[edges.parent == node]
        row = set(g.neighbours[int(g.indptr[node]):int(g.indptr[node + 1])].tolist())
        assert len(set(got.tolist())) == len(got) and set(got.tolist()) <= row
        want_protos = min(int(n_proto[node]), 5)
        assert int((g.proto_slot[got] >= 0).sum()) == want_protos


def test_chains_have_the_right_shapes_and_are_deterministic_for_a_seed(ratings):
    model = fresh(ratings)
    g = graph_of(model)
    roots = torch.tensor([0, 3, g.n_users + 2])
    a = sample_chains(g, roots, (6, 4, 3), torch.Generator().manual_seed(7))
    b = sample_chains(g, roots, (6, 4, 3), torch.Generator().manual_seed(7))
    c = sample_chains(g, roots, (6, 4, 3), torch.Generator().manual_seed(8))
    assert len(a.levels) == 3
    for la, lb in zip(a.levels, b.levels, strict=True):
        for name in ("nodes", "parent", "child", "values", "examples", "reverse_edge"):
            assert torch.equal(getattr(la, name), getattr(lb, name))
    assert any(not torch.equal(x.examples, y.examples) for x, y in zip(a.levels, c.levels, strict=True)
               if len(x.examples) == len(y.examples)) or any(len(x.examples) != len(y.examples)
                                                            for x, y in zip(a.levels, c.levels, strict=True))
    for d, lvl in enumerate(a.levels):
        fan = (6, 4, 3)[d]
        assert torch.equal(lvl.nodes, torch.unique(lvl.nodes))  # memoised: unique per level
        assert int(torch.bincount(lvl.parent, minlength=len(lvl.nodes)).max()) <= fan
        assert (g.proto_slot[lvl.nodes[lvl.parent]] < 0).all()  # prototypes are never expanded
        nxt = a.nodes(d + 1)
        assert len(lvl.child) == 0 or int(lvl.child.max()) < len(nxt)
    assert (g.proto_slot[a.leaves] >= 0).all()  # only prototypes reach the last depth


def _edge_set(chains, depth):
    """The sampled edges of a level as ``(parent node, child node, rating row)`` triples."""
    lvl = chains.levels[depth]
    parents, children = lvl.nodes[lvl.parent], chains.nodes(depth + 1)[lvl.child]
    return set(zip(parents.tolist(), children.tolist(), lvl.examples.tolist(), strict=True))


@pytest.mark.parametrize("compiled", [True, False])
def test_a_node_draws_the_same_neighbours_whichever_nodes_are_sampled_with_it(ratings, compiled):
    """Draws are keyed by (call, level, node): a root's chains do not depend on the batch."""
    g = graph_of(fresh(ratings))
    alone = sample_chains(g, torch.tensor([3]), (6, 4, 3), torch.Generator().manual_seed(5), compiled=compiled)
    batch = sample_chains(g, torch.tensor([0, 3, 7, g.n_users + 2]), (6, 4, 3), torch.Generator().manual_seed(5),
                          compiled=compiled)
    assert _edge_set(alone, 0) <= _edge_set(batch, 0)
    assert _edge_set(alone, 1) <= _edge_set(batch, 1)


@pytest.mark.parametrize("compiled", [True, False])
def test_hiding_a_rating_changes_the_chains_only_below_the_edges_it_hides(ratings, compiled):
    """With the same key, the chains with one rating excluded are the chains without the
    exclusion minus that rating's edges and what hung below them only: hiding a rating moves
    no other draw (what makes an explanation's leave-one-out and a same-trajectory retrain
    change only what the rating touched)."""
    g = graph_of(fresh(ratings))
    roots = torch.tensor([0, 3, 7, g.n_users + 2, g.n_users + 5])
    full = sample_chains(g, roots, (6, 4, 3), torch.Generator().manual_seed(2), compiled=compiled)
    used = torch.cat([lvl.examples for lvl in full.levels]).unique()
    for z in used[:12].tolist():
        key = g.pair_keys(torch.tensor([int(torch.tensor(ratings.users)[z])]),
                          torch.tensor([int(torch.tensor(ratings.items)[z])]))
        hidden = sample_chains(g, roots, (6, 4, 3), torch.Generator().manual_seed(2), exclude=key, compiled=compiled)
        reached = set(roots.tolist())
        for depth in range(3):
            want = {e for e in _edge_set(full, depth) if e[2] != z and e[0] in reached}
            assert _edge_set(hidden, depth) == want
            reached = {e[1] for e in want}


@pytest.mark.parametrize("compiled", [True, False])
def test_users_and_items_added_later_move_no_existing_nodes_draws(ratings, compiled):
    """Draws are keyed by the trained sizes (`EvidenceGraph.draw_ids`): growing the graph by
    users and items without ratings (every item's node id shifts) leaves every existing
    node's chains as they were, so predictions do not move when somebody new arrives."""
    g = graph_of(fresh(ratings))
    grown = g.insert(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64),
                     g.n_users + 3, g.n_items + 2)
    assert grown.key_sizes == (g.n_users, g.n_items)
    roots = torch.tensor([0, 5, g.n_users + 1, g.n_users + 7])
    shift = lambda ids: torch.where(ids >= g.n_users, ids + 3, ids)  # noqa: E731
    for passes in (1, 3):
        a = sample_chains(g, roots, (6, 4, 3), torch.Generator().manual_seed(1), passes=passes, compiled=compiled)
        b = sample_chains(grown, shift(roots), (6, 4, 3), torch.Generator().manual_seed(1), passes=passes,
                          compiled=compiled)
        for la, lb in zip(a.levels, b.levels, strict=True):
            assert torch.equal(la.examples, lb.examples) and torch.equal(la.values, lb.values)
            assert torch.equal(la.parent, lb.parent) and torch.equal(la.child, lb.child)


def test_keyed_draws_are_the_same_numbers_in_the_kernels_and_in_torch():
    from recsys.models.rec.kernels import keyed_pair_uniforms64, keyed_uniforms32
    rng = np.random.default_rng(0)
    for stream in (0, 2, 64):
        base = stream_base(draw_key(torch.Generator().manual_seed(stream)), stream)
        ids = torch.from_numpy(rng.integers(0, 1 << 40, 500))
        drawn = keyed_uniform(base, ids.unsqueeze(1), torch.arange(40).unsqueeze(0))
        assert np.array_equal(drawn.numpy(), keyed_uniforms32(np.uint64(base), ids.numpy(), 40))
        cols = torch.from_numpy(rng.integers(0, 1 << 30, 500))
        assert np.array_equal(keyed_uniform(base, ids, cols, torch.float64).numpy(),
                              keyed_pair_uniforms64(np.uint64(base), ids.numpy(), cols.numpy()))
        assert 0 <= float(drawn.min()) and float(drawn.max()) < 1
        assert abs(float(drawn.mean()) - 0.5) < 0.01 and abs(float(drawn.std()) - 12 ** -0.5) < 0.01


def test_reverse_edges_point_back_to_the_parent(ratings):
    model = fresh(ratings, prototypes=1)
    g = graph_of(model)
    ch = sample_chains(g, torch.arange(10), (8, 8, 8), torch.Generator().manual_seed(0))
    found = 0
    for d in range(2):
        lvl, nxt = ch.levels[d], ch.levels[d + 1]
        for e in torch.nonzero(lvl.reverse_edge >= 0).squeeze(1).tolist():
            r = int(lvl.reverse_edge[e])
            assert int(nxt.parent[r]) == int(lvl.child[e])
            assert int(ch.nodes(d + 2)[nxt.child[r]]) == int(lvl.nodes[lvl.parent[e]])
            found += 1
    assert found > 0


def _check_single_pass_chains(g, ch, roots, fanouts):
    """The invariants every single-pass sampling keeps (graph ids, memoised levels, edges that
    exist, reverse edges that point back)."""
    assert torch.equal(ch.levels[0].nodes, roots)
    for d, lvl in enumerate(ch.levels):
        assert torch.equal(lvl.nodes, torch.unique(lvl.nodes))
        assert int(lvl.nodes.max()) < g.n_nodes
        assert len(lvl.parent) == 0 or int(torch.bincount(lvl.parent).max()) <= fanouts[d]
        kids = ch.nodes(d + 1)[lvl.child]
        for p_, c_, ex in zip(lvl.nodes[lvl.parent].tolist(), kids.tolist(), lvl.examples.tolist(), strict=True):
            row = g.neighbours[int(g.indptr[p_]):int(g.indptr[p_ + 1])]
            rows_ex = g.examples[int(g.indptr[p_]):int(g.indptr[p_ + 1])]
            assert c_ in row.tolist() and ex in rows_ex.tolist()
        if d + 1 < len(ch.levels):
            nxt = ch.levels[d + 1]
            for e in torch.nonzero(lvl.reverse_edge >= 0).squeeze(1).tolist():
                r = int(lvl.reverse_edge[e])
                assert int(nxt.parent[r]) == int(lvl.child[e])
                assert int(ch.nodes(d + 2)[nxt.child[r]]) == int(lvl.nodes[lvl.parent[e]])


def test_passes_drawn_together_are_independent_valid_samplings(ratings):
    """Several prediction passes are sampled in one go: each is a valid single-pass sampling of
    the same roots, they differ from one another, and memoisation never merges two passes."""
    model = fresh(ratings, prototypes=1)
    g = graph_of(model)
    roots = torch.tensor([0, 3, 7, g.n_users + 2, g.n_users + 5])
    fanouts = (5, 4, 3)
    multi = sample_chains(g, roots, fanouts, torch.Generator().manual_seed(3), passes=3)
    assert multi.passes == 3 and len(multi.levels[0].nodes) == 3 * len(roots)
    per_pass = multi.split_passes()
    assert len(per_pass) == 3
    for ch in per_pass:
        _check_single_pass_chains(g, ch, roots, fanouts)
    assert sum(len(ch.levels[d].parent) for ch in per_pass for d in range(3)) == \
        sum(len(lvl.parent) for lvl in multi.levels)
    first_hops = [sorted(ch.levels[0].examples.tolist()) for ch in per_pass]
    assert first_hops[0] != first_hops[1] or first_hops[1] != first_hops[2]


def test_aggregating_passes_together_equals_aggregating_each_pass(trained):
    """The vectors of a multi-pass sampling are, pass by pass, the vectors of each pass alone,
    and an evaluation prediction is the mean of its passes' predictions."""
    model = trained
    model.eval()
    g, bias = model.live()
    users, items = torch.tensor([0, 5, 11]), torch.tensor([2, 2, 9])
    roots, inverse = torch.unique(torch.cat([users, items + g.n_users]), return_inverse=True)
    with torch.no_grad():
        multi = sample_chains(g, roots, model.config.fanouts, torch.Generator().manual_seed(1), passes=4)
        together = model.aggregate(multi).reshape(4, len(roots), -1)
        for p, single in enumerate(multi.split_passes()):
            assert torch.allclose(together[p], model.aggregate(single), atol=1e-6)
        passes = model.config.eval_passes
        chains = sample_chains(g, roots, model.config.fanouts, model._generator(fresh=True), passes=passes,
                               exclude=g.pair_keys(users, items))
        # each pass's root vectors, with the prediction-time evidence shrinkage of its roots
        scale = model.evidence_scale(chains).reshape(passes, len(roots), 1)
        vec = [model.aggregate(ch) * scale[p] for p, ch in enumerate(chains.split_passes())]
        b = len(users)
        by_pass = torch.stack([model.global_mean + bias[users] + bias[g.n_users + items]
                               + (v[inverse[:b]] * v[inverse[b:]]).sum(-1) for v in vec])
        assert torch.allclose(model(users, items), by_pass.mean(0), atol=1e-5)


def test_small_inference_levels_run_both_networks_and_select_with_the_same_result(trained, monkeypatch):
    """Below `_BOTH_NETS_BELOW` edges, inference runs both message networks on every edge and
    keeps each edge's own side: the vectors equal those of splitting the edges by side."""
    import recsys.models.rec.model as ec

    model = trained
    model.eval()
    g, _ = model.live()
    roots = torch.unique(torch.tensor([0, 3, 7, g.n_users + 1, g.n_users + 4]))
    chains = sample_chains(g, roots, model.config.fanouts, torch.Generator().manual_seed(2), passes=3)
    with torch.no_grad():
        assert max(len(lvl.parent) for lvl in chains.levels) < ec._BOTH_NETS_BELOW
        selected = model.aggregate(chains)
        monkeypatch.setattr(ec, "_BOTH_NETS_BELOW", 0)
        split = model.aggregate(chains)
    assert torch.allclose(selected, split, atol=1e-6)


def test_the_target_rating_is_never_its_own_evidence(ratings):
    model = fresh(ratings, prototypes=1, fanouts=(30, 30, 30))
    g = graph_of(model)
    users, items = torch.from_numpy(ratings.users[:20]), torch.from_numpy(ratings.items[:20])
    roots = torch.unique(torch.cat([users, items + g.n_users]))
    target_rows = set(range(20))
    ch = sample_chains(g, roots, (30, 30, 30), torch.Generator().manual_seed(0),
                       exclude=g.pair_keys(users, items))
    for lvl in ch.levels:
        assert not target_rows & set(lvl.examples.tolist())
    ch = sample_chains(g, roots, (30, 30, 30), torch.Generator().manual_seed(0))  # without exclusion
    assert target_rows & set(ch.levels[0].examples.tolist())


def test_a_large_batch_is_sampled_in_chain_groups_each_excluding_only_its_own_targets(ratings):
    """The evidence of a training rating does not depend on the batch size: a batch of two
    chain groups predicts exactly what the two groups predict one after the other."""
    model = fresh(ratings, chain_group=32)
    model.train()
    users, items, _ = ratings.tensors()
    state = model.sampling_state().clone()
    whole = model.forward(users[:64], items[:64])
    model.set_sampling_state(state)
    parts = torch.cat([model.forward(users[:32], items[:32]), model.forward(users[32:64], items[32:64])])
    assert torch.equal(whole, parts)
    single = fresh(ratings, chain_group=64)
    single.train()
    single.set_sampling_state(state)
    assert not torch.equal(single.forward(users[:64], items[:64]), whole)  # one group hides all 64


def test_root_truncation_keeps_a_random_subset_of_the_first_hop_only(ratings):
    model = fresh(ratings, prototypes=2)
    g = graph_of(model)
    roots = torch.arange(12)
    keep = torch.tensor([1, 2, 3, 0] * 3)
    full = sample_chains(g, roots, (30, 4), torch.Generator().manual_seed(3))
    seen: set[int] = set()
    for seed in range(20):
        ch = sample_chains(g, roots, (30, 4), torch.Generator().manual_seed(seed), root_keep=keep)
        lvl = ch.levels[0]
        counts = torch.bincount(lvl.parent, minlength=len(roots))
        deg = g.degrees()[roots]
        assert torch.equal(counts, torch.where(keep > 0, torch.minimum(keep, deg), deg))
        for e in range(len(lvl.parent)):  # real edges of the root
            root, child = int(roots[lvl.parent[e]]), int(ch.nodes(1)[lvl.child[e]])
            assert child in g.neighbours[int(g.indptr[root]):int(g.indptr[root + 1])].tolist()
        seen |= set(lvl.examples[lvl.parent == 0].tolist())
        assert int(torch.bincount(ch.levels[1].parent).max()) <= 4  # deeper levels untouched
    # a uniformly random subset, not the prototypes-first prefix of the row
    assert len(seen) == int(g.degrees()[0]) > 1
    assert len(full.levels[0].parent) == int(g.degrees()[roots].sum())


def test_cold_roots_resolve_the_bias_from_their_kept_ratings(ratings):
    model = fresh(ratings, prototypes=1, cold_roots=1.0, bias_reg=3.0, item_bias_reg=2.0)
    g, bias = model._live()
    roots = torch.tensor([5, 7, g.n_users + 3])
    ch = sample_chains(g, roots, model.config.fanouts, torch.Generator().manual_seed(0),
                       root_keep=torch.tensor([2, 0, 1]))
    got = model.cold_root_bias(ch, torch.tensor([True, False, True]))
    lvl = ch.levels[0]
    mu = float(model.global_mean)
    for pos, lam in ((0, 3.0), (2, 2.0)):
        rows = lvl.parent == pos
        other = ch.nodes(1)[lvl.child[rows]]
        want = float((lvl.values[rows] - mu - bias[other]).sum()) / (lam + int(rows.sum()))
        assert float(got[pos]) == pytest.approx(want, abs=1e-5)
    assert float(got[1]) == pytest.approx(float(bias[7]))
    # and training with cold roots runs and reaches every parameter
    model.train()
    u, i, v = ratings.tensors()
    model.loss(u[:50], i[:50], v[:50]).backward()
    assert model.gate.grad is not None and model.gate.grad.abs().sum() > 0


def test_target_free_biases_leave_the_target_rating_out(ratings):
    model = fresh(ratings, target_free_bias=True, bias_reg=3.0, item_bias_reg=2.0)
    g, bias = model._live()
    mu = float(model.global_mean)
    rows = np.array([0, 7, 42])
    users, items = torch.from_numpy(ratings.users[rows]), torch.from_numpy(ratings.items[rows])
    rb = torch.cat([bias[users], bias[g.n_users + items]])
    got = model._target_free_bias(users, items, rb)
    b = bias.double().numpy()
    for k, row in enumerate(rows):
        u, i = ratings.users[row], ratings.items[row]
        mine = (ratings.users == u) & (np.arange(len(ratings)) != row)
        want_u = (ratings.values[mine] - mu - b[g.n_users + ratings.items[mine]]).sum() / (3.0 + mine.sum())
        theirs = (ratings.items == i) & (np.arange(len(ratings)) != row)
        want_i = (ratings.values[theirs] - mu - b[ratings.users[theirs]]).sum() / (2.0 + theirs.sum())
        assert float(got[k]) == pytest.approx(want_u, abs=2e-3)
        assert float(got[len(rows) + k]) == pytest.approx(want_i, abs=2e-3)
    # a pair with no live rating keeps its biases
    unrated = [(u, i) for u in range(ratings.n_users) for i in range(ratings.n_items)
               if not ((ratings.users == u) & (ratings.items == i)).any()][0]
    u1, i1 = torch.tensor([unrated[0]]), torch.tensor([unrated[1]])
    rb1 = torch.cat([bias[u1], bias[g.n_users + i1]])
    assert torch.equal(model._target_free_bias(u1, i1, rb1), rb1)


def test_item_biases_have_their_own_ridge_weight():
    users, items = np.array([0, 1, 2]), np.array([0, 0, 0])
    values = np.array([5.0, 5.0, 5.0])
    _, bi = fit_baseline(users, items, values, 3, 1, 3.0, reg=1e6, sweeps=1, item_reg=1.0)
    assert bi[0] == pytest.approx(6.0 / 4.0)


# ---------------------------------------------------------------------------- parameters
def test_only_prototypes_have_free_vectors_and_the_size_is_fixed(ratings):
    model = fresh(ratings)
    counts = ratings.user_counts()
    top = set(np.argsort(-counts, kind="stable")[:4].tolist())
    assert set(model.prototype_users.tolist()) == top
    assert model.prototype_vectors.shape == (8, 8)
    big = build_model("rec", 10 * ratings.n_users, 10 * ratings.n_items, (1, 5), SMALL)
    assert big.parameter_count() == model.parameter_count()
    assert all(p.shape[0] != ratings.n_users and p.shape[0] != ratings.n_items for p in model.parameters())
    # a prototype's vector is its free vector, whatever its ratings
    g = graph_of(model)
    proto = int(model.prototype_users[0])
    vec = model.node_vectors(torch.tensor([proto]))
    assert torch.allclose(vec[0], model.prototype_vectors[int(g.proto_slot[proto])])


def test_gradients_reach_prototypes_and_both_message_networks(ratings):
    model = fresh(ratings)
    model.train()
    u, i, v = ratings.tensors()
    # a batch's own ratings are never evidence, so take a batch of a tenth of them
    model.loss(u[:50], i[:50], v[:50]).backward()
    for name in ("prototype_vectors", "fallback_vectors", "gate"):
        assert getattr(model, name).grad is not None and getattr(model, name).grad.abs().sum() > 0, name
    for net in (model.phi_user, model.phi_item):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# In-sample error is what the next two tests watch, and on this small random data training
# moves it by ~0.001. Cold roots (training on deliberately truncated evidence) and
# target-free biases trade in-sample fit for out-of-sample predictions, and weaker bias ridge
# leaves less in-sample error to the vectors: these tests keep the plain training setup.
IN_SAMPLE = {"cold_roots": 0.0, "target_free_bias": False, "bias_reg": 10.0, "item_bias_reg": None}


def in_sample_mse(model, ratings, group: int = 8) -> float:
    """MSE on the training ratings predicted ``group`` at a time, so that each is predicted
    from nearly all the others (one call over all of them would hide them all)."""
    u, i, v = ratings.tensors()
    pred = torch.cat([model.predict(u[s:s + group], i[s:s + group]) for s in range(0, len(u), group)])
    return float(((pred - v) ** 2).mean())


def test_training_lowers_the_error(ratings):
    model = fresh(ratings, **IN_SAMPLE)
    model.eval()
    before = in_sample_mse(model, ratings)
    Trainer(TrainConfig(epochs=6, optimizer="adam", learning_rate=0.02, batch_size=64, progress=False)).fit(model, ratings)
    assert in_sample_mse(model, ratings) < before - 0.05


@pytest.mark.parametrize(("settings"), [
    dict(optimizer="sgd", learning_rate=0.5),
    dict(optimizer="adagrad", learning_rate=0.05),
    dict(optimizer="adam", learning_rate=0.05, salr=True),
    dict(optimizer="cov-noise", noise={"estimator": "sub-batch", "base": "adam", "batch": 16}, learning_rate=0.02),
    *(dict(optimizer=kind, learning_rate=0.01) for kind in ("kfac", "ekfac", "tkfac", "tekfac")),
], ids=lambda s: s["optimizer"] + ("+salr" if s.get("salr") else ""))
def test_every_shared_optimizer_trains_rec(ratings, settings):
    """The optimizers shared with MF train REC's networks and prototypes through the same
    trainer (K-FAC family: its nn.Linear message layers; other parameters plain)."""
    model = fresh(ratings, **IN_SAMPLE)
    model.eval()
    before = in_sample_mse(model, ratings)
    Trainer(TrainConfig(epochs=3, batch_size=64, progress=False, **settings)).fit(model, ratings)
    assert in_sample_mse(model, ratings) < before - 0.01  # SGD gains 0.011-0.023 over seeds 0-3


# ---------------------------------------------------------------------------- online and cold start
def test_a_new_user_gets_a_prediction_that_moves_when_a_rating_is_added(trained, ratings):
    model = trained
    item_ids = ratings.item_ids.raw_ids
    assert model.add_user("newcomer") == ratings.n_users
    target = torch.tensor([model.ratings.item_ids.index(item_ids[0])])
    idx = torch.tensor([model.ratings.user_ids.index("newcomer")])
    before = model.explain("newcomer", item_ids[0])
    assert before["path"] == "fallback (unknown user)" and before["evidence"] == []
    fallback = float(model.predict(idx, target)[0])
    out = model.add_ratings(["newcomer", "newcomer"], [item_ids[1], item_ids[2]], [5.0, 4.0])
    assert out == {"added": 2, "replaced": 0, "new_users": 0, "new_items": 0}
    first = float(model.predict(idx, target)[0])
    assert model.known_users[idx].item() and first != fallback
    model.add_ratings(["newcomer"], [item_ids[3]], [1.0])
    second = float(model.predict(idx, target)[0])
    assert second != first
    # replacing a rating changes it too; a brand-new item with a rating is predicted by the model
    assert model.add_ratings(["newcomer"], [item_ids[3]], [5.0])["replaced"] == 1
    assert float(model.predict(idx, target)[0]) != second
    assert model.add_ratings(["0"], ["new-item"], [4.0])["new_items"] == 1
    assert model.explain("newcomer", "new-item")["path"] == "model"


def test_learn_inserts_like_add_ratings_and_the_explainer_reports_first_hop_shares(ratings):
    """The serving protocols: `learn(ratings, new)` (rows appended with `Ratings.append`, new
    users first registered through the maps) is `add_ratings` of those rows, `path` says
    ``model`` once a user has ratings, and the explainer's contributions are the first hop of
    `explain` (one `Explanation`, the rest as ``terms``)."""
    from recsys.models.base import Explainer, OnlineLearner
    from tests.conftest import with_new_ratings

    a, b = fresh(ratings), fresh(ratings)
    a.eval()
    b.eval()
    assert isinstance(a, OnlineLearner)
    items = ratings.item_ids.raw_ids
    grown, new = with_new_ratings(ratings, ["solo"], [items[0]], [3.0])  # "solo" joins the maps
    empty = np.zeros(0, dtype=np.int64)
    a.learn(ratings.append(grown.subset(empty)), empty)  # only the maps grew
    assert a.path(grown.user_ids.index("solo")) == "fallback" and a.path(-1) == "fallback"
    live, new = with_new_ratings(grown, ["solo", "0", "solo"], [items[1], items[2], items[1]], [5.0, 1.0, 4.0])
    a.learn(live, new)
    b.add_user("solo")
    b.add_ratings(["solo", "0", "solo"], [items[1], items[2], items[1]], [5.0, 1.0, 4.0],
                  live.timestamps[new].tolist())
    assert a.ratings.user_ids == b.ratings.user_ids and np.array_equal(a.ratings.values, b.ratings.values)
    solo = live.user_ids.index("solo")
    assert a.path(solo) == "model"
    users, its = torch.tensor([solo, 0, 1]), torch.tensor([3, 2, 4])
    assert torch.equal(a.predict(users, its), b.predict(users, its))
    explainer = a.explainer(live)
    assert isinstance(explainer, Explainer)
    exp = explainer.explain(solo, 3, 2)
    ref = a.explain("solo", items[3], top=None)
    first = [e for e in ref["evidence"] if e["hop"] == 1]
    assert exp.method == rec_explain.METHOD and exp.n_candidates == len(first)
    # each first-hop rating is credited with its leave-one-out effect, the largest |effect| first
    ids = np.array([e["example"] for e in first])
    effects = rec_explain.leave_one_out_effects(a, solo, 3, ids)[0]
    top = np.argsort(-np.abs(effects), kind="stable")[:2]
    assert [c.example for c in exp.contributions] == ids[top].tolist()
    assert [c.effect for c in exp.contributions] == pytest.approx(effects[top].tolist(), abs=1e-6)
    assert exp.terms == ref["terms"] and exp.prediction == ref["prediction"]
    assert all(c.shares == "hop 1" for c in exp.contributions)
    assert explainer.explain(-1, 3, 2).method.startswith("none")


def test_online_insertion_builds_the_graph_a_rebuild_would(ratings):
    """New ratings, new users and items, a replaced rating and a pair repeated within one
    insertion: the incrementally grown graph equals the graph of the same ratings built from
    scratch (so sampling does not depend on how the ratings arrived); the touched rows'
    biases are re-solved and the others kept."""
    model = fresh(ratings)
    users = ["0", "new-user", "new-user", "3", "0", "new-user"]
    items = ["0", "1", "new-item", "new-item", "0", "2"]
    values = [5.0, 4.0, 2.0, 3.0, 1.0, 3.0]   # ("0", "0") twice: the last wins
    already = model.ratings.values[(model.ratings.users == 0) & (model.ratings.items == 0)]
    before_bias = model._live()[1].clone()
    out = model.add_ratings(users, items, values)
    assert out == {"added": 5 - len(already), "replaced": len(already), "new_users": 1, "new_items": 1}
    rebuilt = fresh(ratings)
    rebuilt.bind_ratings(model.ratings)
    grown, ref = graph_of(model), graph_of(rebuilt)
    for name in ("indptr", "neighbours", "values", "examples", "n_proto", "proto_slot"):
        assert torch.equal(getattr(grown, name), getattr(ref, name)), name
    r = model.ratings
    assert r.values[(r.users == 0) & (r.items == 0)].tolist() == [1.0]
    # biases: touched items are re-solved last, each the ridge solve of its row given the users'
    # biases; every untouched node keeps its bias
    g, bias = grown, model._live()[1]
    touched_items = [r.n_users + r.item_ids.index(x) for x in ("0", "1", "2", "new-item")]
    for node in touched_items:
        lo, hi = int(g.indptr[node]), int(g.indptr[node + 1])
        resid = float((g.values[lo:hi] - model.global_mean - bias[g.neighbours[lo:hi]]).sum())
        assert float(bias[node]) == pytest.approx(resid / (model.config.item_reg + hi - lo), abs=1e-5)
    touched = {r.user_ids.index(x) for x in ("0", "new-user", "3")} | set(touched_items)
    untouched_users = [n for n in range(ratings.n_users) if n not in touched]
    assert torch.equal(bias[untouched_users], before_bias[untouched_users])


def test_a_pair_rated_twice_takes_the_new_value_in_both_ratings(ratings):
    from recsys.ratings import Ratings

    r = ratings
    twice = Ratings(np.append(r.users, r.users[0]), np.append(r.items, r.items[0]),
                    np.append(r.values, np.float32(2.0)), None, r.user_ids, r.item_ids, r.rating_scale)
    model = fresh(twice)
    user, item = r.user_ids.raw(int(r.users[0])), r.item_ids.raw(int(r.items[0]))
    assert model.add_ratings([user], [item], [5.0])["replaced"] == 1
    live = model.ratings
    assert live.values[(live.users == r.users[0]) & (live.items == r.items[0])].tolist() == [5.0, 5.0]
    rebuilt = fresh(twice)
    rebuilt.bind_ratings(live)
    assert torch.equal(graph_of(model).values, graph_of(rebuilt).values)


def test_add_ratings_checks_its_input(trained):
    with pytest.raises(ValueError, match="within the scale"):
        trained.add_ratings(["0"], ["0"], [9.0])
    with pytest.raises(ValueError, match="same length"):
        trained.add_ratings(["0"], ["0", "1"], [3.0])


def test_cold_shrink_pulls_thin_evidence_towards_the_baseline_at_prediction_time_only(ratings):
    """``cold_shrink``: a new user with one rating is predicted closer to its bias-only
    baseline than without it, a user with many ratings (nearly) as before, the explanation
    still sums to the prediction, and training is the same with the knob on."""
    tc = TrainConfig(epochs=2, optimizer="adam", learning_rate=0.01, batch_size=64, progress=False, seed=0)
    models = {}
    for c in (0.0, 2.0):
        models[c] = build_model("rec", ratings.n_users, ratings.n_items, ratings.rating_scale, {**SMALL, "cold_shrink": c})
        Trainer(tc).fit(models[c], ratings)
    for a, b in zip(models[0.0].parameters(), models[2.0].parameters(), strict=True):
        assert torch.equal(a, b)  # training never reads the knob
    model = models[0.0]
    model.eval()
    model.add_ratings(["cold"], [ratings.item_ids.raw_ids[0]], [5.0])
    graph, bias = model.live()
    nu, deg = graph.n_users, graph.degrees()
    mu = float(model.global_mean)
    items = torch.nonzero(deg[nu:] >= 8).squeeze(1)
    items = items[items != 0][:10]  # not the new user's rated item (a batch hides its rated pairs)
    heavy = int(torch.argmax(deg[:nu]))
    unrated = torch.tensor([not bool(((torch.from_numpy(ratings.users) == heavy) & (torch.from_numpy(ratings.items) == int(i))).any())
                            for i in items])
    cold = model.ratings.user_ids.index("cold")

    def raw(user: int, its: torch.Tensor, c: float) -> torch.Tensor:
        model.config = dataclasses.replace(model.config, cold_shrink=c)
        with torch.no_grad():
            return model(torch.full_like(its, user), its)

    for c in (0.5, 2.0):
        base = mu + bias[cold] + bias[nu + items]
        off, on = (raw(cold, items, 0.0) - base).abs(), (raw(cold, items, c) - base).abs()
        assert bool((on <= off + 1e-6).all()) and float(on.sum()) < float(off.sum()) * (1 - 0.5 * np.exp(-1 / c))
    its = items[unrated]
    assert len(its) and torch.allclose(raw(heavy, its, 0.5), raw(heavy, its, 0.0), atol=1e-3)
    model.config = dataclasses.replace(model.config, cold_shrink=2.0)
    ex = model.explain("cold", ratings.item_ids.raw_ids[int(items[0])], top=None)
    hop1 = sum(e["share"] for e in ex["evidence"] if e["hop"] == 1)
    assert ex["path"] == "model"
    assert hop1 + sum(ex["terms"].values()) == pytest.approx(float(raw(cold, items[:1], 2.0)[0]), abs=1e-4)
    with pytest.raises(ValueError, match="cold_shrink"):
        RECConfig(cold_shrink=-1.0)


def test_zero_evidence_falls_back_to_the_baseline_and_says_so(ratings):
    model = fresh(ratings)
    model.add_user("ghost")
    model.add_item("ghost-item")
    g, bias = model._live()
    u = torch.tensor([model.ratings.user_ids.index("ghost"), 0, -1])
    i = torch.tensor([0, model.ratings.item_ids.index("ghost-item"), 0])
    pred = model.predict(u, i)
    mu = float(model.global_mean)
    assert float(pred[0]) == pytest.approx(mu + float(bias[g.n_users + 0]))
    assert float(pred[1]) == pytest.approx(mu + float(bias[0]))
    assert float(pred[2]) == pytest.approx(float(pred[0]))
    assert model.explain("0", "ghost-item")["path"] == "fallback (item has no ratings)"


def test_baseline_biases_are_the_ridge_solution():
    users, items = np.array([0, 0, 1]), np.array([0, 1, 1])
    values = np.array([5.0, 3.0, 1.0])
    bu, bi = fit_baseline(users, items, values, 2, 2, 3.0, reg=0.0, sweeps=200)
    pred = 3.0 + bu[users] + bi[items]
    assert np.allclose(pred, values, atol=1e-3)


# ---------------------------------------------------------------------------- artefacts, explanations
def test_artefact_round_trip_keeps_predictions_and_live_ratings(trained, tmp_path):
    model = trained
    save_artefact(tmp_path / "rec", model, model.ratings)
    art = load_artefact(tmp_path / "rec")
    assert art.model.ratings is art.train
    u, i, _ = art.train.tensors()
    assert torch.equal(art.model.predict(u, i), fresh_copy_predict(model, u, i))
    assert art.model.config == model.config


def fresh_copy_predict(model, u, i):
    # a model re-bound to its own live ratings (what loading does) predicts the same
    clone = build_model("rec", model.n_users, model.n_items, model.rating_scale, model.config_dict())
    clone.load_state_dict(model.state_dict())
    clone.bind_ratings(model.ratings)
    clone.eval()
    return clone.predict(u, i)


def test_explanations_sum_to_the_prediction(trained, ratings):
    model = trained
    for user, item in [("1", "2"), ("5", "7")]:
        ex = model.explain(user, item, top=None)
        assert ex["path"] == "model"
        hop1 = sum(e["share"] for e in ex["evidence"] if e["hop"] == 1)
        total = hop1 + sum(ex["terms"].values())
        assert total == pytest.approx(ex["prediction"], abs=1e-4) or not 1 < ex["prediction"] < 5
        assert {e["hop"] for e in ex["evidence"]} <= {1, 2, 3}
        for e in ex["evidence"]:
            r = model.ratings
            assert float(r.values[e["example"]]) == e["rating"]
            assert r.user_ids.raw(int(r.users[e["example"]])) == e["user"]
        first = [e for e in ex["evidence"] if e["hop"] == 1]
        assert first and all(e["user"] == user or e["item"] == item for e in first)
        assert not any(e["user"] == user and e["item"] == item for e in ex["evidence"])


def test_config_validation():
    with pytest.raises(ValueError, match="fanouts"):
        RECConfig(fanouts=())
    assert RECConfig(fanouts=[4, 2]).fanouts == (4, 2)
    with pytest.raises(ValueError, match="unknown rec config keys"):
        build_model("rec", 2, 2, (1, 5), {"fanout": 3})


def test_same_code_runs_on_cuda_when_available(ratings):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = fresh(ratings).to("cuda")
    u, i, _ = ratings.tensors("cuda")
    pred = model.predict(u, i)
    assert pred.device.type == "cuda" and torch.isfinite(pred).all()


# ---------------------------------------------------------------------------- command line
def test_command_line_trains_evaluates_and_predicts_rec(tmp_path, capsys):
    from recsys.cli import main

    frame = make_ratings(n_users=40, n_items=30, n=600).to_frame()
    path = tmp_path / "ratings.csv"
    frame[["user", "item", "rating", "timestamp"]].to_csv(path, index=False, header=False)
    common = ["--ratings", str(path), "--columns", "user,item,rating,timestamp", "--model", "rec",
              "--epochs", "2", "--batch-size", "32", "--fanouts", "4,2", "--prototypes", "5", "--quiet"]
    assert main(["evaluate", *common, "--split", "random:0.2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "rec" and 0 < out["rmse"] < 2
    assert main(["train", *common, "--out", str(tmp_path / "m"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_config"]["optimizer"] == "adam"  # REC's training defaults
    assert summary["model_config"]["fanouts"] == [4, 2]
    assert main(["predict", "--model", str(tmp_path / "m"), "--user", "1", "--item", "2", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["path"] == "model" and 1 <= pred["prediction"] <= 5
