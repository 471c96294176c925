"""Recursive evidence chains, sampled level by level over the live ratings graph.

The ratings form a bipartite graph on ``N = n_users + n_items`` *nodes*: user ``u`` is node
``u``, item ``i`` is node ``n_users + i`` (a "global id"). `EvidenceGraph` holds it as one CSR
over nodes whose rows list a node's rated neighbours with the **prototype neighbours first**,
then the others, each group in a fixed random order: by a seeded hash of the rating's row and
side (`edge_hash`), so the order is a function of the ratings alone and `EvidenceGraph.insert`
can add ratings where a rebuild would put them, without re-sorting.

`sample_chains` expands a batch of root nodes breadth first, one *level* per fanout, with no
Python loop over nodes or ratings:

- Every non-prototype node of a level draws up to ``fanout`` neighbours (prototypes first,
  then the others) by *stratified sampling with a random rotation* over its CSR row: slot
  ``j`` of ``k`` takes one random entry of the ``j``-th of ``k`` equal strata, so the draw is
  without replacement, each entry is equally likely, and a row no longer than the fanout is
  taken whole. Prototypes are never expanded: they have free vectors.
- At the last level only prototype neighbours are drawn, because a non-prototype at depth 0
  has no evidence and would be dropped anyway.
- Edges whose (user, item) pair is in ``exclude`` (the batch's target ratings) are removed
  everywhere, so a target rating is never evidence for its own prediction.
- The children of a level are de-duplicated (``torch.unique``): a node reached from several
  parents is expanded and computed once per level ("memoisation within a batch").
- Several independent samplings (``passes``, averaged at prediction time) are drawn in one
  go, each pass's nodes under their own ids (`Chains`), so their cost is one set of tensor
  operations, not one per pass: what a single prediction's latency is made of.
- Every random number is *keyed* (`keyed_uniform`): a function of the call's key (one number
  taken from the generator per call, `draw_key`), the level and the node (pass included), not
  the next number of a stream. So a node draws the same neighbours whichever other nodes are
  sampled with it, and hiding a rating drops its edges and what hung below them and changes
  no other draw: the leave-one-out an explanation computes, and a same-trajectory retrain
  without the rating, differ from the full run only where the rating was (with a stream, one
  dropped child shifted every later draw of the call).

The immediate-parent skip is done at aggregation time (see `Level.reverse_edge`), because a
memoised node is shared by all its parents.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from recsys.models.rec.kernels import (
    expandable,
    reverse_edges,
    sample_level,
    truncate_roots,
    unique_inverse,
)
from recsys.ratings import Ratings


@dataclass(frozen=True)
class EvidenceGraph:
    """The live ratings as a node CSR with prototype neighbours first.

    Attributes (``N = n_users + n_items`` nodes, ``2n`` directed edges for ``n`` ratings):
        indptr: ``int64 [N+1]``; row ``g`` is ``indptr[g]:indptr[g+1]``.
        neighbours: ``int64 [2n]`` global ids of the rated neighbours.
        values: ``float32 [2n]`` the ratings.
        examples: ``int64 [2n]`` row of each rating in the live `Ratings`.
        n_proto: ``int64 [N]`` how many of a row's neighbours are prototypes (at the front).
        proto_slot: ``int64 [N]`` row of the node in the prototype table (user prototypes
            ``0..p_u-1``, item prototypes ``p_u..p_u+p_i-1``), ``-1`` for other nodes.
        n_users, n_items: sizes of the two sides.
    """

    indptr: torch.Tensor
    neighbours: torch.Tensor
    values: torch.Tensor
    examples: torch.Tensor
    n_proto: torch.Tensor
    proto_slot: torch.Tensor
    n_users: int
    n_items: int
    seed: int = 0
    #: the sizes the draws are keyed by (`draw_ids`): the trained model's, so that growing the
    #: graph (new users shift every item's node id) changes no existing node's draws; 0: own sizes
    key_users: int = 0
    key_items: int = 0

    @property
    def n_nodes(self) -> int:
        return self.n_users + self.n_items

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    @property
    def key_sizes(self) -> tuple[int, int]:
        """``(users, items)`` the draws are keyed by (`draw_ids`)."""
        return (self.key_users or self.n_users, self.key_items or self.n_items)

    def draw_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The identity ``int64`` under which node ``ids`` (pass offsets included) draw their
        random numbers (`keyed_uniform`): with ``U, I = key_sizes``, user ``u < U`` is ``u``,
        item ``i < I`` is ``U + i``, pass ``p`` adds ``p·(U + I)`` (so on a graph of those sizes
        it is the id itself); a user or item added since gets ``2^40 + u`` or ``2^41 + i``, pass
        ``p`` adding ``p·2^42``. A node keeps its identity however the graph grows
        (`recsys.models.rec.kernels.draw_id` is the same)."""
        ku, ki = self.key_sizes
        n, nu = self.n_nodes, self.n_users
        g, p = ids % n, ids // n
        user = g < nu
        index = torch.where(user, g, g - nu)
        old = index < torch.where(user, ku, ki)
        key = torch.where(user, torch.where(old, index, index + (1 << 40)),
                          torch.where(old, ku + index, index + (1 << 41)))
        return key + p * torch.where(old, ku + ki, 1 << 42)

    def degrees(self) -> torch.Tensor:
        """Ratings per node, ``int64 [N]``."""
        return self.indptr[1:] - self.indptr[:-1]

    def to(self, device: torch.device | str) -> EvidenceGraph:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return EvidenceGraph(**moved)

    @classmethod
    def build(cls, ratings: Ratings, prototype_users: np.ndarray, prototype_items: np.ndarray,
              *, seed: int = 0, key_sizes: tuple[int, int] = (0, 0),
              device: torch.device | str = "cpu") -> EvidenceGraph:
        """The graph of ``ratings`` with the given prototypes (user and item indices, each
        ``int64 [p]``); within a row, the prototype neighbours and then the others are each in
        a fixed random order (`edge_hash` of ``seed``, ties by rating row)."""
        nu, ni = ratings.n_users, ratings.n_items
        n_nodes = nu + ni
        slot = np.full(n_nodes, -1, dtype=np.int64)
        slot[np.asarray(prototype_users, dtype=np.int64)] = np.arange(len(prototype_users))
        slot[nu + np.asarray(prototype_items, dtype=np.int64)] = len(prototype_users) + np.arange(len(prototype_items))
        n = len(ratings)
        source = np.concatenate([ratings.users, nu + ratings.items])
        cols = np.concatenate([nu + ratings.items, ratings.users])
        vals = np.concatenate([ratings.values, ratings.values]).astype(np.float32)
        examples = np.concatenate([np.arange(n), np.arange(n)]).astype(np.int64)
        non_proto = slot[cols] < 0
        item_row = np.repeat(np.array([False, True]), n)
        order = np.lexsort((examples, edge_hash(examples, item_row, seed), non_proto, source))
        indptr = np.zeros(n_nodes + 1, dtype=np.int64)
        np.cumsum(np.bincount(source, minlength=n_nodes), out=indptr[1:])
        n_proto = np.bincount(source[~non_proto], minlength=n_nodes).astype(np.int64)
        t = torch.from_numpy
        return cls(t(indptr), t(cols[order]), t(vals[order]), t(examples[order]), t(n_proto),
                   t(slot), nu, ni, seed, *key_sizes).to(device)

    def insert(self, users: np.ndarray, items: np.ndarray, values: np.ndarray, examples: np.ndarray,
               n_users: int, n_items: int) -> EvidenceGraph:
        """The graph with new ratings ``(users, items, values)`` (indices, ``[k]`` each; rating
        rows ``examples [k]``) added and the sides grown to ``n_users``/``n_items`` (new
        nodes are not prototypes): equal to `build` on the grown ratings, at the cost of
        moving the arrays once (O(n)) and reading the touched rows, not of a sort. On the
        CPU; the result goes back to this graph's device."""
        old_nu, old_ni = self.n_users, self.n_items
        du, di = n_users - old_nu, n_items - old_ni
        if du < 0 or di < 0:
            raise ValueError(f"a graph cannot shrink: {old_nu}x{old_ni} -> {n_users}x{n_items}")
        g = self.to("cpu")
        indptr, nb = g.indptr.numpy(), g.neighbours.numpy()
        vals, ex = g.values.numpy(), g.examples.numpy()
        n_proto, slot = g.n_proto.numpy(), g.proto_slot.numpy()
        if du:  # item nodes move up by the new users
            nb = np.where(nb >= old_nu, nb + du, nb)
            indptr = np.concatenate([indptr[:old_nu + 1], np.full(du, indptr[old_nu]), indptr[old_nu + 1:]])
            n_proto = np.concatenate([n_proto[:old_nu], np.zeros(du, np.int64), n_proto[old_nu:]])
            slot = np.concatenate([slot[:old_nu], np.full(du, -1, np.int64), slot[old_nu:]])
        if di:
            indptr = np.concatenate([indptr, np.full(di, indptr[-1])])
            n_proto = np.concatenate([n_proto, np.zeros(di, np.int64)])
            slot = np.concatenate([slot, np.full(di, -1, np.int64)])
        k, nu = len(users), n_users
        if k:
            source = np.concatenate([users, nu + items]).astype(np.int64)
            cols = np.concatenate([nu + items, users]).astype(np.int64)
            new_vals = np.concatenate([values, values]).astype(np.float32)
            new_ex = np.concatenate([examples, examples]).astype(np.int64)
            new_np = slot[cols] < 0
            item_row = np.repeat(np.array([False, True]), k)
            new_h = edge_hash(new_ex, item_row, self.seed)
            # each new edge's place in its row: how many of the row's edges sort before it
            owner, pos = row_positions(indptr, source)
            old_np = slot[nb[pos]] < 0
            old_h = edge_hash(ex[pos], (source >= nu)[owner], self.seed)
            o_np, o_h, o_ex = new_np[owner], new_h[owner], new_ex[owner]
            before = (old_np < o_np) | ((old_np == o_np) & ((old_h < o_h) | ((old_h == o_h) & (ex[pos] < o_ex))))
            at = indptr[source] + np.bincount(owner, weights=before, minlength=2 * k).astype(np.int64)
            order = np.lexsort((new_ex, new_h, new_np, source))  # equal places keep the row's order
            at = at[order]
            nb = np.insert(nb, at, cols[order])
            vals = np.insert(vals, at, new_vals[order])
            ex = np.insert(ex, at, new_ex[order])
            counts = np.bincount(source, minlength=len(slot))
            indptr = indptr + np.concatenate([[0], np.cumsum(counts)])
            n_proto = n_proto + np.bincount(source[~new_np], minlength=len(slot))
        t = torch.from_numpy
        return EvidenceGraph(t(np.ascontiguousarray(indptr)), t(np.ascontiguousarray(nb)), t(vals),
                             t(np.ascontiguousarray(ex)), t(np.ascontiguousarray(n_proto)),
                             t(np.ascontiguousarray(slot)), n_users, n_items, self.seed,
                             *self.key_sizes).to(self.device)

    def pair_edges(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every edge of the pairs' ratings (user and item indices ``[k]``; a repeated pair
        has several): ``(pair [m], position [m])``, both directions, pair ``j`` the index into
        ``users``/``items``. Reads only those users' and items' rows."""
        nu = self.n_users

        def find(nodes: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            start = self.indptr[nodes]
            deg = self.indptr[nodes + 1] - start
            owner = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), deg)
            pos = start[owner] + torch.arange(len(owner), device=nodes.device) - (torch.cumsum(deg, 0) - deg)[owner]
            hit = self.neighbours[pos] == wanted[owner]
            return owner[hit], pos[hit]

        (pu, eu), (pi, ei) = find(users, nu + items), find(nu + items, users)
        return torch.cat([pu, pi]), torch.cat([eu, ei])

    def pair_keys(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """One ``int64`` key per (user index, item index) pair, as `sample_neighbours`
        computes for edges."""
        return users * self.n_items + items


def row_positions(indptr: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every edge of the CSR rows ``nodes [k]``: ``(owner [m], position [m])``, ``owner`` the
    index into ``nodes`` of the row each position belongs to (rows in order)."""
    deg = indptr[nodes + 1] - indptr[nodes]
    owner = np.repeat(np.arange(len(nodes)), deg)
    return owner, indptr[nodes][owner] + np.arange(len(owner)) - np.repeat(np.cumsum(deg) - deg, deg)


def edge_hash(examples: np.ndarray, item_row: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random key ``int64 [m]`` per directed edge: the rating row ``examples``
    seen from the user's row (``item_row`` False) or the item's (splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        z = (np.asarray(examples, dtype=np.uint64) * np.uint64(2) + np.asarray(item_row, dtype=np.uint64)
             + np.uint64(seed) * np.uint64(0x632BE59BD9B4E019) + np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)


# ----------------------------------------------------------------------------- keyed draws
#: the stream of a level's draws is its depth; the root truncation's draws have their own
TRUNCATION_STREAM = 64
_GOLDEN = 0x9E3779B97F4A7C15
_ID_MULTIPLIER = 0xD6E8FEB86659FD93
_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser on a Python int (64 bits, unsigned)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def draw_key(generator: torch.Generator) -> int:
    """One sampling call's key: a 62-bit integer from ``generator`` (the only number a call
    takes from it, whatever it samples)."""
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device).item())


def stream_base(key: int, stream: int) -> int:
    """The 64-bit base of one stream of a call's draws (unsigned, as a Python int)."""
    return _mix64(key ^ _mix64((stream + 1) * _GOLDEN))


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _mix64_tensor(z: torch.Tensor) -> torch.Tensor:
    """`_mix64` on ``int64`` tensors (two's complement; logical shifts by masking)."""
    z = z ^ ((z >> 30) & ((1 << 34) - 1))
    z = z * _signed(0xBF58476D1CE4E5B9)
    z = z ^ ((z >> 27) & ((1 << 37) - 1))
    z = z * _signed(0x94D049BB133111EB)
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def keyed_uniform(base: int, ids: torch.Tensor, columns: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform draws in ``[0, 1)`` that depend only on ``(base, id, column)``: ``ids`` and
    ``columns`` (``int64``, broadcast together) give the shape. float32 draws have 24
    random bits, float64 draws 53; `recsys.models.rec.kernels.keyed_uniform32` and
    ``keyed_uniform64`` compute the same numbers.

    Why keyed rather than a stream: the draws of one node do not depend on which other nodes
    a call samples, so hiding one rating changes the chains only below the edge it hides
    (explanations and same-trajectory retraining compare like with like), and a query draws
    the same chains alone or in a batch."""
    h = _mix64_tensor(torch.full_like(ids, _signed(base)) ^ (ids * _signed(_ID_MULTIPLIER)))
    z = _mix64_tensor(h + (columns + 1) * _signed(_GOLDEN))
    if dtype == torch.float64:
        return ((z >> 11) & ((1 << 53) - 1)).to(torch.float64) * 2.0 ** -53
    return ((z >> 40) & ((1 << 24) - 1)).to(torch.float32) * 2.0 ** -24


def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for a 1-D integer ``index``: ``index_select``, which costs about half the
    dispatch time of advanced indexing on the small tensors a single prediction gathers."""
    return x.index_select(0, index)


@dataclass(frozen=True)
class Edges:
    """Sampled edges of one level: ``parent [E]`` (position in the level's nodes),
    ``child [E]`` (global id of the neighbour), ``values [E]`` and ``examples [E]``."""

    parent: torch.Tensor
    child: torch.Tensor
    values: torch.Tensor
    examples: torch.Tensor


def sample_neighbours(graph: EvidenceGraph, nodes: torch.Tensor, fanout: int, key: int, *,
                      stream: int = 0, draw_ids: torch.Tensor | None = None, prototypes_only: bool = False,
                      exclude: torch.Tensor | None = None,
                      evidence_dropout: float = 0.0, truncate: torch.Tensor | None = None) -> Edges:
    """Up to ``fanout`` neighbours of each of ``nodes`` (global ids ``int64 [n]``).

    ``key`` (`draw_key`) and ``stream`` (the level's depth) key the draws: node ``j`` draws
    columns ``0..F-1`` (its slots' jitter), ``F, F+1`` (the two segments' rotations), ``F+2,
    F+3`` (evidence dropout) of `keyed_uniform` under `EvidenceGraph.draw_ids` of its
    ``draw_ids[j]`` (default: its id; a pass's copy of a node passes its pass id); a root's
    truncation draws one float64 per sampled edge, column the child's draw id, under
    `TRUNCATION_STREAM`.

    ``exclude``: sorted pair keys (`EvidenceGraph.pair_keys`) of ratings never to return.
    ``evidence_dropout``: probability that a node keeps only a uniformly random ``1..m`` of
    its ``m`` sampled neighbours (training only: teaches the model what little evidence
    looks like). ``truncate``: ``int64 [n]``; a node with ``truncate > 0`` keeps a uniformly
    random ``truncate`` of its sampled neighbours (after ``exclude``; all of them when fewer), the
    others are untouched (training only: simulates new users and items, see
    `sample_chains`). Returns the valid edges, parents as positions into ``nodes``.
    """
    dev = graph.device
    n = len(nodes)
    if n == 0 or fanout < 1:
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        return Edges(empty, empty, torch.empty(0, device=dev), empty)
    start = rows(graph.indptr, nodes).unsqueeze(1)  # [n, 1]
    n_proto = rows(graph.n_proto, nodes).unsqueeze(1)
    kp = n_proto.clamp(max=fanout)
    slots = torch.arange(fanout, device=dev).unsqueeze(0)  # [1, F]
    ids = graph.draw_ids(nodes if draw_ids is None else draw_ids)
    draws = keyed_uniform(stream_base(key, stream), ids.unsqueeze(1),
                          torch.arange(fanout + 4, device=dev).unsqueeze(0))  # [n, F+4]
    jitter, rot = draws[:, :fanout], draws[:, fanout:fanout + 2]
    # prototype segment: slots 0..kp-1; other segment: slots kp..kp+ko-1; each slot is drawn
    # in its own segment (its size, draws and rotation), in one set of operations for both
    if prototypes_only:
        pos = start + _stratified(slots, jitter, n_proto, kp, rot[:, :1])
        taken = kp
    else:
        n_other = rows(graph.indptr, nodes + 1).unsqueeze(1) - start - n_proto
        ko = n_other.clamp(max=fanout - kp)
        in_p = slots < kp
        pos = start + torch.where(in_p, 0, n_proto) + _stratified(
            torch.where(in_p, slots, slots - kp), jitter, torch.where(in_p, n_proto, n_other),
            torch.where(in_p, kp, ko), torch.where(in_p, rot[:, :1], rot[:, 1:]))
        taken = kp + ko
    if evidence_dropout > 0:
        taken = taken.squeeze(1)
        drop = draws[:, fanout + 2] < evidence_dropout
        keep = (draws[:, fanout + 3] * taken).long() + 1
        taken = torch.where(drop, torch.minimum(keep, taken), taken).unsqueeze(1)
    valid = torch.nonzero((slots < taken).reshape(-1)).squeeze(1)  # row-major: grouped by parent
    parent = valid // fanout
    pos = rows(pos.reshape(-1), valid)
    child = rows(graph.neighbours, pos)
    if exclude is not None and len(exclude):
        g = rows(nodes, parent)
        user, other = torch.minimum(g, child), torch.maximum(g, child)
        keys = graph.pair_keys(user, other - graph.n_users)
        keep = ~torch.isin(keys, exclude)
        parent, pos, child = parent[keep], pos[keep], child[keep]
    if truncate is not None and len(parent):
        # edges come grouped by parent: a random order within each group, then the first
        # truncate[parent] of it (a uniformly random subset, not the prototypes-first prefix)
        spread = keyed_uniform(stream_base(key, TRUNCATION_STREAM), rows(ids, parent), graph.draw_ids(child),
                               torch.float64)
        order = torch.argsort(parent.double() + spread * 0.5)
        rank = torch.empty_like(parent)
        rank[order] = torch.arange(len(parent), device=dev) - torch.searchsorted(parent, parent[order])
        limit = truncate[parent]
        chosen = (limit <= 0) | (rank < limit)
        parent, pos, child = parent[chosen], pos[chosen], child[chosen]
    return Edges(parent, child, rows(graph.values, pos), rows(graph.examples, pos))


def _stratified(slots: torch.Tensor, jitter: torch.Tensor, size: torch.Tensor, k: torch.Tensor,
                rotation: torch.Tensor) -> torch.Tensor:
    """Offsets ``[n, F]`` into segments of ``size`` entries (``size``, ``k``, ``rotation``
    broadcast against ``slots [n or 1, F]``): slot ``j < k`` takes a uniformly random entry of
    the ``j``-th of ``k`` near-equal strata (integer bounds, so distinct), then all are rotated
    by ``floor(rotation·size)`` modulo ``size``. (Slots ``j >= k`` get some offset; callers
    drop them.)"""
    size_, k_ = size.clamp(min=1), k.clamp(min=1)
    lo = slots * size_ // k_
    hi = (slots + 1) * size_ // k_
    off = torch.minimum(lo + (jitter * (hi - lo)).long(), hi - 1)
    return (off + (rotation * size_).long()) % size_


@dataclass(frozen=True)
class Level:
    """One level of sampled chains.

    ``nodes [n_l]``: unique global ids at this level; ``parent [E]``: position of each edge's
    parent in ``nodes``; ``child [E]``: position of its child in the next level's nodes;
    ``values [E]``, ``examples [E]``: the rating on the edge and its row in the live ratings;
    ``reverse_edge [E]``: for the parent-skip, the index among the *next* level's edges of
    the edge child -> parent (the child's message from this parent), ``-1`` when the child
    did not sample its parent.
    """

    nodes: torch.Tensor
    parent: torch.Tensor
    child: torch.Tensor
    values: torch.Tensor
    examples: torch.Tensor
    reverse_edge: torch.Tensor


@dataclass(frozen=True)
class Chains:
    """Sampled chains of a batch: ``levels[d]`` expands the nodes at depth ``d`` (roots at
    ``d = 0``); ``leaves [n_D]`` are the global ids at the last depth (only prototypes
    reach it).

    ``passes > 1``: that many independent samplings drawn together (one set of tensor
    operations instead of one per sampling). Pass ``p``'s copy of graph node ``g`` has the id
    ``g + p·n_nodes`` at every level, so memoisation never merges two passes and each level
    holds the passes' nodes in consecutive blocks; `base` maps ids back to graph nodes and
    `split_passes` gives each pass as its own single-pass `Chains`."""

    levels: list[Level]
    leaves: torch.Tensor
    passes: int = 1
    n_nodes: int = 0

    def nodes(self, depth: int) -> torch.Tensor:
        return self.levels[depth].nodes if depth < len(self.levels) else self.leaves

    def base(self, ids: torch.Tensor) -> torch.Tensor:
        """The graph node of each of ``ids`` (the identity for a single pass)."""
        return ids % self.n_nodes if self.passes > 1 else ids

    def edge_pair_keys(self, graph: EvidenceGraph) -> list[np.ndarray]:
        """Per level, the pair key (`EvidenceGraph.pair_keys`) of every edge's rating, ``int64 [E]``."""
        out = []
        for d, lvl in enumerate(self.levels):
            a = self.base(lvl.nodes[lvl.parent]).numpy()
            b = self.base(self.nodes(d + 1)[lvl.child]).numpy()
            out.append(np.minimum(a, b) * graph.n_items + (np.maximum(a, b) - graph.n_users))
        return out

    def split_passes(self) -> list[Chains]:
        """One single-pass `Chains` per pass, in graph ids (the same chains, re-indexed)."""
        if self.passes == 1:
            return [self]
        n, dev = self.n_nodes, self.leaves.device
        cuts = torch.arange(self.passes + 1, device=dev) * n
        node_cut = [torch.searchsorted(self.nodes(d), cuts).tolist() for d in range(len(self.levels) + 1)]
        # a level's edges are grouped by parent, so each pass's edges are one block as well
        edge_cut = [torch.searchsorted(lvl.parent, torch.tensor(node_cut[d], device=dev)).tolist()
                    for d, lvl in enumerate(self.levels)]
        out = []
        for p in range(self.passes):
            levels = []
            for d, lvl in enumerate(self.levels):
                lo, hi = node_cut[d][p], node_cut[d][p + 1]
                e0, e1 = edge_cut[d][p], edge_cut[d][p + 1]
                rev = lvl.reverse_edge[e0:e1]
                if d + 1 < len(self.levels):
                    rev = torch.where(rev >= 0, rev - edge_cut[d + 1][p], rev)
                levels.append(Level(lvl.nodes[lo:hi] - p * n, lvl.parent[e0:e1] - lo,
                                    lvl.child[e0:e1] - node_cut[d + 1][p], lvl.values[e0:e1],
                                    lvl.examples[e0:e1], rev))
            leaves = self.leaves[node_cut[-1][p]:node_cut[-1][p + 1]] - p * n
            out.append(Chains(levels, leaves, 1, n))
        return out


def sample_chains(graph: EvidenceGraph, roots: torch.Tensor, fanouts: tuple[int, ...],
                  generator: torch.Generator, *, exclude: torch.Tensor | None = None,
                  evidence_dropout: float = 0.0, root_keep: torch.Tensor | None = None,
                  passes: int = 1, compiled: bool = True) -> Chains:
    """Evidence chains under the unique global ids ``roots [n_0]`` (see
    `sample_chains_vectorised`). On the CPU, ``compiled`` draws them with
    `recsys.models.rec.kernels`' kernels (`sample_chains_compiled`): the same chains from the
    same generator (left in the same state), at a fraction of the dispatch cost.

    A call takes one key from ``generator`` (`draw_key`); every draw is then a function of
    that key, the level and the node it is for (`keyed_uniform`), so a node's neighbours do
    not depend on which other nodes are sampled with it or which edges are excluded
    elsewhere."""
    if compiled and graph.device.type == "cpu" and generator.device.type == "cpu":
        return sample_chains_compiled(graph, roots, fanouts, generator, exclude=exclude,
                                      evidence_dropout=evidence_dropout, root_keep=root_keep, passes=passes)
    return sample_chains_vectorised(graph, roots, fanouts, generator, exclude=exclude,
                                    evidence_dropout=evidence_dropout, root_keep=root_keep, passes=passes)


def sample_chains_compiled(graph: EvidenceGraph, roots: torch.Tensor, fanouts: tuple[int, ...],
                           generator: torch.Generator, *, exclude: torch.Tensor | None = None,
                           evidence_dropout: float = 0.0, root_keep: torch.Tensor | None = None,
                           passes: int = 1) -> Chains:
    """`sample_chains_vectorised` for a CPU graph, level by level through the kernels of
    `recsys.models.rec.kernels`: the same `Chains` from ``generator``, which is left in the same
    state (one key taken, the same draws from it)."""
    n_nodes = graph.n_nodes
    key = draw_key(generator)
    key_sizes = graph.key_sizes
    roots_np = roots.numpy()
    if passes > 1:
        if root_keep is not None:
            raise ValueError("root_keep (cold roots in training) needs passes=1")
        roots_np = (roots_np[None, :] + np.arange(passes)[:, None] * n_nodes).reshape(-1)
    keep_np = None if root_keep is None else root_keep.numpy()
    exclude_np = np.sort(exclude.numpy()) if exclude is not None else np.empty(0, np.int64)
    arrays = [graph.indptr.numpy(), graph.n_proto.numpy(), graph.neighbours.numpy(), graph.values.numpy(),
              graph.examples.numpy()]
    proto_slot = graph.proto_slot.numpy()
    nodes = np.ascontiguousarray(roots_np, dtype=np.int64)
    levels_nodes = [nodes]
    raw = []
    for depth, fanout in enumerate(fanouts):
        expand = expandable(nodes, n_nodes, proto_slot)
        edges = sample_level(*arrays, nodes, expand, n_nodes, fanout, depth == len(fanouts) - 1,
                             np.uint64(stream_base(key, depth)), exclude_np, graph.n_users, graph.n_items,
                             np.float32(evidence_dropout), *key_sizes)
        if depth == 0 and keep_np is not None and len(edges[0]):
            chosen = truncate_roots(edges[0], edges[1], nodes, expand,
                                    np.uint64(stream_base(key, TRUNCATION_STREAM)), keep_np, n_nodes,
                                    graph.n_users, *key_sizes)
            edges = tuple(a[chosen] for a in edges)
        nodes, child_pos = unique_inverse(edges[1])
        raw.append((edges, child_pos))
        levels_nodes.append(nodes)
    t = torch.from_numpy
    levels = []
    for depth, ((parent, _child, values, examples), child_pos) in enumerate(raw):
        if depth + 1 < len(raw):
            nxt = raw[depth + 1][0]
            reverse = reverse_edges(levels_nodes[depth], parent, child_pos, nxt[0], nxt[1],
                                    len(levels_nodes[depth + 1]))
        else:
            reverse = np.full(len(parent), -1, np.int64)
        levels.append(Level(t(levels_nodes[depth]), t(parent), t(child_pos), t(values), t(examples), t(reverse)))
    return Chains(levels, t(levels_nodes[-1]), passes, n_nodes)


def sample_chains_vectorised(graph: EvidenceGraph, roots: torch.Tensor, fanouts: tuple[int, ...],
                             generator: torch.Generator, *, exclude: torch.Tensor | None = None,
                             evidence_dropout: float = 0.0, root_keep: torch.Tensor | None = None,
                             passes: int = 1) -> Chains:
    """Evidence chains under the unique global ids ``roots [n_0]`` with ``fanouts[d]``
    neighbours per node at depth ``d`` (see the module docstring). ``root_keep``
    (``int64 [n_0]``, training only): a root with ``root_keep > 0`` keeps only a uniformly
    random ``root_keep`` of its sampled first-hop evidence, as if it were a new user or item
    with that many ratings (`sample_neighbours`' ``truncate``); deeper levels are untouched.
    ``passes``: independent samplings drawn at once (see `Chains`); level 0 then holds
    ``passes·n_0`` roots, pass by pass."""
    dev = graph.device
    n_nodes = graph.n_nodes
    key = draw_key(generator)
    if passes > 1:
        if root_keep is not None:
            raise ValueError("root_keep (cold roots in training) needs passes=1")
        roots = (roots.unsqueeze(0) + torch.arange(passes, device=roots.device).unsqueeze(1) * n_nodes).reshape(-1)
    nodes = roots
    if exclude is not None:
        exclude = torch.sort(exclude).values
    raw: list[tuple[Edges, torch.Tensor]] = []  # each level's edges and their children's positions
    levels_nodes = [nodes]  # the unique ids at each depth, roots first, leaves last
    for depth, fanout in enumerate(fanouts):
        base = nodes % n_nodes if passes > 1 else nodes
        expand = torch.nonzero(rows(graph.proto_slot, base) < 0).squeeze(1)
        edges = sample_neighbours(graph, rows(base, expand), fanout, key, stream=depth, draw_ids=rows(nodes, expand),
                                  prototypes_only=depth == len(fanouts) - 1, exclude=exclude,
                                  evidence_dropout=evidence_dropout,
                                  truncate=root_keep[expand] if depth == 0 and root_keep is not None else None)
        parent = rows(expand, edges.parent)
        child = edges.child + (rows(nodes, parent) - rows(base, parent)) if passes > 1 else edges.child
        edges = Edges(parent, child, edges.values, edges.examples)
        nodes, child_pos = torch.unique(edges.child, return_inverse=True)
        raw.append((edges, child_pos))
        levels_nodes.append(nodes)
    levels: list[Level] = []
    stride = n_nodes * passes  # one past the largest id
    for depth, (edges, child_pos) in enumerate(raw):
        level_nodes = levels_nodes[depth]
        reverse = torch.full_like(child_pos, -1)
        nxt = raw[depth + 1][0] if depth + 1 < len(raw) else None
        if nxt is not None and len(edges.child) and len(nxt.child):
            # key of an edge (parent position p, child id c): p * stride + c
            sorted_keys, order = torch.sort(nxt.parent * stride + nxt.child, stable=True)
            want = child_pos * stride + rows(level_nodes, edges.parent)
            hit = torch.searchsorted(sorted_keys, want).clamp(max=len(sorted_keys) - 1)
            found = rows(sorted_keys, hit) == want
            reverse = torch.where(found, rows(order, hit), reverse)
        levels.append(Level(level_nodes, edges.parent, child_pos, edges.values, edges.examples, reverse))
    leaves = levels_nodes[-1]
    return Chains(levels, leaves.to(dev), passes, n_nodes)
