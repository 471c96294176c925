"""Data-parallel training on ``torch.distributed`` (gloo on the CPU, NCCL on GPUs).

Every rank holds a full replica of the model, visits the same sampler order (same seed) and
takes its contiguous slice of every global batch (`DataParallel.shard`). Each rank's loss is
its shard's mean scaled by ``n_rank / n_batch``, so the ranks' losses sum to the global
batch's mean and every gradient is a sum over ranks; after ``backward`` the trainer calls
`DataParallel.reduce_gradients`, which leaves every rank with the gradient of the global
batch mean:

- sparse gradients (``nn.Embedding(sparse=True)``): each rank coalesces its ``(rows, values)``,
  the ranks all-gather them (padded to the largest) and coalesce the concatenation: the
  traffic is O(touched rows · d), never a whole table;
- dense gradients of ``nn.Embedding`` tables (e.g. Adam, which cannot take sparse ones): the
  nonzero rows are exchanged the same way when that is smaller than the table, otherwise
  the table is all-reduced;
- every other gradient (linear layers, free parameters): one flat SUM all-reduce, which also
  carries the batch loss.

Optimizers then step identically on every rank, so replicas stay bit-for-bit equal (every
rank sums the same numbers in the same order). Curvature and noise statistics
(`recsys.optim.capture.LayerCapture`, used by the K-FAC family and covariance-noise SGD) are
made global by `DataParallel.gather_captures`: each layer's recorded ``(input, output
gradient)`` pairs are all-gathered and concatenated in rank order, which reproduces the
records of one process on the global batch (the scaled loss makes each output gradient
exactly the single-process one), so the factors, eigenbases and noise draws are the same on
every rank and equal to single-process ones up to rounding.

Model families' own steps use the same collectives: MF's closed-form minibatch SGD (no
autograd, `recsys.models.mf.steps.parallel_sgd_batch`) applies each rank's shard with the
learning rate scaled by ``n_rank / n_batch``, reads the change of the rows it touched, undoes
it, and the ranks sum their row changes with `DataParallel.exchange_rows` (the exchange of
sparse gradients). Update logs (gradient rollback) are summed by `merge_rollback_log`.

Launch with ``torchrun --nproc-per-node N -m recsys.cli train ...`` (`init_from_env` reads
its environment) or with `spawn` (``recsys train --nproc N``), which sets the same variables.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from recsys.models.base import UpdateLog
    from recsys.optim.capture import LayerCapture

#: what torchrun sets for every worker (and `spawn` sets too)
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# gradient kinds exchanged in the metadata round of `reduce_gradients`
_NONE, _SPARSE, _DENSE_ROWS, _DENSE = 0, 1, 2, 3


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): > 1 under torchrun or `spawn`."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def default_backend(device: str | torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: str | torch.device = "cpu", backend: str | None = None, *,
                  timeout_s: float = 600.0) -> DataParallel | None:
    """Join the process group described by torchrun's environment variables (`ENV_VARS`) and
    return this rank's `DataParallel`; None when ``WORLD_SIZE`` is unset or 1 (one process:
    nothing to do). On CUDA, rank ``LOCAL_RANK`` is pinned to device ``cuda:LOCAL_RANK``.
    ``timeout_s`` bounds every collective (a rank that died makes the others fail, not hang)."""
    world = env_world_size()
    if world <= 1:
        return None
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun "
                           "(or recsys.distributed.spawn), which sets them all")
    device = torch.device(device)
    if device.type == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend or default_backend(device), init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DataParallel()


def free_port() -> int:
    """A TCP port that was free on localhost a moment ago (for `spawn`'s rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned(local_rank: int, nproc: int, port: int, threads: int | None,
             fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nproc: int, *args: Any, threads: int | None = None) -> None:
    """Run ``fn(*args)`` in ``nproc`` fresh processes on this machine with torchrun's
    environment set (rank ``r`` gets ``RANK=LOCAL_RANK=r``, a free localhost port), so that
    `init_from_env` inside ``fn`` joins them into one group. ``fn`` must be importable (a
    module-level function; processes are started with ``spawn``). ``threads``: torch
    intra-op threads per process. Blocks until all finish; when one raises, the others are
    terminated and the error is re-raised here (`torch.multiprocessing.ProcessRaisedException`)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    import torch.multiprocessing as mp

    mp.start_processes(_spawned, args=(nproc, free_port(), threads, fn, args), nprocs=nproc,
                       join=True, start_method="spawn")


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items: sizes differ by at
    most one, in rank order (ranks past ``n`` get an empty share when ``n < world_size``)."""
    return n * rank // world_size, n * (rank + 1) // world_size


class DataParallel:
    """This rank's handle on a data-parallel run over an initialised process group (see the
    module docstring). Create with `init_from_env`, or directly once
    ``torch.distributed.init_process_group`` has run; pass to ``Trainer(parallel=...)``."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DataParallel needs an initialised torch.distributed process group "
                               "(launch with torchrun and call recsys.distributed.init_from_env)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r})"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes artefacts."""
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ set-up
    def shard(self, ids: np.ndarray) -> tuple[np.ndarray, float]:
        """This rank's contiguous slice of a global batch ``ids int64 [n]`` and its weight
        ``n_rank / n`` (the factor on the shard's mean loss that makes the ranks' losses sum
        to the global mean)."""
        start, stop = shard_bounds(len(ids), self.rank, self.world_size)
        return ids[start:stop], (stop - start) / max(1, len(ids))

    def check_same(self, what: str, **values: float) -> None:
        """Raise ValueError naming the first of ``values`` on which the ranks disagree (e.g. the
        number of training examples, the batch size, the seed)."""
        mine = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
        everyone = self._all_gather_fixed(mine)
        for k, name in enumerate(values):
            column = [float(t[k]) for t in everyone]
            if any(v != column[0] for v in column):
                shown = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(column))
                raise ValueError(f"data-parallel ranks disagree on {what} {name} ({shown}); every rank "
                                 "must train the same data with the same configuration")

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers onto every rank, in place."""
        for t in [*module.parameters(), *module.buffers()]:
            if t.numel() == 0:
                continue
            buf = t.detach().to(self._comm_device)
            dist.broadcast(buf, src=0, group=self.group)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)

    # ------------------------------------------------------------------ collectives
    def _all_gather_fixed(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a same-shaped ``tensor``, in rank order (on ``tensor``'s device)."""
        t = tensor.to(self._comm_device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        return [o.to(tensor.device) for o in out]

    def _all_gather_flat(self, flat: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
        """Every rank's 1-d ``flat`` tensor, given every rank's length ``sizes [world]`` (padded
        to the longest for the collective, trimmed after)."""
        longest = max(sizes)
        device = flat.device
        if longest == 0:
            return [flat.new_empty(0) for _ in sizes]
        padded = torch.zeros(longest, dtype=flat.dtype, device=self._comm_device)
        padded[: flat.numel()] = flat.to(self._comm_device)
        out = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(out, padded, group=self.group)
        return [o[:n].to(device) for o, n in zip(out, sizes, strict=True)]

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """SUM all-reduce of ``tensor`` (a new tensor on ``tensor``'s device)."""
        t = tensor.detach().clone().to(self._comm_device)
        dist.all_reduce(t, group=self.group)
        return t.to(tensor.device)

    def exchange_rows(self, rows: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                       meta: Sequence[float]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """All-gather row sets: ``rows[k] int64 [m_k]`` with ``values[k] [m_k, *tail_k]`` (the
        tails and dtypes agree across ranks, ``m_k`` may not), plus a float64 ``meta`` vector
        whose every rank's copy is returned too. Returns per table the concatenation over
        ranks in rank order (``rows [Σ m]``, ``values [Σ m, *tail]``) and ``meta`` per rank
        ``[world][len(meta)]``. Three collectives however many tables."""
        mine = torch.tensor([*(float(r.numel()) for r in rows), *meta], dtype=torch.float64)
        everyone = self._all_gather_fixed(mine)
        counts = [[int(t[k]) for k in range(len(rows))] for t in everyone]
        metas = [t[len(rows):] for t in everyone]
        if not rows:
            return [], [], metas
        widths = [int(np.prod(v.shape[1:])) for v in values]
        device = rows[0].device
        all_rows = self._all_gather_flat(torch.cat([r.reshape(-1) for r in rows]) if rows else
                                         torch.empty(0, dtype=torch.long, device=device),
                                         [sum(c) for c in counts])
        dtype = values[0].dtype
        if any(v.dtype != dtype for v in values):
            raise TypeError("row exchange needs one value dtype for all tables")
        all_vals = self._all_gather_flat(torch.cat([v.reshape(-1) for v in values]),
                                         [sum(m * w for m, w in zip(c, widths, strict=True)) for c in counts])
        out_rows: list[list[torch.Tensor]] = [[] for _ in rows]
        out_vals: list[list[torch.Tensor]] = [[] for _ in rows]
        for rank_rows, rank_vals, c in zip(all_rows, all_vals, counts, strict=True):
            r_off = v_off = 0
            for k, (m, w) in enumerate(zip(c, widths, strict=True)):
                out_rows[k].append(rank_rows[r_off:r_off + m])
                out_vals[k].append(rank_vals[v_off:v_off + m * w].view(m, *values[k].shape[1:]))
                r_off, v_off = r_off + m, v_off + m * w
        return ([torch.cat(r) for r in out_rows], [torch.cat(v) for v in out_vals], metas)

    # ------------------------------------------------------------------ gradients
    @torch.no_grad()
    def reduce_gradients(self, params: Iterable[nn.Parameter], loss: float = 0.0, *,
                         row_tables: Iterable[nn.Parameter] = ()) -> float:
        """Sum ``.grad`` of ``params`` over the ranks in place (see the module docstring) and
        return the sum of the ranks' ``loss``. ``row_tables``: parameters that are embedding
        tables ``[rows, d]`` (their dense gradients may be exchanged by nonzero rows). A
        gradient that is None on every rank stays None; on some ranks only, it counts as
        zero there. Sparse gradients come back coalesced."""
        params = list(params)
        tables = {id(p) for p in row_tables}
        kinds, local = [], []
        for p in params:
            g = p.grad
            if g is None:
                kinds.append(_NONE)
                local.append(None)
            elif g.is_sparse:
                g = g.coalesce()
                kinds.append(_SPARSE)
                local.append((g.indices()[0], g.values()))
            elif id(p) in tables and g.dim() == 2:
                rows = torch.nonzero(g.ne(0).any(1)).squeeze(1)
                kinds.append(_DENSE_ROWS)
                local.append((rows, g.index_select(0, rows)))
            else:
                kinds.append(_DENSE)
                local.append(None)
        sizes = [0.0 if loc is None else float(loc[0].numel()) for loc in local]
        meta = torch.tensor([*kinds, *sizes, loss], dtype=torch.float64)
        everyone = self._all_gather_fixed(meta)
        n = len(params)
        all_kinds = [[int(t[k]) for t in everyone] for k in range(n)]
        all_sizes = [[int(t[n + k]) for t in everyone] for k in range(n)]
        total_loss = float(sum(float(t[2 * n]) for t in everyone))

        # decide each parameter's exchange identically on every rank
        plan: list[str] = []
        for p, ks, ms in zip(params, all_kinds, all_sizes, strict=True):
            present = {k for k in ks if k != _NONE}
            if not present:
                plan.append("none")
            elif present == {_SPARSE}:
                plan.append("rows")
            elif _SPARSE in present:
                raise RuntimeError("a parameter has sparse gradients on some ranks and dense on others")
            elif present == {_DENSE_ROWS}:
                width = int(np.prod(p.shape[1:]))
                cheaper = self.world_size * max(ms) * (width + 1) < p.numel()
                plan.append("rows" if cheaper else "dense")
            else:
                plan.append("dense")

        # sparse rows (and nonzero rows of dense table gradients)
        row_idx = [k for k, how in enumerate(plan) if how == "rows"]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for k in row_idx:
            by_dtype.setdefault(params[k].dtype, []).append(k)
        for group in by_dtype.values():
            rows, vals = [], []
            for k in group:
                p, loc = params[k], local[k]
                if loc is None:
                    rows.append(torch.empty(0, dtype=torch.long, device=p.device))
                    vals.append(torch.empty(0, *p.shape[1:], dtype=p.dtype, device=p.device))
                else:
                    rows.append(loc[0])
                    vals.append(loc[1].to(p.dtype))
            got_rows, got_vals, _ = self.exchange_rows(rows, vals, [])
            for k, r, v in zip(group, got_rows, got_vals, strict=True):
                p = params[k]
                if _SPARSE in all_kinds[k]:
                    p.grad = torch.sparse_coo_tensor(r.unsqueeze(0), v, p.shape, check_invariants=False).coalesce()
                else:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    elif local[k] is not None:
                        p.grad.index_fill_(0, local[k][0], 0)
                    p.grad.index_add_(0, r, v)

        # dense: one flat SUM all-reduce per dtype
        dense_idx = [k for k, how in enumerate(plan) if how == "dense"]
        by_dtype = {}
        for k in dense_idx:
            by_dtype.setdefault(params[k].dtype, []).append(k)
        for group in by_dtype.values():
            for k in group:
                p = params[k]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif p.grad.is_sparse:  # cannot happen after the plan above; defensive
                    p.grad = p.grad.to_dense()
            flat = self.all_sum(torch.cat([params[k].grad.reshape(-1) for k in group]))
            offset = 0
            for k in group:
                g = params[k].grad
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return total_loss

    # ------------------------------------------------------------------ curvature statistics
    @torch.no_grad()
    def gather_captures(self, captures: Iterable[LayerCapture]) -> None:
        """Replace every capture's recorded ``(input, output gradient)`` pairs of this step by
        the concatenation over ranks (rank order = global batch order), in place, before the
        preconditioner / noise optimizer reads them.

        Per layer, when every rank that recorded anything recorded the same number of calls,
        call ``j`` of all ranks is concatenated (ranks without records add nothing): exactly
        one process's records on the global batch for batch-aligned calls (MF's lookups,
        REC's message networks per level). Otherwise (a data-dependent call missing on some
        rank) each rank's calls are first flattened into one, and the layer's statistics for
        that step are those of the flattened rows (same rows, per-call scaling lost)."""
        for capture in captures:
            keys = list(capture.records)  # the same order on every rank (module order)
            complete = {k: [(a, g) for a, g in capture.records[k] if g is not None] for k in keys}
            shapes = [[(tuple(a.shape), str(a.dtype), tuple(g.shape), str(g.dtype)) for a, g in complete[k]]
                      for k in keys]
            everyone: list[Any] = [None] * self.world_size
            dist.all_gather_object(everyone, shapes, group=self.group)
            # every (call, tensor) to gather, decided identically on every rank
            local: list[torch.Tensor] = []
            templates: list[tuple[tuple[int, ...], str]] = []
            numels: list[list[int]] = []
            layout: list[tuple[object, int]] = []  # (key, number of calls) in gathering order
            for pos, key in enumerate(keys):
                per_rank = [e[pos] for e in everyone]
                counts = {len(c) for c in per_rank if c}
                mine = complete[key]
                if not counts:
                    layout.append((key, 0))
                    continue
                if len(counts) > 1:  # a data-dependent call missing somewhere: one flat call per rank
                    flat = self._flatten_calls(mine)
                    mine = [flat] if flat is not None else []
                    per_rank = [[self._flat_shape(c)] if c else [] for c in per_rank]
                n_calls = max(len(c) for c in per_rank)
                template = next(c for c in per_rank if c)
                for j in range(n_calls):
                    for t in (0, 1):  # input, output gradient
                        shape, dtype = template[j][2 * t], template[j][2 * t + 1]
                        templates.append((shape, dtype))
                        numels.append([int(np.prod(c[j][2 * t])) if c else 0 for c in per_rank])
                        local.append(mine[j][t] if mine else torch.empty(
                            0, *shape[1:], dtype=getattr(torch, dtype.removeprefix("torch.")),
                            device=self._comm_device))
                layout.append((key, n_calls))
            gathered = iter(self._all_gather_many(local, numels, [shape[1:] for shape, _ in templates]))
            for key, n_calls in layout:
                capture.records[key] = [[next(gathered), next(gathered)] for _ in range(n_calls)]

    def _all_gather_many(self, tensors: Sequence[torch.Tensor], numels: Sequence[Sequence[int]],
                         tails: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """For each ``tensors[k] [m_k, *tails[k]]`` (``m_k`` may differ across ranks; every
        rank's ``numels[k][rank]`` is known), the concatenation over ranks in rank order;
        one collective per dtype."""
        out: list[torch.Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for k, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(k)
        for group in by_dtype.values():
            device = tensors[group[0]].device
            flat = torch.cat([tensors[k].reshape(-1).to(device) for k in group])
            sizes = [sum(numels[k][r] for k in group) for r in range(self.world_size)]
            per_rank = self._all_gather_flat(flat, sizes)
            pieces: dict[int, list[torch.Tensor]] = {k: [] for k in group}
            for r, buf in enumerate(per_rank):
                offset = 0
                for k in group:
                    pieces[k].append(buf[offset:offset + numels[k][r]])
                    offset += numels[k][r]
            for k in group:
                out[k] = torch.cat(pieces[k]).view(-1, *tails[k])
        return out  # type: ignore[return-value]

    @staticmethod
    def _flatten_calls(calls: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not calls:
            return None
        index = not calls[0][0].is_floating_point()
        a = torch.cat([x.reshape(-1) if index else x.reshape(-1, x.shape[-1]) for x, _ in calls])
        g = torch.cat([y.reshape(-1, y.shape[-1]) for _, y in calls])
        return a, g

    @staticmethod
    def _flat_shape(shapes: list[tuple]) -> tuple:
        a_shape, a_dtype, g_shape, g_dtype = shapes[0]
        index = "int" in a_dtype
        rows = sum(int(np.prod(s[0])) // (1 if index else s[0][-1]) for s in shapes)
        g_rows = sum(int(np.prod(s[2])) // s[2][-1] for s in shapes)
        return (((rows,) if index else (rows, a_shape[-1])), a_dtype, (g_rows, g_shape[-1]), g_dtype)

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def merge_rollback_log(self, log: UpdateLog) -> None:
        """Sum the ranks' update logs into every rank's ``log``, in place (`UpdateLog.merge`
        with `all_sum`). Each rank logged only its shards' examples, so the logs are disjoint
        by example and the sum is the single-process log (up to rounding)."""
        log.merge(self.all_sum)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def close(self) -> None:
        """Leave the process group (the default group when this handle uses it)."""
        if dist.is_initialized():
            dist.destroy_process_group(self.group)
