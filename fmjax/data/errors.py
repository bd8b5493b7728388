"""The one error type of the data package."""


class DataError(ValueError):
  """A data problem the user can fix, reported as one line naming what to change."""
