"""recsys: rating prediction explained by the training ratings behind it."""
