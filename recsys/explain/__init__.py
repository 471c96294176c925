"""Explanations of predictions by the training ratings behind them: the `RollbackCallback`
that records a model's update log while it trains, and the queries that turn logs and
models into explanations (`recsys.explain.influence`)."""

from recsys.explain.rollback import RollbackCallback

__all__ = ["RollbackCallback"]
