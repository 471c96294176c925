from recsys.explain.rollback import (
    CompactRollbackLog,
    RollbackCallback,
    RollbackLog,
    append_ratings,
    online_sgd,
)

__all__ = ["CompactRollbackLog", "RollbackCallback", "RollbackLog", "append_ratings", "online_sgd"]
