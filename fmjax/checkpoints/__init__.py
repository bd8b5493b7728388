"""Checkpoints: the Orbax store (the one writer), locating and restoring, resume checks, the workdir lock."""
