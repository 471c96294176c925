"""The project's own ranking MF (``rank-mf``): BPR or sampled-softmax loss trained by the
shared `Trainer` and optimizers (`model`), its gradient-rollback update log (`log`) and its
explanations of scores by training interactions (`explain`)."""

from recsys.models.rankmf.model import RankingMF, RankMFConfig

__all__ = ["RankMFConfig", "RankingMF"]
