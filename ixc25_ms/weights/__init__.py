"""Checkpoint I/O in one place: safetensors, dtype tags, weight sources per layout, key table, spec, loader."""


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, corrupt or inconsistent (the message names file and key)."""
