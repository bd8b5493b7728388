"""The process around a run: paths (local and remote), distributed start, GPU flags, huge pages."""
