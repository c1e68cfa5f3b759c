"""Building blocks with no knowledge of checkpoints or model versions."""
