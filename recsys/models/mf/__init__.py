"""Biased matrix factorisation: the model (`model`), its compiled SGD kernels (`kernels`),
its step functions for the `Trainer` (`steps`), its gradient-rollback update log (`log`,
`log_kernels`) and its explanation estimates (`explain`)."""

from recsys.models.mf.model import MatrixFactorization, MFConfig

__all__ = ["MFConfig", "MatrixFactorization"]
