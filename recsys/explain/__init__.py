from recsys.explain.rollback import RollbackCallback, RollbackLog, append_ratings, online_sgd

__all__ = ["RollbackCallback", "RollbackLog", "append_ratings", "online_sgd"]
