"""The one error type of the data package."""

from fmjax.errors import UserError


class DataError(UserError):
  """A data problem the user can fix, reported as one line naming what to change."""
