"""Checkpoint formats: the only place that knows key names and file layouts."""
