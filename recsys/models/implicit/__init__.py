"""Rankers fitted by the `implicit` library, wrapped rather than re-implemented: `ALS`
(implicit-feedback ALS, exact fold-in and exact explanations) and `BPR` (Bayesian personalised
ranking, Newton fold-in on its objective, approximate explanations). Their factor tables are
buffers of fixed shape, so artefacts save them as arrays (no pickle); implicit's CUDA backend
is used when the model is on a CUDA device and the library was built with it.

Inside this package ``import implicit`` is absolute and names the library.

Defaults: ``embedding_size=64``; the rest are the library's documented defaults except where a
validation grid on slices of the training folds (never the test files) did better: ALS's
``reg``, ``alpha`` and weighting, BPR's ``iterations``; `ALSConfig` and `BPRConfig` give the grid.
"""

from __future__ import annotations

from recsys.models.implicit.als import ALS, ALSConfig
from recsys.models.implicit.bpr import BPR, BPRConfig

__all__ = ["ALS", "BPR", "ALSConfig", "BPRConfig"]
