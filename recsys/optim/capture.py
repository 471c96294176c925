"""`LayerCapture`: what curvature and noise optimizers need from a layer's forward and backward.

For every hooked ``nn.Linear`` / ``nn.Embedding`` it records, per forward call in training
mode, the layer's input ``a`` (features, or embedding indices) and the gradient of the loss
with respect to its output ``g`` (summed if the output is used several times). K-FAC builds
its factors from these pairs; covariance-noise SGD builds per-example gradients from them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class LayerCapture:
    """Forward hooks that record ``(input, output gradient)`` pairs per module key."""

    def __init__(self, modules: Iterable[tuple[object, nn.Module]]) -> None:
        self.modules = dict(modules)
        self.records: dict[object, list[list]] = {key: [] for key in self.modules}
        self._capturing = True
        self._grads_on = True
        self._handles = [m.register_forward_hook(self._make_hook(key)) for key, m in self.modules.items()]

    def _make_hook(self, key: object):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (self._capturing and module.training and torch.is_grad_enabled() and output.requires_grad):
                return
            entry = [inputs[0].detach(), None]
            self.records[key].append(entry)

            def grad_hook(g: torch.Tensor) -> None:
                if not self._grads_on:
                    return
                entry[1] = g.detach() if entry[1] is None else entry[1] + g.detach()
            output.register_hook(grad_hook)
        return hook

    @property
    def active(self) -> bool:
        """Whether the hooks are still attached to the modules."""
        return bool(self._handles)

    def take(self, key: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The pairs recorded for ``key`` since the last call whose backward has run."""
        pairs = [(a, g) for a, g in self.records[key] if g is not None]
        self.records[key] = []
        return pairs

    def take_embedding(self, key: object, dim: int, *,
                       grads: bool = True) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The recorded lookups of an embedding table as per-example rows and gradients:
        ``(rows int64 [n], grads [n, dim])``, or None when nothing was recorded. Lookups of
        the same indices in one pass (a model that reads a table twice per loss) are one
        example; gradients of a mean loss are scaled by the batch size to be per-example.
        ``grads=False``: the rows only (``grads`` None), for a step that needs no statistics."""
        merged: list[list[torch.Tensor]] = []
        for idx, g in self.take(key):
            for m in merged:
                if m[0].shape == idx.shape and torch.equal(m[0], idx):
                    m[1] = m[1] + g
                    break
            else:
                merged.append([idx, g])
        if not merged:
            return None
        rows = torch.cat([i.reshape(-1) for i, _ in merged])
        if not grads:
            return rows, None
        return rows, torch.cat([g.reshape(-1, dim) * i.shape[0] for i, g in merged])

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward/backward passes inside record nothing (e.g. SALR's extra passes)."""
        old, self._capturing = self._capturing, False
        try:
            yield
        finally:
            self._capturing = old

    @contextlib.contextmanager
    def grads_paused(self) -> Iterator[None]:
        """Backward passes inside leave the recorded output gradients as they are (the
        K-FAC Fisher statistic records sampled-target gradients, then back-propagates the
        real loss without them being overwritten)."""
        old, self._grads_on = self._grads_on, False
        try:
            yield
        finally:
            self._grads_on = old

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.records = {key: [] for key in self.modules}


class LookupGradients:
    """Per embedding table, ``[indices, gradient]`` of every lookup of a training forward
    pass: the gradient of the loss with respect to the gathered rows (row ``b`` is example
    ``b``'s share, even when a row is looked up twice in a batch). Gradient rollback credits
    each example its rows' gradient from these (`recsys.optim.credit`). The last gradient
    delivered to a lookup is kept: K-FAC's sampled-target (Fisher) pass back-propagates
    through the same lookups before the loss does."""

    def __init__(self, tables: Iterable[tuple[str, nn.Module]]) -> None:
        tables = dict(tables)
        for name, module in tables.items():
            if not isinstance(module, nn.Embedding):
                raise TypeError(f"rollback on the autograd path needs {name} to be an nn.Embedding")
        #: table name -> the step's lookups so far, ``[indices, gradient or None]`` each
        self.captured: dict[str, list[list]] = {name: [] for name in tables}
        self._paused = False
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in tables.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if torch.is_grad_enabled() and output.requires_grad and module.training and not self._paused:
                entry = [inputs[0], None]

                def keep(grad: torch.Tensor) -> None:
                    entry[1] = grad

                output.register_hook(keep)
                self.captured[name].append(entry)
        return hook

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Lookups inside are not captured (the trainer's extra passes, e.g. SALR's)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
