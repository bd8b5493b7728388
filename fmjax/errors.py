"""The base of every error a user can fix: the CLIs print it as one line and exit with code 2.

Each module keeps its own subclass (ConfigError, CheckpointError, DataError, ...) so callers can
catch what they expect; `fmjax.cli` catches them all through this one base.
"""


class UserError(ValueError):
  """A problem with the user's input (a flag, a file, a config value), reported as one line."""
