"""The order in which training examples are visited, after Mishchenko, Khaled and Richtárik,
"Random Reshuffling: Simple Analysis with Vast Improvements" (arXiv 2006.05988).

Each sampler yields, per epoch, an ``int64`` array of example ids (rows of the training
`Ratings`); the trainer cuts it into batches. Random reshuffling and shuffle-once share the
better convergence rate; the fixed order (incremental gradient) is worse by a factor tied to
``n``; sampling with replacement visits some rows several times and others never per epoch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from recsys.optim.shuffle import random_permutation


class ExampleSampler(ABC):
    """Produces the visiting order of ``n`` examples for each epoch, reproducibly for a seed:
    ``epoch_order(e)`` depends only on ``(seed, e)``, so a resumed run sees the same order."""

    name: ClassVar[str]

    def __init__(self, n_examples: int, seed: int = 0) -> None:
        if n_examples < 1:
            raise ValueError("a sampler needs at least one example")
        self.n_examples = n_examples
        self.seed = seed

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    @abstractmethod
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Example ids to visit in epoch ``epoch`` (0-based), ``int64 [n_examples]``."""

    def batches(self, epoch: int, batch_size: int) -> list[np.ndarray]:
        """The epoch's order cut into consecutive batches (the last may be smaller)."""
        order = self.epoch_order(epoch)
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


class WithReplacement(ExampleSampler):
    """Classic SGD: every draw is uniform over all examples, independently."""

    name = "with-replacement"

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self._rng(epoch).integers(0, self.n_examples, self.n_examples, dtype=np.int64)


class RandomReshuffling(ExampleSampler):
    """A fresh random permutation every epoch (the usual default)."""

    name = "reshuffle"

    def epoch_order(self, epoch: int) -> np.ndarray:
        return random_permutation(self.n_examples, self.seed, epoch)


class ShuffleOnce(ExampleSampler):
    """One random permutation, drawn once and reused every epoch."""

    name = "shuffle-once"

    def __init__(self, n_examples: int, seed: int = 0) -> None:
        super().__init__(n_examples, seed)
        self._order = random_permutation(n_examples, seed, 0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self._order


class FixedOrder(ExampleSampler):
    """Incremental gradient: the examples in their stored order every epoch (for time-ordered
    data this replays history)."""

    name = "fixed"

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.arange(self.n_examples, dtype=np.int64)


SAMPLERS: dict[str, type[ExampleSampler]] = {
    cls.name: cls for cls in (WithReplacement, RandomReshuffling, ShuffleOnce, FixedOrder)
}


def make_sampler(name: str, n_examples: int, seed: int = 0) -> ExampleSampler:
    """The sampler called ``name`` (one of `SAMPLERS`)."""
    try:
        return SAMPLERS[name](n_examples, seed)
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
