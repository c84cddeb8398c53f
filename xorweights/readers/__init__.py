"""Readers: open checkpoints in every format users have as tensor references, and the dtypes."""
