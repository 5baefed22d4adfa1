"""label_joiner."""
