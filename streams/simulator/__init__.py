"""Ads traffic simulator with known ground truth (``python -m streams.simulator --help``)."""
