"""The evidence-chain model (REC): the model (`model`), its chain sampler (`chains`), its
compiled CPU sampling and inference kernels (`kernels`) and its explanations (`explain`)."""

from recsys.models.rec.model import EvidenceChainModel, RECConfig

__all__ = ["EvidenceChainModel", "RECConfig"]
