"""`FrozenModelHeap`: keeps Python's cyclic garbage collector off the loaded model.

A loaded model is hundreds of thousands of long-lived Python objects (id maps, caches,
explainers: about 350,000 tracked objects at 10^7 ratings), and every full (generation-2)
collection walks all of them and what they hold: ``gc.collect()`` took 380 ms at 10^7 ratings
on the shared 2-core machine (0.04 ms once frozen), a pause that stalls every request queued
on that worker's event loop. None of them is garbage while the model serves. So once a model
is loaded and warmed, `refreeze` collects what is garbage and moves every object still
alive into the interpreter's permanent generation (`gc.freeze`), which collections skip;
objects made later (request garbage, rows cached on first use) are collected as usual.

A frozen object that later becomes cyclic garbage would never be collected: when the
service swaps in another model (reload), `follow` sees the new model and refreezes
(`gc.unfreeze`, a full collection that frees the old model, `gc.freeze` again), once per
swap. The interpreter has one permanent generation, shared by every app in the process
(tests build many); refreezing is correct whichever app does it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from collections.abc import Callable

log = logging.getLogger("recsys.api")


class FrozenModelHeap:
    """Freeze the heap once ``current()`` (the model serving now, or None) is loaded, and
    again whenever another model replaces it (checked every ``interval_s`` seconds)."""

    def __init__(self, current: Callable[[], object | None], interval_s: float = 1.0) -> None:
        self.current = current
        self.interval_s = interval_s
        self._frozen: weakref.ref | None = None  # the model frozen last (weak: a swapped-out one must go)
        #: seconds the last refreeze took (its full collection stops the worker meanwhile)
        self.last_seconds = 0.0

    def refreeze(self) -> None:
        """Collect all garbage, then freeze every live object (module docstring)."""
        model = self.current()
        start = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.last_seconds = time.perf_counter() - start
        self._frozen = None if model is None else weakref.ref(model)
        log.info("froze %d objects out of the garbage collector's reach in %.3f s", gc.get_freeze_count(),
                 self.last_seconds)

    def stale(self) -> bool:
        """Whether a model serves that was not frozen (a first load, or a swap since)."""
        model = self.current()
        return model is not None and (self._frozen is None or self._frozen() is not model)

    async def follow(self) -> None:
        """Refreeze after every model swap, until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            if self.stale():
                self.refreeze()
