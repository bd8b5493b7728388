"""The one-line errors of fmjax's lm-eval integration, and the check that lm-eval is installed (no jax here)."""

from __future__ import annotations

import importlib.util

from fmjax.errors import UserError

LM_EVAL_VERSION = '0.4.13'
INSTALL = f'pip install "fmjax[eval]" (lm-eval=={LM_EVAL_VERSION} and accelerate)'


class LmEvalError(UserError):
  """A problem with an lm-eval run on an fmjax checkpoint."""


class LmEvalMissing(LmEvalError):
  """lm-eval is not installed."""


class UnknownTask(LmEvalError):
  """A task name that no task directory defines."""


class TaskDataMissing(LmEvalError):
  """A task whose data files cannot be found or read."""


class BackendArgumentError(LmEvalError):
  """A bad model argument or request for the fmjax backend."""


def require_lm_eval() -> None:
  """LmEvalMissing (one line: how to install it) unless lm_eval can be imported."""
  try:
    found = importlib.util.find_spec('lm_eval') is not None
  except (ImportError, ValueError):
    found = False
  if not found:
    raise LmEvalMissing(f'lm-eval is not installed: {INSTALL}')
