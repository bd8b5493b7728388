"""The configuration error: what a user must fix in a config file or a `--config.*` flag."""

from __future__ import annotations

from fmjax.errors import UserError


class ConfigError(UserError):
  """A configuration problem, reported to the user as one line."""
