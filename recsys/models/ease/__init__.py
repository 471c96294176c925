"""EASE, the item-item ranking model in closed form: the model and its config (`model`), the
users' live interaction rows it scores from (`rows`) and its exact explainer (`explain`)."""

from recsys.models.ease.model import EASE, EASEConfig

__all__ = ["EASE", "EASEConfig"]
