"""Serving: scoring and the auction, prediction logging, the A/B experiment (see ``scorer.py``)."""
