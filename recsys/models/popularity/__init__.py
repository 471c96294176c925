"""The most-popular ranker (`model`): the non-personalised baseline ranking."""

from recsys.models.popularity.model import PopularityConfig, PopularityRanker

__all__ = ["PopularityConfig", "PopularityRanker"]
