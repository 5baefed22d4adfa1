"""The Feast repository (definitions in features.py) and the project's online read and write paths."""
