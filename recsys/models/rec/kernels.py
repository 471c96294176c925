"""Compiled CPU kernels for evidence-chain inference: chain sampling and aggregation.

A single REC prediction is a few hundred edges over three levels. As tensor operations it is
about 560 dispatches of a few microseconds each (the arithmetic is a few tens of
microseconds), which is why one prediction took 3-4 ms on the CPU. These numba kernels do a
level's sampling, and the whole bottom-up aggregation, in machine code:

- `sample_level` (with `expandable`, `truncate_roots`, `unique_inverse`, `reverse_edges`)
  samples one level; `recsys.models.rec.chains.sample_chains_compiled` drives them level by
  level and draws **the same chains** as the tensor version
  (`recsys.models.rec.chains.sample_chains_vectorised`), bit for bit: it takes the same
  key from the same ``torch.Generator``, computes the same keyed random numbers from it
  (`keyed_uniform32`, `keyed_uniform64`: the tensor code's `keyed_uniform`, on the same
  64-bit arithmetic) and does the same arithmetic on them. So a query's answer, a training run, the rollback log's
  replay and the tests of the sampled chains do not depend on which of the two ran. It
  covers inference and training (evidence dropout, root truncation); `sample_chains` uses it
  for every CPU graph.
- `aggregate_compiled` computes `EvidenceChainModel.aggregate`'s root vectors without
  autograd (inference only), equal to the tensor version up to float32 rounding (the
  matrix products go through BLAS in a different order).

The tensor code stays the one definition on every device, the one whose aggregation trains,
and the reference these kernels are tested against (``tests/test_rec_kernels.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

# ---------------------------------------------------------------------------- sampling


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ID_MULTIPLIER = np.uint64(0xD6E8FEB86659FD93)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, nogil=True, inline="always")
def _mix64(z: np.uint64) -> np.uint64:
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True, inline="always")
def _id_hash(base: np.uint64, node: int) -> np.uint64:
    """The per-id part of `recsys.models.rec.chains.keyed_uniform`."""
    return _mix64(base ^ (np.uint64(node) * _ID_MULTIPLIER))


@njit(cache=True, nogil=True, inline="always")
def draw_id(node: int, n_nodes: int, n_users: int, key_users: int, key_items: int) -> int:
    """`recsys.models.rec.chains.EvidenceGraph.draw_ids` of one node id (pass offset included)."""
    g = node % n_nodes
    p = node // n_nodes
    if g < n_users:
        if g < key_users:
            return g + p * (key_users + key_items)
        return g + (1 << 40) + p * (1 << 42)
    i = g - n_users
    if i < key_items:
        return key_users + i + p * (key_users + key_items)
    return i + (1 << 41) + p * (1 << 42)


@njit(cache=True, nogil=True, inline="always")
def keyed_uniform32(h: np.uint64, column: int) -> np.float32:
    """`recsys.models.rec.chains.keyed_uniform` (float32) of column ``column`` under the id hash ``h``."""
    z = _mix64(h + np.uint64(column + 1) * _GOLDEN)
    return np.float32(z >> np.uint64(40)) * np.float32(5.9604644775390625e-08)


@njit(cache=True, nogil=True, inline="always")
def keyed_uniform64(h: np.uint64, column: int) -> np.float64:
    """`recsys.models.rec.chains.keyed_uniform` (float64) of column ``column`` under the id hash ``h``."""
    z = _mix64(h + np.uint64(column + 1) * _GOLDEN)
    return np.float64(z >> np.uint64(11)) * 1.1102230246251565e-16


@njit(cache=True, nogil=True)
def keyed_uniforms32(base: np.uint64, ids: np.ndarray, columns: int) -> np.ndarray:
    """``keyed_uniform(base, ids[:, None], arange(columns)[None])``, float32 ``[m, columns]``
    (what the tests compare with the tensor version)."""
    out = np.empty((len(ids), columns), np.float32)
    for r in range(len(ids)):
        h = _id_hash(base, ids[r])
        for c in range(columns):
            out[r, c] = keyed_uniform32(h, c)
    return out


@njit(cache=True, nogil=True)
def keyed_pair_uniforms64(base: np.uint64, ids: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``keyed_uniform(base, ids, columns, float64)`` for pairs ``ids [m]``, ``columns [m]``."""
    out = np.empty(len(ids), np.float64)
    for r in range(len(ids)):
        out[r] = keyed_uniform64(_id_hash(base, ids[r]), columns[r])
    return out


@njit(cache=True, nogil=True, inline="always")
def _stratified(slot: int, jitter: np.float32, size: int, k: int, rotation: np.float32) -> int:
    """`recsys.models.rec.chains._stratified` for one slot, with its float32 arithmetic."""
    size_ = max(size, 1)
    k_ = max(k, 1)
    lo = slot * size_ // k_
    hi = (slot + 1) * size_ // k_
    off = min(lo + int(jitter * np.float32(hi - lo)), hi - 1)
    return (off + int(rotation * np.float32(size_))) % size_


@njit(cache=True, nogil=True)
def expandable(nodes: np.ndarray, n_nodes: int, proto_slot: np.ndarray) -> np.ndarray:
    """Positions ``int64 [m]`` among ``nodes`` (ids, pass offsets included) of the
    non-prototypes, in order: the nodes a level expands."""
    out = np.empty(len(nodes), np.int64)
    m = 0
    for j in range(len(nodes)):
        if proto_slot[nodes[j] % n_nodes] < 0:
            out[m] = j
            m += 1
    return out[:m]


@njit(cache=True, nogil=True)
def sample_level(indptr: np.ndarray, n_proto: np.ndarray, neighbours: np.ndarray, values: np.ndarray,
                 examples: np.ndarray, nodes: np.ndarray, expand: np.ndarray, n_nodes: int, fanout: int,
                 prototypes_only: bool, draw_base: np.uint64, exclude: np.ndarray,
                 n_users: int, n_items: int, evidence_dropout: np.float32, key_users: int, key_items: int):
    """One level of `sample_neighbours` for the nodes ``nodes[expand]``, each node drawing its
    float32 numbers under its `draw_id` (pass offset included; ``key_users``, ``key_items``:
    the graph's key sizes) from the level's ``draw_base``
    (`recsys.models.rec.chains.stream_base`; columns as `sample_neighbours` says; ``exclude``
    sorted pair keys): the edges ``(parent positions in nodes, child ids with the parent's pass
    offset, values, examples)``, grouped by parent in order."""
    m = len(expand)
    parent = np.empty(m * fanout, np.int64)
    child = np.empty(m * fanout, np.int64)
    pos_out = np.empty(m * fanout, np.int64)
    n_ex = len(exclude)
    e = 0
    for r in range(m):
        p = expand[r]
        node = nodes[p]
        g = node % n_nodes
        offset = node - g
        start = indptr[g]
        n_p = n_proto[g]
        kp = min(n_p, fanout)
        n_other = 0 if prototypes_only else indptr[g + 1] - start - n_p
        ko = 0 if prototypes_only else min(n_other, fanout - kp)
        taken = kp + ko
        h = _id_hash(draw_base, draw_id(node, n_nodes, n_users, key_users, key_items))
        if evidence_dropout > 0 and keyed_uniform32(h, fanout + 2) < evidence_dropout:
            taken = min(int(keyed_uniform32(h, fanout + 3) * np.float32(taken)) + 1, taken)
        rotation_p, rotation_o = keyed_uniform32(h, fanout), keyed_uniform32(h, fanout + 1)
        for j in range(taken):
            if j < kp:
                pos = start + _stratified(j, keyed_uniform32(h, j), n_p, kp, rotation_p)
            else:
                pos = start + n_p + _stratified(j - kp, keyed_uniform32(h, j), n_other, ko, rotation_o)
            c = neighbours[pos]
            if n_ex:
                key = min(g, c) * n_items + (max(g, c) - n_users)
                at = np.searchsorted(exclude, key)
                if at < n_ex and exclude[at] == key:
                    continue
            parent[e] = p
            child[e] = c + offset
            pos_out[e] = pos
            e += 1
    pos_out = pos_out[:e]
    return parent[:e], child[:e], values[pos_out], examples[pos_out]


@njit(cache=True, nogil=True)
def truncate_roots(parent: np.ndarray, child: np.ndarray, nodes: np.ndarray, expand: np.ndarray,
                   draw_base: np.uint64, limit: np.ndarray, n_nodes: int, n_users: int, key_users: int,
                   key_items: int) -> np.ndarray:
    """`sample_neighbours`' ``truncate``: which edges ``[E]`` (grouped by ``parent``, positions
    in ``nodes``; ``child`` ids) to keep, a parent ``p`` with ``limit[p] > 0`` keeping the
    ``limit[p]`` of its edges that come first when ordered by ``r + 0.5·u``, ``r`` the parent's
    row among the expanded nodes ``expand`` and ``u`` the edge's float64 draw (under the
    parent's `draw_id`, column the child's, from ``draw_base``: the tensor code's order, to
    the last bit)."""
    n = len(parent)
    key = np.empty(n, np.float64)
    for e in range(n):
        h = _id_hash(draw_base, draw_id(nodes[parent[e]], n_nodes, n_users, key_users, key_items))
        u = keyed_uniform64(h, draw_id(child[e], n_nodes, n_users, key_users, key_items))
        key[e] = np.float64(np.searchsorted(expand, parent[e])) + u * 0.5
    order = np.argsort(key, kind="mergesort")
    chosen = np.empty(n, np.bool_)
    start = 0
    for k in range(n):  # order visits the groups in turn; rank = place within its group
        if k > 0 and parent[order[k]] != parent[order[k - 1]]:
            start = k
        p = parent[order[k]]
        chosen[order[k]] = limit[p] <= 0 or k - start < limit[p]
    return chosen


@njit(cache=True, nogil=True)
def unique_inverse(ids: np.ndarray):
    """``(sorted unique ids, inverse)`` as ``torch.unique(..., return_inverse=True)``."""
    n = len(ids)
    order = np.argsort(ids)
    inverse = np.empty(n, np.int64)
    uniq = np.empty(n, np.int64)
    m = -1
    for k in range(n):
        v = ids[order[k]]
        if m < 0 or uniq[m] != v:
            m += 1
            uniq[m] = v
        inverse[order[k]] = m
    return uniq[:m + 1], inverse


@njit(cache=True, nogil=True)
def reverse_edges(level_nodes: np.ndarray, parent: np.ndarray, child_pos: np.ndarray,
                  next_parent: np.ndarray, next_child: np.ndarray, n_next: int) -> np.ndarray:
    """`recsys.models.rec.chains.Level.reverse_edge`: for each edge parent -> child, the index of
    the first next-level edge child -> parent, ``-1`` if the child did not sample it
    (``next_parent`` ascending)."""
    first = np.searchsorted(next_parent, np.arange(n_next + 1))
    out = np.full(len(parent), -1, np.int64)
    for e in range(len(parent)):
        c = child_pos[e]
        want = level_nodes[parent[e]]
        for f in range(first[c], first[c + 1]):
            if next_child[f] == want:
                out[e] = f
                break
    return out


# ---------------------------------------------------------------------------- aggregation


@njit(cache=True, nogil=True, inline="always")
def _gate_into(out: np.ndarray, mean: np.ndarray, count: np.float32, side: int, gate: np.ndarray,
               fallback: np.ndarray) -> None:
    """``out = lerp(fallback[side], mean, σ(a·log max(count, 1) + c))`` (`_gated`)."""
    z = gate[side, 0] * np.float32(np.log(max(count, np.float32(1.0)))) + gate[side, 1]
    w = np.float32(1.0) / (np.float32(1.0) + np.float32(np.exp(-z)))
    for f in range(len(out)):
        start = fallback[side, f]
        diff = mean[f] - start
        out[f] = start + w * diff if w < 0.5 else mean[f] - diff * (np.float32(1.0) - w)


@njit(cache=True, nogil=True, inline="always")
def _mlp(x: np.ndarray, w1t: np.ndarray, b1: np.ndarray, w2t: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """One hidden ReLU layer: ``relu(x @ w1t + b1) @ w2t + b2``."""
    h = np.dot(x, w1t)
    for r in range(h.shape[0]):
        for c in range(h.shape[1]):
            v = h[r, c] + b1[c]
            h[r, c] = v if v > 0 else np.float32(0.0)
    out = np.dot(h, w2t)
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            out[r, c] += b2[c]
    return out


@njit(cache=True, nogil=True, inline="always")
def _free_vectors(nodes: np.ndarray, n_nodes: int, proto_slot: np.ndarray, protos: np.ndarray):
    """Free vectors ``[n, K]`` of ``nodes`` (zero for non-prototypes) and their prototype
    mask ``[n]``."""
    vec = np.zeros((len(nodes), protos.shape[1]), np.float32)
    is_proto = np.zeros(len(nodes), np.bool_)
    for j in range(len(nodes)):
        s = proto_slot[nodes[j] % n_nodes]
        if s >= 0:
            vec[j] = protos[s]
            is_proto[j] = True
    return vec, is_proto


@njit(cache=True, nogil=True)
def aggregate_levels(node_off: np.ndarray, nodes: np.ndarray, edge_off: np.ndarray, parent: np.ndarray,
                     child: np.ndarray, values: np.ndarray, reverse: np.ndarray, n_nodes: int, n_users: int,
                     proto_slot: np.ndarray, bias: np.ndarray, root_bias: np.ndarray, mu: np.float32,
                     protos: np.ndarray, fallback: np.ndarray, gate: np.ndarray, rating_levels: np.ndarray,
                     w1t_user: np.ndarray, b1_user: np.ndarray, w2t_user: np.ndarray, b2_user: np.ndarray,
                     w1t_item: np.ndarray, b1_item: np.ndarray, w2t_item: np.ndarray, b2_item: np.ndarray
                     ) -> np.ndarray:
    """`EvidenceChainModel.aggregate` (no record) over flattened levels: level ``d``'s nodes
    are ``nodes[node_off[d]:node_off[d+1]]`` (the leaves last), its edges
    ``edge_off[d]:edge_off[d+1]`` of ``parent``/``child`` (positions within their levels),
    ``values`` and ``reverse``. ``root_bias`` (empty: none) replaces the roots' biases.
    Returns the root vectors ``float32 [n_0, K]``."""
    depth = len(edge_off) - 1
    k = protos.shape[1]
    n_levels = rating_levels.shape[0]
    step = rating_levels[1] - rating_levels[0]
    one = np.float32(1.0)
    vec, valid = _free_vectors(nodes[node_off[depth]:], n_nodes, proto_slot, protos)
    have_below = False
    sums_b = np.zeros((0, k), np.float32)
    counts_b = np.zeros(0, np.float32)
    msg_b = np.zeros((0, k), np.float32)
    ok_b = np.zeros(0, np.bool_)
    mean = np.empty(k, np.float32)
    for d in range(depth - 1, -1, -1):
        n0, n1 = node_off[d], node_off[d + 1]
        c0 = node_off[d + 1]
        e0, e1 = edge_off[d], edge_off[d + 1]
        n_e = e1 - e0
        n_l = n1 - n0
        new_vec, is_proto = _free_vectors(nodes[n0:n1], n_nodes, proto_slot, protos)
        if n_e == 0:  # no evidence at this level: only prototypes are valid
            vec, valid, have_below = new_vec, is_proto, False
            continue
        x = np.empty((n_e, k + n_levels + 1), np.float32)
        ok = np.empty(n_e, np.bool_)
        into_item = np.empty(n_e, np.bool_)
        n_item = 0
        for e in range(n_e):
            c = child[e0 + e]
            cnode = nodes[c0 + c] % n_nodes
            pnode = nodes[n0 + parent[e0 + e]] % n_nodes
            cok = valid[c]
            r = reverse[e0 + e] if have_below else -1
            if r >= 0 and proto_slot[cnode] < 0:  # the child's mean without this parent's message
                used = one if ok_b[r] else np.float32(0.0)
                cnt = counts_b[c] - used
                denom = max(cnt, one)
                for f in range(k):
                    mean[f] = (sums_b[c, f] - msg_b[r, f] * used) / denom
                _gate_into(x[e, :k], mean, cnt, 1 if cnode >= n_users else 0, gate, fallback)
                cok = cnt > 0
            else:
                x[e, :k] = vec[c]
            v = values[e0 + e]
            for lv in range(n_levels):
                x[e, k + lv] = max(np.float32(0.0), one - abs(v - rating_levels[lv]) / step)
            pb = root_bias[parent[e0 + e]] if (d == 0 and len(root_bias)) else bias[pnode]
            x[e, k + n_levels] = v - mu - pb - bias[cnode]
            ok[e] = cok
            into_item[e] = pnode >= n_users
            n_item += into_item[e]
        msg = np.empty((n_e, k), np.float32)
        for side in range(2):
            n_side = n_item if side == 1 else n_e - n_item
            if n_side == 0:
                continue
            idx = np.empty(n_side, np.int64)
            m = 0
            for e in range(n_e):
                if into_item[e] == (side == 1):
                    idx[m] = e
                    m += 1
            xs = np.ascontiguousarray(x[idx])
            if side == 0:
                out = _mlp(xs, w1t_user, b1_user, w2t_user, b2_user)
            else:
                out = _mlp(xs, w1t_item, b1_item, w2t_item, b2_item)
            for j in range(n_side):
                msg[idx[j]] = out[j]
        sums = np.zeros((n_l, k), np.float32)
        counts = np.zeros(n_l, np.float32)
        for e in range(n_e):
            if ok[e]:
                p = parent[e0 + e]
                for f in range(k):
                    sums[p, f] += msg[e, f]
                counts[p] += one
            else:
                msg[e] = 0.0
        valid = is_proto.copy()
        for j in range(n_l):
            if not is_proto[j]:  # generated: the gated mean of its messages
                denom = max(counts[j], one)
                for f in range(k):
                    mean[f] = sums[j, f] / denom
                _gate_into(new_vec[j], mean, counts[j], 1 if nodes[n0 + j] % n_nodes >= n_users else 0, gate,
                           fallback)
                valid[j] = counts[j] > 0
        vec = new_vec
        sums_b, counts_b, msg_b, ok_b, have_below = sums, counts, msg, ok, True
    for j in range(node_off[1] - node_off[0]):
        if not valid[j]:
            vec[j] = fallback[1 if nodes[j] % n_nodes >= n_users else 0]
    return vec


def _weights(net: torch.nn.Sequential) -> tuple[np.ndarray, ...]:
    """``(W1ᵀ, b1, W2ᵀ, b2)`` of a `_Message` network: views of its float32 parameters (the
    transposes Fortran-ordered, which BLAS takes as they are; no copy per call)."""
    first, last = net[0], net[-1]
    return (first.weight.detach().numpy().T, first.bias.detach().numpy(),
            last.weight.detach().numpy().T, last.bias.detach().numpy())


def aggregate_compiled(model, chains, root_bias: torch.Tensor | None = None) -> torch.Tensor:
    """`EvidenceChainModel.aggregate` of ``chains`` (no record) for a CPU float32 model in
    inference: root vectors ``[passes·n_0, K]``."""
    graph, bias = model.live()
    depth = len(chains.levels)
    level_nodes = [chains.nodes(d).numpy() for d in range(depth + 1)]
    node_off = np.zeros(depth + 2, np.int64)
    np.cumsum([len(n) for n in level_nodes], out=node_off[1:])
    edge_off = np.zeros(depth + 1, np.int64)
    np.cumsum([len(lvl.parent) for lvl in chains.levels], out=edge_off[1:])

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(lvl, name).numpy() for lvl in chains.levels])

    rb = np.empty(0, np.float32) if root_bias is None else root_bias.detach().numpy().astype(np.float32)
    # a single pass's ids are graph nodes: a modulus that leaves them as they are
    n_nodes = chains.n_nodes if chains.passes > 1 else np.iinfo(np.int64).max
    vec = aggregate_levels(
        node_off, np.concatenate(level_nodes), edge_off, cat("parent"), cat("child"), cat("values"), cat("reverse_edge"),
        n_nodes, graph.n_users, graph.proto_slot.numpy(), bias.detach().numpy(), rb,
        np.float32(float(model.global_mean)), model.prototype_table.detach().numpy(),
        model.fallback_vectors.detach().numpy(), model.gate.detach().numpy(), model.rating_levels.numpy(),
        *_weights(model.phi_user), *_weights(model.phi_item))
    return torch.from_numpy(vec)
